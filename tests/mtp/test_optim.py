"""The drafter head's optimizer: bfloat16 heads learn through a float32 master copy."""

import math

import torch

from mtp.optim import HeadOptimizer


class Head(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 0.2, 0.05, 0.01], dtype=dtype))

    def param_groups(self, lr):
        return [{"params": [self.w], "lr": lr}]


def _train(head, steps=100, lr=3e-4):
    opt = HeadOptimizer(head, lr)
    for _ in range(steps):
        opt.zero_grad()
        head.w.sum().backward()  # the same sign every step: AdamW moves each weight by ~lr
        opt.step()
    return opt


def test_a_bfloat16_head_moves_as_a_float32_one():
    """100 AdamW steps of ~3e-4 move every weight by ~0.03; applied to bfloat16 weights directly,
    the steps round away for weights above ~0.08 (1.0 and 0.2 stayed where they were). Through the
    master copy the bfloat16 weights are the float32 run's rounded: within half a bfloat16 step."""
    full, half = Head(torch.float32), Head(torch.bfloat16)
    _train(full), _train(half)
    assert (full.w.detach() - torch.tensor([1.0, 0.2, 0.05, 0.01])).abs().min() > 0.029
    want = full.w.detach()
    spacing = torch.tensor([2.0 ** (math.floor(math.log2(abs(x))) - 7) for x in want.tolist()])  # bf16 ulp at each
    assert ((half.w.detach().float() - want).abs() <= spacing / 2).all()


def test_the_master_copy_survives_a_save_and_a_bare_state_starts_from_the_head():
    head = Head(torch.bfloat16)
    opt = _train(head, steps=10)
    state = opt.state_dict()
    other = Head(torch.bfloat16)
    with torch.no_grad():
        other.w.copy_(head.w)
    again = HeadOptimizer(other, 3e-4)
    again.load_state_dict(state)
    assert torch.equal(again.master[0], opt.master[0]) and not torch.equal(again.master[0], other.w.float())
    bare = HeadOptimizer(other, 3e-4)
    bare.load_state_dict(state["optimizer"])  # a checkpoint from before the master copy
    assert torch.equal(bare.master[0], other.w.detach().float())


def test_a_non_finite_gradient_is_not_applied():
    head = Head(torch.bfloat16)
    opt = HeadOptimizer(head, 3e-4)
    before = head.w.detach().clone()
    (head.w.sum() * float("nan")).backward()
    assert math.isnan(opt.step())
    assert torch.equal(head.w.detach(), before) and head.w.grad is None
