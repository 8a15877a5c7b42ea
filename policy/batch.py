"""The unit of GRPO data: a group of N responses to one prompt, and its padded tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Group:
    """N sampled responses to one prompt, with what the sampler and the reward saw.

    ``responses[i]`` holds the sampled token ids of response i (including a final EOS if the
    sampler stopped on it); ``behaviour_logprobs[i][t]`` is the sampler's log-probability of
    ``responses[i][t]`` at the rollout temperature; ``version`` is the policy version that
    sampled it.
    """
    prompt: str
    prompt_ids: list[int]
    responses: list[list[int]]
    behaviour_logprobs: list[list[float]]
    version: int
    completions: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    rewards: list[float] | None = None
    # Dataset columns of the prompt's row (e.g. "answer"), passed to reward functions.
    row: dict = field(default_factory=dict)
    # Index of the prompt in its dataset.
    index: int = -1

    def __post_init__(self):
        assert len(self.responses) == len(self.behaviour_logprobs), "one logprob list per response"
        for i, (ids, lps) in enumerate(zip(self.responses, self.behaviour_logprobs)):
            assert len(ids) == len(lps), f"response {i}: {len(ids)} tokens but {len(lps)} logprobs"

    @property
    def n(self) -> int:
        return len(self.responses)


@dataclass
class PaddedBatch:
    """Prompt+response rows, right-padded, with where each response token is predicted.

    input_ids [B, L]; attention_mask [B, L]; targets [B, R] (response token ids, 0-padded);
    predict_pos [B, R]: index into L of the logits that predict targets (prompt_len + t - 1);
    response_mask [B, R]: 1 on real response tokens.
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    predict_pos: torch.Tensor
    response_mask: torch.Tensor


def pad_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> PaddedBatch:
    assert len(prompts) == len(responses) and prompts, (len(prompts), len(responses))
    B = len(prompts)
    L = max(len(p) + len(r) for p, r in zip(prompts, responses))
    R = max(max(len(r) for r in responses), 1)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    targets = torch.zeros((B, R), dtype=torch.long)
    predict_pos = torch.zeros((B, R), dtype=torch.long)
    response_mask = torch.zeros((B, R), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        assert len(p) >= 1, f"row {i}: empty prompt (the first response token needs a predicting position)"
        row = p + r
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
        targets[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        predict_pos[i, :] = torch.arange(len(p) - 1, len(p) - 1 + R).clamp(max=L - 1)
        response_mask[i, :len(r)] = 1
    return PaddedBatch(input_ids, attention_mask, targets, predict_pos, response_mask)
