"""The trajectory log: every trained response as one row of ``<logging.dir>/trajectories.parquet``.

Columns: step (the trainer step that used it), prompt_index, prompt, completion,
response_ids, behaviour_logprobs, reward, sampled_version, finish_reason. One Parquet row
group per step, so a run that stops early keeps every step written so far, and a file is
readable once closed: a run starts ``trajectories.from-step<N>.parquet`` at each periodic
checkpoint (step N), so a run killed without closing its log loses only the rows since its last
checkpoint, which a resume from it trains again. A run resumed into
the same directory writes ``trajectories.from-step<N>.parquet`` and first drops the rows of
steps >= N from the earlier files (:func:`drop_steps_from`), as ``metrics.jsonl`` drops their
records: the resumed run trains those steps again, so each trained response is in the log once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from policy.batch import Group

log = logging.getLogger("rlaccel")

SCHEMA = pa.schema([
    ("step", pa.int64()), ("prompt_index", pa.int64()), ("prompt", pa.string()), ("completion", pa.string()),
    ("response_ids", pa.list_(pa.int32())), ("behaviour_logprobs", pa.list_(pa.float32())),
    ("reward", pa.float64()), ("sampled_version", pa.int64()), ("finish_reason", pa.string()),
])


class TrajectoryLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._writer = pq.ParquetWriter(str(self.path), SCHEMA)

    @classmethod
    def from_step(cls, run_dir: Path, step: int) -> TrajectoryLog:
        """The log of a run's steps from ``step`` on: ``trajectories.parquet`` from the start,
        ``trajectories.from-step<N>.parquet`` from a resume or a periodic checkpoint."""
        return cls(run_dir / ("trajectories.parquet" if step == 0 else f"trajectories.from-step{step}.parquet"))

    @staticmethod
    def table(step: int, groups: list[Group]) -> pa.Table:
        """The rows :meth:`write` appends (built while the trainer trains, written once it has)."""
        rows = [{"step": step, "prompt_index": g.index, "prompt": g.prompt, "completion": c, "response_ids": r,
                 "behaviour_logprobs": lp, "reward": rw, "sampled_version": g.version, "finish_reason": f}
                for g in groups
                for c, r, lp, rw, f in zip(g.completions, g.responses, g.behaviour_logprobs, g.rewards,
                                           g.finish_reasons)]
        return pa.Table.from_pylist(rows, schema=SCHEMA)

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table)

    def close(self) -> None:
        self._writer.close()


def drop_steps_from(run_dir: str | Path, step: int) -> int:
    """Remove the rows of steps >= ``step`` from ``run_dir``'s trajectory files, a row group at a
    time (a file left empty is deleted; each is replaced only once its rewrite is complete).
    A file without its footer (a run killed before it closed its log) cannot be read: it is kept
    as ``<name>.unreadable``, with a warning. Returns the number of rows dropped."""
    dropped = 0
    for path in sorted(Path(run_dir).glob("trajectories*.parquet")):
        try:
            file = pq.ParquetFile(path)
            groups = [file.read_row_group(i, columns=["step"]).column("step") for i in range(file.num_row_groups)]
        except pa.ArrowInvalid as exc:  # no footer (or an empty file); an I/O error is raised
            aside = path.with_name(path.name + ".unreadable")
            n = 2
            while aside.exists():
                aside, n = path.with_name(f"{path.name}.unreadable-{n}"), n + 1
            path.rename(aside)
            log.warning("%s cannot be read (%s; the run that wrote it was killed before closing it?): kept as %s, "
                        "its rows are not in the log", path, exc, aside)
            continue
        later = [int(pc.sum(pc.greater_equal(steps, step)).as_py() or 0) for steps in groups]
        if not sum(later):
            continue
        dropped += sum(later)
        if sum(later) == file.metadata.num_rows:
            path.unlink()
            continue
        tmp = path.with_name(path.name + ".tmp")
        with pq.ParquetWriter(str(tmp), file.schema_arrow) as writer:
            for i, n in enumerate(later):
                if n == 0:
                    writer.write_table(file.read_row_group(i))
                elif n < len(groups[i]):
                    table = file.read_row_group(i)
                    writer.write_table(table.filter(pc.less(table.column("step"), step)))
        os.replace(tmp, path)
    return dropped
