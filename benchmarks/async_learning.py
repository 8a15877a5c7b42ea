"""What async costs in learning per sample, over seeds: synchronous against max_staleness = 1.

The end-to-end benchmark (e2e_vs_trl.py) finds that rlaccel_all needs more samples to the
tiny-short target than TRL and rlaccel_plain, and its drafter makes each of its runs draw
differently. Here the drafter is left out, so every run is deterministic on one machine and a
difference between variants is the variants', seed by seed:

  sync         shared-prompt training and zero-advantage skipping, max_staleness = 0: exact in
               effect, it learns per sample as rlaccel_plain does (the e2e run's rlaccel_sync
               without the drafter)
  async        the same with max_staleness = 1, one thread a side (e2e_vs_trl's rlaccel_nospec):
               samples one policy version old, with the decoupled-PPO correction truncated at
               algorithm.is_cap = 2 (the default)
  async_cap10  async with is_cap = 10: whether the truncation is what costs the samples

Each run is the tiny-short cell of e2e_vs_trl.py (its warm-started model, 32 prompts × 8, 80
steps), in one Ray session (the runs share its actor processes, as there).

    python benchmarks/async_learning.py [--seeds 0,1,2,3,4,5] [--quick]

Writes benchmarks/results/async_learning.json ({variant, seed, samples_to: {level: samples},
final_reward, wall_s_to_target, samples_per_s}) and a PNG of each seed's samples to the target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import e2e_vs_trl as e2e  # noqa: E402  (benchmarks/e2e_vs_trl.py: the cell, its runner and systems)
from common import RESULTS, write_results  # noqa: E402
from e2e_results import samples_to, summarize  # noqa: E402

VARIANTS = {
    "sync": ["orchestration.max_staleness=0", "trainer.shared_prompt=true"],
    "async": e2e.RLACCEL["rlaccel_nospec"],
    "async_cap10": [*e2e.RLACCEL["rlaccel_nospec"], "algorithm.is_cap=10"],
}
LEVELS = (0.14, 0.16, 0.18, 0.20, 0.22)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for x, variant in enumerate(VARIANTS):
        hits = [(r["seed"], r["samples_to"][str(LEVELS[-1])]) for r in rows if r["variant"] == variant]
        reached = [n for _, n in hits if n is not None]
        ax.scatter([x] * len(reached), reached, alpha=0.6)
        for seed, n in hits:
            if n is not None:
                ax.annotate(str(seed), (x, n), xytext=(6, 0), textcoords="offset points", fontsize=7)
        if reached:
            ax.hlines(statistics.mean(reached), x - 0.25, x + 0.25, color="black")
    ax.set_xticks(range(len(VARIANTS)), list(VARIANTS))
    ax.set_ylabel(f"samples to reward {LEVELS[-1]} (10-step mean)")
    ax.set_title("tiny preset, short prompts, no drafter: each seed (label) and the mean (bar)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4,5")
    parser.add_argument("--quick", action="store_true", help="one seed, 20 steps (smoke)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    steps = 20 if args.quick else 80
    out = args.out or str(RESULTS / ("async_learning_quick.json" if args.quick else "async_learning.json"))
    e2e.RLACCEL.update(VARIANTS)  # run_rlaccel reads a system's overrides there
    cell = e2e.cells(False)["tiny-short"]
    from orchestration.config import load_config
    c = load_config(cell["preset"], cell["overrides"])
    per_step = c.algorithm.prompts_per_step * c.rollout.n
    model_dir = e2e.prepare_policy(cell)
    from orchestration.actors import Actors
    actors, rows = Actors(), []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in seeds:  # seed by seed, the variants in turn: a drift of the machine hits them alike
            for variant in VARIANTS:
                job = {"system": variant, "seed": seed, "cell": "tiny-short", "preset": cell["preset"],
                       "overrides": cell["overrides"], "steps": steps, "model_dir": model_dir, "head": "",
                       "skip": True, "run_dir": str(tmp / f"{variant}-{seed}"),
                       "result": str(tmp / f"{variant}-{seed}.json")}
                t0 = time.perf_counter()
                with open(tmp / f"{variant}-{seed}.log", "w") as log:
                    failed = e2e.run_here(job, log, actors)
                if failed:
                    tail = (tmp / f"{variant}-{seed}.log").read_text()[-2000:]
                    raise RuntimeError(f"{variant} seed {seed}: {failed}\n{tail}")
                s = summarize(json.loads(Path(job["result"]).read_text())["steps_detail"], LEVELS[-1], per_step)
                row = {"variant": variant, "seed": seed, "overrides": VARIANTS[variant], "steps": steps,
                       "samples_to": {str(level): samples_to(s["curve"], level) for level in LEVELS},
                       "final_reward": s["final_reward"], "wall_s_to_target": s["wall_s_to_target"],
                       "samples_per_s": s["samples_per_s"], "run_s": time.perf_counter() - t0}
                rows.append(row)
                print(f"{variant:12s} seed {seed}: samples to {LEVELS[-1]} {row['samples_to'][str(LEVELS[-1])]}, "
                      f"final reward {row['final_reward']:.3f}, to target {row['wall_s_to_target']} s, "
                      f"{row['samples_per_s']:.0f} samples/s", flush=True)
    e2e.stop_ray(actors)
    for variant in VARIANTS:
        hits = [r["samples_to"][str(LEVELS[-1])] for r in rows if r["variant"] == variant]
        reached = [n for n in hits if n is not None]
        print(f"{variant:12s} samples to {LEVELS[-1]}: mean {statistics.mean(reached) if reached else None} "
              f"({len(reached)} of {len(hits)} seeds reached), per seed {hits}")
    write_results(rows, out, plot)


if __name__ == "__main__":
    main()
