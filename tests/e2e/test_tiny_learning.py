"""The real entry point on the tiny preset: it must learn, both trainers must learn the same,
and the curve must follow the golden one.

The golden curve belongs to one warm-started model: the warm start (400 SFT steps) amplifies
float rounding, so a CPU with other kernels builds a different model that learns along another
curve (seen: first-window reward 0.157 instead of 0.121, final 0.42 instead of 0.31, with code
that matched the golden on the machine it was recorded on). The golden file records the model's
checksum; on another model the test still holds both trainers to each other and to learning, and
warns that the golden comparison does not apply. Regenerate it after an intended change of the
recipe with ``RLACCEL_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/e2e`` and say why in the
commit.
"""

import json
import os
import warnings
from pathlib import Path

import pytest
import ray

from orchestration.config import load_config
from orchestration.grpo import main
from orchestration.model_prep import prepare_model
from policy.models import load_model, state_checksum

GOLDEN = Path(__file__).parent / "golden" / "tiny_reward_curve.json"
WINDOWS = 10
# Per-window (10% of the run) mean reward may move this far between two runs of the same model.
# One window averages ~8k binary samples (sampling s.d. < 0.005); the rest is allowed for float
# reassociation (the shared-prompt trainer's, another CPU's) changing the sampled trajectory.
WINDOW_TOL = 0.04


def window_means(values: list[float], windows: int = WINDOWS) -> list[float]:
    size = len(values) // windows
    return [sum(values[i * size:(i + 1) * size]) / size for i in range(windows)]


@pytest.mark.slow
@pytest.mark.vllm
def test_tiny_preset_learns_the_same_with_both_trainers_and_matches_golden(tmp_path):
    """The shared-prompt trainer is exact up to float32 rounding, so it must learn the same as the
    unpacked one: their reward curves are held to each other window by window (the sampled
    trajectories part ways after a few steps through rounding, hence a tolerance, not equality)."""
    runs = {}
    for shared_prompt in (False, True):
        config = load_config("configs/tiny.yaml", [f"logging.dir={tmp_path / str(shared_prompt)}",
                                                   "logging.tensorboard=false", f"trainer.shared_prompt={shared_prompt}"])
        try:
            history = main(config, progress=False)
        finally:
            ray.shutdown()
        runs[shared_prompt] = history
    curves = {k: window_means([h["reward"] for h in history]) for k, history in runs.items()}
    for shared_prompt, means in curves.items():
        assert means[-1] >= 2 * means[0], (f"no learning (shared_prompt={shared_prompt}): first 10% {means[0]:.3f}, "
                                           f"last 10% {means[-1]:.3f}")
    diffs = [abs(a - b) for a, b in zip(curves[False], curves[True])]
    assert max(diffs) <= WINDOW_TOL, f"the trainers learned differently: {curves[False]} vs {curves[True]}"

    checksum = state_checksum(load_model(prepare_model(config, progress=False)).state_dict())
    reward = [h["reward"] for h in runs[False]]
    if os.environ.get("RLACCEL_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"seed": config.orchestration.seed, "model_checksum": checksum,
                                      "steps": [h["step"] for h in runs[False]], "reward": reward}, indent=1))
    golden = json.loads(GOLDEN.read_text())
    assert golden["seed"] == config.orchestration.seed and golden["steps"] == [h["step"] for h in runs[False]]
    if golden.get("model_checksum") != checksum:
        warnings.warn(f"the golden reward curve was recorded with warm-started model {golden.get('model_checksum')}, "
                      f"this machine built {checksum}: only the two trainers were compared")
        return
    diffs = [abs(a - b) for a, b in zip(curves[False], window_means(golden["reward"]))]
    assert max(diffs) <= WINDOW_TOL, f"reward curve left the golden one: windows {curves[False]} vs golden, diffs {diffs}"
