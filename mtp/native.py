"""Native MTP layers (vLLM's ``mtp`` method): rlaccel's trainable copies of MiMo's form
(:class:`MiMoMTPHead`, a Qwen2 block), DeepSeek-V3's (:class:`DeepSeekMTPHead`, a multi-head
latent attention block) and Qwen3-Next's (:class:`Qwen3NextMTPHead`, a gated-attention block with
a mixture of experts; Qwen3.5's MTP module computes the same), and the check whether a checkpoint
declares native MTP layers. Shares the draft unroll and the decoder layer with the EAGLE heads
(:mod:`mtp.heads`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (DeepseekV3Attention, DeepseekV3MLP,
                                                                  DeepseekV3RotaryEmbedding,
                                                                  apply_rotary_pos_emb_interleave)
from transformers.models.qwen3_next.modeling_qwen3_next import (Qwen3NextAttention, Qwen3NextRMSNorm,
                                                                Qwen3NextRotaryEmbedding, Qwen3NextSparseMoeBlock,
                                                                apply_rotary_pos_emb)

from mtp.heads import DraftHead, HeadConfig, Layer, RMSNorm, causal_mask, pass_through
from policy.models import checkpoint_configs

MIMO_PREFIX = "model.mtp_layers.0."
NATIVE_FILE = "mtp.safetensors"


class NativeMTPHead(DraftHead):
    """What the native forms share: one MTP layer stored with the policy checkpoint, its tensors
    under :meth:`prefix` in ``mtp.safetensors`` — the names outside the decoder block (``own``) as
    the head names them, the block's (``layers.0.*`` here) without ``layers.0.`` — and the config
    keys that make vLLM build the drafter (:meth:`config_keys`)."""

    own: tuple[str, ...] = ()
    # The token embedding is zeroed at position 0 (MiMo's and DeepSeek's MTP layers; not Qwen3-Next's).
    zero_first_embedding = True

    @classmethod
    def check_policy(cls, config: dict) -> None:
        """Raise ValueError if rlaccel cannot train this form for a policy with this config.json."""

    def fuse(self, emb: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The decoder layer's input from the token embedding and the input state."""
        raise NotImplementedError

    def out_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The step's output (the LM head's input and the next step's state) from the layer's."""
        raise NotImplementedError

    def block(self, emb: torch.Tensor, h: torch.Tensor, pos: torch.Tensor, past_kv=None, mask=None):
        """One draft step: the token embedding (zeroed at position 0 where the form's vLLM layer
        does so), fused with the state, one decoder layer, the output norm."""
        if self.zero_first_embedding:
            emb = emb.masked_fill((pos == 0)[..., None], 0.0)
        x = self.fuse(emb, h)
        if mask is None:
            mask = causal_mask(x.shape[1], x.device)
        x, kv = self.layers[0](x, pos, None if past_kv is None else past_kv[0], mask)
        return self.out_norm(x), [kv]

    def prefix(self) -> str:
        raise NotImplementedError

    def config_keys(self) -> dict:
        return {"num_nextn_predict_layers": 1}

    @classmethod
    def from_checkpoint_config(cls, model_dir: Path) -> "NativeMTPHead":
        """An untrained layer shaped for the checkpoint in ``model_dir``."""
        raise NotImplementedError

    def vllm_state(self) -> dict[str, torch.Tensor]:
        """The layer's tensors under their checkpoint names (what vLLM's MTP loader maps)."""
        return {self.prefix() + name.removeprefix("layers.0."): t.detach().contiguous().cpu()
                for name, t in self.state_dict().items()}

    def save_vllm(self, model_dir: str | Path) -> Path:
        """Write the layer into ``model_dir`` (a saved policy checkpoint): ``mtp.safetensors``,
        listed in the weight index if the checkpoint is sharded, and the config keys that make
        vLLM build the target and its MTP drafter. Existing MTP tensors elsewhere in the
        checkpoint are refused (they would load twice)."""
        from safetensors import safe_open
        from safetensors.torch import save_file
        model_dir, prefix = Path(model_dir), self.prefix()
        for f in model_dir.glob("*.safetensors"):
            if f.name != NATIVE_FILE:
                with safe_open(str(f), "pt") as st:
                    if any(k.startswith(prefix) for k in st.keys()):
                        raise ValueError(f"{f} already holds MTP layers; save the policy without them "
                                         f"(policy.models.save_model) and write the trained layer there")
        state = self.vllm_state()
        save_file(state, str(model_dir / NATIVE_FILE))
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"].update({k: NATIVE_FILE for k in state})
            index.write_text(json.dumps(data, indent=1))
        config_path = model_dir / "config.json"
        config = json.loads(config_path.read_text())
        config.update(self.config_keys())
        config_path.write_text(json.dumps(config, indent=1))
        return model_dir

    @classmethod
    def load_vllm(cls, model_dir: str | Path) -> "NativeMTPHead":
        """MTP layer 0 of a checkpoint (any of its safetensors files). Copies of the policy's
        embedding and LM head stored with it (DeepSeek-V3's ``embed_tokens``, ``shared_head.head``)
        are skipped: vLLM drafts with the target's."""
        from safetensors import safe_open
        model_dir = Path(model_dir)
        head = cls.from_checkpoint_config(model_dir)
        prefix, state = head.prefix(), {}
        for f in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                state.update({k[len(prefix):]: st.get_tensor(k) for k in st.keys() if k.startswith(prefix)})
        state = {k: v for k, v in state.items() if not k.startswith(("embed_tokens.", "shared_head.head."))}
        if not state:
            raise ValueError(f"{model_dir} has no native MTP layer ({prefix}* tensors); train one with "
                             f"`python -m mtp.train mtp.head=native`, or use rollout.draft_model with an EAGLE head")
        head = head.to(next(iter(state.values())).dtype)
        head.load_state_dict(head.state_from_vllm(state))
        return head

    def state_from_vllm(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The head's state dict from the checkpoint's tensors (names after :meth:`prefix`)."""
        return {(k if k.split(".")[0] in self.own else "layers.0." + k): v for k, v in state.items()}


class MiMoMTPHead(NativeMTPHead):
    """A native MTP layer in MiMo's form, computing what vLLM's ``mimo_mtp.py`` (vllm 0.32)
    computes, so a layer trained here drafts the same tokens under ``method="mtp"``::

        e   = RMSNorm_tok(E(tok)), zeroed at position 0
        z   = input_proj([RMSNorm_hid(h) ‖ e])           note: hidden first, then the token
        s   = Qwen2 decoder layer(z)                     input norm, q/k/v biases, residuals
        out = RMSNorm_final(s);  logits = LM(out)        the policy's LM head, no further norm

    The first pass takes h = the target's last hidden state *before* its final norm (MiMo's
    model returns it un-normed; its ``compute_logits`` applies the norm); draft steps ≥ 2 take
    the previous step's ``out``. vLLM runs MTP layer 0 for every draft step (its generic
    proposer never passes a step index), as :meth:`DraftHead.unroll` does. In the checkpoint
    the layer is ``model.mtp_layers.0.{token_layernorm, hidden_layernorm, input_proj,
    final_layernorm, self_attn.*, mlp.*, input_layernorm, post_attention_layernorm}`` and the
    config has ``architectures: [MiMoForCausalLM]``, ``num_nextn_predict_layers``.
    """

    pre_norm_hidden = True
    own = ("token_layernorm", "hidden_layernorm", "input_proj", "final_layernorm")

    def __init__(self, config: HeadConfig):
        super().__init__()
        if config.num_layers != 1:
            raise ValueError("a MiMo MTP layer has one decoder block (vLLM drafts every step with MTP layer 0); "
                             "set mtp.layers=1 with mtp.head=native")
        self.config = config
        H, eps = config.hidden_size, config.rms_norm_eps
        self.token_layernorm, self.hidden_layernorm = RMSNorm(H, eps), RMSNorm(H, eps)
        self.input_proj = nn.Linear(2 * H, H, bias=False)
        self.layers = nn.ModuleList([Layer(config, input_norm=True)])
        self.final_layernorm = RMSNorm(H, eps)

    @classmethod
    def for_policy(cls, policy, num_layers: int = 1) -> "MiMoMTPHead":
        """A fresh layer for a Qwen2-form ``policy``: the block a copy of the policy's last layer,
        ``input_proj`` = [I | 0] (the normed hidden state through), the final norm the policy's:
        a layer that starts near "the policy's next layer". A checkpoint that already has MTP
        layers starts from them instead (:meth:`load_vllm`)."""
        config = dataclasses.replace(HeadConfig.from_policy(policy.config, num_layers), attention_bias=True)
        head = cls(config).to(next(policy.parameters()).dtype)
        last = policy.model.layers[-1]
        with torch.no_grad():
            head.layers[0].load_state_dict(last.state_dict())
            head.final_layernorm.weight.copy_(policy.model.norm.weight)
            pass_through(head.input_proj, 0)
        return head

    def fuse(self, emb: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.input_proj(torch.cat([self.hidden_layernorm(h), self.token_layernorm(emb)], dim=-1))

    def out_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_layernorm(x)

    def prefix(self) -> str:
        return MIMO_PREFIX

    def config_keys(self) -> dict:
        return {"architectures": ["MiMoForCausalLM"], "num_nextn_predict_layers": 1}

    @classmethod
    def from_checkpoint_config(cls, model_dir: Path) -> "MiMoMTPHead":
        from transformers import Qwen2Config
        return cls(dataclasses.replace(HeadConfig.from_policy(Qwen2Config.from_pretrained(str(model_dir))),
                                       attention_bias=True))


class MLAttention(DeepseekV3Attention):
    """DeepSeek's multi-head latent attention in the interface of :class:`mtp.heads.Attention`
    (``qkv`` then ``attend``, so :class:`mtp.heads.Layer` runs it with the unroll's KV and masks),
    computing what vLLM's ``DeepseekV2Attention`` computes: q from ``q_proj`` (or the low-rank
    ``q_a_proj`` → norm → ``q_b_proj``), the latent ``kv_a_proj_with_mqa`` → [c_kv ‖ k_rope],
    c_kv normed and expanded by ``kv_b_proj`` into per-head k_nope and v, k_rope shared by every
    head; rotary embedding on the rope dimensions in interleaved pairs (vLLM's
    ``is_neox_style=False``); scale (nope + rope)^-½, with YaRN's mscale² if the rope is scaled.
    Parameters, ``expand_kv``, rotary embedding and scale are transformers' ``DeepseekV3Attention``'s."""

    def __init__(self, config):
        super().__init__(config, layer_idx=config.num_hidden_layers)
        self.rotary = DeepseekV3RotaryEmbedding(config)  # non-persistent buffers only: not in the state dict

    def qkv(self, x: torch.Tensor, pos: torch.Tensor):
        """q, k [B, heads, T, nope + rope] and v [B, heads, T, v_head_dim] of x [B, T, H]."""
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_pass, q_rot = q.view(B, T, -1, self.qk_head_dim).transpose(1, 2).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        kv_nope, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv_nope = self.kv_a_layernorm(kv_nope).view(B, 1, T, self.kv_lora_rank)
        cos, sin = self.rotary(x, pos)
        q_rot, k_rot = apply_rotary_pos_emb_interleave(q_rot, k_rot.view(B, 1, T, self.qk_rope_head_dim), cos, sin)
        k, v = self.expand_kv(kv_nope, k_rot)
        return torch.cat([q_pass, q_rot], dim=-1), k, v

    def attend(self, q, k, v, mask: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = q.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLALayer(Layer):
    """A dense DeepSeek-V3 decoder layer (input norm, latent attention, post-attention norm,
    SwiGLU MLP, residuals) under transformers' names, run by :meth:`Layer.forward`."""

    def __init__(self, config):
        nn.Module.__init__(self)
        self.self_attn, self.mlp = MLAttention(config), DeepseekV3MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepSeekMTPHead(NativeMTPHead):
    """A native MTP module in DeepSeek-V3's form, computing what vLLM's ``deepseek_mtp.py``
    (vllm 0.32) computes, so a module trained here drafts the same tokens under ``method="mtp"``::

        e   = RMSNorm_e(E(tok)), zeroed at position 0
        z   = eh_proj([e ‖ RMSNorm_h(h)])           the token first, then the hidden state
        s   = DeepSeek-V3 decoder layer(z)           latent attention (:class:`MLAttention`), dense MLP
        out = RMSNorm_shared_head(s);  logits = LM(out)      the policy's LM head

    The first pass takes h = the target's final hidden state (after its final norm: vLLM's
    DeepSeek model returns it normed); draft steps ≥ 2 take the previous step's ``out`` (vLLM
    recycles the post-norm state). In the checkpoint the module is layer N of the model
    (``model.layers.{N}.{enorm, hnorm, eh_proj, shared_head.norm, self_attn.*, mlp.*,
    input_layernorm, post_attention_layernorm}``, N = num_hidden_layers) and the config has
    ``num_nextn_predict_layers: 1``; vLLM shares the target's embedding and LM head with it.
    Only a dense block trains here: DeepSeek-V3's own MTP block is a mixture of experts
    (layer N ≥ ``first_k_dense_replace``), which drafts frozen as shipped.
    """

    own = ("enorm", "hnorm", "eh_proj", "shared_head")

    @classmethod
    def check_policy(cls, config: dict) -> None:
        N, dense = config["num_hidden_layers"], config.get("first_k_dense_replace") or 0
        if config.get("n_routed_experts") and N >= dense:
            raise ValueError(f"the MTP block (layer {N}) of this DeepSeek-V3 is a mixture of experts "
                             f"(first_k_dense_replace={dense}); rlaccel trains dense MTP blocks only — draft with the "
                             f"checkpoint's own layer frozen (rollout.spec_method=mtp) instead of mtp.head=native")

    def __init__(self, config):
        super().__init__()
        self.check_policy(config.to_dict())
        self.config = config
        H, eps = config.hidden_size, config.rms_norm_eps
        self.enorm, self.hnorm = RMSNorm(H, eps), RMSNorm(H, eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.layers = nn.ModuleList([MLALayer(config)])
        self.shared_head = nn.ModuleDict({"norm": RMSNorm(H, eps)})

    @classmethod
    def for_policy(cls, policy, num_layers: int = 1) -> "DeepSeekMTPHead":
        """A fresh module for a DeepSeek-V3 ``policy``: the block a copy of the policy's last
        layer (dense in a model whose every layer is), ``eh_proj`` = [0 | I] (the normed hidden
        state through), the shared head's norm the policy's final norm."""
        if num_layers != 1:
            raise ValueError("a DeepSeek-V3 MTP module has one decoder block; set mtp.layers=1 with mtp.head=native")
        head = cls(policy.config).to(next(policy.parameters()).dtype)
        last = policy.model.layers[-1]
        with torch.no_grad():
            if isinstance(last.mlp, DeepseekV3MLP):
                head.layers[0].load_state_dict(last.state_dict())
            head.shared_head["norm"].weight.copy_(policy.model.norm.weight)
            pass_through(head.eh_proj, policy.config.hidden_size)
        return head

    def fuse(self, emb: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))

    def out_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared_head["norm"](x)

    def prefix(self) -> str:
        return f"model.layers.{self.config.num_hidden_layers}."

    @classmethod
    def from_checkpoint_config(cls, model_dir: Path) -> "DeepSeekMTPHead":
        from transformers import AutoConfig
        return cls(AutoConfig.from_pretrained(str(model_dir)))


