"""Lossless checkpoints of the GRPO loop.

A checkpoint directory holds the trainer's state (policy weights in Hugging Face format,
tokenizer, optimizer, policy version: ``PolicyTrainer.save_checkpoint``) and
``loop_state.json``: the next step, the data cursor (epoch, position), the rollout counter
that seeds sampling, the regenerated-group count, the batches still in flight (queued on the
workers, not yet trained on: their rows' indices) with their seeds, the timing that sets how
many are kept in flight (``orchestration.adaptive_in_flight``), and what the cursor counts in
(the number of rows, a hash of their prompts and answers, the seed of their order).
It is written under a temporary name (``<name>.tmp``, its loop state last) and swapped in by
renames, the one it replaces kept as ``<name>.old`` until the new one is in place: a crash
never leaves a half-written checkpoint, nor none at all (a resume from a name whose swap was
interrupted first puts the complete copy in its place: :func:`finish_swap`).

A run writes one every ``orchestration.checkpoint_every`` steps, one at its end
(``<logging.dir>/checkpoint``: train on with more ``orchestration.steps``), and one when it
stops on an error or Ctrl-C (``checkpoint-interrupted``): before the step's update with the
step's batch queued again, during it once the update has ended. An update the trainer refused
before any mini-batch was applied (``UpdateNotApplied``: a non-finite loss, or a non-finite
gradient norm outside DeepSpeed) is as a stop before the update. Any other failed update leaves the weights
only (it may have applied some of its mini-batches), under another name
(``checkpoint-interrupted-weights``): a weights-only save never replaces a checkpoint a run can
resume from. Every file is flushed to disk (fsync) before the swap, so a machine crash right
after it does not leave empty files in place of the copy it deleted.

On resume the trainer reloads weights and optimizer, the workers start from the
checkpoint's weights, the data cursor continues, and the in-flight batches are sampled
again first: every prompt is trained on exactly once per epoch, none lost, none doubled.
The loop state also records the settings a resume cannot change (``setup``: the trainer's
ranks and ZeRO stage, whose optimizer files the checkpoint holds, and the model the trainer's
KL reference comes from); :func:`check_setup` refuses another, naming the setting. A resume
from an earlier checkpoint of a run sets its later checkpoints aside (``<name>.abandoned``),
as it drops the later steps' metrics and trajectories: a run directory never mixes two branches.
No other random state exists: sampling is seeded per request from the counters above.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import shutil
from pathlib import Path

import xxhash

from orchestration.config import ConfigError
from orchestration.data import DataError

STATE_FILE = "loop_state.json"
WEIGHTS_ONLY = "checkpoint-interrupted-weights"  # a failed update's weights: not resumable
log = logging.getLogger("rlaccel")


def save(directory: Path, trainer, state: dict | None, timeout: float | None = None) -> Path:
    """The trainer's state and the loop's ``state`` (None: the trainer's only, not resumable) in
    ``directory``, which is replaced only once the new one is complete and on disk."""
    if state is None and (directory / STATE_FILE).is_file():
        raise ValueError(f"{directory} is a checkpoint a run can resume from: weights only go elsewhere")
    tmp, old = _aside(directory, ".tmp"), _aside(directory, ".old")
    (tmp / STATE_FILE).unlink(missing_ok=True)  # first: a .tmp being deleted is never taken for complete
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save(str(tmp), timeout=timeout)  # every rank: weights from rank 0, optimizer partitions from each
    if state is not None:
        (tmp / STATE_FILE).write_text(json.dumps(state))
    _flush(tmp)
    if directory.exists():  # else an interrupted swap's .old is the last complete one: kept until tmp is in place
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def _aside(directory: Path, suffix: str) -> Path:
    return directory.with_name(directory.name + suffix)


def _flush(directory: Path) -> None:
    """fsync every file under ``directory`` and the directories themselves (the renames after it
    then never put a copy whose bytes are still only in the page cache in place of the old one).
    A filesystem that cannot sync a directory (some network and FUSE mounts refuse it) is let be,
    as PostgreSQL's fsync_fname does: its files are synced."""
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES):
                raise
        finally:
            os.close(fd)


