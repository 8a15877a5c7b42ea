"""Speculative decoding inside a vLLM engine, through vLLM's internals (as
:mod:`rollout.vllm_adapter` for the rest): rlaccel's counters of drafts, accepted and verified
positions in the engine's scheduler, the rates derived from them, and the live per-batch-size
schedule (``rollout.spec_schedule``, ``rollout.adaptive_spec``) with its k = 0 fast path and
the speculation-off switch of the schedule check.
"""

from __future__ import annotations

import torch


def count_spec_decoding(llm) -> None:
    """Count drafts and accepted tokens in the engine's scheduler, where vLLM derives its own
    speculative-decoding metrics (``Scheduler.make_spec_decoding_stats``, called for every request
    that verified drafts in a step), whether or not vLLM's statistics are on. vLLM's statistics
    (``disable_log_stats=False``, read through ``llm.get_metrics()``) also record per-token
    Prometheus histograms: ~9% of a rollout call on the tiny preset, and their registry reports
    only the engine built last in a process."""
    scheduler = _scheduler(llm)
    if getattr(scheduler, "_rlaccel_spec_counts", None) is not None:
        return
    k = scheduler.num_spec_tokens
    counts = scheduler._rlaccel_spec_counts = {"drafts": 0, "draft_tokens": 0, "accepted": 0,
                                               "accepted_per_pos": [0] * k, "verified_per_pos": [0] * k}
    make_stats = scheduler.make_spec_decoding_stats

    def counting(spec_decoding_stats, num_draft_tokens, num_accepted_tokens, num_invalid_spec_tokens, request_id):
        if num_draft_tokens:  # vLLM's own rule: invalid (grammar-rejected) drafts are not counted
            drafted = num_draft_tokens - (num_invalid_spec_tokens or {}).get(request_id, 0)
            counts["drafts"] += 1
            counts["draft_tokens"] += drafted
            counts["accepted"] += num_accepted_tokens
            for i in range(num_accepted_tokens):
                counts["accepted_per_pos"][i] += 1
            # position i was verified if it was drafted (a schedule drafts k <= K a round) and the
            # ones before it were accepted
            for i in range(min(num_accepted_tokens + 1, drafted)):
                counts["verified_per_pos"][i] += 1
        return make_stats(spec_decoding_stats, num_draft_tokens=num_draft_tokens,
                          num_accepted_tokens=num_accepted_tokens, num_invalid_spec_tokens=num_invalid_spec_tokens,
                          request_id=request_id)

    scheduler.make_spec_decoding_stats = counting


def spec_decode_counters(llm) -> dict:
    """Cumulative speculative-decoding counters of this engine (:func:`count_spec_decoding` must
    have been installed): ``drafts``, ``draft_tokens``, ``accepted``, ``accepted_per_pos``
    (drafts whose first i+1 tokens were all accepted) and ``verified_per_pos`` (drafts whose
    position i+1 was drafted and verified: the first i accepted)."""
    counts = _scheduler(llm)._rlaccel_spec_counts
    return {**counts, "accepted_per_pos": list(counts["accepted_per_pos"]),
            "verified_per_pos": list(counts["verified_per_pos"])}


def vllm_spec_metrics(llm) -> dict:
    """The same counters from vLLM's own metrics (an engine built with ``disable_log_stats=False``;
    the registry reports the engine built last in the process): the reference for
    :func:`spec_decode_counters`."""
    names = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
             "vllm:spec_decode_num_accepted_tokens": "accepted",
             "vllm:spec_decode_num_accepted_tokens_per_pos": "accepted_per_pos"}
    out: dict = {}
    for m in llm.get_metrics():
        if m.name in names:
            key = names[m.name]
            if hasattr(m, "values"):
                old = out.get(key, [0] * len(m.values))
                out[key] = [a + b for a, b in zip(old, m.values)]
            else:
                out[key] = out.get(key, 0) + int(m.value)
    return out


