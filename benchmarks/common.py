"""What every benchmark script shares: where results go and how they are written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def write_results(rows: list[dict] | dict, out: str | Path, plot: Callable[..., None]) -> Path:
    """rows as JSON at ``out`` and the plot beside it as PNG."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    plot(rows, out.with_suffix(".png"))
    return out


def machine() -> dict:
    """What ran a benchmark: CPU model, family and flags that select kernels, cores. Runs of the same
    seed can differ between machines from the first step (numerics, random streams), so a
    comparison across runs should check this first."""
    import os
    import platform
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        lines = Path("/proc/cpuinfo").read_text().split("\n\n")[0].split("\n")  # the first CPU's block
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
    except OSError:
        return info
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    info.update(cpu=fields.get("model name", info["cpu"]), cpu_family=fields.get("cpu family"),
                cpu_model=fields.get("model"),
                simd=sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma")))
    return info


def resident_gib(actors) -> list[float]:
    """Resident memory (GiB) of each worker and trainer rank of an orchestration.actors.Actors."""
    import ray
    rss = lambda self: __import__("psutil").Process().memory_info().rss / 2**30  # noqa: E731
    return ray.get([a.__ray_call__.remote(rss) for a in (*actors.workers, *actors.trainers)])


def with_run_allocator() -> None:
    """Run this script again (same arguments) with the allocator settings a run's CPU workers and
    trainer ranks get (``orchestration.keep_freed_memory``), unless it already has them: glibc reads
    them at start, and without them fresh pages weigh on every 100M-preset step and sync."""
    import os
    import sys
    from orchestration.actors import KEEP_FREED_MEMORY
    if any(os.environ.get(k) != v for k, v in KEEP_FREED_MEMORY.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **KEEP_FREED_MEMORY})


def alternating(variants: list[str], rounds: int) -> list[str]:
    """Each variant ``rounds`` times: two in the order A B B A A B ..., more round-robin."""
    order = [v for _ in range(rounds) for v in variants]
    if len(variants) == 2:
        order = [order[i ^ 1] if (i // 2) % 2 else order[i] for i in range(len(order))]
    return order


def plot_medians(path, labels: list[str], samples: list[list[float]], xlabel: str, title: str,
                 colours: list[str] | None = None) -> None:
    """Horizontal bars of each variant's median (its first sample, a warm-up, left out) with every
    sample after the first as a dot."""
    import statistics

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 1.4 + 0.35 * len(labels)))
    ax.barh(labels, [statistics.median(t[1:]) for t in samples], color=colours)
    for i, t in enumerate(samples):
        ax.plot(t[1:], [i] * (len(t) - 1), "k.", ms=3)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
