"""Resolve ``config.model`` to a local model directory every component loads.

A local ``model.path`` is used as is. A built-in model is built, warm-started on the run's
prompts and cached under ``$RLACCEL_CACHE`` (default ``<repo>/.cache``), keyed by a hash of
everything that determines it; the directory is written to a temporary name and renamed,
so an interrupted build never leaves a half-written model behind, and a file lock makes a
second process wanting the same model (two jobs, parallel tests) wait for the first's build
instead of repeating it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from filelock import FileLock

from orchestration.config import REPO_ROOT, Config
from orchestration.data import load_prompts
from policy.models import build_char_tokenizer, build_model, num_parameters, save_model
from policy.warm_start import warm_start

log = logging.getLogger(__name__)
# Bump when the recipe changes, to invalidate caches (2: the warm start's learning rate decays to 0;
# 3: no label-smoothing mass on the padded vocabulary ids the tokenizer cannot produce).
WARM_START_VERSION = 3


def cache_dir() -> Path:
    return Path(os.environ.get("RLACCEL_CACHE", REPO_ROOT / ".cache"))


def cached_model(config: Config) -> tuple[str, Path]:
    """The built-in model's cache key (everything that determines it) and its directory."""
    key = {"v": WARM_START_VERSION, "model": dataclasses.asdict(config.model),
           "data": dataclasses.asdict(config.data), "seed": config.orchestration.seed}
    if config.data.source != "arithmetic":  # the prompts it warm-starts on: a file's path alone is not them
        key["data_files"] = _files_identity(Path(config.data.source))
    key_src = json.dumps(key, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    return key_src, cache_dir() / "models" / f"{config.model.name}-{key}"


def _files_identity(source: Path) -> list:
    """The data source's resolved path and, per file under it, (name, size, modification time): an
    edited or replaced data file names another warm-started model."""
    root = source.resolve()
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
    return [str(root), *[[str(f.relative_to(root)) if f != root else f.name, f.stat().st_size, f.stat().st_mtime_ns]
                         for f in files]]


def prepare_model(config: Config, progress: bool = True) -> Path:
    if config.model.path is not None:
        return Path(config.model.path)
    key_src, target = cached_model(config)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # built by another process while this one waited
            return target
        return _build(config, key_src, target, progress)


def _build(config: Config, key_src: str, target: Path, progress: bool) -> Path:
    m = config.model
    tokenizer = build_char_tokenizer()
    model = build_model(m.name, tokenizer, seed=config.orchestration.seed, dtype=getattr(torch, m.dtype))
    log.info("building model %r (%.2fM parameters) into %s", m.name, num_parameters(model) / 1e6, target)
    if m.warm_start_steps > 0:
        rows = load_prompts(config.data, tokenizer)
        examples = [(r["prompt"], r["answer"]) for r in rows]
        losses = warm_start(model, tokenizer, examples, m.warm_start_steps, m.warm_start_lr, m.warm_start_batch,
                            seed=config.orchestration.seed, progress=progress,
                            label_smoothing=m.warm_start_label_smoothing)
        log.info("warm start: loss %.3f -> %.3f over %d steps", losses[0], losses[-1], len(losses))
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tokenizer, tmp)
    (tmp / "rlaccel_build.json").write_text(key_src)
    try:
        tmp.rename(target)
    except OSError:  # another process finished the same build first (a filesystem without working locks)
        shutil.rmtree(tmp, ignore_errors=True)
    return target
