"""rlaccel's CPU replacements of vLLM's two speculative samplers that draw Exp(1) noise
(rollout/vllm_adapter.py, "fast sampling noise"): the same distributions as vLLM's own, checked
against the exact ones without an engine. The lossless tests in test_speculative.py run whole
engines with them installed."""

import types

import pytest
import torch

from tests.rollout.test_speculative import _chi2_pvalue

B, V = 40_000, 6
P = torch.tensor([0.3, 0.25, 0.2, 0.1, 0.1, 0.05])   # target
Q = torch.tensor([0.1, 0.4, 0.3, 0.05, 0.15, 0.0])   # draft


@pytest.fixture(scope="module")
def samplers():
    from rollout.vllm_adapter import set_engine_env
    set_engine_env(1, 1)
    from vllm.platforms import current_platform
    current_platform.register_triton_kernel_overrides()  # the CPU kernels vLLM's engine would register
    from vllm.v1.sample import rejection_sampler
    from vllm.v1.spec_decode import llm_base_proposer

    from rollout import vllm_adapter
    assert rejection_sampler.sample_recovered_tokens.__module__.startswith("vllm"), \
        "an engine fixture left rlaccel's samplers installed: restore vLLM's at its teardown"
    return {"vllm": (rejection_sampler.sample_recovered_tokens, llm_base_proposer.compute_probs_and_sample_next_token),
            "rlaccel": (vllm_adapter.sample_recovered_tokens, vllm_adapter.compute_probs_and_sample_next_token)}


def test_exponential_noise_is_exp1_and_positive():
    from rollout.vllm_adapter import exponential_noise
    torch.manual_seed(0)
    x = exponential_noise((200_000,), torch.float32)
    assert not torch.isnan(x).any() and (x > 0).all()
    # Kolmogorov-Smirnov against 1 - exp(-x): the 1e-3 critical value is 1.95 / sqrt(n)
    xs = x.double().sort().values
    ecdf = torch.arange(1, len(xs) + 1, dtype=torch.float64) / len(xs)
    assert (ecdf - (1 - torch.exp(-xs))).abs().max() < 1.95 / len(xs) ** 0.5
    assert exponential_noise((3,), torch.float64).dtype == torch.float64


def _recovered(fn, generators=None, n=B):
    meta = types.SimpleNamespace(generators=generators or {})
    return fn(1, [1] * n, torch.arange(1, n + 1, dtype=torch.int32), torch.ones(n, dtype=torch.long),
              Q.expand(n, V).contiguous(), P.expand(n, V).contiguous(), meta, torch.device("cpu"))


@pytest.mark.parametrize("impl", ["vllm", "rlaccel"])
def test_recovered_tokens_follow_the_residual(samplers, impl):
    """A rejected draft is replaced by a sample of max(p - q, 0), normalised."""
    torch.manual_seed(1)
    residual = (P - Q).clamp(min=0)
    counts = torch.bincount(_recovered(samplers[impl][0]), minlength=V)
    assert counts[residual == 0].sum() == 0
    assert _chi2_pvalue(counts, residual / residual.sum()) > 1e-3


def test_seeded_requests_draw_from_their_own_generator(samplers):
    fn = samplers["rlaccel"][0]
    gens = lambda: {i: torch.Generator().manual_seed(100 + i) for i in range(0, 64, 2)}  # noqa: E731
    a, b = _recovered(fn, gens(), 64), _recovered(fn, gens(), 64)
    assert torch.equal(a[0::2], b[0::2])  # the seeded rows repeat
    residual = (P - Q).clamp(min=0)
    seeded = torch.cat([_recovered(fn, {i: torch.Generator().manual_seed(1000 * r + i) for i in range(500)}, 500)
                        for r in range(40)])
    assert _chi2_pvalue(torch.bincount(seeded, minlength=V), residual / residual.sum()) > 1e-3


@pytest.mark.parametrize("impl", ["vllm", "rlaccel"])
def test_draft_tokens_follow_the_tempered_drafter(samplers, impl):
    torch.manual_seed(2)
    logits = torch.log(P)
    meta = types.SimpleNamespace(all_greedy=False, all_random=True, temperature=torch.full((B,), 0.7))
    ids, probs = samplers[impl][1](logits.expand(B, V).clone(), meta)
    want = torch.softmax(logits / 0.7, -1)
    assert torch.allclose(probs[0], want, atol=1e-6)
    assert _chi2_pvalue(torch.bincount(ids, minlength=V), want) > 1e-3
    # Greedy requests in a mixed batch draft the argmax.
    meta = types.SimpleNamespace(all_greedy=False, all_random=False, temperature=torch.tensor([0.0, 1.0] * 50))
    ids, _ = samplers[impl][1](logits.expand(100, V).clone(), meta)
    assert (ids[0::2] == 0).all() and (ids[1::2] != 0).any()
