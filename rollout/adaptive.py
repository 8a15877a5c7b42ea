"""Adaptive speculation: how many draft tokens (k, 0 = off) to verify at each live batch size.

A speculative step at batch b with k drafts costs ``step_s[b][k]`` seconds and yields, per
sequence, E_k = 1 + sum_{i<=k} prod_{j<=i} a_j tokens, where a_j is the measured acceptance of
draft position j given the earlier ones were accepted (vLLM's per-position counters). Tokens
per second are b * E_k / step_s[b][k]; k = 0 (drafter off) yields b / step_s[b][0]. The
schedule takes, at every measured batch size, the k with the most tokens per second, in
vLLM's ``num_speculative_tokens_per_batch_size`` form [(batch_lo, batch_hi, k)].

Step costs do not depend on acceptance, so they are measured once per engine
(:func:`measure_step_costs`); acceptance drifts as the policy trains, so the schedule is
re-derived from the live acceptance (:class:`AdaptiveSchedule`). SpecDec++ / CLP choose the
draft length per sequence from a predicted acceptance; vLLM 0.32 exposes k per batch size, so
this picks k per batch size from the measured one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)
MAX_BATCH = 1 << 16
# Part of a cached step-cost table's key (rollout.calibration_cache): change it when what a step
# costs or how it is measured changes in rlaccel (measure_step_costs' windows, the drafter skip
# at k = 0, the sampling path), so that no table measured before is reused.
CALIBRATION_VERSION = "2026-12-02b: 2 warm-up + 6 timed steps, 2 repeats, min; drafter skipped at k=0; threads set; inverse-CDF samplers"


def expected_tokens(acceptance_per_pos: list[float], k: int) -> float:
    """Tokens per sequence per step with k drafts: the verified bonus token plus the accepted prefix."""
    total, run = 1.0, 1.0
    for a in list(acceptance_per_pos)[:k]:
        run *= a
        total += run
    return total


# Speculate only where the predicted gain over k = 0 exceeds this: calibrated step costs vary by
# ~10% between repeats on a shared machine, and near a tie a mis-measured cost can only lose
# (k = 0 is what plain decoding costs; a wrong k > 0 is not).
MARGIN = 0.1

# The acceptance assumed for a position no measurement covers (no mtp.train report beside the
# drafter, or one measured with fewer positions): a guess the live acceptance soon replaces.
GUESSED_ACCEPTANCE = 0.5


def starting_acceptance(reported: list[float | None] | None, k: int) -> list[float]:
    """The schedule's starting per-position acceptance for k positions: the drafter's report
    (``mtp.train``'s vLLM measurement) where it has one, else :data:`GUESSED_ACCEPTANCE`."""
    reported = list(reported or [])[:k]
    return [GUESSED_ACCEPTANCE if a is None else a for a in reported] + [GUESSED_ACCEPTANCE] * (k - len(reported))


def best_k(step_s: dict[int, float], acceptance_per_pos: list[float], margin: float = MARGIN) -> int:
    """The k of ``step_s`` ({k: seconds per step} at one batch size) with the most tokens/s; k = 0
    unless that beats k = 0 by more than ``margin``."""
    rate = {k: expected_tokens(acceptance_per_pos, k) / step_s[k] for k in step_s}
    k = max(sorted(rate), key=rate.get)
    return 0 if k and 0 in rate and rate[k] < (1 + margin) * rate[0] else k


def derive_schedule(step_s: dict[int, dict[int, float]], acceptance_per_pos: list[float]) -> list[list[int]]:
    """[[lo, hi, k]] covering every batch size: each measured batch size b rules the sizes above
    the previous measured one up to b; the largest also rules everything above it."""
    sizes = sorted(step_s)
    schedule, lo = [], 1
    for i, b in enumerate(sizes):
        hi = b if i + 1 < len(sizes) else MAX_BATCH
        k = best_k(step_s[b], acceptance_per_pos)
        if schedule and schedule[-1][2] == k:
            schedule[-1][1] = hi
        else:
            schedule.append([lo, hi, k])
        lo = hi + 1
    return schedule


def measure_step_costs(engine, batches: tuple[int, ...], ks: tuple[int, ...], prompt_ids: list[list[int]],
                       steps: int = 6, warmup: int = 2, repeats: int = 2) -> dict[int, dict[int, float]]:
    """Seconds per decode step at each live batch size and k, on ``engine`` (a speculative
    :class:`rollout.vllm_engine.VLLMEngine` built with a schedule, so its k can be set live).

    b requests long enough never to finish in the window are added to the engine; after
    ``warmup`` engine steps (the prefill and the first decodes) ``steps`` engine steps are timed,
    each a decode step with k drafts for all b sequences, then the requests are aborted. That
    is the step the schedule chooses between, and nothing else: no prefill, no per-call overhead,
    no tail of sequences finishing at different times (an earlier calibration timed whole
    ``generate`` calls and mis-estimated the step by ~30%). Each cell is measured ``repeats``
    times, the cells interleaved, and the fastest kept (noise on a shared machine only adds time;
    measured k by k, one slow spell once doubled every k > 0 cost). A step never costs
    less with more drafts or more sequences, so the table is made non-decreasing in k and in b
    (:func:`monotone`): a noisy cell cannot make a larger k look free. Six timed steps, not eight:
    on the 100M preset (1 thread, batches 1-32, k 0-3) 59 s against 75 s, and two calibrations
    of either length disagreed alike on the k of near-tied batch sizes (ad hoc, 2026-12-02)."""
    from vllm import SamplingParams

    from rollout.vllm_spec import set_spec_schedule
    llm_engine = engine.llm.llm_engine
    room = llm_engine.vllm_config.model_config.max_model_len - max(len(p) for p in prompt_ids) - 1
    if room < (warmup + steps + 1) * (max(ks) + 1):
        raise ValueError(f"step-cost calibration needs {(warmup + steps + 1) * (max(ks) + 1)} tokens after the "
                         f"longest calibration prompt, rollout.max_model_len leaves {room}: raise "
                         f"rollout.max_model_len or lower rollout.num_speculative_tokens")
    params = SamplingParams(n=1, temperature=1.0, max_tokens=room, ignore_eos=True, seed=0, detokenize=False)
    ids = itertools.count()

    def window(b: int) -> float:
        requests = [f"rlaccel-calibration-{next(ids)}" for _ in range(b)]
        for i, request in enumerate(requests):
            llm_engine.add_request(request, {"prompt_token_ids": prompt_ids[i % len(prompt_ids)]}, params)
        try:
            for _ in range(warmup):
                llm_engine.step()
            t0 = time.perf_counter()
            for _ in range(steps):
                llm_engine.step()
            return (time.perf_counter() - t0) / steps
        finally:
            llm_engine.abort_request(requests)  # frees them in the scheduler at once

    costs: dict[int, dict[int, float]] = {b: {} for b in batches}
    try:
        for k in ks:  # warm-up
            set_spec_schedule(engine.llm, [(1, MAX_BATCH, k)])
            window(1)
        for _ in range(repeats):  # interleaved: a slow spell on a shared machine hits every k alike
            for b in batches:
                for k in ks:
                    set_spec_schedule(engine.llm, [(1, MAX_BATCH, k)])
                    costs[b][k] = min(costs[b].get(k, float("inf")), window(b))
    finally:
        set_spec_schedule(engine.llm, engine.cfg.spec_schedule or [(1, MAX_BATCH, engine.cfg.num_speculative_tokens)])
    return monotone(costs)


def cached_step_costs(cache_dir: str | Path | None, key: dict, batches: tuple[int, ...],
                      measure) -> dict[int, dict[int, float]]:
    """The step-cost table at ``batches``: ``measure(batches)``, or, with a cache directory, the
    rows a run with the same ``key`` measured before, measuring only the batch sizes it lacks.

    Step costs depend on the engine's shapes, threads, versions and the machine, not on the
    weights or the acceptance, so runs of one model and drafter on one machine can share them
    (rollout.calibration_cache): the calibration is ~1 min on the 100M preset. ``key`` must name
    everything the costs depend on; it is hashed into the file name and stored in the file. An
    unreadable or mismatched file is measured again and replaced."""
    if not cache_dir:
        return measure(batches)
    text = json.dumps(key, sort_keys=True, default=str)
    path = Path(cache_dir) / f"step-costs-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    rows: dict[int, dict[int, float]] = {}
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved["key"] == json.loads(text):
                rows = {int(b): {int(k): float(s) for k, s in row.items()} for b, row in saved["step_s"].items()}
            else:
                log.warning("%s holds step costs of another engine; measuring again", path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("could not read cached step costs %s (%s); measuring again", path, exc)
    missing = tuple(b for b in batches if b not in rows)
    if len(missing) < len(batches):
        log.info("speculation step costs at batch %s from %s (delete it to measure again)",
                 [b for b in batches if b in rows], path)
    if missing:
        rows.update(measure(missing))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")  # whole or absent, with several workers at once
            tmp.write_text(json.dumps({"key": json.loads(text), "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
                                       "step_s": rows}, indent=1))
            tmp.replace(path)
        except OSError as exc:  # the measurement stands; only later runs lose it
            log.warning("could not keep the step costs in %s (%s): check rollout.calibration_cache", path, exc)
    return monotone({b: rows[b] for b in batches})


def monotone(step_s: dict[int, dict[int, float]]) -> dict[int, dict[int, float]]:
    """The smallest table >= ``step_s`` that is non-decreasing in k at every batch size and in the
    batch size at every k (running maxima)."""
    out: dict[int, dict[int, float]] = {}
    for i, b in enumerate(sorted(step_s)):
        row, run = {}, 0.0
        for k in sorted(step_s[b]):
            below = out[sorted(step_s)[i - 1]].get(k, 0.0) if i else 0.0
            run = max(run, step_s[b][k], below)
            row[k] = run
        out[b] = row
    return out


class AdaptiveSchedule:
    """Keeps an engine's schedule derived from its measured step costs and the live acceptance:
    ``observe`` the acceptance of each generate call (an exponential moving average), and the
    schedule is re-derived and applied when it changes."""

    def __init__(self, engine, step_s: dict[int, dict[int, float]], acceptance_per_pos: list[float],
                 smoothing: float = 0.3, explore_every: int = 0):
        self.engine, self.step_s, self.smoothing = engine, step_s, smoothing
        self.acceptance = list(acceptance_per_pos)
        self.schedule: list[list[int]] = []
        self.changes = 0
        self.explore_every, self.calls = explore_every, 0
        self._apply()

    def exploring(self) -> list[list[int]] | None:
        """Counts a rollout call; every ``explore_every``-th (0: never) returns the schedule with
        each batch size's k one measured step higher, for that call only, so that positions the
        schedule does not draft get measured: their estimates otherwise keep their last value, and
        a pessimistic start (or a dip the head has since recovered from) would hold k down for
        good. None on the other calls, and where every k is already the largest."""
        if not self.explore_every:
            return None
        self.calls += 1
        if self.calls % self.explore_every:
            return None
        ks = sorted(next(iter(self.step_s.values())))  # the k the calibration measured (allowed ones)
        up = [[lo, hi, next((x for x in ks if x > k), k)] for lo, hi, k in self.schedule]
        return up if up != self.schedule else None

    def observe(self, acceptance_per_pos: list[float | None]) -> bool:
        """Fold in one call's per-position acceptance; True if the schedule changed. A position
        the call never verified (None, or past the list's end: the schedule drafted fewer) keeps
        its estimate: a position not drafted is no evidence against drafting it."""
        if not acceptance_per_pos:
            return False
        s = self.smoothing
        self.acceptance = [old if new is None else (1 - s) * old + s * new
                           for old, new in zip(self.acceptance, acceptance_per_pos)] + \
            self.acceptance[len(acceptance_per_pos):]
        return self._apply()

    def reset(self, acceptance_per_pos: list[float | None]) -> bool:
        """Take this acceptance as the current one (no smoothing; None keeps a position's estimate)
        and apply the derived schedule even if the engine's was changed behind this object's back;
        True if it differs."""
        self.acceptance = [old if new is None else new for old, new in zip(self.acceptance, acceptance_per_pos)] + \
            self.acceptance[len(acceptance_per_pos):]
        old, self.schedule = self.schedule, []
        self._apply()
        return self.schedule != old

    def k_at(self, batch: int) -> int:
        return next(k for lo, hi, k in self.schedule if lo <= batch <= hi)

    def _apply(self) -> bool:
        from rollout.vllm_spec import set_spec_schedule
        schedule = derive_schedule(self.step_s, self.acceptance)
        if schedule == self.schedule:
            return False
        set_spec_schedule(self.engine.llm, schedule)
        if self.schedule:
            log.info("speculation schedule %s -> %s (acceptance %s)", self.schedule, schedule,
                     [round(a, 3) for a in self.acceptance])
        self.schedule, self.changes = schedule, self.changes + 1
        return True


class ScheduleCheck:
    """Checks the derived schedule against speculation off on the live workload.

    The schedule is a steady-state model: tokens per step over the cost of a step. A rollout's
    wall-clock also depends on what it leaves out. An RL rollout ends when its slowest sequence
    does, and its tail of few live sequences (where the schedule speculates) can be only a few
    steps long: on the tiny preset (8 tokens at most) the tail took as many steps with k = 3 as
    without, each step dearer, and its first step verifies nothing (no drafts were proposed at
    k = 0). So the engine times its calls: a call runs either under the schedule or with
    speculation off, both arms are tried in turn until each has ``samples`` timed calls, then
    the faster (mean tokens/s of its last ``window`` calls) is used and the other is probed
    again after ``interval`` calls, the interval doubling (up to ``max_interval``) while it loses
    clearly; the arm in use changes only when a probe beats it by more than ``margin``. The
    "schedule" arm is the schedule as it is re-derived from the live acceptance. Calls are
    compared per shape (sequences, max tokens): an RL run repeats one shape. The first call of
    each arm on a shape is not timed (first-call warm-ups)."""

    SCHEDULE, OFF = "schedule", "off"

    def __init__(self, samples: int = 2, window: int = 3, max_interval: int = 32, margin: float = 0.05):
        self.samples, self.window, self.max_interval, self.margin = samples, window, max_interval, margin
        self._shapes: dict[tuple, dict] = {}

    def _state(self, shape: tuple) -> dict:
        return self._shapes.setdefault(shape, {
            "rates": {self.SCHEDULE: [], self.OFF: []}, "seen": {self.SCHEDULE: 0, self.OFF: 0},
            "winner": None, "interval": 2, "since_probe": 0})

    def winner(self, shape: tuple) -> str | None:
        """The arm in use once both have been timed, else None."""
        return self._shapes.get(shape, {}).get("winner")

    def mean_rate(self, shape: tuple, arm: str) -> float | None:
        rates = self._shapes.get(shape, {}).get("rates", {}).get(arm)
        return sum(rates[-self.window:]) / len(rates[-self.window:]) if rates else None

    def arm(self, shape: tuple) -> str:
        """The arm the next call of this shape runs under."""
        s = self._state(shape)
        if s["winner"] is None:  # still timing: the arm with fewer calls so far (the schedule first)
            return self.OFF if s["seen"][self.OFF] < s["seen"][self.SCHEDULE] else self.SCHEDULE
        if s["since_probe"] >= s["interval"]:
            return self.OFF if s["winner"] == self.SCHEDULE else self.SCHEDULE
        return s["winner"]

    def record(self, shape: tuple, arm: str, tokens: int, seconds: float) -> str | None:
        """Fold in one call; returns the new winner when it changed, else None. Once both arms
        are timed, only a probe can change the winner: it is judged against the arm in use's
        last calls, the same stretch of the run (an RL run's call lengths drift, so the probed
        arm's older timings are stale). A probe within the margin of the arm in use is repeated
        soon (interval 2); a clear loss doubles the interval."""
        s = self._state(shape)
        s["seen"][arm] += 1
        timed = s["seen"][arm] > 1 and seconds > 0
        if timed:
            s["rates"][arm] = (s["rates"][arm] + [tokens / seconds])[-self.window:]
        old = s["winner"]
        if old is None:  # timing both arms in turn
            if any(len(rates) < self.samples for rates in s["rates"].values()):
                return None
            s["winner"] = max(s["rates"], key=lambda a: self.mean_rate(shape, a))
            s["since_probe"], s["interval"] = 0, 2
            return s["winner"]
        if arm == old:
            s["since_probe"] += 1
            return None
        s["since_probe"] = 0
        if not timed:  # an untimed probe: try again soon
            s["interval"] = 2
            return None
        probe, in_use = s["rates"][arm][-1], self.mean_rate(shape, old)
        if probe > (1 + self.margin) * in_use:
            s["winner"], s["interval"] = arm, 2
            return arm
        s["interval"] = 2 if probe > (1 - self.margin) * in_use else min(2 * s["interval"], self.max_interval)
        return None
