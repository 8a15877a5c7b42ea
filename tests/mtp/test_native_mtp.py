"""The native MTP layer in MiMo's form (vLLM's ``mtp`` method): its block equals vLLM's
``MiMoMultiTokenPredictorLayer`` formula written with transformers' Qwen2 decoder layer; its
k-step unroll equals step-by-step drafting; it takes the policy's pre-norm last hidden state;
and it round-trips through a policy checkpoint under exactly the names vLLM's MiMo MTP loader
maps, without disturbing the policy's own weights."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from mtp.heads import policy_states
from mtp.native import MIMO_PREFIX, MiMoMTPHead, has_native_mtp
from policy.models import build_char_tokenizer, load_model, save_model


def micro_qwen2(vocab: int = 40) -> Qwen2Config:
    return Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None)


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(micro_qwen2()).eval()


@pytest.fixture(scope="module")
def head(policy):
    head = MiMoMTPHead.for_policy(policy)
    torch.manual_seed(1)
    with torch.no_grad():  # away from the start so that every weight (and every bias) matters
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return head


def test_block_is_vllm_mimo_mtp_with_a_qwen2_layer(policy, head):
    config = policy.config
    config._attn_implementation = "sdpa"
    layer = Qwen2DecoderLayer(config, layer_idx=0)
    layer.load_state_dict({k.removeprefix("layers.0."): v for k, v in head.state_dict().items()
                           if k.startswith("layers.0.")})
    norms = {}
    for name in ("token_layernorm", "hidden_layernorm", "final_layernorm"):
        norms[name] = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        norms[name].weight.data.copy_(getattr(head, name).weight)
    torch.manual_seed(0)
    emb, h = torch.randn(2, 7, config.hidden_size), torch.randn(2, 7, config.hidden_size)
    pos = torch.arange(0, 7).expand(2, 7)  # includes position 0, whose token embedding MiMo zeroes
    with torch.no_grad():
        e = norms["token_layernorm"](torch.where(pos[..., None] == 0, 0.0, emb))
        z = head.input_proj(torch.cat([norms["hidden_layernorm"](h), e], -1))
        s = layer(z, attention_mask=None, position_ids=pos, position_embeddings=Qwen2RotaryEmbedding(config)(z, pos))
        want = norms["final_layernorm"](s[0] if isinstance(s, tuple) else s)
        got, _ = head.block(emb, h, pos)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


@torch.no_grad()
def test_unroll_equals_step_by_step_drafting(policy, head):
    torch.manual_seed(2)
    tokens = torch.randint(2, 40, (2, 12))
    hidden, _ = policy_states(policy, tokens, pre_norm=True)
    k = 3
    outs = head.unroll(policy.model.embed_tokens, tokens, hidden, k)
    embed = policy.model.embed_tokens
    for q in (0, 4, 8):
        pos = torch.arange(q + 1).expand(2, q + 1)
        out, cache = head.block(embed(tokens[:, 1:q + 2]), hidden[:, :q + 1], pos)
        prev = out[:, -1:]
        assert torch.allclose(prev, outs[0][:, q:q + 1], atol=1e-5)
        for j in range(2, k + 1):
            mask = torch.ones(1, cache[0][0].shape[2] + 1, dtype=torch.bool)
            prev, new = head.block(embed(tokens[:, q + j:q + j + 1]), prev, torch.full((2, 1), q + j - 1), cache, mask)
            cache = [(torch.cat([c[0], n[0]], 2), torch.cat([c[1], n[1]], 2)) for c, n in zip(cache, new)]
            assert torch.allclose(prev, outs[j - 1][:, q:q + 1], atol=1e-5), (q, j)


@torch.no_grad()
def test_first_pass_takes_the_pre_norm_hidden_state(policy):
    tokens = torch.randint(2, 40, (2, 9))
    pre, logits = policy_states(policy, tokens, pre_norm=True)
    post, _ = policy_states(policy, tokens)
    assert not torch.allclose(pre, post)
    assert torch.allclose(policy.model.norm(pre), post, atol=1e-6)
    assert torch.allclose(logits, policy.lm_head(post))


def test_checkpoint_round_trip_with_vllm_names(policy, head, tmp_path):
    tokenizer = build_char_tokenizer("abcdefghij")
    directory = save_model(policy, tokenizer, tmp_path / "mimo")
    assert not has_native_mtp(directory)
    head.save_vllm(directory)
    assert has_native_mtp(directory)
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["MiMoForCausalLM"] and config["num_nextn_predict_layers"] == 1
    from safetensors.torch import load_file
    names = set(load_file(str(directory / "mtp.safetensors")))
    layer = {f"self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")} | {"self_attn.o_proj.weight"}
    layer |= {f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    layer |= {"input_layernorm.weight", "post_attention_layernorm.weight", "input_proj.weight",
              "token_layernorm.weight", "hidden_layernorm.weight", "final_layernorm.weight"}
    assert names == {MIMO_PREFIX + n for n in layer}
    again = MiMoMTPHead.load_vllm(directory)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), head.state_dict().values()))
    reloaded = load_model(directory)  # the policy part is untouched
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), policy.state_dict().values()))
    with pytest.raises(ValueError, match="has no native MTP layer"):
        MiMoMTPHead.load_vllm(save_model(policy, tokenizer, tmp_path / "plain"))


@pytest.mark.parametrize("config, native", [
    ({"architectures": ["MiMoForCausalLM"], "num_nextn_predict_layers": 1}, True),
    ({"architectures": ["DeepseekV3ForCausalLM"], "num_nextn_predict_layers": 1}, True),
    ({"architectures": ["Qwen3_5ForConditionalGeneration"], "text_config": {"mtp_num_hidden_layers": 1}}, True),
    ({"architectures": ["MiMoForCausalLM"], "num_nextn_predict_layers": 0}, False),
    ({"architectures": ["Qwen3ForCausalLM"]}, False),
])
def test_which_checkpoints_declare_native_mtp_layers(tmp_path, config, native):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert has_native_mtp(tmp_path) is native