def spec_decode_delta(before: dict, after: dict) -> dict:
    """The counters of the interval between two :func:`spec_decode_counters` snapshots
    ({} for an engine without drafter)."""
    if not after:
        return {}
    delta = {k: after[k] - before.get(k, 0) for k in ("drafts", "draft_tokens", "accepted")}
    for key in ("accepted_per_pos", "verified_per_pos"):
        if key in after:
            old = before.get(key, [0] * len(after[key]))
            delta[key] = [a - b for a, b in zip(after[key], old)]
    return delta


def spec_decode_rates(counts: dict) -> dict[str, float | list[float | None]]:
    """From interval counters: per-position acceptance given the earlier positions accepted
    (None for a position never verified in the interval: no sample, not a rejection),
    P(first i+1 drafts accepted), mean tokens per target forward, accepted / drafted tokens, and
    the number of draft rounds they are over (``drafts``: position 1's sample size).

    Without ``verified_per_pos`` (vLLM's own metrics have no such counter) every round is taken
    to have drafted every position, which holds for a fixed k only: under a schedule drafting
    k < K, positions past k would count as rejected."""
    drafts = counts.get("drafts", 0)
    if drafts <= 0:
        return {}
    per_pos = counts["accepted_per_pos"]
    verified = counts.get("verified_per_pos") or [drafts] + per_pos[:-1]
    return {"acceptance_per_pos": [a / v if v else None for a, v in zip(per_pos, verified)],
            "accepted_per_draft": [a / drafts for a in per_pos],
            "mean_accepted_len": 1 + counts["accepted"] / drafts,
            "draft_acceptance": counts["accepted"] / max(counts["draft_tokens"], 1), "drafts": drafts}


# ---- adaptive speculation: k = 0 really turns the drafter off --------------------------------
#
# vLLM's per-batch-size schedule (`num_speculative_tokens_per_batch_size`, read by the scheduler
# into `dynamic_sd_lookup`) sets how many drafts the proposer makes for the next step. At k = 0
# vLLM 0.32 still runs the drafter's first pass (its KV cache fill) every step and still routes
# sampling through the rejection sampler with zero drafts (measured 0.58-0.75x of a plain engine
# on the ~100M preset at batch 4-64). `enable_drafter_skip` makes k = 0 cost what a plain engine
# costs: a decode-only step scheduled with k = 0 skips the drafter forward, and a step that carries
# no drafts samples with the plain sampler (same distribution; the rejection sampler with zero
# drafts samples only its "bonus" token through that same sampler). Prefill steps and steps that
# verify drafts still run the drafter, so its KV cache holds every prompt; positions decoded while
# k = 0 are missing from it, which lowers acceptance after k goes back up (never exactness: the
# rejection test uses the q the drafter actually proposed from). `set_drafter_off` (the schedule
# check's "off" calls, which never speculate) skips the prefill steps' drafter too.


