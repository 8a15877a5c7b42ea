"""Lossless checkpoints of the GRPO loop.

A checkpoint directory holds the trainer's state (policy weights in Hugging Face format,
tokenizer, optimizer, policy version: ``PolicyTrainer.save_checkpoint``) and
``loop_state.json``: the next step, the data cursor (epoch, position), the rollout counter
that seeds sampling, the regenerated-group count, and the batches still in flight (queued
on the workers, not yet trained on) with their seeds. It is written under a temporary name
and renamed, so a crash never leaves a half-written checkpoint.

On resume the trainer reloads weights and optimizer, the workers start from the
checkpoint's weights, the data cursor continues, and the in-flight batches are sampled
again first: every prompt is trained on exactly once per epoch, none lost, none doubled.
No other random state exists: sampling is seeded per request from the counters above.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

STATE_FILE = "loop_state.json"


def save(directory: Path, trainer, state: dict) -> Path:
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save(str(tmp))  # every rank: weights from rank 0, optimizer partitions from each
    (tmp / STATE_FILE).write_text(json.dumps(state))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory


def load(directory: str | Path) -> dict:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an rlaccel checkpoint (no {STATE_FILE}); checkpoints are "
                                f"written to <logging.dir>/checkpoints/step-N with orchestration.checkpoint_every")
    return json.loads(path.read_text())
