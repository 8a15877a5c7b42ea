"""An MTP drafter head in the EAGLE / DeepSeek-V3 form, computing exactly what vLLM's ``eagle``
drafter (``vllm/model_executor/models/llama_eagle.py``, vllm 0.32) computes, so that a head
trained here drafts the same tokens inside vLLM.

One draft step, for the token ``tok`` at position ``pos`` with input state ``h``::

    z   = fc([E(tok) ‖ h])                       fc: 2H -> H, no bias, no norm before it
    s   = z + o_proj(attn(RoPE(q(z)), RoPE(k(z)), v(z)))      layer 0 has no input norm
    out = s + mlp(RMSNorm(s))                    no final norm
    logits = LM(out)                             the policy's LM head (shared)

The first pass runs over every target position t with ``tok = x_{t+1}`` and ``h = f_t``, the
policy's final (post-norm) hidden state; its KV at t is what later steps attend to. Draft
step j ≥ 2 of an anchor q feeds the previous step's token and ``out`` (no norm) at position
q + j - 1, attending to the first-pass KV at positions ≤ q and to its own earlier steps.
:meth:`DraftHead.unroll` runs k such steps for every anchor at once (the "training-time
test" attention pattern), so a loss sees the recursion the engine runs.

Embedding and LM head are the policy's (vLLM shares them); the head owns ``fc`` and
``mtp.layers`` Llama decoder layers (layers after the first with their input norm, as vLLM
builds them), named as vLLM loads them (``fc.weight``, ``layers.0.…``).

Two more forms share the unroll (:class:`DraftHead`): :class:`Eagle3Head`, vLLM's ``eagle3``
drafter with its own LM head over a reduced draft vocabulary, and :class:`mtp.native.MiMoMTPHead`, a native
MTP layer (vLLM's ``mtp`` method).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class HeadConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    max_position_embeddings: int
    num_layers: int = 1
    attention_bias: bool = False  # q/k/v biases (Qwen2 / MiMo layers have them)

    @classmethod
    def from_policy(cls, config, num_layers: int = 1) -> "HeadConfig":
        """The head's layers mirror a decoder layer of the policy (a Hugging Face config)."""
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return cls(config.hidden_size, config.intermediate_size, config.num_attention_heads,
                   config.num_key_value_heads, getattr(config, "head_dim", None) or
                   config.hidden_size // config.num_attention_heads, config.rms_norm_eps, float(theta),
                   config.vocab_size, config.max_position_embeddings, num_layers)

    def vllm_config(self) -> dict:
        """config.json of the draft checkpoint: vLLM's ``eagle`` method builds
        ``EagleLlamaForCausalLM`` from a Llama config (``model_type`` "llama")."""
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": self.num_layers,
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "hidden_act": "silu",
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
                "vocab_size": self.vocab_size, "max_position_embeddings": self.max_position_embeddings,
                "attention_bias": False, "tie_word_embeddings": False}


