"""Batches for the drafter head: the policy's sequences -> per draft step (p, q, targets, valid),
the training loss, and the offline acceptance estimate. Used by ``mtp.train`` (before RL) and
by the trainer's online maintenance (during RL)."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from mtp import losses
from mtp.heads import DraftHead, policy_states


def draft_targets(policy, head: DraftHead, seqs: list[tuple[list[int], int]], k: int, pad_id: int):
    """Per draft step j = 1..k: (p logits, q logits, sampled targets, valid mask), all [B, L-1(, V)].

    Row t is the anchor "last accepted position t": draft step j predicts x_{t+j+1}. Anchors
    start at the last prompt position (decode drafting) and a step is valid while its target
    lies inside the sequence.
    """
    device = policy.lm_head.weight.device
    tokens = pad_sequence([torch.tensor(s) for s, _ in seqs], batch_first=True, padding_value=pad_id).to(device)
    lengths = torch.tensor([len(s) for s, _ in seqs], device=device)
    prompt_lens = torch.tensor([p for _, p in seqs], device=device)
    B, L = tokens.shape
    attention = (torch.arange(L, device=device)[None] < lengths[:, None]).long()
    with torch.no_grad():
        hidden, logits = policy_states(policy, tokens, attention, pre_norm=head.pre_norm_hidden,
                                       aux_layers=head.aux_layers)
    # the policy's embedding and LM head (EAGLE, MTP forms), detached: trained by neither loss, and
    # no gradient lands on the policy (on an untied model the embedding's would be a dense V x H)
    outs = head.unroll(_frozen(policy.model.embed_tokens), tokens, hidden, k)
    lm_head = policy.lm_head.weight.detach()
    t = torch.arange(L - 1, device=device)[None]
    anchor = t >= (prompt_lens[:, None] - 1)
    logits = torch.cat([logits, logits.new_zeros(B, k, logits.shape[-1])], 1)
    padded = torch.cat([tokens, tokens.new_full((B, k + 1), pad_id)], 1)
    steps = []
    for j in range(1, k + 1):
        valid = (anchor & (t + j + 1 < lengths[:, None])).float()
        steps.append((logits[:, j:j + L - 1], head.draft_logits(outs[j - 1], lm_head), padded[:, j + 1:j + L], valid))
    return steps


def _frozen(module):
    """``module``'s forward (an embedding's scale included) without a gradient to its weights."""
    def call(*args):
        with torch.no_grad():
            return module(*args)
    return call


def loss_fn(steps, objective: str, warm: bool, temperature: float, kl_weight: float = 0.0) -> torch.Tensor:
    """"ce": cross-entropy on the sampled tokens; "tv": KL(p‖q) while ``warm``, then the multi-step
    acceptance objective plus ``kl_weight`` · KL(p‖q) (the anchor, see mtp/losses.py)."""
    if objective == "ce":
        return sum(losses.ce(q, y, v, temperature) for _, q, y, v in steps)
    kl = sum(losses.kl(p, q, v, temperature) for p, q, _, v in steps) if warm or kl_weight else 0.0
    if warm:
        return kl
    alphas = [losses.acceptance(p, q, temperature) for p, q, _, _ in steps]
    return losses.acceptance_objective(alphas, steps[0][3], [v for *_, v in steps]) + kl_weight * kl


@torch.no_grad()
def predicted_acceptance(policy, head, seqs, k: int, temperature: float, pad_id: int, batch: int = 64) -> dict:
    """Offline, over every decode anchor of ``seqs``: P(first j drafts accepted) per round, and
    the per-position rate P(draft j accepted | drafts < j accepted) over the rounds in which
    draft j's target lies inside the sequence (vLLM counts nothing past a finished sequence);
    and the policy's mean mass on the tokens the head can propose (``draft_vocab_coverage``,
    1 unless the head drafts from a reduced vocabulary), the bound on its acceptance."""
    reached, verified, rounds, covered = torch.zeros(k), torch.zeros(k), 0.0, 0.0
    for lo in range(0, len(seqs), batch):
        steps = draft_targets(policy, head, seqs[lo:lo + batch], k, pad_id)
        alphas = [losses.acceptance(p, q, temperature) for p, q, _, _ in steps]
        chained = losses.chain(alphas)
        for j, (_, _, _, valid) in enumerate(steps):
            reached[j] += float((chained[j] * valid).sum())
            verified[j] += float(((chained[j - 1] if j else torch.ones_like(valid)) * valid).sum())
        p, q, _, valid = steps[0]
        covered += float((losses.coverage(p, q, temperature) * valid).sum())
        rounds += float(valid.sum())
    first_j = (reached / max(rounds, 1)).tolist()
    return {"accepted_per_draft": first_j, "acceptance_per_pos": (reached / verified.clamp(min=1e-9)).tolist(),
            "mean_accepted_len": 1 + sum(first_j), "rounds": rounds,
            "draft_vocab_coverage": covered / max(rounds, 1)}
