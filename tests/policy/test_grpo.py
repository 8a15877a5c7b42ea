"""GRPO math against values worked out by hand."""

import math

import pytest
import torch

from policy.grpo import (ADVANTAGES, LOSS_AGGREGATIONS, StepTotals, behaviour_weight, dr_grpo_advantages,
                         grpo_advantages, grpo_loss, k3_kl, weighs_on_policy)


def test_grpo_advantages_by_hand():
    # rewards 1,0,0,1: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 0.57735
    adv = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), eps=0.0)
    expected = 0.5 / math.sqrt(1 / 3)
    assert torch.allclose(adv, torch.tensor([[expected, -expected, -expected, expected]]), atol=1e-6)


def test_grpo_advantages_constant_group_is_zero():
    adv = grpo_advantages(torch.tensor([[1.0, 1.0, 1.0]]))
    assert torch.equal(adv, torch.zeros(1, 3))


@pytest.mark.parametrize("advantage", ["grpo", "dr_grpo"])
def test_a_group_of_equal_rewards_has_advantage_exactly_zero(advantage):
    # 0.1 six times averages to 0.1 - 1.4e-17 in float64 (as the trainer computes them): without the
    # exact zero, grpo gave 1.4e-11, and the responses were not skipped (trainer.skip_zero_advantage)
    rewards = torch.tensor([[0.1] * 6, [0.7] * 6, [0.3, 0.1, 0.1, 0.1, 0.1, 0.1]], dtype=torch.float64)
    adv = ADVANTAGES[advantage](rewards)
    assert torch.equal(adv[:2], torch.zeros(2, 6, dtype=torch.float64)) and (adv[2] != 0).all()


def test_dr_grpo_advantages_do_not_divide_by_std():
    adv = dr_grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]]))
    assert torch.equal(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5], [1.0, -1.0, 0.0, 0.0]]))


def test_registries_hold_the_documented_variants():
    assert set(ADVANTAGES) == {"grpo", "dr_grpo"}
    assert set(LOSS_AGGREGATIONS) == {"token_mean", "seq_mean", "seq_sum_norm"}


def test_k3_kl_by_hand():
    # log_ratio = ref - logp = -1: e^-1 + 1 - 1
    kl = k3_kl(torch.tensor([-1.0, -0.5]), torch.tensor([-2.0, -0.5]))
    assert torch.allclose(kl, torch.tensor([math.exp(-1.0), 0.0]), atol=1e-7)


def _loss(logp, old, adv, mask, agg="token_mean", **kw):
    totals = StepTotals(tokens=int(mask.sum()), sequences=mask.shape[0], max_tokens=mask.shape[1])
    return grpo_loss(logp, old, adv, mask, totals, agg, **kw)


