"""The real entry point on the tiny preset: it must learn, and follow the golden curve.

Regenerate the golden file after an intended change of the recipe with
``RLACCEL_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/e2e`` and say why in the commit.
"""

import json
import os
from pathlib import Path

import pytest
import ray

from orchestration.config import load_config
from orchestration.grpo import main

GOLDEN = Path(__file__).parent / "golden" / "tiny_reward_curve.json"
WINDOWS = 10
# Per-window (10% of the run) mean reward may move this far from the golden curve. One
# window averages ~8k binary samples (sampling s.d. < 0.005); the rest is allowed for
# float reassociation on another CPU changing the sampled trajectory.
WINDOW_TOL = 0.04


def window_means(values: list[float], windows: int = WINDOWS) -> list[float]:
    size = len(values) // windows
    return [sum(values[i * size:(i + 1) * size]) / size for i in range(windows)]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("shared_prompt", [False, True], ids=["unpacked", "shared_prompt"])
def test_tiny_preset_learns_and_matches_golden(tmp_path, shared_prompt):
    """The shared-prompt trainer is exact up to float32 rounding, so it must learn the same:
    its reward curve is held to the same golden windows (the sampled trajectories part ways
    after a few steps through rounding, hence the tolerance rather than equality)."""
    config = load_config("configs/tiny.yaml", [f"logging.dir={tmp_path / 'run'}", "logging.tensorboard=false",
                                               f"trainer.shared_prompt={shared_prompt}"])
    try:
        history = main(config, progress=False)
    finally:
        ray.shutdown()
    reward = [h["reward"] for h in history]
    means = window_means(reward)
    assert means[-1] >= 2 * means[0], f"no learning: first 10% {means[0]:.3f}, last 10% {means[-1]:.3f}"
    if os.environ.get("RLACCEL_UPDATE_GOLDEN") and not shared_prompt:
        GOLDEN.write_text(json.dumps({"seed": config.orchestration.seed, "steps": [h["step"] for h in history],
                                      "reward": reward}, indent=1))
    golden = json.loads(GOLDEN.read_text())
    assert golden["seed"] == config.orchestration.seed and golden["steps"] == [h["step"] for h in history]
    diffs = [abs(a - b) for a, b in zip(means, window_means(golden["reward"]))]
    assert max(diffs) <= WINDOW_TOL, f"reward curve left the golden one: windows {means} vs golden, diffs {diffs}"
