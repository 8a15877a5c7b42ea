"""The fused master-copy AdamW pass (policy.fused_adamw) against its reference
(policy.distributed.MasterCopy.clip_and_step: float32 gradients, torch's norm and clip, torch's
fused AdamW, the master rounded into the parameters).

Each step starts both paths from the same state and compares them with a float64 oracle of the
same step (the same float32 state, the bfloat16 gradients exactly, the clip coefficient of the
exact norm). Tolerances derived from the roundings: the fused norm sums each tensor's float32
squares in some order (relative error at most (n − 1)·2⁻²⁴ for n terms, the longest tensor's
length here) and the tensors' sums in float64; master and moments may be off the oracle by at
most twice the reference's own largest error (the pass rounds as torch's kernel does but for the
lerp's fused multiply-add) plus one float32 rounding; the bfloat16 parameters are the master
rounded, exactly, in both. Compiles with inductor (a C++ compiler; ~12 s cold): slow.
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


def _pair(lr: float, weight_decay: float, betas=(0.9, 0.99)):
    """The reference and the fused update of two identical bfloat16 models."""
    cfg = load_config(None, [f"trainer.lr={lr}", f"trainer.weight_decay={weight_decay}",
                             f"trainer.beta1={betas[0]}", f"trainer.beta2={betas[1]}"]).trainer
    ref = LocalUpdate(_model(), cfg)
    assert ref.fused is None  # "auto", below AUTO_MIN_PARAMETERS
    fused = LocalUpdate(_model(), cfg)
    fused.fused = fused_master_adamw(fused.optimizer, fused.params, fused.master, "on")
    return ref, fused


def _set_grads(updates, step: int, scale: float = 0.01) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for i, n in enumerate(SIZES):
        grad = (scale * torch.randn(n, generator=g)).bfloat16()
        if step == 2 and i == 1:
            grad = None  # a parameter without a gradient this step: no state change
        for u in updates:
            u.params[i].grad = None if grad is None else grad.clone()


def _oracle(update: MasterCopy, max_norm: float, before: list[dict]) -> tuple[float, list[dict]]:
    """The step in float64 from the state ``before`` (per parameter: master, exp_avg, exp_avg_sq,
    step) and the update's parameters' gradients."""
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


def _step_both_and_compare(ref: LocalUpdate, fused: LocalUpdate, max_norm: float) -> None:
    """One step of each from the same state and gradients, against the float64 oracle."""
    before = _state(ref)
    exact_norm, oracle = _oracle(ref, max_norm, before)
    ref.clip_and_step(ref.optimizer, max_norm)
    fused_norm = fused.clip_and_step(fused.optimizer, max_norm)
    assert abs(fused_norm - exact_norm) <= max(SIZES) * 2.0 ** -24 * exact_norm
    for i, (o, r, f) in enumerate(zip(oracle, _state(ref), _state(fused))):
        assert f["step"] == r["step"] == o["step"]
        for k in ("master", "exp_avg", "exp_avg_sq"):
            ref_err = float((r[k] - o[k]).abs().max())
            fused_err = float((f[k] - o[k]).abs().max())
            assert fused_err <= 2 * ref_err + float(o[k].abs().max()) * 2.0 ** -24, (i, k, fused_err, ref_err)
    for q, m in zip(fused.params, fused.master):
        assert q.dtype == torch.bfloat16 and torch.equal(q.detach(), m.detach().to(torch.bfloat16))  # the master rounded


@pytest.mark.parametrize("max_norm, lr, weight_decay, betas", [(1e9, 1e-3, 0.0, (0.9, 0.99)),
                                                               (1e9, 1e-3, 0.1, (0.9, 0.99)),
                                                               (1e9, 1e-2, 0.0, (0.8, 0.95)),
                                                               (0.05, 1e-2, 0.01, (0.9, 0.999))])
def test_the_fused_pass_steps_as_the_reference_does(max_norm, lr, weight_decay, betas):
    """Four steps (clipped in the last case: the gradients' norm is ~1.6, max_norm 0.05; the
    second parameter has no gradient in the third step, which then calls both passes per tensor,
    and is a step behind in the fourth, whose norm is one call over all four and whose update is
    per tensor; the first two make one call of each form). Nothing compiles after the first step."""
    ref, fused = _pair(lr, weight_decay, betas)
    for step in range(4):
        _set_grads([ref, fused], step)
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            _step_both_and_compare(ref, fused, max_norm)
        _copy_state(ref, fused)  # the next step starts both from the same state
    assert fused.fused._one_call_ran == {"norms", "updates"}


def test_the_one_call_pass_steps_parameters_laid_out_in_one_block():
    """The trainer lays the parameters out in one block (policy.models.flatten_parameters): the
    one-call update then writes views of one tensor, as the per-tensor calls did."""
    from policy.models import flatten_parameters
    cfg = load_config(None, ["trainer.lr=1e-3", "trainer.weight_decay=0.1"]).trainer
    ref, flat = _model(), _model()
    flatten_parameters(flat)
    assert len({p.untyped_storage().data_ptr() for p in flat}) == 1
    ref, fused = LocalUpdate(ref, cfg), LocalUpdate(flat, cfg)
    fused.fused = fused_master_adamw(fused.optimizer, fused.params, fused.master, "on")
    for step in (0, 1):
        _set_grads([ref, fused], step)
        _step_both_and_compare(ref, fused, 1e9)
        _copy_state(ref, fused)
    assert fused.fused._one_call_ran == {"norms", "updates"}


def test_a_one_call_form_that_does_not_compile_steps_per_tensor(caplog):
    """A compile error (dynamo's, which wraps inductor's and a missing compiler's) falls back to
    the per-tensor calls; any other error is raised (it may come after some tensors were written)."""
    from torch._dynamo.exc import TorchDynamoException
    ref, fused = _pair(1e-3, 0.1)

    def breaks(*args):
        raise RuntimeError("while running")
    fused.fused._one_call["updates"] = breaks
    _set_grads([fused], 0)
    with pytest.raises(RuntimeError, match="while running"):
        fused.clip_and_step(fused.optimizer, 1e9)
    ref, fused = _pair(1e-3, 0.1)

    def fails(*args):
        raise TorchDynamoException("no compiler")
    fused.fused._one_call["updates"] = fails
    for step in (0, 1):
        _set_grads([ref, fused], step)
        with caplog.at_level("WARNING"):
            _step_both_and_compare(ref, fused, 1e9)
        _copy_state(ref, fused)
    assert "updates" not in fused.fused._one_call and fused.fused._one_call_ran == {"norms"}
    assert sum("the one-call updates did not compile" in r.message for r in caplog.records) == 1


def test_a_parameter_without_a_gradient_keeps_its_state():
    ref, fused = _pair(1e-3, 0.1)
    _set_grads([fused], 0)
    fused.params[0].grad = None
    fused.clip_and_step(fused.optimizer, 1.0)
    assert not fused.optimizer.state.get(fused.master[0])
    assert torch.equal(fused.master[0].detach(), ref.master[0].detach())  # not even weight decay applied


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_norm_steps_nothing(bad):
    _, fused = _pair(1e-3, 0.1)
    _set_grads([fused], 0)
    fused.params[2].grad[5] = bad
    before = [m.detach().clone() for m in fused.master]
    norm = fused.clip_and_step(fused.optimizer, 1.0)
    assert not math.isfinite(norm)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, fused.master))
    assert not any(fused.optimizer.state.values())


def test_a_checkpoint_of_the_fused_path_resumes_on_either_path(tmp_path):
    """The pass keeps torch's AdamW state: a save after fused steps loads into the reference, and
    both go on alike, the fused one with the loaded groups (the load replaces them; a schedule's
    new learning rate in them is the one applied)."""
    ref, fused = _pair(1e-3, 0.1)
    for step in range(2):
        _set_grads([fused], step)
        fused.clip_and_step(fused.optimizer, 1.0)
    fused.save(tmp_path)
    ref.load(tmp_path)
    fused.load(tmp_path)
    for a, b in zip(ref.master, fused.master):
        assert torch.equal(a.detach(), b.detach())
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(ref.optimizer.state[a][k], fused.optimizer.state[b][k])
    for update in (ref, fused):
        update.optimizer.param_groups[0]["lr"] = 5e-4  # as a learning-rate schedule would
    _set_grads([ref, fused], 2)
    _step_both_and_compare(ref, fused, 1.0)


def test_a_gradient_the_pass_does_not_take_goes_the_reference_path():
    ref, fused = _pair(1e-3, 0.1)
    _set_grads([ref, fused], 0)
    strided = torch.zeros(2 * SIZES[2], dtype=torch.bfloat16)[::2]
    strided.copy_(ref.params[2].grad)
    fused.params[2].grad = strided  # non-contiguous
    assert not fused.fused.applies()
    ref.clip_and_step(ref.optimizer, 1.0)
    fused.clip_and_step(fused.optimizer, 1.0)
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(ref.master, fused.master))  # the same path


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
    for optimizer in (torch.optim.AdamW(small.master, betas=(0.3, 0.99), fused=True),  # torch's other lerp form
                      torch.optim.AdamW(small.master)):  # not the fused kernel, which the pass rounds as
        assert fused_master_adamw(optimizer, small.params, small.master, "auto") is None
        with pytest.raises(ValueError, match="fused_master_step=on"):
            fused_master_adamw(optimizer, small.params, small.master, "on")
    big = torch.nn.Linear(AUTO_MIN_PARAMETERS // 1000, 1000, bias=False).to(torch.bfloat16)
    assert isinstance(LocalUpdate(big, cfg).fused, FusedMasterAdamW)