def _install_drafter_skip(worker) -> bool:
    """Runs inside the engine's worker: wrap the proposer's ``propose`` and the runner's
    ``_sample``; True if installed (False if already installed or there is no drafter)."""
    import inspect
    runner = worker.model_runner
    drafter = getattr(runner, "drafter", None)
    if drafter is None or getattr(runner, "_rlaccel_drafter_skip", None) is not None:
        return False
    propose, sample = drafter.propose, runner._sample
    signature = inspect.signature(propose)
    counts = runner._rlaccel_drafter_skip = {"skipped": 0, "plain_sampled": 0, "ran": 0}
    state = runner._rlaccel_drafter_state = {"disabled": False}  # set_drafter_off: no drafter at all, prompts too

    def propose_unless_off(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        k, meta = bound.arguments["num_speculative_tokens"], bound.arguments["common_attn_metadata"]
        if k == 0 and meta.max_query_len == 1:  # decode-only step, no drafts wanted next
            drafter.num_speculative_tokens = 0
            drafter._last_draft_probs = None
            counts["skipped"] += 1
            return torch.empty(meta.batch_size(), 0, dtype=torch.int64, device=bound.arguments["target_token_ids"].device)
        return propose(*args, **kwargs)

    def sample_plain_without_drafts(logits, spec_decode_metadata):
        if spec_decode_metadata is not None and spec_decode_metadata.max_spec_len == 0:
            runner.input_batch.update_async_output_token_ids()
            counts["plain_sampled"] += 1
            return runner.sampler(logits=logits, sampling_metadata=runner.input_batch.sampling_metadata)
        return sample(logits, spec_decode_metadata)

    propose_runner = runner.propose_draft_token_ids

    def runner_propose_unless_off(scheduler_output, *args, **kwargs):
        # The whole drafting step (its input bookkeeping too) when nothing is to be drafted and
        # every scheduled sequence decodes one token (no prompt, no drafts verified this step).
        if state["disabled"] or (scheduler_output.num_spec_tokens_to_schedule == 0
                                 and not scheduler_output.scheduled_new_reqs
                                 and max(scheduler_output.num_scheduled_tokens.values(), default=0) == 1):
            drafter._last_draft_probs = None
            counts["skipped"] += 1
            return torch.empty(runner.input_batch.num_reqs, 0, dtype=torch.int64)
        counts["ran"] += 1
        return propose_runner(scheduler_output, *args, **kwargs)

    drafter.propose = propose_unless_off
    runner.propose_draft_token_ids = runner_propose_unless_off
    runner._sample = sample_plain_without_drafts
    return True


def _drafter_skip_counts(worker) -> dict:
    return dict(getattr(worker.model_runner, "_rlaccel_drafter_skip", None) or {})


def _set_drafter_off(worker, off: bool) -> None:
    worker.model_runner._rlaccel_drafter_state["disabled"] = off


def set_drafter_off(llm, off: bool) -> None:
    """With ``off``, the drafter does not run at all, prompts included (the engine's schedule must
    be k = 0 everywhere meanwhile): a call that will never speculate costs what a plain engine
    costs. Its prompts' blocks then hold no drafter KV; a prefix-cache hit on them later would draft
    from garbage (lower acceptance, never inexact), so reset the prefix cache before speculating again."""
    llm.collective_rpc(_set_drafter_off, args=(off,))


def enable_drafter_skip(llm) -> None:
    """Install the k = 0 fast path in every engine worker (see the comment above)."""
    llm.collective_rpc(_install_drafter_skip)


def drafter_skip_counts(llm) -> dict:
    """Steps that skipped the drafter, steps that ran it, and steps sampled without the rejection sampler."""
    out: dict = {}
    for c in llm.collective_rpc(_drafter_skip_counts):
        for key, value in c.items():
            out[key] = out.get(key, 0) + value
    return out


def _scheduler(llm):
    core = llm.llm_engine.engine_core
    scheduler = getattr(getattr(core, "engine_core", None), "scheduler", None)
    if scheduler is None or not hasattr(scheduler, "dynamic_sd_lookup"):
        raise RuntimeError("the vLLM scheduler is not reachable in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0 is "
                           "required for rlaccel's speculation counters and live schedule; rollout/vllm_spec.py)")
    return scheduler


def set_spec_schedule(llm, schedule: list[tuple[int, int, int]]) -> None:
    """Replace the scheduler's per-batch-size k (``[(batch_lo, batch_hi, k)]``, k <= the engine's
    num_speculative_tokens) while the engine runs; vLLM reads it each step."""
    from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup
    scheduler = _scheduler(llm)
    if scheduler.dynamic_sd_lookup is None:
        raise ValueError("the engine was built without a speculation schedule (rollout.spec_schedule)")
    scheduler.dynamic_sd_lookup = build_dynamic_sd_schedule_lookup(
        [tuple(r) for r in schedule], vllm_max_batch_size=scheduler.scheduler_config.max_num_seqs,
        vllm_num_speculative_tokens=scheduler.num_spec_tokens)
