"""The fused master-copy AdamW pass (policy.fused_adamw) against its reference
(policy.distributed.MasterCopy.clip_and_step: float32 gradients, torch's norm and clip, torch's
fused AdamW, the master rounded into the parameters).

Each step starts both paths from the same state and compares them with a float64 oracle of the
same step (the same float32 state, the bfloat16 gradients exactly, the clip coefficient of the
exact norm). Tolerances derived from the roundings: the fused norm is within twice the
reference's own error of the exact norm (both sum float32 squares, differently) plus two float32
roundings; master and moments may be off the oracle
by at most twice the reference's own largest error (the pass rounds as torch's kernel does but
for the lerp's fused multiply-add) plus one float32 rounding; the bfloat16 parameters are the
master rounded, exactly, in both. Compiles with inductor (a C++ compiler; ~12 s cold): slow.
"""

import copy
import math

import pytest
import torch

from orchestration.config import load_config
from policy.distributed import LocalUpdate, MasterCopy
from policy.fused_adamw import AUTO_MIN_PARAMETERS, FusedMasterAdamW, fused_master_adamw

pytestmark = pytest.mark.slow
SIZES = (3, 1000, 4099, 20_000)  # tails shorter and longer than a vector, and a longer run


def _model(seed: int = 0) -> torch.nn.ParameterList:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.ParameterList([torch.nn.Parameter((0.02 * torch.randn(n, generator=g)).bfloat16())
                                   for n in SIZES])


def _pair(lr: float, weight_decay: float):
    """The reference and the fused update of two identical bfloat16 models."""
    cfg = load_config(None, [f"trainer.lr={lr}", f"trainer.weight_decay={weight_decay}"]).trainer
    ref_model, fused_model = _model(), _model()
    ref = LocalUpdate(ref_model, cfg)
    assert ref.fused is None  # below AUTO_MIN_PARAMETERS
    fused = LocalUpdate(fused_model, cfg)
    fused.fused = FusedMasterAdamW(fused.optimizer, fused.params, fused.master)
    return ref, fused


def _set_grads(updates, step: int, scale: float) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for i, n in enumerate(SIZES):
        grad = (scale * torch.randn(n, generator=g)).bfloat16()
        if step == 2 and i == 1:
            grad = None  # a parameter without a gradient this step: no state change
        for u in updates:
            u.params[i].grad = None if grad is None else grad.clone()


def _oracle(update: MasterCopy, max_norm: float, before: list[dict]) -> tuple[float, list[dict]]:
    """The step in float64 from the reference's state ``before`` (per parameter: master, exp_avg,
    exp_avg_sq, step) and its parameters' gradients."""
    grads = [None if p.grad is None else p.grad.double() for p in update.params]
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads if g is not None))
    coef = min(1.0, max_norm / (norm + 1e-6))
    group = update.optimizer.param_groups[0]
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    out = []
    for g, s in zip(grads, before):
        if g is None:
            out.append(s)
            continue
        t = s["step"] + 1
        m0 = s["exp_avg"] if s["exp_avg"] is not None else torch.zeros_like(s["master"])
        v0 = s["exp_avg_sq"] if s["exp_avg_sq"] is not None else torch.zeros_like(s["master"])
        g = g * coef
        m, v = m0 + (1 - b1) * (g - m0), v0 * b2 + (1 - b2) * g * g
        p = s["master"] * (1 - lr * wd) - lr / (1 - b1 ** t) * m / (v.sqrt() / math.sqrt(1 - b2 ** t) + eps)
        out.append({"master": p, "exp_avg": m, "exp_avg_sq": v, "step": t})
    return norm, out


def _state(update: MasterCopy) -> list[dict]:
    out = []
    for m in update.master:
        s = update.optimizer.state.get(m, {})
        out.append({"master": m.detach().double().clone(), "step": float(s["step"]) if s else 0.0,
                    **{k: s[k].double().clone() if s else None for k in ("exp_avg", "exp_avg_sq")}})
    return out


def _copy_state(src: MasterCopy, dst: MasterCopy) -> None:
    dst.optimizer.load_state_dict(copy.deepcopy(src.optimizer.state_dict()))  # its tensors, not shared
    dst.restore(src.master_state(), "test")
    with torch.no_grad():
        for p, q in zip(src.params, dst.params):
            q.copy_(p)


