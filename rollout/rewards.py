"""Reward functions with TRL's signature, and the runner that applies them to groups.

A reward function is ``fn(prompts: list[str], completions: list[str], **columns) -> list[float]``
where ``columns`` holds the dataset columns of each sample's prompt row (e.g. ``answer``),
one list entry per sample. It is called by keyword, as TRL's ``GRPOTrainer`` calls it
(``fn(prompts=..., completions=..., **columns)``), so a TRL function that takes ``completions``
first, or no ``prompts``, gets what its parameter names; TRL also passes ``completion_ids`` and
``trainer_state``, which rlaccel does not. Several functions are summed.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import time
from collections import Counter
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
    from math_verify import parse, verify
    return [float(verify(parse(a), parse(c))) for c, a in zip(completions, answer)]


# What a reward function imports when it runs (module -> its pip package), checked when it is
# loaded: a function's name is resolved at start, its imports only at its first call, minutes in.
math_verify_reward.requires = {"math_verify": "math-verify"}


def load_reward_fn(path: str) -> RewardFn:
    """Import ``"package.module:function"``."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise RewardError(f"algorithm.reward_fns: {path!r} is not 'module:function' (e.g. "
                          f"'rollout.rewards:arithmetic_reward')")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise RewardError(f"algorithm.reward_fns: cannot import {path!r} ({exc}); "
                          f"give 'module:function' importable on the job's Python path") from None
    except Exception as exc:  # noqa: BLE001 (the module itself raised while it was imported)
        raise RewardError(f"algorithm.reward_fns: importing {module_name!r} for {path!r} raised "
                          f"{type(exc).__name__}: {exc}; fix the module") from exc
    if not callable(fn):
        raise RewardError(f"algorithm.reward_fns: {path!r} is not callable")
    missing = [package for module, package in getattr(fn, "requires", {}).items()
               if importlib.util.find_spec(module) is None]
    if missing:
        raise RewardError(f"algorithm.reward_fns: {path!r} needs {', '.join(missing)}: pip install "
                          f"{' '.join(missing)} (or `pip install -e .[gpu]`)")
    return fn


def check_signatures(fns: dict[str, RewardFn], columns: list[str]) -> None:
    """Refuse, before any sampling, a function that cannot be called as :func:`score_groups` calls
    it with the dataset's ``columns`` (e.g. a parameter naming a column the data lacks)."""
    import inspect
    for name, fn in fns.items():
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # a builtin or C function: nothing to check
            continue
        try:
            signature.bind(prompts=[""], completions=[""], **{k: [None] for k in columns})
        except TypeError as exc:
            raise RewardError(f"reward function {name} cannot take the data's columns ({exc}): it is called as "
                              f"fn(prompts=..., completions=..., **columns) with the columns {sorted(columns)}; "
                              f"give it **kwargs, or add the column to the data") from None


