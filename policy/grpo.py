"""GRPO advantages and the clipped token-level surrogate, as pure functions.

Terms. A *group* is the N responses sampled for one prompt; r ∈ R^{G×N} their rewards.
For response i and token t: logp = log π_θ(y_t | x, y_<t) under the policy being trained,
old_logp under the policy that the ratio is taken against (the sampling policy),
ratio ρ = exp(logp − old_logp), advantage A_i (one per response, shared by its tokens).

Per-token loss (PPO clip, with the asymmetric "clip-higher" of DAPO, arXiv 2503.14476):

    l_t = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A)  +  β·KL_t

KL_t is the k3 estimator of KL(π_θ ‖ π_ref) (Schulman, "Approximating KL divergence"):
    KL_t = exp(ref_logp − logp) − (ref_logp − logp) − 1  ≥ 0.

Off-policy samples (async rollout with bounded staleness) follow the decoupled PPO objective
of AReaL (arXiv 2505.24298): the clip ratio is taken against the proximal policy (the
trainer's policy at the start of the step, ``old_logp``) and the surrogate is multiplied by
a truncated behaviour importance weight w_t = min(π_prox/π_behav, C) (truncated IS, as in
Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"),
computed by the trainer and passed as ``is_weight``. On-policy samples get w = 1 exactly, or,
with ``algorithm.behaviour_weight`` "all" ("auto" in half precision), the same truncated weight
with π_prox the trainer's computation of the sampling policy: it corrects the sampler's numerical
mismatch with the trainer (vLLM's bfloat16 kernels against the trainer's; TRL's
``vllm_importance_sampling_correction`` in its token_truncate mode).

Advantage estimators (``ADVANTAGES``):
  * ``grpo``     A = (r − mean_group(r)) / (std_group(r) + eps)   (DeepSeekMath, arXiv 2402.03300;
                  unbiased std, as TRL and verl)
  * ``dr_grpo``  A = r − mean_group(r)                              (Dr. GRPO, arXiv 2503.20783)

Loss aggregations (``LOSS_AGGREGATIONS``) turn [B, T] per-token losses into a scalar. They
take the *totals of the whole optimizer step* so that micro-batches add up to the
full-batch loss exactly:
  * ``token_mean``    Σ l / (response tokens in the step)                 (DAPO)
  * ``seq_mean``      Σ_i (Σ_t l_it / |y_i|) / (sequences in the step)     (original GRPO)
  * ``seq_sum_norm``  Σ l / (sequences in the step · max_tokens)          (Dr. GRPO)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

ADVANTAGES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
LOSS_AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {}


def register(registry: dict, name: str):
    def wrap(fn):
        assert name not in registry, f"{name} registered twice"
        registry[name] = fn
        return fn
    return wrap


@register(ADVANTAGES, "grpo")
def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """rewards [G, N] -> advantages [G, N], group mean/std normalised."""
    assert rewards.dim() == 2 and rewards.shape[1] >= 2, rewards.shape
    return _centred(rewards) / (rewards.std(dim=1, keepdim=True) + eps)


@register(ADVANTAGES, "dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """rewards [G, N] -> advantages [G, N], group mean removed, no std normalisation."""
    assert rewards.dim() == 2 and rewards.shape[1] >= 2, rewards.shape
    return _centred(rewards)


def _centred(rewards: torch.Tensor) -> torch.Tensor:
    """rewards − group mean, exactly 0 in a group of equal rewards: their float mean need not be
    the value itself (0.1 six times averages to 0.1 − 1.4e-17 in float64), which divided by the tiny std
    and eps left an advantage of ~1e-11 where there is no signal."""
    uniform = rewards.amax(dim=1, keepdim=True) == rewards.amin(dim=1, keepdim=True)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return torch.where(uniform, torch.zeros_like(centred), centred)


@dataclass(frozen=True)
class StepTotals:
    """Counts over the whole optimizer step (all micro-batches)."""
    tokens: int
    sequences: int
    max_tokens: int


@register(LOSS_AGGREGATIONS, "token_mean")
def token_mean(loss: torch.Tensor, mask: torch.Tensor, totals: StepTotals) -> torch.Tensor:
    return (loss * mask).sum() / totals.tokens


@register(LOSS_AGGREGATIONS, "seq_mean")
def seq_mean(loss: torch.Tensor, mask: torch.Tensor, totals: StepTotals) -> torch.Tensor:
    per_seq = (loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return per_seq.sum() / totals.sequences


@register(LOSS_AGGREGATIONS, "seq_sum_norm")
def seq_sum_norm(loss: torch.Tensor, mask: torch.Tensor, totals: StepTotals) -> torch.Tensor:
    return (loss * mask).sum() / (totals.sequences * totals.max_tokens)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref); same shape as the inputs."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


# algorithm.behaviour_weight: which samples get the behaviour weight (:func:`behaviour_weight`).
BEHAVIOUR_WEIGHTS = ("auto", "stale", "all")


def weighs_on_policy(mode: str, dtype) -> bool:
    """Whether on-policy samples get the behaviour weight: ``mode`` "all", or "auto" with a
    half-precision policy (``dtype`` a torch dtype or its name); "stale" weights only older ones."""
    return mode == "all" or (mode == "auto" and str(dtype).removeprefix("torch.") in ("bfloat16", "float16"))


def behaviour_weight(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, weighted: torch.Tensor,
                     cap: float) -> torch.Tensor:
    """The truncated behaviour importance weight w = min(π_prox/π_behav, C) = min(exp(old_logp −
    behaviour_logp), cap) on the rows ``weighted`` [B] (bool), exactly 1 on the others; [B, T]."""
    assert old_logp.shape == behaviour_logp.shape and weighted.shape == old_logp.shape[:1], \
        (old_logp.shape, behaviour_logp.shape, weighted.shape)
    weight = torch.exp(old_logp - behaviour_logp).clamp(max=cap)
    return torch.where(weighted[:, None], weight, torch.ones_like(weight))


def grpo_loss(
    logp: torch.Tensor,          # [B, T] policy logprobs of the sampled tokens (with grad)
    old_logp: torch.Tensor,      # [B, T] sampling-policy logprobs (no grad)
    advantages: torch.Tensor,    # [B] one per response
    mask: torch.Tensor,          # [B, T] 1 for response tokens, 0 for padding
    totals: StepTotals,
    aggregation: str = "token_mean",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,  # [B, T], required when kl_coef > 0
    is_weight: torch.Tensor | None = None,  # [B, T] behaviour importance weight (no grad), see below
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped GRPO surrogate for one micro-batch; returns (loss, metrics)."""
    B, T = logp.shape
    assert old_logp.shape == (B, T) and mask.shape == (B, T) and advantages.shape == (B,), \
        (logp.shape, old_logp.shape, mask.shape, advantages.shape)
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp.detach())
    adv = advantages.detach().to(logp.dtype)[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if is_weight is not None:
        assert is_weight.shape == (B, T), is_weight.shape
        per_token = per_token * is_weight.detach().to(logp.dtype)
    metrics: dict[str, float] = {}
    if kl_coef > 0:
        assert ref_logp is not None and ref_logp.shape == (B, T), "kl_coef > 0 needs ref_logp [B, T]"
        kl = k3_kl(logp, ref_logp.detach())
        per_token = per_token + kl_coef * kl
        metrics["kl"] = float((kl * mask).sum() / mask.sum().clamp(min=1))
    loss = LOSS_AGGREGATIONS[aggregation](per_token, mask, totals)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        # tokens whose clipped term is the one taken (no gradient through the ratio); a ratio
        # outside the range on the side that does not bind still learns (verl's pg_clipfrac)
        metrics["clip_frac"] = float(((clipped < unclipped).to(mask.dtype) * mask).sum() / n)
        metrics["ratio_mean"] = float((ratio * mask).sum() / n)
        metrics["is_weight_mean"] = 1.0 if is_weight is None else float((is_weight * mask).sum() / n)
    return loss, metrics