class GatedAttentionLayer(nn.Module):
    """A full-attention Qwen3-Next decoder layer under transformers' names, in the interface of
    :class:`mtp.heads.Layer` (``forward(x, pos, past_kv, mask)``), computing what vLLM's
    ``Qwen3NextDecoderLayer(layer_type="full_attention")`` computes: zero-centred RMS norms
    (x · (1 + w)), q/k norms per head, rotary embedding on the first ``partial_rotary_factor`` of
    each head (neox style), the attention output times sigmoid of a per-head gate that ``q_proj``
    emits beside q, then a sparse mixture of experts (softmax router, top-k, a sigmoid-gated
    shared expert)."""

    def __init__(self, config):
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Qwen3NextAttention(config, layer_idx=config.num_hidden_layers)
        self.mlp = Qwen3NextSparseMoeBlock(config)
        self.input_layernorm, self.post_attention_layernorm = Qwen3NextRMSNorm(H, eps), Qwen3NextRMSNorm(H, eps)
        self.rotary = Qwen3NextRotaryEmbedding(config)  # non-persistent buffers only: not in the state dict

    def forward(self, x, pos, past_kv, mask):
        """(x + gated attention + MoE, (k, v) of these rows); ``past_kv`` extra keys/values or None."""
        attn, (B, T, _) = self.self_attn, x.shape
        a = self.input_layernorm(x)
        q, gate = torch.chunk(attn.q_proj(a).view(B, T, -1, 2 * attn.head_dim), 2, dim=-1)
        q = attn.q_norm(q).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(a).view(B, T, -1, attn.head_dim)).transpose(1, 2)
        v = attn.v_proj(a).view(B, T, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *self.rotary(a, pos))
        keys, values = (k, v) if past_kv is None else (torch.cat([past_kv[0], k], 2), torch.cat([past_kv[1], v], 2))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling,
                                             enable_gqa=q.shape[1] != keys.shape[1])
        s = x + attn.o_proj(out.transpose(1, 2).reshape(B, T, -1) * torch.sigmoid(gate.reshape(B, T, -1)))
        return s + self.mlp(self.post_attention_layernorm(s)), (k, v)


