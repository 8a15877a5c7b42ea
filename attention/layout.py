"""The packed group layout: one row [prompt | r_1 | … | r_N] per GRPO group.

In a decoder-only model, causal masking makes the prompt's hidden states identical for the
N responses of a group, so the prompt is processed once (DualKV, arXiv "DualKV: Shared-Prompt
Flash Attention for Efficient RL Training with Large Rollouts and Long Contexts"). Token
count N(P+R) becomes P+ΣR_n, a reduction ρ = N(P+R)/(P+NR) for equal lengths.

Within a row (P prompt tokens, response n of length R_n at offset o_n = P + Σ_{m<n} R_m):
  * position ids: prompt 0..P−1; every response continues at P (P..P+R_n−1), as if alone;
  * segment ids: 0 for the prompt, n+1 for response n, −1 for padding;
  * attention: a prompt token sees the prompt causally; a response token sees the whole
    prompt and its own response causally, never another response;
  * predicting positions: r_n[0] is predicted by the logits at P−1 (shared by all n),
    r_n[t] (t ≥ 1) by those at o_n + t − 1.
Several rows (groups) form a micro-batch, right-padded to the longest row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class RowLayout:
    """One packed group inside a micro-batch row."""
    prompt_len: int
    response_lens: list[int]
    # [N, R_max] absolute row positions of each response's tokens (padding entries point at
    # the response's first slot, masked by `response_valid`)
    response_index: torch.Tensor
    response_valid: torch.Tensor  # [N, R_max] bool

    @property
    def length(self) -> int:
        return self.prompt_len + sum(self.response_lens)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor       # [B, L]
    position_ids: torch.Tensor    # [B, L]
    segment_ids: torch.Tensor     # [B, L]  0 prompt, n+1 response n, -1 padding
    rows: list[RowLayout]
    # Sequence k of the micro-batch (in the order given to `pack`) is row `seq_row[k]`,
    # response `seq_response[k]` of it.
    seq_row: list[int]
    seq_response: list[int]
    # The rows' RowLayout.response_index / response_valid padded to one [B, N_max, R_max] shape
    # (padding entries point at position 0, invalid), and the prompt lengths [B].
    response_index: torch.Tensor
    response_valid: torch.Tensor
    prompt_lens: torch.Tensor
    # The flex backend's block mask ((device, L), mask), built by the first layer that needs it.
    flex_block_mask: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> PackedBatch:
    """Pack sequences (prompt_k, response_k); consecutive sequences with the same prompt
    share one row. Every response must have at least one token."""
    assert len(prompts) == len(responses) and prompts, (len(prompts), len(responses))
    groups: list[tuple[list[int], list[list[int]]]] = []
    seq_row, seq_response = [], []
    for p, r in zip(prompts, responses):
        assert len(p) >= 1 and len(r) >= 1, "empty prompt or response cannot be packed"
        if not groups or groups[-1][0] != p:
            groups.append((p, []))
        seq_row.append(len(groups) - 1)
        seq_response.append(len(groups[-1][1]))
        groups[-1][1].append(r)
    L = max(len(p) + sum(map(len, rs)) for p, rs in groups)
    B = len(groups)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    segment_ids = torch.full((B, L), -1, dtype=torch.long)
    rows = []
    for b, (p, rs) in enumerate(groups):
        P = len(p)
        input_ids[b, :P] = torch.tensor(p)
        position_ids[b, :P] = torch.arange(P)
        segment_ids[b, :P] = 0
        r_max = max(map(len, rs))
        index = torch.zeros((len(rs), r_max), dtype=torch.long)
        valid = torch.zeros((len(rs), r_max), dtype=torch.bool)
        offset = P
        for n, r in enumerate(rs):
            R = len(r)
            input_ids[b, offset:offset + R] = torch.tensor(r)
            position_ids[b, offset:offset + R] = torch.arange(P, P + R)
            segment_ids[b, offset:offset + R] = n + 1
            index[n, :] = offset
            index[n, :R] = torch.arange(offset, offset + R)
            valid[n, :R] = True
            offset += R
        rows.append(RowLayout(P, [len(r) for r in rs], index, valid))
    n_max, r_max = max(len(rs) for _, rs in groups), max(len(r) for r in responses)
    response_index = torch.zeros((B, n_max, r_max), dtype=torch.long)
    response_valid = torch.zeros((B, n_max, r_max), dtype=torch.bool)
    for b, row in enumerate(rows):
        n, r = row.response_index.shape
        response_index[b, :n, :r] = torch.where(row.response_valid, row.response_index, 0)
        response_valid[b, :n, :r] = row.response_valid
    return PackedBatch(input_ids, position_ids, segment_ids, rows, seq_row, seq_response, response_index,
                       response_valid, torch.tensor([len(p) for p, _ in groups]))


def predicting_positions(row: RowLayout) -> torch.Tensor:
    """[N, R_max] row positions whose logits predict each response token (padding: P−1)."""
    shifted = row.response_index - 1
    shifted[:, 0] = row.prompt_len - 1
    return torch.where(row.response_valid, shifted, torch.full_like(shifted, row.prompt_len - 1))


def dense_mask(batch: PackedBatch) -> torch.Tensor:
    """[B, 1, L, L] boolean attention mask of the layout (True = may attend).

    A padding query attends to itself only, so that no softmax row is empty.
    """
    seg = batch.segment_ids
    L = seg.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    q_seg, k_seg = seg[:, :, None], seg[:, None, :]
    allowed = causal & (k_seg >= 0) & (q_seg >= 0) & ((k_seg == 0) | (k_seg == q_seg))
    allowed |= torch.eye(L, dtype=torch.bool)[None] & (q_seg < 0)
    return allowed[:, None]


def token_reduction(prompt_len: int, response_lens: list[int]) -> float:
    """ρ = Σ_n (P + R_n) / (P + Σ_n R_n)."""
    return sum(prompt_len + r for r in response_lens) / (prompt_len + sum(response_lens))


def balance_groups(packed_lens: list[int], max_tokens: int,
                   fits: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """Assign whole groups to micro-batches of at most ``max_tokens`` packed tokens each (a group
    longer than that alone), as few as the greedy fill needs and balanced in tokens: longest
    first, each into the least-loaded micro-batch it fits in, a new one when it fits in none.
    ``fits(groups)``: a further limit on a micro-batch's groups (their padded shape). Starts from
    the lower bound ⌈Σ / max_tokens⌉ micro-batches. Returns group indices per micro-batch."""
    bins = min(max(1, -(-sum(packed_lens) // max_tokens)), len(packed_lens))
    load = [0] * bins
    out: list[list[int]] = [[] for _ in range(bins)]
    for g in sorted(range(len(packed_lens)), key=lambda g: -packed_lens[g]):
        fits_k = [k for k in range(len(load)) if not out[k] or (
            load[k] + packed_lens[g] <= max_tokens and (fits is None or fits(out[k] + [g])))]
        if not fits_k:
            load.append(0)
            out.append([])
            fits_k = [len(load) - 1]
        k = min(fits_k, key=lambda k: load[k])
        out[k].append(g)
        load[k] += packed_lens[g]
    return [sorted(b) for b in out if b]