def _complete_copy(directory: Path) -> Path | None:
    """Where a save of ``directory`` killed between its renames left it missing: its complete copy,
    the new one (``.tmp``, whose loop state is written last) if it is complete, else the one it
    was replacing (``.old``); None if ``directory`` is there or neither is complete."""
    if directory.exists():
        return None
    return next((c for c in (_aside(directory, ".tmp"), _aside(directory, ".old")) if (c / STATE_FILE).is_file()), None)


def finish_swap(directory: str | Path) -> None:
    """Put an interrupted save's complete copy in place of ``directory`` (the run resuming from
    it; :func:`load`, which config validation calls, only reads it)."""
    directory = Path(directory)
    complete = _complete_copy(directory)
    if complete is not None:
        complete.rename(directory)
        log.warning("%s: a save replacing this checkpoint was interrupted; the complete copy %s is now in its "
                    "place", directory, complete)
        shutil.rmtree(_aside(directory, ".old"), ignore_errors=True)


# What a run writes in its logging.dir besides config.yaml and placement.json.
RUN_FILES = ("metrics.jsonl", "trajectories*.parquet", "tensorboard", "checkpoint", "checkpoints",
             "checkpoint-interrupted", WEIGHTS_ONLY, "checkpoint*.tmp", "checkpoint*.old", "checkpoint*.abandoned*",
             "trajectories*.parquet.tmp", "trajectories*.parquet.unreadable*", "metrics.jsonl.tmp")


def load(directory: str | Path) -> dict:
    """The loop state of the checkpoint in ``directory`` (``orchestration.resume``)."""
    path = Path(directory) / STATE_FILE
    complete = _complete_copy(Path(directory)) if not path.is_file() else None
    if complete is not None:  # an interrupted save: its complete copy (main puts it in place: finish_swap)
        path = complete / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"orchestration.resume={str(directory)!r} is not an rlaccel checkpoint directory (no "
                          f"{STATE_FILE}); give <logging.dir>/checkpoints/step-N, <logging.dir>/checkpoint or "
                          f"<logging.dir>/checkpoint-interrupted")
    try:
        state = json.loads(path.read_text())
        missing = [k for k in ("step", "version", "submitted", "regenerated", "stream", "in_flight") if k not in state]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        missing, state = [f"readable JSON ({exc})"], None
    if missing:
        raise ConfigError(f"orchestration.resume={str(directory)!r}: its {STATE_FILE} is damaged (no "
                          f"{', '.join(missing)}); resume from another checkpoint of the run (checkpoints/step-N), "
                          f"or start a new run from its weights (model.path={str(directory)!r})")
    return state


def claim_run_dir(directory: str | Path, resume: str | None, overwrite: bool) -> Path:
    """The directory this run logs to, for ``logging.dir``: itself, unless it holds an earlier run
    (its metrics, trajectories, checkpoints) that this run does not resume (a checkpoint inside
    it, or inside a ``<dir>-N`` an earlier run was moved to, goes on with it there). Nothing of an
    earlier run is lost: a new run beside it logs to the first free ``<dir>-2``, ``<dir>-3``, ...
    (created here, so that two runs starting together take different ones), or with
    ``overwrite`` deletes its files first."""
    directory = Path(directory)
    if directory.name in ("", ".", ".."):  # no name of its own to number
        directory = directory.resolve()

    def earlier(path: Path) -> list[str]:
        return sorted({p.name for pattern in RUN_FILES for p in path.glob(pattern)})

    if not earlier(directory):
        return directory
    if resume is not None:
        parents = Path(resume).resolve().parents
        for candidate in [directory, *directory.parent.glob(f"{glob.escape(directory.name)}-*")]:
            numbered = candidate == directory or candidate.name.removeprefix(directory.name + "-").isdigit()
            if numbered and candidate.resolve() in parents:
                if overwrite:
                    raise ConfigError(f"logging.overwrite=true would delete the checkpoint orchestration.resume="
                                      f"{resume!r} resumes from (it is inside {str(candidate)!r}): resume without it")
                return candidate
    if overwrite:
        for pattern in RUN_FILES:
            for path in directory.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        return directory
    n = 2
    while True:
        free = directory.with_name(f"{directory.name}-{n}")
        try:
            free.mkdir(parents=True)
            return free
        except FileExistsError:
            n += 1


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


