"""Native MTP layers (vLLM's ``mtp`` method): rlaccel's trainable copy of MiMo's form, and the
check whether a checkpoint declares native MTP layers. Shares the draft unroll and the Llama/Qwen2
layer pieces with the EAGLE heads (:mod:`mtp.heads`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from mtp.heads import DraftHead, HeadConfig, Layer, RMSNorm, causal_mask

MIMO_PREFIX = "model.mtp_layers.0."
NATIVE_FILE = "mtp.safetensors"


class MiMoMTPHead(DraftHead):
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
            H = config.hidden_size
            head.input_proj.weight.zero_()
            head.input_proj.weight[:, :H].copy_(torch.eye(H))
        return head

    def block(self, emb: torch.Tensor, h: torch.Tensor, pos: torch.Tensor, past_kv=None, mask=None):
        emb = emb.masked_fill((pos == 0)[..., None], 0.0)
        x = self.input_proj(torch.cat([self.hidden_layernorm(h), self.token_layernorm(emb)], dim=-1))
        if mask is None:
            mask = causal_mask(x.shape[1], x.device)
        x, kv = self.layers[0](x, pos, None if past_kv is None else past_kv[0], mask)
        return self.final_layernorm(x), [kv]

    def vllm_state(self) -> dict[str, torch.Tensor]:
        """The layer's tensors under their checkpoint names (what vLLM's MiMo MTP loader maps)."""
        return {MIMO_PREFIX + name.removeprefix("layers.0."): t.detach().contiguous().cpu()
                for name, t in self.state_dict().items()}

    def save_vllm(self, model_dir: str | Path) -> Path:
        """Write the layer into ``model_dir`` (a saved policy checkpoint): ``mtp.safetensors``,
        listed in the weight index if the checkpoint is sharded, and the config keys that make
        vLLM build the MiMo target and its MTP drafter. Existing MTP tensors elsewhere in the
        checkpoint are refused (they would load twice)."""
        from safetensors import safe_open
        from safetensors.torch import save_file
        model_dir = Path(model_dir)
        for f in model_dir.glob("*.safetensors"):
            if f.name != NATIVE_FILE:
                with safe_open(str(f), "pt") as st:
                    if any(k.startswith("model.mtp_layers.") for k in st.keys()):
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
        config.update(architectures=["MiMoForCausalLM"], num_nextn_predict_layers=1)
        config_path.write_text(json.dumps(config, indent=1))
        return model_dir

    @classmethod
    def load_vllm(cls, model_dir: str | Path) -> "MiMoMTPHead":
        """MTP layer 0 of a checkpoint (any of its safetensors files)."""
        from safetensors import safe_open
        from transformers import Qwen2Config
        model_dir = Path(model_dir)
        state = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                state.update({k[len(MIMO_PREFIX):]: st.get_tensor(k) for k in st.keys() if k.startswith(MIMO_PREFIX)})
        if not state:
            raise ValueError(f"{model_dir} has no native MTP layer ({MIMO_PREFIX}* tensors); train one with "
                             f"`python -m mtp.train mtp.head=native`, or use rollout.draft_model with an EAGLE head")
        config = dataclasses.replace(HeadConfig.from_policy(Qwen2Config.from_pretrained(str(model_dir))),
                                     attention_bias=True)
        head = cls(config).to(next(iter(state.values())).dtype)
        block = {"layers.0." + k: v for k, v in state.items()
                 if not k.split(".")[0] in ("token_layernorm", "hidden_layernorm", "input_proj", "final_layernorm")}
        head.load_state_dict({**{k: v for k, v in state.items() if "layers.0." + k not in block}, **block})
        return head


def has_native_mtp(model_dir: str | Path) -> bool:
    """The checkpoint's config declares native MTP layers that vLLM's ``mtp`` method drafts with:
    ``num_nextn_predict_layers`` (MiMo, DeepSeek-V3, Qwen3-Next) or ``mtp_num_hidden_layers``
    (Qwen3.5), at the top level or in ``text_config``. rlaccel trains only MiMo's form
    (:class:`MiMoMTPHead`); the others draft frozen, as shipped."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text())
    for c in (config, config.get("text_config") or {}):
        if (c.get("num_nextn_predict_layers") or 0) >= 1 or (c.get("mtp_num_hidden_layers") or 0) >= 1:
            return True
    return False
