"""Lossless checkpoints of the GRPO loop.

A checkpoint directory holds the trainer's state (policy weights in Hugging Face format,
tokenizer, optimizer, policy version: ``PolicyTrainer.save_checkpoint``) and
``loop_state.json``: the next step, the data cursor (epoch, position), the rollout counter
that seeds sampling, the regenerated-group count, the batches still in flight (queued on the
workers, not yet trained on: their rows' indices) with their seeds, and what the cursor
counts in (the number of rows, a hash of their prompts and answers, the seed of their order).
It is written under a temporary name and renamed, so a crash never leaves a half-written
checkpoint.

A run writes one every ``orchestration.checkpoint_every`` steps, one at its end
(``<logging.dir>/checkpoint``: train on with more ``orchestration.steps``), and one when it
stops on an error or Ctrl-C (``checkpoint-interrupted``): before the step's update with the
step's batch queued again, during it once the update has ended. An update that itself failed
leaves the weights only: it may have applied some of its mini-batches.

On resume the trainer reloads weights and optimizer, the workers start from the
checkpoint's weights, the data cursor continues, and the in-flight batches are sampled
again first: every prompt is trained on exactly once per epoch, none lost, none doubled.
No other random state exists: sampling is seeded per request from the counters above.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import xxhash

from orchestration.config import ConfigError
from orchestration.data import DataError

STATE_FILE = "loop_state.json"


def save(directory: Path, trainer, state: dict | None, timeout: float | None = None) -> Path:
    """The trainer's state and the loop's ``state`` (None: the trainer's only, not resumable) in
    ``directory``, which is replaced only once the new one is complete."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save(str(tmp), timeout=timeout)  # every rank: weights from rank 0, optimizer partitions from each
    if state is not None:
        (tmp / STATE_FILE).write_text(json.dumps(state))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory


def load(directory: str | Path) -> dict:
    """The loop state of the checkpoint in ``directory`` (``orchestration.resume``)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"orchestration.resume={str(directory)!r} is not an rlaccel checkpoint directory (no "
                          f"{STATE_FILE}); give <logging.dir>/checkpoints/step-N, <logging.dir>/checkpoint or "
                          f"<logging.dir>/checkpoint-interrupted")
    return json.loads(path.read_text())


def data_identity(rows: list[dict], seed: int) -> dict:
    """What a checkpoint's data cursor and in-flight indices count in."""
    h = xxhash.xxh3_64()
    for row in rows:
        h.update(json.dumps([row["prompt"], row["answer"]]).encode())
    return {"rows": len(rows), "xxh3": h.hexdigest(), "seed": seed}


def check_data(state: dict, identity: dict, directory) -> None:
    """Refuse a resume whose data or data order differs from the checkpoint's: its cursor and
    in-flight indices would point at other prompts (prompts trained twice or never)."""
    saved = state.get("data")
    if saved is None:  # a checkpoint from before this was recorded
        return
    if saved["seed"] != identity["seed"]:
        raise ConfigError(f"orchestration.seed={identity['seed']} differs from the checkpoint's {saved['seed']} "
                          f"({directory}): the seed orders the prompts, so the epoch in progress would train some "
                          f"twice and skip others; resume with orchestration.seed={saved['seed']}")
    if (saved["rows"], saved["xxh3"]) != (identity["rows"], identity["xxh3"]):
        raise DataError(f"the prompts differ from those of the checkpoint {directory} ({identity['rows']} rows "
                        f"against {saved['rows']}, or the same number with other prompts or answers): resume "
                        f"with the run's data settings (data.*, in its config.yaml), or start a new run from "
                        f"its weights (model.path={directory})")


def batch_indices(batch: list) -> list[int]:
    """A checkpoint's in-flight batch as row indices (older checkpoints kept [index, row] pairs)."""
    return [item if isinstance(item, int) else item[0] for item in batch]
