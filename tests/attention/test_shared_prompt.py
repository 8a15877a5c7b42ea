"""The shared-prompt attention backends against the dense-mask oracle."""

import pytest
import torch

from attention.layout import pack
from attention.shared_prompt import BACKENDS, shared_prompt_attention

CASES = [  # (prompt lengths per group, response lengths per group)
    ([5], [[2, 1, 4]]),
    ([3, 7], [[3, 1], [1, 5, 2, 2, 1, 3, 1, 2]]),
    ([1], [[1]]),
    ([9, 2, 4], [[1, 2], [1], [6, 6, 6]]),  # a row shorter than another's prompt; rows padded to one shape
]


def _qkv(batch, H=4, H_kv=2, D=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L = batch.input_ids.shape
    make = lambda h: torch.randn(B, h, L, D, dtype=dtype, generator=g, requires_grad=True)  # noqa: E731
    return make(H), make(H_kv), make(H_kv)


def _batch(prompt_lens, response_lens):
    prompts, responses = [], []
    for g, (P, rs) in enumerate(zip(prompt_lens, response_lens)):
        for r in rs:
            prompts.append(list(range(10 + g, 10 + g + P)))
            responses.append(list(range(1, 1 + r)))
    return pack(prompts, responses, pad_id=0)


@pytest.mark.parametrize("prompt_lens, response_lens", CASES)
def test_regions_equals_reference_float64(prompt_lens, response_lens):
    batch = _batch(prompt_lens, response_lens)
    q, k, v = _qkv(batch)
    valid = (batch.segment_ids >= 0)[:, None, :, None]
    ref = shared_prompt_attention(q, k, v, batch, 0.35, "reference") * valid
    out = shared_prompt_attention(q, k, v, batch, 0.35, "regions") * valid
    assert (out - ref).abs().max() <= 1e-12
    w = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    g_out = torch.autograd.grad((out * w).sum(), (q, k, v))
    for a, b in zip(g_out, g_ref):
        assert (a - b).abs().max() <= 1e-12


def test_reference_equals_separate_causal_attention():
    """The oracle itself: each response attends as if [prompt | response] were alone."""
    batch = _batch([4], [[3, 2]])
    q, k, v = _qkv(batch, H=2, H_kv=2)
    out = shared_prompt_attention(q, k, v, batch, 0.5, "reference")
    for n, (lo, R) in enumerate([(4, 3), (7, 2)]):
        idx = list(range(4)) + list(range(lo, lo + R))
        alone = torch.nn.functional.scaled_dot_product_attention(q[:, :, idx], k[:, :, idx], v[:, :, idx],
                                                                 is_causal=True, scale=0.5)
        assert torch.allclose(out[:, :, idx], alone, atol=1e-13, rtol=0)


def test_regions_gradcheck():
    batch = _batch([3], [[2, 3]])
    q, k, v = _qkv(batch, H=2, H_kv=1, D=3)
    valid = (batch.segment_ids >= 0)[:, None, :, None]
    assert torch.autograd.gradcheck(lambda q, k, v: shared_prompt_attention(q, k, v, batch, 0.7, "regions") * valid,
                                    (q, k, v))


def test_float32_error_is_within_twice_the_references():
    """float32 regions may differ from the float64 oracle by at most ~2x the float32 dense
    reference's own error (the flash-attention test rule), or 2x the rounding of the result
    itself (float32's unit roundoff times its largest magnitude) should that error be below it."""
    batch = _batch([7, 3], [[5, 2, 6], [4, 4]])
    q, k, v = _qkv(batch, dtype=torch.float64)
    valid = (batch.segment_ids >= 0)[:, None, :, None]
    exact = shared_prompt_attention(q, k, v, batch, 0.35, "reference") * valid
    q32, k32, v32 = (t.detach().float() for t in (q, k, v))
    err_ref = ((shared_prompt_attention(q32, k32, v32, batch, 0.35, "reference") * valid).double() - exact).abs().max()
    err_reg = ((shared_prompt_attention(q32, k32, v32, batch, 0.35, "regions") * valid).double() - exact).abs().max()
    rounding = torch.finfo(torch.float32).eps / 2 * exact.abs().max()
    assert err_reg <= 2 * max(err_ref, rounding), (err_reg, err_ref, rounding)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_twice_the_references(dtype):
    """In bfloat16/float16 (attended in float32 on CPU, the output rounded back), forward and
    gradients differ from the float64 oracle by at most 2x the dense reference's own error in
    that dtype, or 2x the rounding of the result itself."""
    batch = _batch([7, 3], [[5, 2, 6], [4, 4]])
    q, k, v = _qkv(batch, dtype=torch.float64)
    valid = (batch.segment_ids >= 0)[:, None, :, None]
    w = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def run(backend, cast):
        inputs = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        out = shared_prompt_attention(*inputs, batch, 0.35, backend) * valid
        assert out.dtype == cast
        return [out.double(), *(g.double() for g in torch.autograd.grad((out * w.to(cast)).sum(), inputs))]
    exact = run("reference", torch.float64)
    half, ref = run("regions", dtype), run("reference", dtype)
    for name, e, h, r in zip(["output", "dq", "dk", "dv"], exact, half, ref):
        rounding = torch.finfo(dtype).eps / 2 * e.abs().max()
        err, err_ref = (h - e).abs().max(), (r - e).abs().max()
        assert err <= 2 * max(err_ref, rounding), (name, err, err_ref, rounding)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("prompt_lens, response_lens", CASES)
def test_flex_forward_equals_reference(prompt_lens, response_lens):
    """FlexAttention's forward runs (unfused) on CPU; its backward needs a GPU (below)."""
    batch = _batch(prompt_lens, response_lens)
    q, k, v = (t.detach() for t in _qkv(batch))
    valid = (batch.segment_ids >= 0)[:, None, :, None]
    ref = shared_prompt_attention(q, k, v, batch, 0.35, "reference") * valid
    out = shared_prompt_attention(q, k, v, batch, 0.35, "flex") * valid
    assert (out - ref).abs().max() <= 1e-12


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no CPU backward in torch 2.13")
def test_flex_gradients_equal_reference_on_gpu():
    """float32 flex gradients may err at most ~2x as much as the float32 dense reference's,
    both measured against the float64 reference."""
    batch = _batch([7, 3], [[5, 2, 6], [4, 4]])
    q64, k64, v64 = (t.detach().cuda().requires_grad_() for t in _qkv(batch))
    valid = (batch.segment_ids >= 0)[:, None, :, None].cuda()
    w = torch.randn(q64.shape, dtype=torch.float64, device="cuda")

    def grads(backend, *qkv):
        out = shared_prompt_attention(*qkv, batch, 0.35, backend) * valid
        return torch.autograd.grad((out * w.to(out.dtype)).sum(), qkv)

    exact = grads("reference", q64, k64, v64)
    qkv32 = [t.detach().float().requires_grad_() for t in (q64, k64, v64)]
    err_ref = max((a.double() - e).abs().max() for a, e in zip(grads("reference", *qkv32), exact))
    qkv32 = [t.detach().float().requires_grad_() for t in (q64, k64, v64)]
    err_flex = max((a.double() - e).abs().max() for a, e in zip(grads("flex", *qkv32), exact))
    rounding = torch.finfo(torch.float32).eps / 2 * max(e.abs().max() for e in exact)
    assert err_flex <= 2 * max(err_ref, rounding)


def test_unknown_backend():
    batch = _batch([2], [[1]])
    with pytest.raises(ValueError, match="choose one of"):
        shared_prompt_attention(*_qkv(batch), batch, 1.0, "flash")
    assert set(BACKENDS) == {"reference", "regions", "flex"}
