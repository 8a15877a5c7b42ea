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
    tokens, lengths, prompt_lens = _padded(seqs, pad_id, device)
    B, L = tokens.shape
    attention = (torch.arange(L, device=device)[None] < lengths[:, None]).long()
    with torch.no_grad():
        hidden, logits = policy_states(policy, tokens, attention, pre_norm=head.pre_norm_hidden,
                                       aux_layers=head.aux_layers)
    # the policy's embedding and LM head (EAGLE, MTP forms), detached: trained by neither loss, and
    # no gradient lands on the policy (on an untied model the embedding's would be a dense V x H)
    outs = head.unroll(_frozen(policy.model.embed_tokens), tokens, hidden, k)
    lm_head = policy.lm_head.weight.detach()
    logits = torch.cat([logits, logits.new_zeros(B, k, logits.shape[-1])], 1)
    return [(logits[:, j:j + L - 1], head.draft_logits(outs[j - 1], lm_head), targets, valid)
            for j, (targets, valid) in enumerate(_targets(tokens, lengths, prompt_lens, k, pad_id), start=1)]


def loss_counts(seqs: list[tuple[list[int], int]], k: int, pad_id: int,
                support: torch.Tensor | None = None) -> list[float]:
    """Per draft step, the positions :func:`loss_fn` averages over in the whole of ``seqs``: its
    valid anchors, or with ``support`` (bool [V], the tokens the head can propose:
    :func:`head_support`) those whose target the head can propose (the "ce" objective). Given
    them, ``loss_fn(draft_targets(..., part, ...), counts=...)`` of the parts of any split of
    ``seqs`` sum to the whole batch's loss: micro-batches whose gradients accumulate exactly.
    No forward: the masks depend on the lengths alone."""
    tokens, lengths, prompt_lens = _padded(seqs, pad_id, "cpu")
    counts = []
    for targets, valid in _targets(tokens, lengths, prompt_lens, k, pad_id):
        counted = valid if support is None else valid * support.cpu()[targets]
        counts.append(float(counted.sum()))
    return counts


def head_support(head: DraftHead, lm_head: torch.Tensor) -> torch.Tensor:
    """The tokens ``head`` can propose, bool [V]: where its draft logits are finite (a reduced
    draft vocabulary leaves the rest -inf), read off the logits of one zero state."""
    with torch.no_grad():
        return torch.isfinite(head.draft_logits(lm_head.new_zeros(1, head.config.hidden_size), lm_head))[0]


def _padded(seqs: list[tuple[list[int], int]], pad_id: int, device):
    """(tokens [B, L] padded with ``pad_id``, lengths [B], prompt lengths [B])."""
    tokens = pad_sequence([torch.tensor(s) for s, _ in seqs], batch_first=True, padding_value=pad_id).to(device)
    lengths = torch.tensor([len(s) for s, _ in seqs], device=device)
    return tokens, lengths, torch.tensor([p for _, p in seqs], device=device)


def _targets(tokens: torch.Tensor, lengths: torch.Tensor, prompt_lens: torch.Tensor, k: int, pad_id: int):
    """Per draft step j = 1..k: (targets x_{t+j+1}, valid mask) of the anchors t, [B, L-1]."""
    B, L = tokens.shape
    t = torch.arange(L - 1, device=tokens.device)[None]
    anchor = t >= (prompt_lens[:, None] - 1)
    padded = torch.cat([tokens, tokens.new_full((B, k + 1), pad_id)], 1)
    return [(padded[:, j + 1:j + L], (anchor & (t + j + 1 < lengths[:, None])).float()) for j in range(1, k + 1)]


def _frozen(module):
    """``module``'s forward (an embedding's scale included) without a gradient to its weights."""
    def call(*args):
        with torch.no_grad():
            return module(*args)
    return call


def loss_fn(steps, objective: str, warm: bool, temperature: float, kl_weight: float = 0.0,
            counts: list[float] | None = None) -> torch.Tensor:
    """"ce": cross-entropy on the sampled tokens; "tv": KL(p‖q) while ``warm``, then the multi-step
    acceptance objective plus ``kl_weight`` · KL(p‖q) (the anchor, see mtp/losses.py). ``counts``
    (:func:`loss_counts`): ``steps`` are one micro-batch of the batch they count, and the loss is
    its share of the batch's; None: ``steps`` are the whole batch."""
    count = counts or [None] * len(steps)
    if objective == "ce":
        return sum(losses.ce(q, y, v, temperature, n) for (_, q, y, v), n in zip(steps, count))
    kl = (sum(losses.kl(p, q, v, temperature, n) for (p, q, _, v), n in zip(steps, count))
          if warm or kl_weight else 0.0)
    if warm:
        return kl
    alphas = [losses.acceptance(p, q, temperature) for p, q, _, _ in steps]
    return losses.acceptance_objective(alphas, steps[0][3], [v for *_, v in steps], count[0]) + kl_weight * kl


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
