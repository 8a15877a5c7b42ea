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
    """Resident memory (GiB) of each worker and trainer rank of an orchestration.grpo.Actors."""
    import ray
    rss = lambda self: __import__("psutil").Process().memory_info().rss / 2**30  # noqa: E731
    return ray.get([a.__ray_call__.remote(rss) for a in (*actors.workers, *actors.trainers)])