class Qwen3NextMTPHead(NativeMTPHead):
    """A native MTP module in Qwen3-Next's form, computing what vLLM's ``qwen3_next_mtp.py``
    (vllm 0.32) computes, so a module trained here drafts the same tokens under ``method="mtp"``::

        z   = fc([RMSNorm_e(E(tok)) ‖ RMSNorm_h(h)])      the token first; no zeroing at position 0
        s   = Qwen3-Next full-attention decoder layer(z)  :class:`GatedAttentionLayer`, mixture of experts
        out = RMSNorm(s);  logits = LM(out)               the policy's LM head

    every norm zero-centred (x · (1 + w)). The first pass takes h = the target's final hidden
    state (after its final norm); draft steps ≥ 2 take the previous step's ``out``. In the
    checkpoint the module is ``mtp.{pre_fc_norm_embedding, pre_fc_norm_hidden, fc, norm,
    layers.0.*}`` (experts one by one: ``mlp.experts.{e}.{gate,up,down}_proj.weight``, as
    transformers saves them) and the config has ``num_nextn_predict_layers: 1``. Qwen3.5's MTP
    module (vLLM's ``qwen3_5_mtp.py``) is the same computation under ``mtp_num_hidden_layers``;
    its checkpoints are untested here (vLLM's Qwen3.5 model file imports torchvision).
    vLLM 0.32 builds the drafter's block as a mixture of experts only (its MoE bookkeeping raises
    for a dense one), so only such policies train (:meth:`check_policy`).
    """

    own = ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "fc", "norm", "layers")
    zero_first_embedding = False

    @classmethod
    def check_policy(cls, config: dict) -> None:
        # vLLM names the drafter's block layer 0: a mixture of experts if 0 is not in mlp_only_layers,
        # num_experts > 0 and decoder_sparse_step divides 1.
        if not (config.get("num_experts") and 0 not in (config.get("mlp_only_layers") or [])
                and config.get("decoder_sparse_step", 1) == 1):
            raise ValueError("vLLM 0.32 runs a Qwen3-Next MTP block only as a mixture of experts (num_experts > 0, "
                             "layer 0 not in mlp_only_layers, decoder_sparse_step 1); this policy's would be dense")

    def __init__(self, config):
        super().__init__()
        self.check_policy(config.to_dict())
        self.config = config
        H, eps = config.hidden_size, config.rms_norm_eps
        self.pre_fc_norm_embedding, self.pre_fc_norm_hidden = Qwen3NextRMSNorm(H, eps), Qwen3NextRMSNorm(H, eps)
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.layers = nn.ModuleList([GatedAttentionLayer(config)])
        self.norm = Qwen3NextRMSNorm(H, eps)

    @classmethod
    def for_policy(cls, policy, num_layers: int = 1) -> "Qwen3NextMTPHead":
        """A fresh module for a Qwen3-Next ``policy``: the block a copy of the policy's last
        full-attention layer (its MLP too where that is a mixture of experts), ``fc`` = [0 | I]
        (the normed hidden state through), the final norm the policy's."""
        if num_layers != 1:
            raise ValueError("a Qwen3-Next MTP module has one decoder block; set mtp.layers=1 with mtp.head=native")
        head = cls(policy.config).to(next(policy.parameters()).dtype)
        last = [layer for layer in policy.model.layers if hasattr(layer, "self_attn")][-1]
        with torch.no_grad():
            for name in ("self_attn", "input_layernorm", "post_attention_layernorm") + \
                    (("mlp",) if isinstance(last.mlp, Qwen3NextSparseMoeBlock) else ()):
                getattr(head.layers[0], name).load_state_dict(getattr(last, name).state_dict())
            head.norm.weight.copy_(policy.model.norm.weight)
            pass_through(head.fc, policy.config.hidden_size)
        return head

    def fuse(self, emb: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.pre_fc_norm_embedding(emb), self.pre_fc_norm_hidden(h)], dim=-1))

    def out_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def prefix(self) -> str:
        return "mtp."

    def vllm_state(self) -> dict[str, torch.Tensor]:
        """Under the checkpoint's names, the fused expert tensors ([E, 2I, H] gate ‖ up, [E, H, I]
        down) split into one weight per expert and projection."""
        state = {}
        for name, t in self.state_dict().items():
            t, experts = t.detach().cpu(), name.rpartition("experts.")[0] + "experts."
            if name.endswith("experts.gate_up_proj"):
                for e, (gate, up) in enumerate(zip(*t.chunk(2, dim=1))):
                    state[f"mtp.{experts}{e}.gate_proj.weight"] = gate.contiguous()
                    state[f"mtp.{experts}{e}.up_proj.weight"] = up.contiguous()
            elif name.endswith("experts.down_proj"):
                state.update({f"mtp.{experts}{e}.down_proj.weight": d.contiguous() for e, d in enumerate(t)})
            else:
                state["mtp." + name] = t.contiguous()
        return state

    def state_from_vllm(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        fused = {k: v for k, v in state.items() if ".experts." not in k}
        for key in {k.rpartition("experts.")[0] + "experts." for k in state if ".experts." in k}:
            n = self.config.num_experts
            fused[key + "gate_up_proj"] = torch.stack([torch.cat([state[f"{key}{e}.gate_proj.weight"],
                                                                  state[f"{key}{e}.up_proj.weight"]]) for e in range(n)])
            fused[key + "down_proj"] = torch.stack([state[f"{key}{e}.down_proj.weight"] for e in range(n)])
        return fused

    @classmethod
    def from_checkpoint_config(cls, model_dir: Path) -> "Qwen3NextMTPHead":
        from transformers import AutoConfig
        return cls(AutoConfig.from_pretrained(str(model_dir)))


NATIVE_FORMS = {"qwen2": MiMoMTPHead, "mimo": MiMoMTPHead, "deepseek_v3": DeepSeekMTPHead,
                "qwen3_next": Qwen3NextMTPHead}


def native_form(model_type: str) -> type[NativeMTPHead]:
    """The native MTP form rlaccel trains for a policy of this ``model_type``."""
    if model_type not in NATIVE_FORMS:
        raise ValueError(f"mtp.head=native trains MiMo's form (Qwen2 policies), DeepSeek-V3's (dense MTP block) "
                         f"and Qwen3-Next's; the policy is {model_type!r}: use mtp.head=eagle")
    return NATIVE_FORMS[model_type]


def has_native_mtp(model_dir: str | Path) -> bool:
    """The checkpoint's config declares native MTP layers that vLLM's ``mtp`` method drafts with:
    ``num_nextn_predict_layers`` (MiMo, DeepSeek-V3, Qwen3-Next) or ``mtp_num_hidden_layers``
    (Qwen3.5), at the top level or in ``text_config``. rlaccel trains MiMo's form, DeepSeek-V3's
    with a dense block and Qwen3-Next's (:data:`NATIVE_FORMS`); the others draft frozen, as shipped."""
    return any((c.get("num_nextn_predict_layers") or 0) >= 1 or (c.get("mtp_num_hidden_layers") or 0) >= 1
               for c in checkpoint_configs(model_dir))