def score_groups(groups: list[Group], fns: dict[str, RewardFn], on_error: str = "fail",
                 worked: set[str] | None = None) -> dict[str, float]:
    """Fill ``group.rewards`` (sum over functions); returns metrics.

    On an exception, the batch is re-scored one sample at a time to find the failing
    sample(s) (logged, and counted in ``reward_fallbacks``); with ``on_error="fail"`` a
    :class:`RewardError` names the function and the sample (as for a non-finite reward), with
    ``"zero"`` those samples get 0 and are counted in ``reward_errors`` (once each), unless the
    function has not scored a single sample yet: ``worked`` (kept by the caller across steps)
    holds the names of those that have, and one that fails on every sample of a step before it
    ever worked is broken, not its samples (a RewardError).
    """
    worked, t0 = set() if worked is None else worked, time.perf_counter()
    prompts = [g.prompt for g in groups for _ in range(g.n)]
    completions = [c for g in groups for c in g.completions]
    # every column for every sample (None where a row lacks it: rows of a JSONL file may differ)
    keys = dict.fromkeys(k for g in groups for k in g.row if k != "prompt")
    columns = {k: [g.row.get(k) for g in groups for _ in range(g.n)] for k in keys}
    total: list[float | None] = [None] * len(prompts)  # None until a function scores the sample
    failed_samples: set[int] = set()  # scored 0 under on_error="zero", counted once however many functions failed
    fallbacks = 0
    metrics: dict[str, float] = {}
    # each function's metric: by its name, or its whole path where two functions share a name
    short = {name: name.rsplit(":", 1)[-1] for name in fns}
    shared = {n for n, c in Counter(short.values()).items() if c > 1}
    for name, fn in fns.items():
        try:
            values, bad = _call(fn, prompts, completions, columns), set()
        except _WrongShape as exc:  # the function's contract, not a sample: no sample-by-sample retry
            raise RewardError(f"reward function {name} {exc}: it must return a list with one reward (a "
                              f"number, or None: does not apply) per completion, in their order") from None
        except Exception as batch_exc:
            log.warning("reward function %s raised %s: %s on the step's batch of %d samples; scoring them one at "
                        "a time (counted in reward_fallbacks)", name, type(batch_exc).__name__, batch_exc, len(prompts))
            fallbacks += 1
            values, bad = [], set()
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
                    bad.add(i)

        for i, v in enumerate(values):
            if v is None:  # TRL's convention: this function does not apply to the sample
                continue
            if not math.isfinite(v):
                msg = (f"reward function {name} returned {v} for prompt={prompts[i]!r} completion="
                       f"{completions[i]!r}; rewards must be finite numbers (None: the function does not apply "
                       f"to the sample)")
                if on_error == "fail":
                    raise RewardError(msg + ". Fix the function, or set algorithm.on_reward_error=zero to score "
                                            "such samples 0 and count them.")
                log.warning("%s; scored 0 (algorithm.on_reward_error=zero)", msg)
                values[i], v = 0.0, 0.0
                bad.add(i)
            total[i] = v + (total[i] or 0.0)
        if any(v is not None and i not in bad for i, v in enumerate(values)):
            worked.add(name)
        elif len(bad) == len(prompts) and name not in worked:  # the function (or its setup) is broken
            raise RewardError(f"reward function {name} raised or returned a non-finite reward on every one of the "
                              f"step's {len(bad)} samples and has scored none in the run (the last error is logged "
                              f"above): fix the function; algorithm.on_reward_error=zero scores failing samples 0 "
                              f"once it works")
        failed_samples |= bad
        scored = [v for v in values if v is not None]
        metrics[f"reward/{name if short[name] in shared else short[name]}"] = sum(scored) / len(scored) if scored else float("nan")
    for i, v in enumerate(total):
        if v is None:
            msg = (f"every reward function returned None (does not apply) for prompt={prompts[i]!r} "
                   f"completion={completions[i]!r}")
            if on_error == "fail":
                raise RewardError(msg + ": a sample needs a reward from at least one function; or set "
                                        "algorithm.on_reward_error=zero to score such samples 0 and count them.")
            log.warning("%s; scored 0 (algorithm.on_reward_error=zero)", msg)
            total[i] = 0.0
            failed_samples.add(i)
    for i, v in enumerate(total):
        if not math.isfinite(v):
            raise RewardError(f"the reward functions' sum is {v} for prompt={prompts[i]!r} completion={completions[i]!r} "
                              f"(each was finite): keep rewards within float range")
    pos = 0
    for g in groups:
        g.rewards = total[pos:pos + g.n]
        pos += g.n
    metrics["reward"] = sum(total) / len(total)
    metrics["reward_errors"] = float(len(failed_samples))  # samples scored 0 for an error
    metrics["reward_fallbacks"] = float(fallbacks)  # functions that raised on the whole batch (then per sample)
    metrics["reward_s"] = time.perf_counter() - t0
    return metrics


class _WrongShape(RewardError):
    pass


def _call(fn: RewardFn, prompts, completions, columns) -> list[float | None]:
    values = fn(prompts=prompts, completions=completions, **columns)
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise _WrongShape(f"returned a {type(values).__name__}, not a list")
    if len(values) != len(prompts):
        raise _WrongShape(f"returned {len(values)} values for {len(prompts)} completions")
    return [float(v) if v is not None else None for v in values]