class RMSNorm(nn.Module):
    """vLLM's RMSNorm: statistics in float32, then times the weight."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(size)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, c: HeadConfig, in_size: int | None = None):
        """``in_size``: width of the input q, k and v are projected from (default hidden_size)."""
        super().__init__()
        self.c = c
        n = in_size or c.hidden_size
        self.q_proj = nn.Linear(n, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(n, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(n, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor, pos: torch.Tensor):
        """Rotated q [B, Hq, T, d], k and v [B, Hkv, T, d] of x [B, T, H] at positions pos [B, T]."""
        B, T, _ = x.shape
        c = self.c
        q = self.q_proj(x).view(B, T, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        cos, sin = rope(pos, c.head_dim, c.rope_theta, x.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def attend(self, q, k, v, mask: torch.Tensor) -> torch.Tensor:
        """o_proj(softmax(q kᵀ/√d + mask) v); mask [T_q, T_k] bool (True = attend)."""
        B, _, T, d = q.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d ** -0.5,
                                             enable_gqa=self.c.num_attention_heads != self.c.num_key_value_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def rope(pos: torch.Tensor, dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary cos/sin [B, 1, T, dim] (vLLM's ``is_neox_style=True``)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim)
    angles = pos.float()[..., None] * inv_freq  # [B, T, dim/2]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def pass_through(fc: nn.Linear, start: int) -> None:
    """Set ``fc`` [H, n·H] to pass its input's block at column ``start`` through unchanged (the
    identity there, zeros elsewhere): a fusing projection that starts as "the state through"."""
    H = fc.weight.shape[0]
    fc.weight.zero_()
    fc.weight[:, start:start + H].copy_(torch.eye(H))


def causal_mask(T: int, device) -> torch.Tensor:
    """[T, T] bool, True where row t may attend (columns ≤ t)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class MLP(nn.Module):
    def __init__(self, c: HeadConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    """Llama decoder layer; layer 0 of an EAGLE head has no input norm (vLLM's
    ``LlamaDecoderLayer(disable_input_layernorm=True)``), later layers do."""

    def __init__(self, c: HeadConfig, input_norm: bool = False):
        super().__init__()
        self.self_attn, self.mlp = Attention(c), MLP(c)
        if input_norm:
            self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, pos, past_kv, mask):
        """(x + attn + mlp, (k, v) of these rows); ``past_kv`` extra keys/values or None."""
        a = self.input_layernorm(x) if hasattr(self, "input_layernorm") else x
        q, k, v = self.self_attn.qkv(a, pos)
        keys, values = (k, v) if past_kv is None else (torch.cat([past_kv[0], k], 2), torch.cat([past_kv[1], v], 2))
        s = x + self.self_attn.attend(q, keys, values, mask)
        return s + self.mlp(self.post_attention_layernorm(s)), (k, v)


