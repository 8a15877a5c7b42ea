"""Shared-prompt attention over packed rows (see attention/layout.py), one public function.

``shared_prompt_attention(q, k, v, batch, scaling, backend)`` with q [B, H, L, D],
k/v [B, H_kv, L, D] (grouped-query attention when H_kv < H), returns [B, H, L, D].

Backends (``BACKENDS``):
  * ``reference``: dense SDPA with the layout's boolean [L, L] mask — the oracle; costs
    (P+NR)² per row and head.
  * ``regions`` (the CPU fast path): per row, the prompt's queries attend causally to the
    prompt (one SDPA, P²/2); the N responses' queries attend, as one batched SDPA over n, to
    keys [prompt keys | own response keys] with a causal mask on the second part
    (N·R·(P+R)). Nothing between different responses is ever computed.

Deviation from the paper's region-wise LSE merge: the paper runs "response × prompt" and
"response × itself" as separate kernels and merges their outputs with the log-sum-exp rule
out = Σ_r exp(lse_r − lse)·out_r. Concatenating the prompt keys in front of each response's
keys gives the same softmax over the same key set in one kernel, so no merge is needed, and
autograd through SDPA's own backward sums the gradients of the shared prompt keys/values
over the prompt's queries and all N responses (the expand is a broadcast whose backward is
that sum). This also avoids the known pitfall of composing separate attention calls whose
backward ignores the gradient of the LSE.
  * ``flex``: FlexAttention with a block mask derived from the segment ids — for GPUs
    (torch 2.13 has no FlexAttention backward on CPU). The flash-attn varlen variant, where
    the region outputs must be merged by LSE inside one autograd function, is not written.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from attention.layout import PackedBatch, RowLayout, dense_mask

BACKENDS: dict[str, Callable] = {}


def _register(name: str):
    def wrap(fn):
        BACKENDS[name] = fn
        return fn
    return wrap


@_register("reference")
def reference_attention(q, k, v, batch: PackedBatch, scaling: float) -> torch.Tensor:
    mask = dense_mask(batch).to(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=k.shape[1] != q.shape[1])


def _row_regions(q, k, v, row: RowLayout, scaling: float) -> torch.Tensor:
    """q [H, L, D], k/v [H_kv, L, D] of one row -> [H, L, D] (zeros on padding)."""
    H, L, D = q.shape
    gqa = k.shape[0] != H
    P = row.prompt_len
    out_prompt = F.scaled_dot_product_attention(q[None, :, :P], k[None, :, :P], v[None, :, :P], is_causal=True,
                                                scale=scaling, enable_gqa=gqa)[0]          # [H, P, D]
    index, valid = row.response_index.to(q.device), row.response_valid.to(q.device)   # [N, R]
    N, R = index.shape
    q_r = q[:, index].permute(1, 0, 2, 3)                                              # [N, H, R, D]
    k_cat = torch.cat([k[None, :, :P].expand(N, -1, -1, -1), k[:, index].permute(1, 0, 2, 3)], dim=2)
    v_cat = torch.cat([v[None, :, :P].expand(N, -1, -1, -1), v[:, index].permute(1, 0, 2, 3)], dim=2)
    own = torch.ones(R, R, dtype=torch.bool, device=q.device).tril()[None] & valid[:, None, :]   # [N, R, R]
    mask = torch.cat([torch.ones(N, R, P, dtype=torch.bool, device=q.device), own], dim=2)     # [N, R, P+R]
    out_resp = F.scaled_dot_product_attention(q_r, k_cat, v_cat, attn_mask=mask[:, None], scale=scaling,
                                              enable_gqa=gqa)                                  # [N, H, R, D]
    # Responses are stored back to back after the prompt, so their valid tokens in (n, t)
    # order are exactly positions P .. P+ΣR−1.
    out_resp = out_resp.permute(1, 0, 2, 3)[:, valid]                                      # [H, ΣR, D]
    pad = q.new_zeros(H, L - P - out_resp.shape[1], D)
    return torch.cat([out_prompt, out_resp, pad], dim=1)


@_register("regions")
def regions_attention(q, k, v, batch: PackedBatch, scaling: float) -> torch.Tensor:
    return torch.stack([_row_regions(q[b], k[b], v[b], row, scaling) for b, row in enumerate(batch.rows)])


@_register("flex")
def flex_attention_backend(q, k, v, batch: PackedBatch, scaling: float) -> torch.Tensor:
    """FlexAttention with a block mask from the segment ids (the GPU path: it skips fully
    masked blocks, i.e. response × other response). torch 2.13 runs its forward on CPU,
    unfused, but has no CPU backward: train with it on GPU only."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    seg = batch.segment_ids.to(q.device)

    def mask_mod(b, h, q_idx, kv_idx):
        qs, ks = seg[b, q_idx], seg[b, kv_idx]
        layout = (kv_idx <= q_idx) & (ks >= 0) & (qs >= 0) & ((ks == 0) | (ks == qs))
        return layout | ((qs < 0) & (q_idx == kv_idx))  # a padding query sees itself only

    B, _, L, _ = q.shape
    block_mask = create_block_mask(mask_mod, B, None, L, L, device=str(q.device))
    return flex_attention(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=k.shape[1] != q.shape[1])


def shared_prompt_attention(q, k, v, batch: PackedBatch, scaling: float, backend: str = "regions") -> torch.Tensor:
    B, H, L, D = q.shape
    assert k.shape[0] == B and k.shape[2] == L and v.shape == k.shape and H % k.shape[1] == 0, (q.shape, k.shape)
    assert batch.input_ids.shape == (B, L), (batch.input_ids.shape, q.shape)
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} unknown; choose one of {sorted(BACKENDS)}")
    return BACKENDS[backend](q, k, v, batch, scaling)
