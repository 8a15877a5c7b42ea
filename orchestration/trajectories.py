"""The trajectory log: every trained response as one row of ``<logging.dir>/trajectories.parquet``.

Columns: step (the trainer step that used it), prompt_index, prompt, completion,
response_ids, behaviour_logprobs, reward, sampled_version, finish_reason. One Parquet row
group per step, so a run that stops early keeps every step written so far.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from policy.batch import Group

SCHEMA = pa.schema([
    ("step", pa.int64()), ("prompt_index", pa.int64()), ("prompt", pa.string()), ("completion", pa.string()),
    ("response_ids", pa.list_(pa.int32())), ("behaviour_logprobs", pa.list_(pa.float32())),
    ("reward", pa.float64()), ("sampled_version", pa.int64()), ("finish_reason", pa.string()),
])


class TrajectoryLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._writer = pq.ParquetWriter(str(self.path), SCHEMA)

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