class DraftHead(nn.Module):
    """What every head form shares: the k-step unroll over ``block``. A form defines ``block``
    (one draft step over T rows), ``layers`` (whose KV later steps attend to) and which policy
    state its first pass takes (``pre_norm_hidden``)."""

    pre_norm_hidden = False  # True: the policy's last hidden state before its final norm
    # The policy's residual stream after each of these many layers (N: before the final norm),
    # concatenated, instead of its final hidden state (EAGLE-3's auxiliary hidden states).
    aux_layers: tuple[int, ...] | None = None
    # P-EAGLE (vLLM's parallel drafting): draft steps after the first take this token and a learned
    # hidden state (mask slots) instead of the previous draft and output, so one forward drafts all k.
    mask_token_id: int | None = None

    @property
    def parallel(self) -> bool:
        return self.mask_token_id is not None

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The first pass's input state from the policy's states (identity unless the form has an fc)."""
        return hidden

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer parameter groups at learning rate ``lr`` (one group unless a form slows a part)."""
        return [{"params": list(self.parameters()), "lr": lr}]

    def draft_logits(self, out: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
        """The draft distribution's logits [.., V] from a step's output; ``lm_head`` [V, H] is the
        policy's (shared by the EAGLE and MTP forms)."""
        return F.linear(out, lm_head)

    def block(self, emb: torch.Tensor, h: torch.Tensor, pos: torch.Tensor, past_kv=None, mask=None):
        raise NotImplementedError

    def unroll(self, embed, tokens: torch.Tensor, hidden: torch.Tensor, k: int,
               draft_tokens: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The drafter's k steps for every anchor of a batch, teacher-forced.

        tokens [B, L] (x_0..x_{L-1}), hidden [B, L, H] (f_t, the policy's states this form takes).
        Step 1 runs the first pass: row t (t < L-1) takes x_{t+1} and f_t and predicts x_{t+2}.
        Step j ≥ 2, row t (anchor q = t) takes the token drafted at step j-1 — ``draft_tokens[j-2]``
        [B, L-1], by default the true x_{t+j} (the case in which step j is reached: all earlier
        drafts accepted) — and step j-1's output, at position t + j - 1, attending to first-pass
        keys at positions ≤ t and its own earlier steps. A parallel (P-EAGLE) head's step j ≥ 2
        takes its mask token and state instead (``draft_tokens`` unused), with the same attention:
        vLLM's one forward over the bonus slot and k - 1 mask slots under plain causal attention.
        Returns the outputs [B, L-1, H] of each step: row t of step j predicts x_{t+j+1} (rows
        whose target lies past the end are junk; mask them).
        """
        B, L = tokens.shape
        T = L - 1
        pos = torch.arange(T, device=tokens.device).expand(B, T)
        out, kv = self.block(embed(tokens[:, 1:]), self.project(hidden[:, :T]), pos)
        outs, kvs = [out], [kv]  # kvs[step][layer] = (k, v)
        causal = causal_mask(T, tokens.device)
        diag = torch.eye(T, dtype=torch.bool, device=tokens.device)
        for j in range(2, k + 1):
            if self.parallel:  # a mask slot: the same token and state at every step, nothing fed back
                tok = tokens.new_full((B, T), self.mask_token_id)
                h = self.project(self.mask_hidden).expand(B, T, -1)
            else:  # the previous draft (by default x_{t+j}, padded past the end with x_{L-1}: junk rows) and output
                idx = (torch.arange(T, device=tokens.device) + j).clamp(max=L - 1)
                tok = draft_tokens[j - 2] if draft_tokens is not None else tokens[:, idx]
                h = outs[-1]
            mask = torch.cat([causal] + [diag] * (j - 1), dim=1)  # first pass ≤ t, own earlier steps, itself
            past = [(torch.cat([s[i][0] for s in kvs], 2), torch.cat([s[i][1] for s in kvs], 2))
                    for i in range(len(self.layers))]
            out, kv = self.block(embed(tok), h, pos + (j - 1), past, mask)
            outs.append(out)
            kvs.append(kv)
        return outs


class EagleHead(DraftHead):
    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.layers = nn.ModuleList([Layer(config, input_norm=i > 0) for i in range(config.num_layers)])

    @classmethod
    def for_policy(cls, policy, num_layers: int = 1) -> "EagleHead":
        """A head sized for ``policy`` (a transformers causal LM); each decoder layer starts as a
        copy of the policy's last layer (attention and MLP weights), layers after the first with
        zero output projections (identity through the residual), ``fc`` as [0 | I] (pass the
        hidden state through): a head that starts near "the policy's next layer"."""
        config = HeadConfig.from_policy(policy.config, num_layers)
        head = cls(config).to(next(policy.parameters()).dtype)
        last = policy.model.layers[-1]
        with torch.no_grad():
            for i, layer in enumerate(head.layers):
                for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    getattr(layer.self_attn, name).weight.copy_(getattr(last.self_attn, name).weight)
                for name in ("gate_proj", "up_proj", "down_proj"):
                    getattr(layer.mlp, name).weight.copy_(getattr(last.mlp, name).weight)
                layer.post_attention_layernorm.weight.copy_(last.post_attention_layernorm.weight)
                if i > 0:
                    layer.input_layernorm.weight.copy_(last.input_layernorm.weight)
                    layer.self_attn.o_proj.weight.zero_()
                    layer.mlp.down_proj.weight.zero_()
            pass_through(head.fc, config.hidden_size)
        return head

    def block(self, emb: torch.Tensor, h: torch.Tensor, pos: torch.Tensor, past_kv=None, mask=None):
        """One draft block over T rows: returns (out [B, T, H], [(k, v) of these rows per layer]).
        ``past_kv`` [(k, v) per layer] are extra keys the rows may attend to, ``mask`` [T, T_past + T]."""
        x = self.fc(torch.cat([emb, h], dim=-1))
        if mask is None:
            mask = causal_mask(x.shape[1], x.device)
        kvs = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, pos, None if past_kv is None else past_kv[i], mask)
            kvs.append(kv)
        return x, kvs

    # ---- vLLM draft checkpoint ----------------------------------------------------------

    def vllm_state(self) -> dict[str, torch.Tensor]:
        """The head's tensors under the names vLLM's EAGLE drafter loads."""
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}

    def save_vllm(self, directory: str | Path) -> Path:
        """A directory vLLM loads with ``speculative_config={"method": "eagle", "model": dir}``."""
        return _save_draft(self, directory)

    @classmethod
    def load_vllm(cls, directory: str | Path) -> "EagleHead":
        from safetensors.torch import load_file
        directory = Path(directory)
        config = _head_config(json.loads((directory / "config.json").read_text()))
        state = load_file(str(directory / "model.safetensors"))
        head = cls(config).to(next(iter(state.values())).dtype)
        head.load_state_dict(state)
        return head


AUX_FC_LR_SCALE = 0.1  # see Eagle3Head.param_groups


class Eagle3Layer(nn.Module):
    """The decoder layer of vLLM's ``eagle3`` drafter (``llama_eagle3.py``, vllm 0.32): q, k and
    v read the normed token embedding beside the normed input state (2H wide); the residual is
    the input state itself."""

    def __init__(self, c: HeadConfig):
        super().__init__()
        self.self_attn, self.mlp = Attention(c, in_size=2 * c.hidden_size), MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)  # on the token embedding
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, emb, h, pos, past_kv, mask):
        q, k, v = self.self_attn.qkv(torch.cat([self.input_layernorm(emb), self.hidden_norm(h)], dim=-1), pos)
        keys, values = (k, v) if past_kv is None else (torch.cat([past_kv[0], k], 2), torch.cat([past_kv[1], v], 2))
        s = h + self.self_attn.attend(q, keys, values, mask)
        return s + self.mlp(self.post_attention_layernorm(s)), (k, v)


class Eagle3Head(DraftHead):
    """A head in the EAGLE-3 form that drafts from a reduced vocabulary, computing what vLLM's
    ``eagle3`` drafter computes with ``use_aux_hidden_state: false`` (the policy's final hidden
    state, as for ``eagle``; no auxiliary layers)::

        s   = h + o_proj(attn([RMSNorm_in(E(tok)) ‖ RMSNorm_hid(h)]))     q/k/v: 2H -> heads
        out = s + mlp(RMSNorm_post(s))                 chained to the next draft step (pre-norm)
        logits = LM_draft(RMSNorm_final(out))          [D] -> the policy's ids, -inf elsewhere

    Why: each draft step of the EAGLE form runs the policy's whole LM head (on the ~100M preset,
    32k × 768, about four times the decoder layer), which caps what speculation gains at small batch.
    The draft vocabulary D is the tokens the policy samples most (``mtp.draft_vocab``); a draft
    can only be a token of D, so acceptance is at most the policy's mass on D (reported as
    ``draft_vocab_coverage``); rejection sampling stays exact (q is 0 outside D, and the
    verifier's residual max(p − q, 0) covers those tokens).

    Checkpoint: ``layers.0.*`` (with ``hidden_norm``), ``norm.weight``, ``lm_head.weight`` [D, H]
    and ``d2t`` (int64, the target id of draft id i is i + d2t[i]); config.json carries
    ``draft_vocab_size`` and ``eagle_config: {use_aux_hidden_state: false}``. The embedding is
    the policy's (vLLM shares it). One layer (vLLM's later eagle3 layers take no embedding).

    With ``aux_layers`` (EAGLE-3's auxiliary hidden states) the first pass takes
    ``h = fc([r_a ‖ r_b ‖ …])`` over the policy's residual streams after layers a, b, … (vLLM's
    ``hidden + residual``; N = the input of the final norm), ``fc.weight`` [H, n·H] in the
    checkpoint, ``eagle_config: {use_aux_hidden_state: true, eagle_aux_hidden_state_layer_ids}``.
    With ``mask_token_id`` as well it is a P-EAGLE head for vLLM's ``parallel_drafting``: draft
    steps 2..k are mask slots taking E(mask token) and ``fc(mask_hidden)`` (a learned [n·H]
    vector in the concatenated-state space, as vLLM projects it at load), so one drafter forward
    drafts all k tokens; config.json carries ``mask_token_id`` and ``parallel_drafting: true``.
    """

    def __init__(self, config: HeadConfig, draft_ids: torch.Tensor, aux_layers: tuple[int, ...] | None = None,
                 mask_token_id: int | None = None):
        super().__init__()
        if mask_token_id is not None and not aux_layers:
            raise ValueError("a parallel-drafting (P-EAGLE) head needs aux_layers: vLLM keeps its mask state in "
                             "the auxiliary states' space, before fc")
        if aux_layers is not None and len(set(aux_layers)) != len(aux_layers):
            raise ValueError(f"aux_layers {aux_layers} must be distinct (vLLM captures each layer once)")
        if config.num_layers != 1:
            raise ValueError("an EAGLE-3 head has one decoder layer here; set mtp.layers=1 with mtp.draft_vocab > 0")
        ids = torch.as_tensor(draft_ids, dtype=torch.long)
        if ids.ndim != 1 or not 0 < len(ids) < config.vocab_size or bool((ids[1:] <= ids[:-1]).any()) \
                or int(ids[-1]) >= config.vocab_size or int(ids[0]) < 0:
            raise ValueError(f"draft_ids must be sorted, distinct ids of the policy's vocabulary "
                             f"(0..{config.vocab_size - 1}), fewer than all of them (vLLM maps a reduced "
                             f"vocabulary only); got {len(ids)} ids")
        self.config = config
        self.layers = nn.ModuleList([Eagle3Layer(config)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, len(ids), bias=False)
        self.register_buffer("draft_ids", ids)
        self.aux_layers = tuple(int(i) for i in aux_layers) if aux_layers else None
        self.mask_token_id = None if mask_token_id is None else int(mask_token_id)
        if self.aux_layers:
            width = len(self.aux_layers) * config.hidden_size
            self.fc = nn.Linear(width, config.hidden_size, bias=False)
            if self.parallel:
                self.mask_hidden = nn.Parameter(torch.zeros(width))

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc(hidden) if self.aux_layers else hidden

    def param_groups(self, lr: float) -> list[dict]:
        """The auxiliary states' fc at AUX_FC_LR_SCALE · lr. It starts as a pass-through of the final
        norm's input ([0 | 0 | I]); Adam moves every entry by about the learning rate whatever its
        gradient, so at the layer's rate the zero blocks over the other two residual streams (2·H²
        entries, inputs as large as the kept one) drown the pass-through within tens of steps. On
        the ~100M preset with spec_rollout's recipe (150 steps, same data and seed), held-out
        acceptance per position predicted offline: fc at lr 0.842 / 0.948 / 0.940 (mean accepted
        length 2.82), at 0.1 · lr 0.937 / 0.936 / 0.917 (3.00), at 0.01 · lr 0.922 / 0.935 / 0.926
        (2.97); the chained EAGLE-3 head's 0.950 / 0.946 / 0.940."""
        if not self.aux_layers:
            return super().param_groups(lr)
        rest = [p for name, p in self.named_parameters() if name != "fc.weight"]
        return [{"params": rest, "lr": lr}, {"params": [self.fc.weight], "lr": lr * AUX_FC_LR_SCALE}]

    @classmethod
    def for_policy(cls, policy, draft_ids: torch.Tensor, parallel: bool = False,
                   mask_token_id: int = 0) -> "Eagle3Head":
        """A head for ``policy`` drafting from ``draft_ids``: the layer a copy of the policy's last
        one reading only the hidden state (the embedding's q/k/v columns zero), the final norm and
        the LM head rows the policy's: a head that starts near "the policy's next layer".
        ``parallel``: a P-EAGLE head over the last three residual streams (N-2, N-1, N), its fc
        starting as [0 | 0 | I] (the final norm's input through), its mask state zero."""
        config = HeadConfig.from_policy(policy.config)
        n = policy.config.num_hidden_layers
        aux = (n - 2, n - 1, n) if parallel else None
        head = cls(config, draft_ids, aux, mask_token_id if parallel else None).to(next(policy.parameters()).dtype)
        last, layer, H = policy.model.layers[-1], head.layers[0], config.hidden_size
        with torch.no_grad():
            if aux:
                pass_through(head.fc, head.fc.in_features - H)
            for name in ("q_proj", "k_proj", "v_proj"):
                w = getattr(layer.self_attn, name).weight
                w.zero_()
                w[:, H:].copy_(getattr(last.self_attn, name).weight)
            layer.self_attn.o_proj.weight.copy_(last.self_attn.o_proj.weight)
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(layer.mlp, name).weight.copy_(getattr(last.mlp, name).weight)
            layer.hidden_norm.weight.copy_(last.input_layernorm.weight)
            layer.post_attention_layernorm.weight.copy_(last.post_attention_layernorm.weight)
            head.norm.weight.copy_(policy.model.norm.weight)
            head.lm_head.weight.copy_(policy.lm_head.weight[head.draft_ids])
        return head

    def block(self, emb: torch.Tensor, h: torch.Tensor, pos: torch.Tensor, past_kv=None, mask=None):
        if mask is None:
            mask = causal_mask(emb.shape[1], emb.device)
        out, kv = self.layers[0](emb, h, pos, None if past_kv is None else past_kv[0], mask)
        return out, [kv]

    def draft_logits(self, out: torch.Tensor, lm_head: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the policy's vocabulary, -inf outside the draft vocabulary (as vLLM's
        ``compute_logits`` scatters them); ``lm_head`` is unused (the head has its own)."""
        small = self.lm_head(self.norm(out))
        full = small.new_full((*small.shape[:-1], self.config.vocab_size), float("-inf"))
        return full.index_copy(-1, self.draft_ids, small)

    # ---- vLLM draft checkpoint ----------------------------------------------------------

    def vllm_state(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k != "draft_ids"}
        state["d2t"] = (self.draft_ids - torch.arange(len(self.draft_ids), device=self.draft_ids.device)).cpu()
        return state

    def save_vllm(self, directory: str | Path) -> Path:
        """A directory vLLM loads with ``speculative_config={"method": "eagle3", "model": dir}``
        (and ``parallel_drafting: True`` for a P-EAGLE head: :func:`parallel_drafting`)."""
        keys: dict = {"draft_vocab_size": len(self.draft_ids), "eagle_config": {"use_aux_hidden_state": False}}
        if self.aux_layers:
            keys.update(eagle_config={"use_aux_hidden_state": True,
                                      "eagle_aux_hidden_state_layer_ids": list(self.aux_layers)},
                        num_aux_hidden_states=len(self.aux_layers), target_hidden_size=self.config.hidden_size)
        if self.parallel:
            keys.update(mask_token_id=self.mask_token_id, parallel_drafting=True)
        return _save_draft(self, directory, **keys)

    @classmethod
    def load_vllm(cls, directory: str | Path) -> "Eagle3Head":
        """A head saved by :meth:`save_vllm`. Other eagle3 checkpoints (auxiliary hidden states,
        other norm placements) run differently in vLLM and are refused, not trained as this form."""
        from safetensors.torch import load_file
        directory = Path(directory)
        c = json.loads((directory / "config.json").read_text())
        eagle = c.get("eagle_config") or {}
        variants = [k for k in ("norm_before_residual", "norm_output", "norm_before_fc", "fc_norm")
                    if c.get(k) or eagle.get(k)]
        aux = eagle.get("eagle_aux_hidden_state_layer_ids")
        if (eagle.get("use_aux_hidden_state", True) and not aux) or variants:
            raise ValueError(f"{directory}: an eagle3 checkpoint rlaccel does not train (it needs "
                             f"eagle_config.use_aux_hidden_state false, or true with eagle_aux_hidden_state_layer_ids, "
                             f"and none of {variants or 'the norm variants'}); "
                             f"draft with it frozen, or train a head with `python -m mtp.train mtp.draft_vocab=N`")
        state = load_file(str(directory / "model.safetensors"))
        d2t = state.pop("d2t")
        state.pop("t2d", None)
        head = cls(_head_config(c), torch.arange(len(d2t)) + d2t, aux if eagle.get("use_aux_hidden_state") else None,
                   c.get("mask_token_id") if c.get("parallel_drafting") else None).to(state["norm.weight"].dtype)
        want = set(head.state_dict()) - {"draft_ids"}
        if set(state) != want:
            raise ValueError(f"{directory}: the EAGLE-3 checkpoint's tensors differ from this form's: missing "
                             f"{sorted(want - set(state))}, unexpected {sorted(set(state) - want)}")
        head.load_state_dict(state, strict=False)
        return head


def _save_draft(head: DraftHead, directory: str | Path, **config_keys) -> Path:
    """An EAGLE-family draft checkpoint: ``head.vllm_state()`` and config.json (the head's Llama
    config, its dtype, ``config_keys``)."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(head.vllm_state(), str(directory / "model.safetensors"))
    config = {**head.config.vllm_config(), **config_keys,
              "torch_dtype": str(next(head.parameters()).dtype).removeprefix("torch.")}
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory


