"""Weight sync through Ray's object store vs a torch.distributed broadcast, side by side.

For the tiny (~1M) and small (~100M) presets, synchronous (max_staleness 0) and async (2, one
thread each for rollout and trainer): one GRPO run per ``orchestration.weight_sync`` mode, the same
seed, in the same Ray actor processes (orchestration.grpo.Actors), the modes' order alternating.
Per step after the first: the worker's sync seconds (receive or read, load into vLLM, verify),
the step seconds and samples/s. Both modes must give the same rewards (checked, as in
tests/orchestration/test_grpo_loop.py). On a CPU the broadcast is gloo over loopback TCP where the
object store maps shared memory: this measures what that path costs where it cannot win. Its case
is a GPU cluster (NCCL, the weights never leave the devices), which is not measured here.

    python benchmarks/weight_sync.py [--quick]

Writes benchmarks/results/weight_sync.json (a list of {model, max_staleness, weight_sync,
sync_s, step_s, samples_per_s, ...}; medians over the steps after the first) and a PNG.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from common import RESULTS, ROOT, write_results  # noqa: E402  (benchmarks/common.py)

sys.path.insert(0, str(ROOT))
MODES = ("object_store", "broadcast")
CELLS = {  # model: (preset, overrides, steps, quick steps)
    "tiny": ("configs/tiny.yaml", [], 12, 4),
    "small": ("configs/small.yaml", ["algorithm.prompts_per_step=4"], 6, 3),
}
ASYNC = ["trainer.threads=1", "rollout.threads=1", "orchestration.adaptive_in_flight=false"]


def run(actors, model: str, staleness: int, mode: str, quick: bool, run_dir: Path) -> dict:
    from orchestration.config import load_config
    from orchestration.grpo import main
    preset, overrides, steps, quick_steps = CELLS[model]
    config = load_config(preset, [*overrides, *(ASYNC if staleness else []), f"orchestration.max_staleness={staleness}",
                                  f"orchestration.weight_sync={mode}",
                                  f"orchestration.steps={quick_steps if quick else steps}",
                                  f"logging.dir={run_dir}", "logging.tensorboard=false"])
    history = main(config, progress=False, actors=actors)
    timed = history[1:]  # step 0: first-call warm-up, and no sync measured yet
    median = lambda k: statistics.median(h[k] for h in timed)  # noqa: E731
    samples = config.algorithm.prompts_per_step * config.rollout.n
    return {"model": model, "max_staleness": staleness, "weight_sync": mode, "steps": len(history),
            "sync_s": median("sync_s"), "step_s": median("step_s"), "samples_per_s": samples / median("step_s"),
            "update_s": median("update_s"), "rollout_s": median("rollout_s"),
            "sync_bytes": timed[-1]["sync_bytes"], "sync_probe_diff_max": max(h["sync_probe_diff"] for h in timed),
            "rewards": [h["reward"] for h in history]}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = sorted({(r["model"], r["max_staleness"]) for r in rows}, key=lambda c: (c[0] != "tiny", c[1]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{m}\nstaleness {s}" for m, s in cells]
    value = lambda c, mode, key: next(r[key] for r in rows  # noqa: E731
                                      if (r["model"], r["max_staleness"]) == c and r["weight_sync"] == mode)
    for j, mode in enumerate(MODES):
        axes[0].bar([i + 0.4 * j for i in range(len(cells))], [value(c, mode, "sync_s") for c in cells], width=0.4,
                    label=mode)
    axes[0].set_xticks([i + 0.2 for i in range(len(cells))], labels)
    axes[0].set_ylabel("worker sync s / step (median)")
    axes[1].bar(range(len(cells)), [value(c, "broadcast", "samples_per_s") / value(c, "object_store", "samples_per_s")
                                    for c in cells], color="tab:orange")
    axes[1].axhline(1.0, color="gray", lw=1)
    axes[1].set_xticks(range(len(cells)), labels)
    axes[1].set_ylabel("samples/s, broadcast / object store")
    axes[0].legend()
    fig.suptitle("orchestration.weight_sync on 2 CPU cores (gloo broadcast vs Ray object store)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, 4 steps a run")
    parser.add_argument("--out", default=str(RESULTS / "weight_sync.json"))
    args = parser.parse_args()
    import ray

    from orchestration.grpo import Actors
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in (["tiny"] if args.quick else list(CELLS)):
            actors = Actors()
            try:
                for i, staleness in enumerate((0, 2)):
                    for mode in (MODES if i % 2 == 0 else MODES[::-1]):
                        row = run(actors, model, staleness, mode, args.quick, Path(tmp) / f"{model}-{staleness}-{mode}")
                        print(f"{model} staleness {staleness} {mode}: sync {row['sync_s']:.3f} s, "
                              f"step {row['step_s']:.3f} s, {row['samples_per_s']:.1f} samples/s", flush=True)
                        rows.append(row)
            finally:
                actors.close()
                ray.shutdown()
    for model, staleness in sorted({(r["model"], r["max_staleness"]) for r in rows}):
        a, b = (next(r for r in rows if (r["model"], r["max_staleness"], r["weight_sync"]) == (model, staleness, m))
                for m in MODES)
        if a["rewards"] != b["rewards"]:
            raise SystemExit(f"{model} staleness {staleness}: the two sync modes gave different rewards "
                             f"({a['rewards']} vs {b['rewards']}): a sync mode changed what was learned")
        print(f"{model} staleness {staleness}: broadcast / object store: sync {b['sync_s'] / a['sync_s']:.2f}x, "
              f"samples/s {b['samples_per_s'] / a['samples_per_s']:.2f}x")
    print(write_results(rows, args.out, plot))


if __name__ == "__main__":
    main()
