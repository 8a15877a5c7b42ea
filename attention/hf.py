"""Registration as a transformers attention implementation, so any HF decoder (Qwen2/3,
Llama, with GQA and RoPE) runs the packed layout without model surgery.

transformers builds the attention mask before calling the attention function, through the
``AttentionMaskInterface`` entry of the same name — without one it fails, and its packed-
sequence detection from position ids would misread this layout (position ids restart at P
for every response). Our mask entry returns None: the layout, passed explicitly as the
``shared_prompt_batch`` keyword of the model's forward, is the only source of truth.
"""

from __future__ import annotations

from contextlib import contextmanager

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from attention.shared_prompt import shared_prompt_attention

IMPLEMENTATION = "shared_prompt"


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               shared_prompt_batch=None, shared_prompt_backend: str = "regions", sliding_window: int | None = None,
               **_):
    if shared_prompt_batch is None:
        raise ValueError("the shared_prompt attention needs the packed layout: call the model with "
                         "shared_prompt_batch=attention.layout.pack(...)")
    if dropout:
        raise ValueError("shared_prompt attention does not implement attention dropout")
    if sliding_window is not None:
        longest = max(row.prompt_len + max(row.response_lens, default=0) for row in shared_prompt_batch.rows)
        if longest > sliding_window:  # shorter sequences never reach past the window
            raise ValueError(f"shared_prompt attention does not implement sliding-window attention, and a sequence "
                             f"of {longest} tokens (prompt + response) is longer than this layer's window of "
                             f"{sliding_window}: set trainer.shared_prompt=false for this model")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = shared_prompt_attention(query, key, value, shared_prompt_batch, scaling, shared_prompt_backend)
    return out.transpose(1, 2).contiguous(), None  # [B, L, H, D], as transformers expects


def _no_mask(*args, **kwargs):
    return None


AttentionInterface.register(IMPLEMENTATION, _attention)
AttentionMaskInterface.register(IMPLEMENTATION, _no_mask)


@contextmanager
def shared_prompt_attention_enabled(model):
    """Run ``model`` with the shared-prompt attention inside the block, its own outside."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(IMPLEMENTATION)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