def _head_config(c: dict) -> HeadConfig:
    """HeadConfig of a draft checkpoint's config.json."""
    return HeadConfig(c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"],
                      c["head_dim"], c["rms_norm_eps"], c["rope_parameters"]["rope_theta"], c["vocab_size"],
                      c["max_position_embeddings"], c.get("num_hidden_layers", 1))


def draft_method(directory: str | Path) -> str:
    """vLLM's speculative method for an rlaccel draft checkpoint: "eagle3" for a reduced-vocabulary
    head (config.json has ``draft_vocab_size``), else "eagle"."""
    config = json.loads((Path(directory) / "config.json").read_text())
    return "eagle3" if config.get("draft_vocab_size") else "eagle"


def parallel_drafting(directory: str | Path) -> bool:
    """The draft checkpoint is a P-EAGLE head (vLLM's ``parallel_drafting``: one drafter forward
    drafts all k tokens; the per-batch-size k may then only be 0 or k)."""
    return bool(json.loads((Path(directory) / "config.json").read_text()).get("parallel_drafting"))


def load_head(directory: str | Path) -> DraftHead:
    """The EAGLE or EAGLE-3 head saved in ``directory``."""
    return (Eagle3Head if draft_method(directory) == "eagle3" else EagleHead).load_vllm(directory)


def policy_states(policy, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  pre_norm: bool = False, aux_layers: tuple[int, ...] | None = None):
    """(f [B, L, H] the final hidden states — post-norm, or with ``pre_norm`` the input of the
    final norm; with ``aux_layers`` the residual streams after those many layers concatenated
    [B, L, n·H], the input of layer i for i < N and of the final norm for N, as vLLM captures
    them — and logits [B, L, V]) of the policy."""
    captured: dict[int, torch.Tensor] = {}
    modules = list(policy.model.layers) + [policy.model.norm]
    wanted = set(aux_layers or ()) | ({len(modules) - 1} if pre_norm else set())

    def capture(i):
        def hook(module, args, kwargs):
            captured[i] = args[0] if args else kwargs["hidden_states"]
        return hook
    hooks = [modules[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in sorted(wanted)]
    try:
        base = policy.model(input_ids=tokens, attention_mask=attention_mask, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    hidden = base.last_hidden_state
    if aux_layers:
        states = torch.cat([captured[i] for i in aux_layers], dim=-1)
    else:
        states = captured[len(modules) - 1] if pre_norm else hidden
    return states, policy.lm_head(hidden)
