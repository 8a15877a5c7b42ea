"""rlaccel's CPU replacements of vLLM's speculative samplers (rollout/vllm_cpu_fixes.py,
"inverse-CDF sampling"): the draft sampler and the rejection sampler, each checked with vLLM's
own beside it against the exact distributions, without an engine. The lossless tests in
test_speculative.py run whole engines with them installed."""

import types

import pytest
import torch

from tests.rollout.speculation import chi2_pvalue

B, V = 40_000, 6
P = torch.tensor([0.3, 0.25, 0.2, 0.1, 0.1, 0.05])   # target
Q = torch.tensor([0.1, 0.4, 0.3, 0.05, 0.15, 0.0])   # draft
ALPHA = float(torch.minimum(P, Q).sum())             # acceptance of one draft


@pytest.fixture(scope="module")
def samplers():
    from rollout.vllm_adapter import set_engine_env
    set_engine_env(1, 1)
    from vllm.platforms import current_platform
    current_platform.register_triton_kernel_overrides()  # the CPU kernels vLLM's engine would register
    from vllm.v1.sample import rejection_sampler
    from vllm.v1.spec_decode import llm_base_proposer

    from rollout import vllm_cpu_fixes as fixes
    assert rejection_sampler.rejection_sample.__module__.startswith("vllm"), \
        "an engine fixture left rlaccel's samplers installed: restore vLLM's at its teardown"
    return {"vllm": (rejection_sampler.rejection_sample, llm_base_proposer.compute_probs_and_sample_next_token),
            "rlaccel": (fixes.rejection_sample, fixes.compute_probs_and_sample_next_token)}


