"""Reward functions with TRL's signature, and the runner that applies them to groups.

A reward function is ``fn(prompts: list[str], completions: list[str], **columns) -> list[float]``
where ``columns`` holds the dataset columns of each sample's prompt row (e.g. ``answer``),
one list entry per sample, exactly as TRL's ``GRPOTrainer`` calls them. Several functions
are summed.
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import Callable

from policy.batch import Group

log = logging.getLogger(__name__)
RewardFn = Callable[..., list[float]]


class RewardError(RuntimeError):
    pass


def arithmetic_reward(prompts: list[str], completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 when the completion, stripped of whitespace, is exactly the answer, else 0.0."""
    return [1.0 if c.strip() == a.strip() else 0.0 for c, a in zip(completions, answer)]


def math_verify_reward(prompts: list[str], completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 when `math-verify` judges the completion equal to the answer (pip install math-verify)."""
    try:
        from math_verify import parse, verify
    except ImportError as exc:
        raise RewardError("rollout.rewards:math_verify_reward needs `pip install math-verify`") from exc
    return [float(verify(parse(a), parse(c))) for c, a in zip(completions, answer)]


def load_reward_fn(path: str) -> RewardFn:
    """Import ``"package.module:function"``."""
    module_name, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise RewardError(f"algorithm.reward_fns: cannot import {path!r} ({exc}); "
                          f"give 'module:function' importable on the job's Python path") from None
    if not callable(fn):
        raise RewardError(f"algorithm.reward_fns: {path!r} is not callable")
    return fn


def score_groups(groups: list[Group], fns: dict[str, RewardFn], on_error: str = "fail") -> dict[str, float]:
    """Fill ``group.rewards`` (sum over functions); returns metrics.

    On an exception, the batch is re-scored one sample at a time to find the failing
    sample(s); with ``on_error="fail"`` a :class:`RewardError` names the function and the
    sample, with ``"zero"`` those samples get 0 and are counted in ``reward_errors``.
    """
    prompts = [g.prompt for g in groups for _ in range(g.n)]
    completions = [c for g in groups for c in g.completions]
    # every column for every sample (None where a row lacks it: rows of a JSONL file may differ)
    keys = dict.fromkeys(k for g in groups for k in g.row if k != "prompt")
    columns = {k: [g.row.get(k) for g in groups for _ in range(g.n)] for k in keys}
    total: list[float | None] = [None] * len(prompts)  # None until a function scores the sample
    errors = 0
    metrics: dict[str, float] = {}
    for name, fn in fns.items():
        try:
            values = _call(fn, prompts, completions, columns)
        except Exception:
            values = []
            for i in range(len(prompts)):
                try:
                    values.extend(_call(fn, [prompts[i]], [completions[i]], {k: [v[i]] for k, v in columns.items()}))
                except Exception as exc:
                    msg = (f"reward function {name} raised {type(exc).__name__}: {exc} on sample "
                           f"prompt={prompts[i]!r} completion={completions[i]!r}")
                    if on_error == "fail":
                        raise RewardError(msg + ". Fix the function, or set algorithm.on_reward_error=zero "
                                                "to score such samples 0 and count them.") from exc
                    log.warning("%s; scored 0 (algorithm.on_reward_error=zero)", msg)
                    values.append(0.0)
                    errors += 1
        for i, v in enumerate(values):
            if v is None:  # TRL's convention: this function does not apply to the sample
                continue
            if not math.isfinite(v):
                raise RewardError(f"reward function {name} returned {v} for prompt={prompts[i]!r} "
                                  f"completion={completions[i]!r}; rewards must be finite numbers (None: the "
                                  f"function does not apply to the sample)")
            total[i] = v + (total[i] or 0.0)
        scored = [v for v in values if v is not None]
        metrics[f"reward/{name.rsplit(':', 1)[-1]}"] = sum(scored) / len(scored) if scored else float("nan")
    for i, v in enumerate(total):
        if v is None:
            msg = (f"every reward function returned None (does not apply) for prompt={prompts[i]!r} "
                   f"completion={completions[i]!r}")
            if on_error == "fail":
                raise RewardError(msg + ": a sample needs a reward from at least one function; or set "
                                        "algorithm.on_reward_error=zero to score such samples 0 and count them.")
            log.warning("%s; scored 0 (algorithm.on_reward_error=zero)", msg)
            total[i], errors = 0.0, errors + 1
    pos = 0
    for g in groups:
        g.rewards = total[pos:pos + g.n]
        pos += g.n
    metrics["reward"] = sum(total) / len(total)
    metrics["reward_errors"] = float(errors)
    return metrics


def _call(fn: RewardFn, prompts, completions, columns) -> list[float | None]:
    values = fn(prompts, completions, **columns)
    values = [float(v) if v is not None else None for v in values]
    if len(values) != len(prompts):
        raise RewardError(f"reward function returned {len(values)} values for {len(prompts)} samples")
    return values