def test_clipped_surrogate_by_hand():
    # Row 0, A=+1: ratios e^0.1=1.105 (inside 1±0.2) and e^0.5=1.649 (clipped to 1.2).
    # Row 1, A=-1: ratios e^-0.5=0.607 (min(-0.607, -0.8) = -0.8, clipped) and 1.0.
    old = torch.zeros(2, 2)
    logp = torch.tensor([[0.1, 0.5], [-0.5, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    loss, m = _loss(logp, old, adv, mask)
    per_token = torch.tensor([[-math.exp(0.1), -1.2], [0.8, 1.0]])
    assert loss.item() == pytest.approx(per_token.mean().item(), abs=1e-6)
    assert m["clip_frac"] == pytest.approx(0.5)
    # outside the range on the side that does not bind (A=+1, ratio 0.61; A=-1, ratio 1.65): the
    # unclipped term is taken and the gradient flows, so neither counts as clipped
    _, m = _loss(torch.tensor([[-0.5], [0.5]]), torch.zeros(2, 1), adv, torch.ones(2, 1))
    assert m["clip_frac"] == 0.0


def test_asymmetric_clipping_by_hand():
    """clip_low bounds the ratio from below, clip_high from above (DAPO's clip-higher): swapping
    them changes both rows. Row 0, A=+1, ratio e^0.25=1.284: inside [0.9, 1.3] (clipped to 1.1
    were the bounds swapped). Row 1, A=-1, ratio e^-0.2=0.819: below 1 - 0.1, so -max(0.819, 0.9)
    = -0.9 binds (with the bounds swapped, 0.819 is inside [0.7, 1.1])."""
    logp, old = torch.tensor([[0.25], [-0.2]]), torch.zeros(2, 1)
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 1)
    loss, m = _loss(logp, old, adv, mask, clip_low=0.1, clip_high=0.3)
    assert loss.item() == pytest.approx((-math.exp(0.25) + 0.9) / 2, abs=1e-6)
    assert m["clip_frac"] == pytest.approx(0.5)
    swapped, _ = _loss(logp, old, adv, mask, clip_low=0.3, clip_high=0.1)
    assert swapped.item() == pytest.approx((-1.1 + math.exp(-0.2)) / 2, abs=1e-6)


def test_aggregations_by_hand():
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([2.0, -4.0])  # per-token loss: -2 on row 0, +4 on row 1 (ratio 1)
    token_mean, _ = _loss(logp, logp, adv, mask, "token_mean")
    seq_mean, _ = _loss(logp, logp, adv, mask, "seq_mean")
    seq_sum_norm, _ = _loss(logp, logp, adv, mask, "seq_sum_norm")
    assert token_mean.item() == pytest.approx((-2 * 3 + 4) / 4)
    assert seq_mean.item() == pytest.approx((-2 + 4) / 2)
    assert seq_sum_norm.item() == pytest.approx((-2 * 3 + 4) / (2 * 3))


@pytest.mark.parametrize("agg", sorted(LOSS_AGGREGATIONS))
def test_micro_batches_add_up_to_the_full_batch(agg):
    torch.manual_seed(0)
    logp = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    old = logp.detach() + 0.3 * torch.randn(6, 5, dtype=torch.float64)
    adv = torch.randn(6, dtype=torch.float64)
    mask = (torch.rand(6, 5) > 0.3).double()
    mask[:, 0] = 1
    totals = StepTotals(tokens=int(mask.sum()), sequences=6, max_tokens=5)
    full, _ = grpo_loss(logp, old, adv, mask, totals, agg)
    parts = sum(grpo_loss(logp[s], old[s], adv[s], mask[s], totals, agg)[0] for s in (slice(0, 2), slice(2, 6)))
    assert abs(full.item() - parts.item()) < 1e-12


def test_gradient_is_minus_advantage_over_tokens_on_policy():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = _loss(logp, logp.detach(), torch.tensor([3.0]), torch.ones(1, 2))
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.5, -1.5]]))


def test_kl_term_is_added_per_token():
    logp = torch.tensor([[-1.0]])
    loss, m = _loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), kl_coef=0.5, ref_logp=torch.tensor([[-2.0]]))
    assert loss.item() == pytest.approx(0.5 * math.exp(-1.0))
    assert m["kl"] == pytest.approx(math.exp(-1.0))


def test_shape_mismatch_fails_at_entry():
    with pytest.raises(AssertionError):
        _loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))


def test_behaviour_weight_multiplies_the_surrogate():
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    weight = torch.tensor([[0.5, 2.0]])
    loss, _ = _loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 2), is_weight=weight)
    assert loss.item() == pytest.approx(-(0.5 + 2.0) / 2)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.25, -1.0]]))


@pytest.mark.parametrize("mode, dtype, weighted", [("all", "float32", True), ("stale", "bfloat16", False),
                                                   ("auto", "bfloat16", True), ("auto", torch.float16, True),
                                                   ("auto", "float32", False), ("auto", torch.float64, False)])
def test_on_policy_samples_are_weighted_by_mode_and_dtype(mode, dtype, weighted):
    assert weighs_on_policy(mode, dtype) is weighted


def test_the_behaviour_weight_by_hand():
    # row 0 weighted: exp(-1 - -1.5) = e^0.5, exp(-2 - -0.5) = e^-1.5; row 1 not: 1, whatever the logprobs
    old, behaviour = torch.tensor([[-1.0, -2.0], [-1.0, 3.0]]), torch.tensor([[-1.5, -0.5], [-3.0, -1.0]])
    w = behaviour_weight(old, behaviour, torch.tensor([True, False]), cap=2.0)
    assert torch.allclose(w, torch.tensor([[math.exp(0.5), math.exp(-1.5)], [1.0, 1.0]]),
                          rtol=4 * torch.finfo(torch.float32).eps, atol=0)
    # the cap binds exactly: e^2 = 7.4 -> 2
    assert behaviour_weight(torch.tensor([[0.0]]), torch.tensor([[-2.0]]), torch.tensor([True]), cap=2.0).item() == 2.0