@pytest.mark.parametrize("max_norm, lr, weight_decay", [(1e9, 1e-3, 0.0), (1e9, 1e-3, 0.1), (0.05, 1e-2, 0.01)])
def test_the_fused_pass_steps_as_the_reference_does(max_norm, lr, weight_decay):
    """Four steps (clipped in the last case: the gradients' norm is ~1.6, max_norm 0.05)."""
    ref, fused = _pair(lr, weight_decay)
    for step in range(4):
        _set_grads([ref, fused], step, scale=0.01)
        before = _state(ref)
        exact_norm, oracle = _oracle(ref, max_norm, before)
        ref_norm = ref.clip_and_step(ref.optimizer, max_norm)
        fused_norm = fused.clip_and_step(fused.optimizer, max_norm)
        ref_norm_err = abs(ref_norm - exact_norm)
        assert abs(fused_norm - exact_norm) <= 2 * ref_norm_err + 2 * 2.0 ** -24 * exact_norm
        after_ref, after_fused = _state(ref), _state(fused)
        for i, (o, r, f) in enumerate(zip(oracle, after_ref, after_fused)):
            assert f["step"] == r["step"] == o["step"]
            for k in ("master", "exp_avg", "exp_avg_sq"):
                if o[k] is None:  # no gradient yet: no state in either
                    assert r[k] is None and f[k] is None
                    continue
                ref_err = float((r[k] - o[k]).abs().max())
                one_rounding = float(o[k].abs().max()) * 2.0 ** -24
                fused_err = float((f[k] - o[k]).abs().max())
                assert fused_err <= 2 * ref_err + one_rounding, (step, i, k, fused_err, ref_err)
        for p, q, m in zip(ref.params, fused.params, fused.master):
            assert torch.equal(q.detach(), m.detach().to(torch.bfloat16))  # the master rounded
            assert p.dtype == q.dtype == torch.bfloat16
        _copy_state(ref, fused)  # the next step starts both from the same state


def test_a_parameter_without_a_gradient_keeps_its_state():
    ref, fused = _pair(1e-3, 0.1)
    _set_grads([fused], 0, scale=0.01)
    fused.params[0].grad = None
    fused.clip_and_step(fused.optimizer, 1.0)
    assert fused.master[0] not in fused.optimizer.state or not fused.optimizer.state[fused.master[0]]
    assert torch.equal(fused.master[0].detach(), ref.master[0].detach())  # not even weight decay applied


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_norm_steps_nothing(bad):
    _, fused = _pair(1e-3, 0.1)
    _set_grads([fused], 0, scale=0.01)
    fused.params[2].grad[5] = bad
    before = [m.detach().clone() for m in fused.master]
    norm = fused.clip_and_step(fused.optimizer, 1.0)
    assert not math.isfinite(norm)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, fused.master))
    assert not any(fused.optimizer.state.values())


def test_a_checkpoint_of_the_fused_path_resumes_on_the_reference_path(tmp_path):
    """The pass keeps torch's AdamW state: a save after fused steps loads into the reference."""
    ref, fused = _pair(1e-3, 0.1)
    for step in range(2):
        _set_grads([fused], step, scale=0.01)
        fused.clip_and_step(fused.optimizer, 1.0)
    fused.save(tmp_path)
    ref.load(tmp_path)
    for a, b in zip(ref.master, fused.master):
        assert torch.equal(a.detach(), b.detach())
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(ref.optimizer.state[a][k], fused.optimizer.state[b][k])


def test_which_updates_are_fused():
    cfg = load_config(None, []).trainer
    small = LocalUpdate(_model(), cfg)
    assert small.fused is None  # "auto" below AUTO_MIN_PARAMETERS
    assert fused_master_adamw(small.optimizer, small.params, small.master, "off") is None
    assert isinstance(fused_master_adamw(small.optimizer, small.params, small.master, "on"), FusedMasterAdamW)
    float32 = LocalUpdate(torch.nn.Linear(4, 4), cfg)
    assert fused_master_adamw(float32.optimizer, float32.params, float32.master, "on") is None  # no master copy
    with pytest.raises(ValueError, match="choose one of"):
        fused_master_adamw(small.optimizer, small.params, small.master, "yes")
    big = torch.nn.Linear(AUTO_MIN_PARAMETERS // 1000, 1000, bias=False).to(torch.bfloat16)
    assert isinstance(LocalUpdate(big, cfg).fused, FusedMasterAdamW)
