"""Objectives for the drafter heads. Pure functions of logits; p is the policy, q the head,
both at the rollout temperature, so that q is the distribution vLLM's probabilistic drafter
samples from and p the one its rejection sampler verifies against.

Under lossless rejection sampling a draft token from q is accepted with probability
α = Σ_v min(p_v, q_v) = 1 − TV(p, q). Drafts chain: step j is only verified if steps
1..j−1 were accepted, so the expected number of accepted tokens per round of k drafts is
Σ_k Π_{j≤k} α_j — the end-to-end objective :func:`acceptance_objective` maximises (Bebop's
multi-step TV objective), computed on the recursion the engine runs (``DraftHead.unroll``).

Warm start: TV's gradient through the softmax, ∂TV/∂z_i = −q_i (1[q_i < p_i] − Σ_{v: q_v < p_v} q_v),
vanishes where the head puts its mass on tokens the policy does not want (q_i ≈ 0 where q < p,
and the bracket ≈ 0 where q > p), exactly the low-overlap start of a fresh head. KL(p‖q) has
gradient q − p, which never vanishes while q ≠ p, and its minimiser is also q = p; so heads
train with KL(p‖q) first (``mtp.train``'s ``warm_steps``) and the acceptance objective after,
with KL kept beside it at weight ``mtp.kl_weight`` (default 0.1). The anchor matters where the
warm start has not closed the gap when it ends: on the ~100M preset (32k vocabulary, 50 KL steps
leaving KL ≈ 30) the objective alone collapsed — Adam's normalised steps on its near-zero
gradient drift the head into a peaked q, α₁ 0.37 → 0.14, α₂ ≈ 0 — while with the anchor the same
run reached α₁ 0.92 offline and 0.945 in vLLM. Both terms have q = p as their optimum.
Cross-entropy on the sampled tokens (:func:`ce`) is KL's one-sample estimate: the baseline
"CE-only" head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, count: float | None = None) -> torch.Tensor:
    """The mean of ``x`` over ``mask``; with ``count`` (the positions of a whole batch of which
    this is a micro-batch: :func:`mtp.batch.loss_counts`) its share of the whole batch's mean."""
    return (x * mask).sum() / (mask.sum().clamp(min=1) if count is None else max(count, 1.0))


def ce(q_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
       count: float | None = None) -> torch.Tensor:
    """Cross-entropy of the head's logits [.., V] at ``temperature`` (vLLM drafts from
    softmax(q / T)) on the sampled next tokens; tokens outside the head's support (logit -inf: a
    reduced draft vocabulary) are left out."""
    logits = q_logits.flatten(0, -2).float() / temperature
    proposable = torch.isfinite(logits.gather(-1, targets.flatten()[:, None]))[:, 0].view_as(targets)
    nll = F.cross_entropy(logits, targets.flatten(), reduction="none").view_as(targets)
    return masked_mean(nll.masked_fill(~proposable, 0.0), mask * proposable, count)


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
       count: float | None = None) -> torch.Tensor:
    """KL(p‖q) per position, averaged over ``mask``, summed over the head's support: a reduced
    draft vocabulary D (q's logits -inf elsewhere) drops the tokens q cannot propose, a constant
    +inf, leaving −Σ_{v∈D} p_v log q_v + const, whose minimiser is p renormalised on D; that q also
    reaches the best acceptance a head on D can have, Σ_{v∈D} p_v. (Its minimum is then
    p(D) log p(D) < 0, so the value can go below zero.)"""
    logp = torch.log_softmax(p_logits.float() / temperature, -1)
    logq = torch.log_softmax(q_logits.float() / temperature, -1)
    support = torch.isfinite(logq)
    terms = logp.exp() * (logp - logq.masked_fill(~support, 0.0))
    return masked_mean(terms.masked_fill(~support, 0.0).sum(-1), mask, count)


def acceptance(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """α = Σ_v min(p_v, q_v) = 1 − TV(p, q) per position: the probability that a draft sampled
    from q is accepted by lossless rejection sampling against p."""
    p = torch.softmax(p_logits.float() / temperature, -1)
    q = torch.softmax(q_logits.float() / temperature, -1)
    return torch.minimum(p, q).sum(-1)


def coverage(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Σ_{v: q_v > 0} p_v per position: the policy's mass on the tokens the head can propose (its
    support, finite logits), the bound on acceptance of a head over a reduced draft vocabulary."""
    p = torch.softmax(p_logits.float() / temperature, -1)
    return (p * torch.isfinite(q_logits)).sum(-1)


def tv(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Total variation 1 − Σ min(p, q), averaged over ``mask``: the per-step TV loss."""
    return masked_mean(1 - acceptance(p_logits, q_logits, temperature), mask)


def chain(alphas: list[torch.Tensor], valid: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Π_{j≤k} α_j for k = 1..K: the probability that the first k drafts are all accepted.
    ``valid[k]`` masks steps whose target lies past the end of the sequence (never verified)."""
    out, prefix = [], torch.ones_like(alphas[0])
    for k, a in enumerate(alphas):
        prefix = prefix * a
        out.append(prefix if valid is None else prefix * valid[k])
    return out


def expected_accepted(alphas: list[torch.Tensor], valid: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Σ_k Π_{j≤k} α_j per anchor: the expected number of accepted drafts per round."""
    return torch.stack(chain(alphas, valid)).sum(0)


def acceptance_objective(alphas: list[torch.Tensor], mask: torch.Tensor,
                         valid: list[torch.Tensor] | None = None, count: float | None = None) -> torch.Tensor:
    """Loss: minus the mean expected number of accepted drafts per round over the anchors ``mask``."""
    return -masked_mean(expected_accepted(alphas, valid), mask, count)
