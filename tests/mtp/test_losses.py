import math

import torch

from mtp import losses


def test_acceptance_is_one_minus_total_variation():
    p = torch.tensor([[2.0, 0.0, -1.0]])
    assert torch.allclose(losses.acceptance(p, p), torch.ones(1))
    disjoint = losses.acceptance(torch.tensor([[50.0, -50.0]]), torch.tensor([[-50.0, 50.0]]))
    assert float(disjoint) < 1e-20
    pp, qq = torch.softmax(p, -1), torch.softmax(torch.tensor([[0.0, 1.0, 0.0]]), -1)
    tv = 0.5 * (pp - qq).abs().sum()
    assert torch.allclose(losses.acceptance(p, torch.tensor([[0.0, 1.0, 0.0]])), 1 - tv)


def test_acceptance_uses_the_temperature():
    p, q = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    hot = losses.acceptance(p, q, temperature=100.0)
    assert float(hot) > 0.99 > float(losses.acceptance(p, q))


def test_expected_accepted_chains_the_steps():
    a = [torch.tensor([0.9, 0.5]), torch.tensor([0.8, 1.0]), torch.tensor([0.5, 0.0])]
    want = torch.tensor([0.9 + 0.72 + 0.36, 0.5 + 0.5 + 0.0])
    assert torch.allclose(losses.expected_accepted(a), want)
    mask = torch.tensor([1.0, 0.0])
    assert math.isclose(float(losses.acceptance_objective(a, mask)), -1.98, rel_tol=1e-6)


def test_kl_keeps_a_gradient_where_tv_has_almost_none():
    # the head is confident on the wrong token: TV's gradient nearly vanishes, KL's does not
    p = torch.tensor([[8.0, 0.0, 0.0]])
    q = torch.tensor([[0.0, 0.0, 12.0]], requires_grad=True)
    mask = torch.ones(1)
    (g_tv,) = torch.autograd.grad(losses.tv(p, q, mask), q)
    (g_kl,) = torch.autograd.grad(losses.kl(p, q, mask), q)
    assert g_tv.abs().max() < 1e-4 < 0.5 < g_kl.abs().max()


def test_the_kl_anchor_adds_kl_to_the_acceptance_objective_after_the_warm_start():
    from mtp.batch import loss_fn
    torch.manual_seed(0)
    steps = [(torch.randn(2, 5, 7), torch.randn(2, 5, 7, requires_grad=True), None, torch.ones(2, 5)) for _ in range(3)]
    pure = loss_fn(steps, "tv", False, 1.0)
    # by hand: per position the chained acceptance a1 + a1 a2 + a1 a2 a3, a = sum(min(p, q)), negated mean
    a1, a2, a3 = (torch.minimum(p.softmax(-1), q.softmax(-1)).sum(-1) for p, q, _, _ in steps)
    assert torch.allclose(pure, -(a1 + a1 * a2 + a1 * a2 * a3).mean())
    kl = sum(losses.kl(p, q, v) for p, q, _, v in steps)
    assert torch.allclose(loss_fn(steps, "tv", False, 1.0, kl_weight=0.1), pure + 0.1 * kl)
    assert torch.allclose(loss_fn(steps, "tv", True, 1.0, kl_weight=0.1), kl)  # warm start: KL alone
    # a head confident on the wrong token: the objective alone has (almost) no gradient to follow
    p = torch.tensor([[[8.0, 0.0, 0.0]]])
    q = torch.tensor([[[0.0, 0.0, 12.0]]], requires_grad=True)
    stuck = [(p, q, None, torch.ones(1, 1))]
    (g_pure,) = torch.autograd.grad(loss_fn(stuck, "tv", False, 1.0), q)
    (g_anchor,) = torch.autograd.grad(loss_fn(stuck, "tv", False, 1.0, kl_weight=0.1), q)
    assert g_pure.abs().max() < 1e-4 < 0.05 < g_anchor.abs().max()


def test_ce_is_the_mean_negative_log_likelihood():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    targets = torch.tensor([[0, 1]])
    got = losses.ce(logits, targets, torch.ones(1, 2))
    assert math.isclose(float(got), -(math.log(0.5) + math.log(0.8)) / 2, rel_tol=1e-6)
    # at temperature T the head drafts from softmax(q / T) (vLLM's probabilistic drafting): CE of that
    hot = losses.ce(logits, targets, torch.ones(1, 2), temperature=2.0)
    want = -torch.log_softmax(logits / 2.0, -1)[0, [0, 1], [0, 1]].mean()
    assert math.isclose(float(hot), float(want), rel_tol=1e-6) and not math.isclose(float(hot), float(got))


def test_a_reduced_draft_vocabulary_trains_toward_p_renormalised_on_it():
    """q's logits are -inf outside the draft vocabulary D: KL and CE stay finite, KL's minimiser
    over D is p renormalised on D (a gradient step from there is zero), and the acceptance it
    reaches is p's mass on D."""
    inside = torch.tensor([True, False, True, True])
    p_logits = torch.tensor([[1.0, 0.5, -0.3, 0.2]])
    p = torch.softmax(p_logits, -1)
    best = torch.log(p / p[:, inside].sum()).masked_fill(~inside, float("-inf")).requires_grad_(True)
    mask = torch.ones(1)
    loss = losses.kl(p_logits, best, mask)
    (grad,) = torch.autograd.grad(loss, best)
    assert math.isfinite(loss.item()) and grad[:, inside].abs().max() < 1e-6 and not grad.isnan().any()
    other = torch.tensor([[0.0, float("-inf"), 0.0, 0.0]])
    assert float(losses.kl(p_logits, other, mask)) > float(loss) + 1e-3
    assert torch.allclose(losses.acceptance(p_logits, best.detach()), p[:, inside].sum(-1))
    assert torch.allclose(losses.coverage(p_logits, best.detach()), p[:, inside].sum(-1))  # the bound it reaches
    assert torch.allclose(losses.coverage(p_logits, torch.zeros(1, 4)), torch.ones(1))  # a full vocabulary
    targets, two = torch.tensor([[1, 2]]), torch.ones(1, 2)
    q = other.expand(2, 4)[None]
    # the token the head cannot propose (1) is left out: the mean NLL over the one it can
    assert math.isclose(float(losses.ce(q, targets, two)), math.log(3), rel_tol=1e-6)