def test_inverse_cdf_follows_the_weights_and_never_picks_a_zero():
    from rollout.vllm_cpu_fixes import sample_inverse_cdf
    torch.manual_seed(0)
    weights = torch.stack([Q * 3.0, P])  # unnormalised rows, one with a zero
    ids = sample_inverse_cdf(weights.repeat(B // 2, 1), torch.rand(B, dtype=torch.float64)).view(-1, 2)
    assert chi2_pvalue(torch.bincount(ids[:, 0], minlength=V), Q) > 1e-3
    assert chi2_pvalue(torch.bincount(ids[:, 1], minlength=V), P) > 1e-3
    # The ends of [0, 1): the first and the last positive weight, never a zero one around them.
    edge = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 2)
    got = sample_inverse_cdf(edge, torch.tensor([0.0, 1.0 - 2.0 ** -53], dtype=torch.float64))
    assert got.tolist() == [1, 3]
    # NaN weights (a broken temperature upstream) still give an id inside the vocabulary: past it,
    # the engine stalls (vLLM clamps likewise).
    assert 0 <= int(sample_inverse_cdf(torch.full((1, V), float("nan")), torch.tensor([0.5]))) < V


def test_the_chi_square_helper_rejects_a_sample_the_target_forbids():
    """Cells of probability 0 are pooled with the rare ones; a sample there must fail the test
    (pooled into a pool expecting nothing, it had vanished from the statistic: p-value 1)."""
    probs = torch.cat([torch.full((100,), 0.01), torch.zeros(44)])
    counts = torch.cat([torch.full((100,), 190.0), torch.full((44,), 1000 / 44)])
    assert chi2_pvalue(counts, probs) == 0.0
    assert chi2_pvalue(torch.cat([torch.full((100,), 200.0), torch.zeros(44)]), probs) > 0.99


def test_a_nan_draft_row_is_rejected_and_its_token_follows_p(samplers):
    """A drafter head that gives NaN probabilities (a diverged head) costs acceptance, never
    exactness: its drafts are rejected and the emitted token follows p (the residual of a NaN row
    had been sampled as the last vocabulary id every time)."""
    torch.manual_seed(4)
    drafts = torch.multinomial(Q, B, replacement=True).view(B, 1)
    out = _sample(samplers["rlaccel"][0], drafts, torch.full((B, V), float("nan")), _meta(torch.ones(B)))
    assert (out[:, 1] == -1).all()  # every draft rejected: no bonus token
    assert chi2_pvalue(torch.bincount(out[:, 0], minlength=V), P) > 1e-3


def _meta(temperature: torch.Tensor, generators=None):
    return types.SimpleNamespace(all_greedy=bool((temperature == 0).all()), all_random=bool((temperature > 0).all()),
                                 temperature=temperature, generators=generators or {},
                                 frequency_penalties=torch.zeros(len(temperature)))


def test_seeded_drafts_come_from_their_requests_generators():
    """A seeded request's draft rows draw from its generator (one row a request, or K consecutive
    rows of a parallel drafter), the others from the global one; the drafts still follow q."""
    from rollout.vllm_cpu_fixes import compute_probs_and_sample_next_token, draft_uniforms
    gens = lambda: {0: torch.Generator().manual_seed(7), 2: torch.Generator().manual_seed(8)}  # noqa: E731
    meta = _meta(torch.ones(3), gens())
    torch.manual_seed(1)
    a = draft_uniforms(6, meta, "cpu")  # a parallel drafter: 2 rows per request
    torch.manual_seed(2)
    b = draft_uniforms(6, _meta(torch.ones(3), gens()), "cpu")
    assert torch.equal(a[[0, 1, 4, 5]], b[[0, 1, 4, 5]]) and not torch.equal(a[2:4], b[2:4])
    assert torch.equal(a[:2], torch.rand(2, dtype=torch.float64, generator=torch.Generator().manual_seed(7)))
    n = B // 2  # every request seeded: the drafts follow q
    logits = torch.log(Q.clamp(min=1e-30)).expand(n, V).contiguous()
    ids, _ = compute_probs_and_sample_next_token(
        logits.clone(), _meta(torch.ones(n), {i: torch.Generator().manual_seed(i) for i in range(n)}))
    assert chi2_pvalue(torch.bincount(ids, minlength=V), Q) > 1e-3
    again, _ = compute_probs_and_sample_next_token(
        logits.clone(), _meta(torch.ones(n), {i: torch.Generator().manual_seed(i) for i in range(n)}))
    assert torch.equal(ids, again)


def _sample(fn, drafts: torch.Tensor, draft_probs, meta, target=P):
    """fn on n requests with k drafts each (``drafts`` [n, k]); target p and bonus token 5 everywhere."""
    n, k = drafts.shape
    return fn(drafts.flatten().to(torch.int32).contiguous(), [k] * n, k,
              torch.arange(k, n * k + 1, k, dtype=torch.int32), draft_probs,
              torch.log(target).expand(n * k, V).contiguous(), torch.full((n, 1), 5, dtype=torch.int32), meta)


@pytest.mark.parametrize("impl", ["vllm", "rlaccel"])
def test_rejection_sampling_is_lossless_and_keeps_drafts_at_the_acceptance_rate(samplers, impl):
    """Two drafts from q per request: every emitted token follows p, a draft is kept with
    probability sum(min(p, q)), the bonus token only after both, -1 after a rejection."""
    torch.manual_seed(1)
    drafts = torch.multinomial(Q, 2 * B, replacement=True).view(B, 2)
    out = _sample(samplers[impl][0], drafts, Q.expand(2 * B, V).contiguous(), _meta(torch.ones(B)))
    kept = (out[:, :2] == drafts).long().cumprod(1).sum(1)
    assert chi2_pvalue(torch.bincount(kept, minlength=3), torch.tensor([1 - ALPHA, ALPHA * (1 - ALPHA), ALPHA ** 2])) > 1e-3
    assert chi2_pvalue(torch.bincount(out[:, 0], minlength=V), P) > 1e-3
    # A rejected first draft is replaced by a sample of max(p - q, 0), normalised.
    residual = (P - Q).clamp(min=0)
    recovered = torch.bincount(out[kept == 0, 0], minlength=V)
    assert recovered[residual == 0].sum() == 0
    assert chi2_pvalue(recovered, residual / residual.sum()) > 1e-3
    second = out[kept >= 1, 1]
    assert chi2_pvalue(torch.bincount(second, minlength=V), P) > 1e-3
    assert (out[kept == 2, 2] == 5).all()
    assert (out[kept == 0, 1:] == -1).all() and (out[kept == 1, 2] == -1).all()


@pytest.mark.parametrize("impl", ["vllm", "rlaccel"])
def test_one_hot_drafts_are_lossless(samplers, impl):
    """Without draft probabilities (a one-hot q at each draft): a fixed draft token still yields p."""
    torch.manual_seed(2)
    drafts = torch.tensor([[1, 2]]).expand(B, 2)
    out = _sample(samplers[impl][0], drafts, None, _meta(torch.ones(B)))
    assert chi2_pvalue(torch.bincount(out[:, 0], minlength=V), P) > 1e-3
    assert ((out[:, 0] == 1).double().mean() - P[1]).abs() < 5 * (P[1] * (1 - P[1]) / B) ** 0.5


def test_greedy_requests_match_vllm_and_seeded_ones_repeat(samplers):
    torch.manual_seed(3)
    n = 64
    drafts = torch.multinomial(Q, 2 * n, replacement=True).view(n, 2)
    probs = Q.expand(2 * n, V).contiguous()
    temperature = torch.tensor([0.0, 1.0] * (n // 2))
    outs = {impl: _sample(samplers[impl][0], drafts, probs, _meta(temperature)) for impl in ("vllm", "rlaccel")}
    assert torch.equal(outs["vllm"][0::2], outs["rlaccel"][0::2])  # greedy: the target's argmax, 0, wherever it differs
    gens = lambda: {i: torch.Generator().manual_seed(100 + i) for i in range(1, n, 2)}  # noqa: E731
    a, b = (_sample(samplers["rlaccel"][0], drafts, probs, _meta(temperature, gens())) for _ in range(2))
    assert torch.equal(a, b)
    seeded = torch.cat([_sample(samplers["rlaccel"][0], torch.tensor([[1, 2]]).expand(500, 2), None,
                                _meta(torch.ones(500), {i: torch.Generator().manual_seed(1000 * r + i) for i in range(500)}))
                        for r in range(40)])
    assert chi2_pvalue(torch.bincount(seeded[:, 0], minlength=V), P) > 1e-3


@pytest.mark.parametrize("impl", ["vllm", "rlaccel"])
def test_draft_tokens_follow_the_tempered_drafter(samplers, impl):
    torch.manual_seed(2)
    logits = torch.log(P)
    meta = types.SimpleNamespace(all_greedy=False, all_random=True, temperature=torch.full((B,), 0.7), generators={})
    ids, probs = samplers[impl][1](logits.expand(B, V).clone(), meta)
    want = torch.softmax(logits / 0.7, -1)
    assert torch.allclose(probs[0], want, atol=1e-6)
    assert chi2_pvalue(torch.bincount(ids, minlength=V), want) > 1e-3
    # Greedy requests in a mixed batch draft the argmax.
    meta = types.SimpleNamespace(all_greedy=False, all_random=False, temperature=torch.tensor([0.0, 1.0] * 50), generators={})
    ids, _ = samplers[impl][1](logits.expand(100, V).clone(), meta)
    assert (ids[0::2] == 0).all() and (ids[1::2] != 0).any()


def test_the_replacements_fit_the_installed_vllm_and_another_version_keeps_its_own(samplers):
    """rlaccel's samplers replace vLLM 0.32's only where vLLM's functions take the same arguments and
    have the helpers the replacements call; otherwise the engine keeps vLLM's own (a warning says why)."""
    from vllm.v1.sample import rejection_sampler
    from vllm.v1.spec_decode import llm_base_proposer

    from rollout.vllm_cpu_fixes import sampler_mismatch
    assert sampler_mismatch() is None  # the pinned vllm-cpu
    real = {"vllm.v1.sample.rejection_sampler": rejection_sampler,
            "vllm.v1.spec_decode.llm_base_proposer": llm_base_proposer}

    def changed(name, **attrs):
        module = types.SimpleNamespace(**vars(real[name]))
        for k, v in attrs.items():
            if v is None:
                delattr(module, k)
            else:
                setattr(module, k, v)
        return {**real, name: module}

    def rejection_sample(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs,
                         target_logits, bonus_token_ids, sampling_metadata, new_argument=None):
        pass

    why = sampler_mismatch(changed("vllm.v1.sample.rejection_sampler", rejection_sample=rejection_sample))
    assert why and "new_argument" in why and "rejection_sample" in why
    why = sampler_mismatch(changed("vllm.v1.sample.rejection_sampler", generate_uniform_probs=None))
    assert why and "generate_uniform_probs" in why
    why = sampler_mismatch(changed("vllm.v1.spec_decode.llm_base_proposer", compute_probs_and_sample_next_token=None))
    assert why and "is gone" in why
