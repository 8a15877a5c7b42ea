"""Weight sync through Ray's object store vs a torch.distributed broadcast, and with vs without
``orchestration.keep_freed_memory``, side by side.

For the tiny (~1M) and small (~100M) presets, synchronous (max_staleness 0) and async (2, one
thread each for rollout and trainer): one GRPO run per variant, the same seed, the variants'
order alternating; variants with the same memory setting share their Ray actor processes
(orchestration.actors.Actors; the setting is fixed at a process's start). Variants:
  object_store            the default (Ray's object store, freed memory kept)
  broadcast               orchestration.weight_sync=broadcast
  object_store_mem_back   orchestration.keep_freed_memory=false (glibc's default: large blocks
                          freed back to the OS and faulted in again, zeroed, at the next sync)
Per step after the first: the worker's sync seconds (receive or read, load into vLLM, verify),
the step seconds and samples/s; each actor's resident memory after the run. All variants must
give the same rewards (checked, as in tests/orchestration/test_grpo_loop.py). On a CPU the
broadcast is gloo over loopback TCP where the object store maps shared memory: this measures what
that path costs where it cannot win. Its case is a GPU cluster (NCCL, the weights never leave the
devices), which is not measured here.

    python benchmarks/weight_sync.py [--quick]

Writes benchmarks/results/weight_sync.json (a list of {model, max_staleness, variant, weight_sync,
keep_freed_memory, sync_s, step_s, samples_per_s, rss_gib, ...}; medians over the steps after the
first) and a PNG.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from common import RESULTS, ROOT, resident_gib, write_results  # noqa: E402  (benchmarks/common.py)

sys.path.insert(0, str(ROOT))
VARIANTS = {  # name: (orchestration.weight_sync, orchestration.keep_freed_memory)
    "object_store": ("object_store", True),
    "broadcast": ("broadcast", True),
    "object_store_mem_back": ("object_store", False),
}
CELLS = {  # model: (preset, overrides, steps, quick steps)
    "tiny": ("configs/tiny.yaml", [], 12, 4),
    "small": ("configs/small.yaml", ["algorithm.prompts_per_step=4"], 6, 3),
}
ASYNC = ["trainer.threads=1", "rollout.threads=1", "orchestration.adaptive_in_flight=false"]


def run(actors, model: str, staleness: int, variant: str, quick: bool, run_dir: Path) -> dict:
    from orchestration.config import load_config
    from orchestration.grpo import main
    preset, overrides, steps, quick_steps = CELLS[model]
    mode, keep = VARIANTS[variant]
    config = load_config(preset, [*overrides, *(ASYNC if staleness else []), f"orchestration.max_staleness={staleness}",
                                  f"orchestration.weight_sync={mode}", f"orchestration.keep_freed_memory={keep}",
                                  f"orchestration.steps={quick_steps if quick else steps}",
                                  f"logging.dir={run_dir}", "logging.tensorboard=false",
                                  "rollout.sync_probe_every=1"])  # every sync probed, as when its results were recorded
    history = main(config, progress=False, actors=actors)
    timed = history[1:]  # step 0: first-call warm-up, and no sync measured yet
    median = lambda k: statistics.median(h[k] for h in timed)  # noqa: E731
    samples = config.algorithm.prompts_per_step * config.rollout.n
    return {"model": model, "max_staleness": staleness, "variant": variant, "weight_sync": mode,
            "keep_freed_memory": keep, "steps": len(history), "rss_gib": resident_gib(actors),
            "sync_s": median("sync_s"), "step_s": median("step_s"), "samples_per_s": samples / median("step_s"),
            "update_s": median("update_s"), "rollout_s": median("rollout_s"),
            "sync_bytes": timed[-1]["sync_bytes"], "sync_probe_diff_max": max(h["sync_probe_diff"] for h in timed),
            "rewards": [h["reward"] for h in history]}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = sorted({(r["model"], r["max_staleness"]) for r in rows}, key=lambda c: (c[0] != "tiny", c[1]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    labels = [f"{m}\nstaleness {s}" for m, s in cells]
    value = lambda c, variant, key: next(r[key] for r in rows  # noqa: E731
                                         if (r["model"], r["max_staleness"]) == c and r["variant"] == variant)
    width = 0.8 / len(VARIANTS)
    for j, variant in enumerate(VARIANTS):
        at = [i + width * j for i in range(len(cells))]
        axes[0].bar(at, [value(c, variant, "sync_s") for c in cells], width=width, label=variant)
        axes[1].bar(at, [value(c, variant, "samples_per_s") / value(c, "object_store", "samples_per_s")
                         for c in cells], width=width, label=variant)
    for ax, ylabel in zip(axes, ("worker sync s / step (median)", "samples/s vs the default (object_store)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cells))], labels)
        ax.set_ylabel(ylabel)
    axes[1].axhline(1.0, color="gray", lw=1)
    axes[0].legend()
    fig.suptitle("Weight sync on 2 CPU cores: object store, gloo broadcast, memory freed back to the OS")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, 4 steps a run")
    parser.add_argument("--out", default=str(RESULTS / "weight_sync.json"))
    args = parser.parse_args()
    import ray

    from orchestration.actors import Actors
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in (["tiny"] if args.quick else list(CELLS)):
            actors = Actors()
            try:
                for i, staleness in enumerate((0, 2)):
                    for variant in (list(VARIANTS) if i % 2 == 0 else list(VARIANTS)[::-1]):
                        row = run(actors, model, staleness, variant, args.quick,
                                  Path(tmp) / f"{model}-{staleness}-{variant}")
                        print(f"{model} staleness {staleness} {variant}: sync {row['sync_s']:.3f} s, "
                              f"step {row['step_s']:.3f} s, {row['samples_per_s']:.1f} samples/s, "
                              f"resident {'/'.join(f'{g:.2f}' for g in row['rss_gib'])} GiB", flush=True)
                        rows.append(row)
            finally:
                actors.close()
                ray.shutdown()
    for model, staleness in sorted({(r["model"], r["max_staleness"]) for r in rows}):
        cell = {r["variant"]: r for r in rows if (r["model"], r["max_staleness"]) == (model, staleness)}
        base = cell["object_store"]
        for variant, row in cell.items():
            if row["rewards"] != base["rewards"]:
                raise SystemExit(f"{model} staleness {staleness}: {variant} gave other rewards than object_store "
                                 f"({row['rewards']} vs {base['rewards']}): a variant changed what was learned")
            if variant != "object_store":
                print(f"{model} staleness {staleness}: {variant} / object_store: sync "
                      f"{row['sync_s'] / base['sync_s']:.2f}x, samples/s {row['samples_per_s'] / base['samples_per_s']:.2f}x")
    print(write_results(rows, args.out, plot))


if __name__ == "__main__":
    main()
