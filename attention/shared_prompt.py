"""Shared-prompt attention over packed rows (see attention/layout.py), one public function.

``shared_prompt_attention(q, k, v, batch, scaling, backend)`` with q [B, H, L, D],
k/v [B, H_kv, L, D] (grouped-query attention when H_kv < H), returns [B, H, L, D].

Backends (``BACKENDS``):
  * ``reference``: dense SDPA with the layout's boolean [L, L] mask — the oracle; costs
    (P+NR)² per row and head.
  * ``regions`` (the CPU fast path): the prompt's queries attend causally to the prompt (one
    SDPA, P²/2 per row); the N responses' queries attend to keys [prompt keys | own response
    keys] with a causal mask on the second part (N·R·(P+R) per row), as one SDPA over every
    response of the micro-batch. Nothing between different responses is ever computed. The
    rows are padded to one shape, so two SDPA calls per layer serve the whole micro-batch
    rather than two per row (with many short rows, the per-row small ops dominated).

Deviation from the paper's region-wise LSE merge: the paper runs "response × prompt" and
"response × itself" as separate kernels and merges their outputs with the log-sum-exp rule
out = Σ_r exp(lse_r − lse)·out_r. Concatenating the prompt keys in front of each response's
keys gives the same softmax over the same key set in one kernel, so no merge is needed, and
autograd through SDPA's own backward sums the gradients of the shared prompt keys/values
over the prompt's queries and all N responses (the expand is a broadcast whose backward is
that sum). This also avoids the known pitfall of composing separate attention calls whose
backward ignores the gradient of the LSE.
  * ``flex``: FlexAttention with a block mask derived from the segment ids, compiled — for
    GPUs (torch 2.13 has no FlexAttention backward on CPU). The flash-attn varlen variant, where
    the region outputs must be merged by LSE inside one autograd function, is not written.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from attention.layout import PackedBatch, dense_mask

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


@_register("regions")
def regions_attention(q, k, v, batch: PackedBatch, scaling: float) -> torch.Tensor:
    """Two SDPA calls for the whole micro-batch (rows padded to the longest prompt, the most
    responses and the longest response; padded queries and keys are masked, their outputs zero):
    the prompts' queries causally over their prompt, and every response's queries over
    [its row's prompt keys | its own keys].

    On CPU, half-precision inputs are attended in float32 and the output rounded back: torch
    2.13's CPU flash-attention backward in bfloat16 took ~27 ms a call on [32, 12, 6, 64]
    response queries of the ~100M preset against ~0.8 ms in float32 (one thread, profiled), 30%
    of a bfloat16 update; float32 attention is also the more accurate of the two (the bfloat16
    kernel rounds its probabilities before the value product)."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return regions_attention(q.float(), k.float(), v.float(), batch, scaling).to(q.dtype)
    B, H, L, D = q.shape
    H_kv, gqa = k.shape[1], k.shape[1] != H
    index, valid = batch.response_index.to(q.device), batch.response_valid.to(q.device)
    prompt_lens = batch.prompt_lens.to(q.device)
    N, R = index.shape[1:]
    P = int(prompt_lens.max())
    in_prompt = torch.arange(P, device=q.device)[None] < prompt_lens[:, None]                  # [B, P]
    # Prompt queries: causal over the row's prompt keys. Slots past a row's own prompt (its
    # responses or padding) still see that prompt, so no softmax row is empty; they are zeroed.
    causal = torch.ones(P, P, dtype=torch.bool, device=q.device).tril()
    out_prompt = F.scaled_dot_product_attention(q[:, :, :P], k[:, :, :P], v[:, :, :P], scale=scaling, enable_gqa=gqa,
                                                attn_mask=(causal[None] & in_prompt[:, None, :])[:, None])
    out_prompt = out_prompt * in_prompt[:, None, :, None]                                      # [B, H, P, D]
    flat = index.reshape(B, 1, N * R, 1)

    def responses(t: torch.Tensor) -> torch.Tensor:  # [B, h, L, D] -> [B, N, h, R, D]
        h = t.shape[1]
        return t.gather(2, flat.expand(B, h, N * R, D)).view(B, h, N, R, D).transpose(1, 2)

    def with_prompt(t: torch.Tensor) -> torch.Tensor:  # [B*N, H_kv, P+R, D]: the row's prompt, then its own
        return torch.cat([t[:, None, :, :P].expand(B, N, H_kv, P, D), responses(t)], dim=3).reshape(B * N, H_kv, P + R, D)

    own = torch.ones(R, R, dtype=torch.bool, device=q.device).tril()[None, None] & valid[:, :, None, :]   # [B, N, R, R]
    mask = torch.cat([in_prompt[:, None, None, :].expand(B, N, R, P), own], dim=3)                    # [B, N, R, P+R]
    out_resp = F.scaled_dot_product_attention(responses(q).reshape(B * N, H, R, D), with_prompt(k), with_prompt(v),
                                              attn_mask=mask.reshape(B * N, 1, R, P + R), scale=scaling,
                                              enable_gqa=gqa)                                  # [B*N, H, R, D]
    out_resp = out_resp.view(B, N, H, R, D).transpose(1, 2).reshape(B, H, N * R, D) * valid.view(B, 1, N * R, 1)
    # Prompt and response positions are disjoint; invalid entries add zeros at position 0.
    out = F.pad(out_prompt, (0, 0, 0, L - P))
    return out.scatter_add(2, flat.expand(B, H, N * R, D), out_resp)


_compiled_flex = None


@_register("flex")
def flex_attention_backend(q, k, v, batch: PackedBatch, scaling: float) -> torch.Tensor:
    """FlexAttention with a block mask from the segment ids (the GPU path). Only compiled
    (``torch.compile``, on CUDA) does it skip the fully masked blocks (response × other
    response); eager, torch runs it densely over all L² pairs, so on CUDA it is compiled and
    the block mask built compiled, once per micro-batch (the first layer's, kept on the batch).
    torch 2.13 runs its forward on CPU, eager and dense (the tests' check), but has no CPU
    backward: train with it on GPU only (config validation refuses it on a CPU trainer)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    cuda = q.device.type == "cuda"
    B, _, L, _ = q.shape
    cached = batch.flex_block_mask
    if cached is None or cached[0] != (str(q.device), L):
        seg = batch.segment_ids.to(q.device)

        def mask_mod(b, h, q_idx, kv_idx):
            qs, ks = seg[b, q_idx], seg[b, kv_idx]
            layout = (kv_idx <= q_idx) & (ks >= 0) & (qs >= 0) & ((ks == 0) | (ks == qs))
            return layout | ((qs < 0) & (q_idx == kv_idx))  # a padding query sees itself only

        cached = ((str(q.device), L), create_block_mask(mask_mod, B, None, L, L, device=str(q.device), _compile=cuda))
        batch.flex_block_mask = cached  # every layer of the micro-batch's forward and backward reuses it
    if cuda and _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    attend = _compiled_flex if cuda else flex_attention
    return attend(q, k, v, block_mask=cached[1], scale=scaling, enable_gqa=k.shape[1] != q.shape[1])


def shared_prompt_attention(q, k, v, batch: PackedBatch, scaling: float, backend: str = "regions") -> torch.Tensor:
    B, H, L, D = q.shape
    assert k.shape[0] == B and k.shape[2] == L and v.shape == k.shape and H % k.shape[1] == 0, (q.shape, k.shape)
    assert batch.input_ids.shape == (B, L), (batch.input_ids.shape, q.shape)
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} unknown; choose one of {sorted(BACKENDS)}")
    return BACKENDS[backend](q, k, v, batch, scaling)