def setup_identity(config) -> dict:
    """The settings a resume must keep (:func:`check_setup`): the trainer's ranks and ZeRO stage
    (a checkpoint holds one optimizer file, or DeepSpeed's per rank) and the model the run started
    from (the trainer's KL reference, and native MTP layers, come from it; a built-in one by its
    build settings, its prompts being checked by :func:`check_data`)."""
    import dataclasses
    t, m = config.trainer, config.model
    if m.path is None:
        model = json.dumps(dataclasses.asdict(m), sort_keys=True)
    else:  # by its config.json (the same model under another path or mount is the same), with its path
        found = Path(m.path) / "config.json"
        model = xxhash.xxh3_64(found.read_bytes()).hexdigest() if found.is_file() else str(Path(m.path).resolve())
    return {"world_size": t.world_size, "zero_stage": t.zero_stage if t.world_size > 1 else None, "model": model,
            "model_path": str(Path(m.path).resolve()) if m.path is not None else None}


def check_setup(state: dict, setup: dict, config, directory, warn: bool = True) -> None:
    """Refuse a resume whose trainer layout differs from the checkpoint's (its optimizer state would
    not load), or whose model differs where the run reads it (a KL reference, native MTP layers);
    warn (if ``warn``) where it does not."""
    saved = state.get("setup")
    if saved is None:  # a checkpoint from before this was recorded
        return
    for key, name in (("world_size", "trainer.world_size"), ("zero_stage", "trainer.zero_stage")):
        if saved[key] != setup[key]:
            raise ConfigError(f"{name}={setup[key]} differs from the checkpoint's {saved[key]} ({directory}): its "
                              f"optimizer state was saved for that trainer layout; resume with {name}={saved[key]}, "
                              f"or start a new run from its weights (model.path={directory})")
    if saved["model"] != setup["model"]:
        used = config.algorithm.kl_coef > 0 or config.rollout.spec_method == "mtp"
        was, now = (d.get("model_path") or d["model"] for d in (saved, setup))
        message = (f"the model differs from the one the checkpoint's run started from ({directory}: {was}; now "
                   f"{now}; another config.json or built-in model settings): the policy is the checkpoint's, but "
                   + ("the KL reference (algorithm.kl_coef > 0) and native MTP layers come from the model; resume "
                      "with the run's model settings (model.*, in its config.yaml)" if used else
                      "nothing of the model is read here (no KL, no native MTP layers), so the run goes on"))
        if used:
            raise ConfigError(message)
        if warn:
            log.warning(message)


def periodic(run_dir: Path) -> list[Path]:
    """The run's periodic checkpoints (``checkpoints/step-N``), oldest first."""
    found = [c for c in (run_dir / "checkpoints").glob("step-*") if c.name.removeprefix("step-").isdigit()]
    return sorted(found, key=lambda c: int(c.name.removeprefix("step-")))


def prune(run_dir: Path, keep: int, resumed: str | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` periodic checkpoints (0: none deleted), never the one the
    run ``resumed`` from (its workers start from it, and Ray restarts a dead one from it); the
    deleted."""
    spared = Path(resumed).resolve() if resumed else None
    old = [c for c in (periodic(run_dir)[:-keep] if keep else []) if c.resolve() != spared]
    for c in old:
        shutil.rmtree(c)
    return old


def set_aside_later(run_dir: Path, step: int, resume: Path) -> list[Path]:
    """Rename the checkpoints in ``run_dir`` that resume after ``step`` (another branch of the run
    than the one continued from ``resume``) to ``<name>.abandoned`` (``-2``, ... if taken), so that
    a later resume cannot pick one up over this branch's metrics and trajectories; their new names."""
    moved = []
    for candidate in [run_dir / "checkpoint", run_dir / "checkpoint-interrupted", *periodic(run_dir)]:
        if not (candidate / STATE_FILE).is_file() or candidate.resolve() == resume.resolve():
            continue
        try:
            later = json.loads((candidate / STATE_FILE).read_text())["step"] > step
        except (ValueError, KeyError, TypeError):  # a damaged loop state: load() names it if it is resumed
            continue
        if later:
            target, n = _aside(candidate, ".abandoned"), 2
            while target.exists():
                target, n = _aside(candidate, f".abandoned-{n}"), n + 1
            candidate.rename(target)
            moved.append(target)
    return moved


def batch_indices(batch: list) -> list[int]:
    """A checkpoint's in-flight batch as row indices (older checkpoints kept [index, row] pairs)."""
    return [item if isinstance(item, int) else item[0] for item in batch]
