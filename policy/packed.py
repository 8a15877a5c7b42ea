"""Per-token logprobs through the packed shared-prompt layout (``trainer.shared_prompt``).

Same values as :func:`policy.trainer.token_logprobs` on the unpacked rows (pinned by
tests/policy/test_packed.py), with the prompt processed once per group and the LM head
applied only at the distinct predicting positions (P−1 once per group, then every response
token but the last).
"""

from __future__ import annotations

import weakref

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.weak import WeakTensorKeyDictionary

from attention.hf import shared_prompt_attention_enabled
from attention.layout import pack, predicting_positions


# Families whose forward is ``lm_head(model(...).last_hidden_state)`` with nothing after the head
# (no logit scale or soft-cap), so the head can be applied at the predicting positions alone
# (here, and in policy.trainer.token_logprobs).
PLAIN_LM_HEAD = {"qwen2", "qwen3", "qwen3_moe", "llama", "mistral", "mimo"}


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits for the softmax: half precision to float32 (float32/64 unchanged), divided by the
    temperature. At temperature 1 the division, exact and so a no-op, is left out: a pass over the
    [T, V] logits in the forward and another in the backward (the 100M preset: ~8 ms a step)."""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return x if temperature == 1.0 else x / temperature


# The LM head's weight gradient on the CPU, [V, d] = grad[T, V]ᵀ · h[T, d], is computed in products
# of this many vocabulary rows each: one product over the 100M preset's 32k vocabulary took 33 / 40
# / 61 ms at T = 90 / 196 / 512 positions (bfloat16, one thread, oneDNN), in 2048-row chunks 13 / 23
# / 30 ms, and bit for bit the same results there (each element is a T-long dot product either way,
# but a library may split a reduction differently for another row count: the test allows for it);
# float32 63 / 94 / 186 ms against 44 / 73 / 151 ms (ad hoc, 2026-12-05; tests/policy/test_packed.py).
HEAD_GRAD_ROWS = 2048


class _RowChunkedHead(torch.autograd.Function):
    """``F.linear(h, weight)`` whose weight gradient is made in :data:`HEAD_GRAD_ROWS`-row products;
    with ``into_grad``, written straight into the parameter's ``.grad`` when it has none yet
    (:func:`lm_head`)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, into_grad: bool) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        ctx.param = weight if into_grad else None
        # the node that accumulates the weight's .grad (none for a weight that needs no gradient)
        ctx.accumulate = (torch.autograd.graph.get_gradient_edge(weight).node
                          if into_grad and weight.requires_grad else None)
        return torch.nn.functional.linear(h, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight = ctx.saved_tensors
        grad_h = grad.mm(weight) if ctx.needs_input_grad[0] else None  # as autograd's linear
        if not ctx.needs_input_grad[1]:
            return grad_h, None, None
        # Only in a backward that accumulates into .grad (not torch.autograd.grad, nor backward(inputs=)
        # without the weight, which leave .grad alone and must get this gradient returned)
        into = ctx.accumulate is not None and ctx.param.grad is None and _accumulates(ctx.accumulate)
        grad_weight = _kept_grad(ctx.param) if into else torch.empty_like(weight)
        for i in range(0, weight.shape[0], HEAD_GRAD_ROWS):
            torch.mm(grad[:, i:i + HEAD_GRAD_ROWS].t(), h, out=grad_weight[i:i + HEAD_GRAD_ROWS])
        if into:
            ctx.param.grad = grad_weight  # what autograd's accumulation would store, before the embedding's rows
            return grad_h, None, None
        return grad_h, grad_weight, None


# A weight's kept gradient buffer (:func:`_kept_grad`) and a weak reference to the view of it
# last stored as the weight's .grad (keyed by the weight's identity, not its values).
_GRAD_BUFFERS = WeakTensorKeyDictionary()


def _kept_grad(param: torch.Tensor) -> torch.Tensor:
    """A tensor like ``param`` for its gradient, to be stored as its ``.grad``: a view of a buffer
    kept from one backward to the next while the view stored before is gone (the optimizer set
    ``.grad`` to None), else a new buffer. A caller that keeps ``.grad`` itself gets a new buffer
    at the next backward; one that keeps only a view or ``.data`` of it, which this cannot see,
    would see it written over (policy.trainer keeps neither).

    A new [V, d] each step (50 MB on the 100M preset) grew the CPU trainer's heap by its size every
    few steps: glibc's free chunks, split by the step's other tensors, no longer held it, and
    ``orchestration.keep_freed_memory`` returns nothing (glibc's ``mallinfo2``: ~18 MB a step, of
    which ~2.5 in use; 87k page faults in 10 s of a small-short run). Kept, it stays allocated
    between steps, through the next forward (README "Memory")."""
    buffer, stored = _GRAD_BUFFERS.get(param, (None, None))
    if (buffer is None or stored() is not None or buffer.shape != param.shape or buffer.dtype != param.dtype
            or buffer.device != param.device):
        buffer = torch.empty_like(param)
    view = buffer.view_as(buffer)
    _GRAD_BUFFERS[param] = (buffer, weakref.ref(view))
    return view


def _accumulates(node) -> bool:
    """Whether the running backward executes ``node``, a weight's gradient accumulator (into ``.grad``)."""
    try:
        return torch._C._will_engine_execute_node(node)
    # RuntimeError: torch.autograd.grad, which refuses the question for a leaf and accumulates nothing;
    # AttributeError: a torch without this private check. Either way the gradient is returned, as by autograd.
    except (RuntimeError, AttributeError):
        return False


def lm_head(model, h: torch.Tensor, into_grad: bool = False) -> torch.Tensor:
    """``model.lm_head(h)`` for ``h`` [T, d]. A plain CPU ``nn.Linear`` head without bias or hooks
    (no ZeRO-3 gathering its weight) makes its weight gradient in row chunks (:data:`HEAD_GRAD_ROWS`).

    ``into_grad`` (the head's only use in the backward, on a model marked
    ``rlaccel_head_grad_into_param`` by :class:`policy.trainer.PolicyTrainer`: one process, the head
    tied to a sparse-gradient embedding, a backward into ``.grad``): the head's weight gradient is
    stored as the weight's ``.grad`` itself when it has none, and the embedding's rows are then added
    to it in place. Otherwise autograd sums the tied weight's two gradients out of place first, a
    copy of the whole [V, d] matrix (the 100M preset: 20 ms of its one-thread step). The same sum in
    the same order: the head's dense gradient, then the rows."""
    head, module = model.lm_head, torch.nn.modules.module
    if (type(head) is not torch.nn.Linear or head.bias is not None or h.dim() != 2 or h.device.type != "cpu"
            or head._forward_hooks or head._forward_pre_hooks or head._backward_hooks or head._backward_pre_hooks
            or module._global_forward_hooks or module._global_forward_pre_hooks
            or module._global_backward_hooks or module._global_backward_pre_hooks):
        return head(h)
    return _RowChunkedHead.apply(h, head.weight, into_grad and getattr(model, "rlaccel_head_grad_into_param", False))


def head_logprobs(model, hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, temperature: float,
                  chunk: int = 0) -> torch.Tensor:
    """log softmax(lm_head(hidden[rows]) / T)[targets]: the [M] logprobs of the M (position,
    target) pairs, ``hidden`` [U, d] the distinct predicting positions, ``rows`` [M] each pair's.

    ``chunk`` 0: the head once over the U positions ([U, V] logits). ``chunk`` > 0
    (``trainer.logit_chunk``): over ``chunk`` pairs at a time under non-reentrant activation
    checkpointing, so that only one chunk's [chunk, V] logits are alive, in the forward and again
    in the backward, which recomputes them; a position shared by several pairs (a group's last
    prompt position) is multiplied once per pair."""
    def piece(h: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(tempered(lm_head(model, h[r]), temperature), dim=-1)
        return logp.gather(-1, t[:, None])[:, 0]
    if chunk <= 0 or len(rows) <= chunk:
        logp = torch.log_softmax(tempered(lm_head(model, hidden, into_grad=True), temperature), dim=-1)  # [U, V]
        return logp[rows, targets]
    from torch.utils.checkpoint import checkpoint
    return torch.cat([checkpoint(piece, hidden, rows[i:i + chunk], targets[i:i + chunk], use_reentrant=False,
                                 preserve_rng_state=False)  # the head draws no random numbers
                      for i in range(0, len(rows), chunk)])


def packed_token_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                          temperature: float = 1.0, backend: str = "regions",
                          logit_chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp [S, R_max], mask [S, R_max]) for the S (prompt, response) pairs, in their order;
    consecutive pairs with the same prompt share one packed row. ``logit_chunk``: see
    :func:`head_logprobs`."""
    batch = pack(prompts, responses, pad_id)
    device = next(model.parameters()).device
    with shared_prompt_attention_enabled(model):
        hidden = model.model(input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device),
                             shared_prompt_batch=batch, shared_prompt_backend=backend,
                             use_cache=False).last_hidden_state                     # [B, L, d]
    # The head runs once over every row's distinct predicting positions: one [ΣU, d] x [d, V]
    # product instead of one per row, whose few rows each (a group's U) leave a 32k-vocabulary
    # head's multiply at half the speed of one over all of them (forward and both backward ones).
    # The [ΣU, V] logits of every row are then alive at once (with their log-softmax and its
    # gradient, ~2-3x ΣU·V·4 bytes), as the unpacked path's are for its micro-batch, unless
    # logit_chunk bounds them (head_logprobs).
    picked, inverse, targets, offset = [], [], [], 0
    for b, row in enumerate(batch.rows):
        valid = row.response_valid.to(device)
        where = predicting_positions(row).to(device)[valid]                          # [ΣR]
        unique, inv = torch.unique(where, return_inverse=True)
        picked.append(hidden[b, unique])                                              # [U, d]
        inverse.append(inv + offset)
        targets.append(batch.input_ids[b].to(device)[row.response_index.to(device)[valid]])
        offset += len(unique)
    token_logp = head_logprobs(model, torch.cat(picked), torch.cat(inverse), torch.cat(targets), temperature,
                               logit_chunk)                                          # [Σ rows' ΣR]
    per_row = [lp.split(row.response_lens)                                           # N × [R_n]
               for lp, row in zip(token_logp.split([sum(row.response_lens) for row in batch.rows]), batch.rows)]
    per_seq = [per_row[b][n] for b, n in zip(batch.seq_row, batch.seq_response)]
    logp = pad_sequence(per_seq, batch_first=True)
    mask = pad_sequence([torch.ones(len(r), dtype=logp.dtype, device=device) for r in responses], batch_first=True)
    return logp, mask
