"""Async (bounded staleness) vs synchronous GRPO on the tiny preset, same seed, one run.

For orchestration.max_staleness = 0, 1, 2: wall-clock (sum of step times after step 0)
until the 10-step moving average of the reward first reaches the target, the final reward
(mean of the last 10% of steps), and the idle fractions of rollout and trainer. Engine
start-up and step 0 (~12 s of first-call warm-up in vLLM and the trainer, the same for all
settings) are excluded and reported as ``warmup_s``. All runs train with the shared-prompt
trainer (``trainer.shared_prompt=true``), the faster trainer: the loop is trainer-bound
here, so the trainer's speed sets how much overlap can give. With max_staleness = 0 the
trainer gets both cores (its best setting); with overlap each side gets one core, so the
sync run is also measured with one trainer thread to separate the effect of overlap from
that of threads.

    python benchmarks/async_vs_sync.py [--quick]

Writes benchmarks/results/async_vs_sync.json (a list of {max_staleness, wall_s_to_target,
target_reward, final_reward, rollout_idle_frac, trainer_idle_frac, ...}) and a PNG.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import RESULTS, ROOT, write_results  # noqa: E402  (benchmarks/common.py)

sys.path.insert(0, str(ROOT))
TARGET = 0.25
WINDOW = 10


def run(max_staleness: int, trainer_threads: int, steps: int, run_dir: Path) -> dict:
    import ray

    from orchestration.config import load_config
    from orchestration.grpo import main
    config = load_config("configs/tiny.yaml", [f"orchestration.max_staleness={max_staleness}",
                                               "trainer.shared_prompt=true",
                                               f"trainer.threads={trainer_threads}", f"orchestration.steps={steps}",
                                               f"logging.dir={run_dir}", "logging.tensorboard=false"])
    try:
        history = main(config, progress=False)
    finally:
        ray.shutdown()
    reward = [h["reward"] for h in history]
    wall, hit = 0.0, None
    curve = []
    for i, h in enumerate(history):
        wall += h["step_s"] if i > 0 else 0.0
        avg = sum(reward[max(0, i - WINDOW + 1):i + 1]) / min(i + 1, WINDOW)
        curve.append((wall, avg))
        if hit is None and i >= WINDOW - 1 and avg >= TARGET:
            hit = wall
    tail = max(1, len(reward) // 10)
    busy = lambda k: sum(h[k] for h in history[1:])  # noqa: E731
    return {"max_staleness": max_staleness, "trainer_threads": trainer_threads, "wall_s_to_target": hit,
            "target_reward": TARGET, "final_reward": sum(reward[-tail:]) / tail, "wall_s_total": wall,
            "rollout_idle_frac": max(0.0, 1 - busy("rollout_s") / wall),
            "trainer_idle_frac": max(0.0, 1 - busy("update_s") / wall),
            "warmup_s": history[0]["step_s"], "mean_in_flight": sum(h["in_flight"] for h in history) / len(history),
            "steps": len(history), "curve": curve}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, label=f"max_staleness={r['max_staleness']}, trainer threads={r['trainer_threads']}")
    ax.axhline(TARGET, color="grey", ls=":", label=f"target {TARGET}")
    ax.set_xlabel("wall-clock seconds (sum of step times after step 0)")
    ax.set_ylabel(f"reward, {WINDOW}-step moving average")
    ax.set_title("tiny preset, seed 0, 2 CPU cores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 steps per run (smoke)")
    parser.add_argument("--out", default=str(RESULTS / "async_vs_sync.json"))
    args = parser.parse_args()
    steps = 40 if args.quick else 200
    plan = [(0, 2), (0, 1), (1, 1), (2, 1)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s, threads in plan:
            row = run(s, threads, steps, Path(tmp) / f"s{s}t{threads}")
            rows.append(row)
            print(f"max_staleness={s} trainer_threads={threads}: to {TARGET}: {row['wall_s_to_target']} s, "
                  f"total {row['wall_s_total']:.1f} s, final reward {row['final_reward']:.3f}, idle rollout "
                  f"{row['rollout_idle_frac']:.2f} trainer {row['trainer_idle_frac']:.2f}", flush=True)
    sync = min((r for r in rows if r["max_staleness"] == 0 and r["wall_s_to_target"]),
               key=lambda r: r["wall_s_to_target"], default=None)
    for r in rows:  # time to the target reward: the best synchronous run over this one
        r["speedup_vs_best_sync"] = (sync["wall_s_to_target"] / r["wall_s_to_target"]
                                     if sync and r["wall_s_to_target"] else None)
        r["step_speedup_vs_best_sync"] = sync["wall_s_total"] / r["wall_s_total"] if sync else None
        print(f"max_staleness={r['max_staleness']} threads={r['trainer_threads']}: time-to-target speedup "
              f"{r['speedup_vs_best_sync']}, whole-run speedup {r['step_speedup_vs_best_sync']:.2f}")
    write_results(rows, args.out, plot)


if __name__ == "__main__":
    main()
