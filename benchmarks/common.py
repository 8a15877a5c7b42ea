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
