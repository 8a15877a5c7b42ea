"""``orchestration.keep_freed_memory`` on and off, side by side: GRPO runs on the 100M preset.

The setting starts the rollout workers and trainer ranks with glibc malloc keeping the memory they
free (orchestration.actors.KEEP_FREED_MEMORY) instead of returning it to the OS. Its case is the
weight sync into a CPU vLLM engine, which re-allocates the policy's size every step (the
re-packed linear kernels): memory back from the OS arrives as fresh pages, zeroed and faulted in.
The runs: small preset, 4 prompts x 8 a step, shared-prompt training, max_staleness 2 with one
thread each for rollout and trainer (rlaccel_all of benchmarks/e2e_vs_trl.py without the drafter),
the same seed; on / off in the order ABBA BAAB (the machine's speed drifts over minutes), new Ray
actor processes at every switch (the setting is read at a process's start). Per run, after the
first step: samples/s (all steps' wall time) and the medians of the worker's sync, the update and
the rollout seconds; each actor's resident memory at the end. Every run must give the same rewards
(checked: the setting changes no number).

    python benchmarks/keep_freed_memory.py [--quick]

Writes benchmarks/results/keep_freed_memory.json ({runs: [...], summary: {...}}) and a PNG.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from common import RESULTS, ROOT, machine, resident_gib, write_results  # noqa: E402  (benchmarks/common.py)

sys.path.insert(0, str(ROOT))
ORDER = (True, False, False, True, False, True, True, False)
OVERRIDES = ["algorithm.prompts_per_step=4", "orchestration.max_staleness=2", "trainer.shared_prompt=true",
             "trainer.threads=1", "rollout.threads=1", "logging.tensorboard=false"]


def run(actors, keep: bool, steps: int, run_dir: Path) -> dict:
    from orchestration.config import load_config
    from orchestration.grpo import main
    config = load_config("configs/small.yaml", [*OVERRIDES, f"orchestration.steps={steps}",
                                                f"orchestration.keep_freed_memory={keep}", f"logging.dir={run_dir}"])
    history = main(config, progress=False, actors=actors)
    timed = history[1:]  # step 0: first-call warm-up, and no sync measured yet
    median = lambda k: statistics.median(h[k] for h in timed)  # noqa: E731
    samples = config.algorithm.prompts_per_step * config.rollout.n
    return {"keep_freed_memory": keep, "steps": len(history),
            "samples_per_s": samples * len(timed) / sum(h["step_s"] for h in timed),
            "sync_s": median("sync_s"), "update_s": median("update_s"), "rollout_s": median("rollout_s"),
            "rss_gib": resident_gib(actors), "rewards": [h["reward"] for h in history]}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = result["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for keep, color in ((True, "tab:blue"), (False, "tab:gray")):
        at = [i for i, r in enumerate(runs) if r["keep_freed_memory"] == keep]
        label = "keep_freed_memory=" + str(keep).lower()
        axes[0].bar(at, [runs[i]["samples_per_s"] for i in at], color=color, label=label)
        axes[1].bar(at, [runs[i]["sync_s"] for i in at], color=color, label=label)
    for ax, ylabel in zip(axes, ("samples/s", "worker sync s / step (median)")):
        ax.set_xticks(range(len(runs)), [str(i + 1) for i in range(len(runs))])
        ax.set_xlabel("run, in the order run")
        ax.set_ylabel(ylabel)
    axes[0].legend(loc="lower right")
    s = result["summary"]
    fig.suptitle(f"100M preset, async + shared prompt, 2 CPU cores: median samples/s {s['samples_per_s_on']:.1f} "
                 f"vs {s['samples_per_s_off']:.1f} ({s['samples_per_s_ratio']:.2f}x)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 runs (ABBA) of 3 steps")
    parser.add_argument("--out", default=str(RESULTS / "keep_freed_memory.json"))
    args = parser.parse_args()
    import ray

    from orchestration.actors import Actors
    order, steps = (ORDER[:4], 3) if args.quick else (ORDER, 7)
    runs = []
    actors = Actors()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i, keep in enumerate(order):
                runs.append(run(actors, keep, steps, Path(tmp) / f"run-{i}"))
                r = runs[-1]
                print(f"run {i + 1}/{len(order)} keep_freed_memory={keep}: {r['samples_per_s']:.2f} samples/s, sync "
                      f"{r['sync_s']:.3f} s, update {r['update_s']:.3f} s, rollout {r['rollout_s']:.3f} s, resident "
                      f"{'/'.join(f'{g:.2f}' for g in r['rss_gib'])} GiB", flush=True)
    finally:
        actors.close()
        ray.shutdown()
    if len({tuple(r["rewards"]) for r in runs}) != 1:
        raise SystemExit(f"the runs gave different rewards ({[r['rewards'] for r in runs]}): "
                         "the setting changed what was learned")
    median = lambda keep, k: statistics.median(r[k] for r in runs if r["keep_freed_memory"] == keep)  # noqa: E731
    summary = {f"{k}_{'on' if keep else 'off'}": median(keep, k)
               for k in ("samples_per_s", "sync_s", "update_s", "rollout_s") for keep in (True, False)}
    summary["samples_per_s_ratio"] = summary["samples_per_s_on"] / summary["samples_per_s_off"]
    summary["sync_s_ratio"] = summary["sync_s_on"] / summary["sync_s_off"]
    print("medians: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    print(write_results({"machine": machine(), "runs": runs, "summary": summary}, args.out, plot))


if __name__ == "__main__":
    main()
