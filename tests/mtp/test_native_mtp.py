"""The native MTP layers (vLLM's ``mtp`` method) in MiMo's and DeepSeek-V3's forms: each block
equals vLLM's formula (``MiMoMultiTokenPredictorLayer``, ``DeepSeekMultiTokenPredictorLayer``)
written with transformers' decoder layer (Qwen2, DeepSeek-V3 with latent attention); the k-step
unroll equals step-by-step drafting; MiMo's takes the policy's pre-norm last hidden state; each
round-trips through a policy checkpoint under exactly the names vLLM's MTP loader maps, without
disturbing the policy's own weights."""

import functools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, Qwen2Config, Qwen3NextConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RotaryEmbedding
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextDecoderLayer, Qwen3NextRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from mtp.heads import policy_states
from mtp.native import MIMO_PREFIX, DeepSeekMTPHead, MiMoMTPHead, Qwen3NextMTPHead, has_native_mtp, native_form
from policy.models import build_char_tokenizer, load_model, save_model


def micro_qwen2(vocab: int = 40) -> Qwen2Config:
    return Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None)


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(micro_qwen2()).eval()


def micro_deepseek(vocab: int = 40, q_lora_rank: int | None = None, **kw) -> DeepseekV3Config:
    """Every layer dense (first_k_dense_replace past the MTP layer's index); no MTP layer declared
    (transformers' default config declares one it does not build)."""
    kw = {"first_k_dense_replace": 100, "num_nextn_predict_layers": 0, **kw}
    return DeepseekV3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=2, q_lora_rank=q_lora_rank, kv_lora_rank=32,
                            qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=8, max_position_embeddings=64,
                            pad_token_id=0, eos_token_id=1, bos_token_id=None, **kw)


def micro_qwen3_next(vocab: int = 40, **kw) -> Qwen3NextConfig:
    """A linear-attention layer then a full-attention one, every MLP a mixture of 4 experts (top 2)."""
    kw = {"num_experts": 4, **kw}
    return Qwen3NextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           layer_types=["linear_attention", "full_attention"], num_attention_heads=2,
                           num_key_value_heads=1, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=2,
                           linear_key_head_dim=16, linear_value_head_dim=16, num_experts_per_tok=2,
                           moe_intermediate_size=32, shared_expert_intermediate_size=32, max_position_embeddings=64,
                           pad_token_id=0, eos_token_id=1, bos_token_id=None, **kw)


def perturbed(head):
    torch.manual_seed(1)
    with torch.no_grad():  # away from the start so that every weight (and every bias) matters
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return head


@pytest.fixture(scope="module")
def head(policy):
    return perturbed(MiMoMTPHead.for_policy(policy))


@functools.cache
def deepseek_pair(q_lora_rank: int | None):
    """(a DeepSeek-V3 policy, its MTP module), built once per query rank."""
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(micro_deepseek(q_lora_rank=q_lora_rank)).eval()
    return policy, perturbed(DeepSeekMTPHead.for_policy(policy))


@pytest.fixture(params=[None, 24], ids=["q_proj", "q_lora"])
def deepseek(request):
    """A DeepSeek-V3 policy and its MTP module, with the full-rank and the low-rank query."""
    return deepseek_pair(request.param)


@functools.cache
def qwen3_next_pair():
    """(a Qwen3-Next policy, its MTP module)."""
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(micro_qwen3_next()).eval()
    return policy, perturbed(Qwen3NextMTPHead.for_policy(policy))


@pytest.fixture(params=["mimo", "deepseek", "qwen3_next"])
def form(request):
    """(policy, MTP layer, whether its first pass takes the pre-norm state) of each form."""
    if request.param == "mimo":
        return request.getfixturevalue("policy"), request.getfixturevalue("head"), True
    return (*(deepseek_pair(24) if request.param == "deepseek" else qwen3_next_pair()), False)


@torch.no_grad()
def test_unroll_equals_step_by_step_drafting(form):
    policy, head, pre_norm = form
    assert head.pre_norm_hidden is pre_norm
    torch.manual_seed(2)
    tokens = torch.randint(2, 40, (2, 12))
    hidden, _ = policy_states(policy, tokens, pre_norm=pre_norm)
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


def block_inputs(head, layer, hidden_size: int):
    """Load the head's decoder block into transformers' ``layer``; random (token embeddings, states,
    positions) for 2 rows of 7 to run both on."""
    layer.load_state_dict({k.removeprefix("layers.0."): v for k, v in head.state_dict().items()
                           if k.startswith("layers.0.")})
    torch.manual_seed(0)
    return torch.randn(2, 7, hidden_size), torch.randn(2, 7, hidden_size), torch.arange(0, 7).expand(2, 7)


def test_block_is_vllm_deepseek_mtp_with_a_transformers_layer(deepseek):
    """vLLM's DeepSeekMultiTokenPredictorLayer: eh_proj([enorm(e) ‖ hnorm(h)]) (e zeroed at
    position 0), then the decoder layer, then shared_head.norm — with transformers' DeepSeek-V3
    layer (latent attention, interleaved rope) as the block."""
    policy, head = deepseek
    config = policy.config
    config._attn_implementation = "sdpa"
    layer = DeepseekV3DecoderLayer(config, layer_idx=config.num_hidden_layers)
    emb, h, pos = block_inputs(head, layer, config.hidden_size)
    with torch.no_grad():
        e = head.enorm(torch.where(pos[..., None] == 0, 0.0, emb))
        z = head.eh_proj(torch.cat([e, head.hnorm(h)], -1))
        s = layer(z, attention_mask=None, position_ids=pos,
                  position_embeddings=DeepseekV3RotaryEmbedding(config)(z, pos))
        want = head.shared_head["norm"](s[0] if isinstance(s, tuple) else s)
        got, _ = head.block(emb, h, pos)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    other = emb.clone()
    other[:, 0] += 1.0
    with torch.no_grad():
        assert torch.equal(head.block(other, h, pos)[0], got)  # the token at position 0 is zeroed


def test_deepseek_checkpoint_round_trip_with_vllm_names(deepseek, tmp_path):
    policy, head = deepseek
    tokenizer = build_char_tokenizer("abcdefghij")
    directory = save_model(policy, tokenizer, tmp_path / "deepseek")
    assert not has_native_mtp(directory)
    head.save_vllm(directory)
    assert has_native_mtp(directory)
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["num_nextn_predict_layers"] == 1
    from safetensors.torch import load_file
    names = set(load_file(str(directory / "mtp.safetensors")))
    q = {"q_proj.weight"} if policy.config.q_lora_rank is None else \
        {"q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"}
    attn = q | {"kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"}
    layer = {f"self_attn.{n}" for n in attn} | {f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    layer |= {"input_layernorm.weight", "post_attention_layernorm.weight", "enorm.weight", "hnorm.weight",
              "eh_proj.weight", "shared_head.norm.weight"}
    assert names == {"model.layers.2." + n for n in layer}  # layer N = num_hidden_layers
    again = DeepSeekMTPHead.load_vllm(directory)
    assert again.state_dict().keys() == head.state_dict().keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in head.state_dict().items())
    reloaded = load_model(directory)  # the policy part is untouched
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), policy.state_dict().values()))
    with pytest.raises(ValueError, match="already holds MTP layers"):
        from safetensors.torch import save_file
        save_file({"model.layers.2.enorm.weight": torch.ones(64)}, str(directory / "extra.safetensors"))
        head.save_vllm(directory)


def test_block_is_vllm_qwen3_next_mtp_with_a_transformers_layer():
    policy, head = qwen3_next_pair()
    config = policy.config
    config._attn_implementation = "sdpa"
    layer = Qwen3NextDecoderLayer(config, layer_idx=1)  # a full-attention layer with experts
    emb, h, pos = block_inputs(head, layer, config.hidden_size)
    with torch.no_grad():
        z = head.fc(torch.cat([head.pre_fc_norm_embedding(emb), head.pre_fc_norm_hidden(h)], -1))
        s = layer(z, position_embeddings=Qwen3NextRotaryEmbedding(config)(z, pos), attention_mask=None,
                  position_ids=pos)
        want = head.norm(s[0] if isinstance(s, tuple) else s)
        got, _ = head.block(emb, h, pos)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    other = emb.clone()
    other[:, 0] += 1.0
    with torch.no_grad():
        assert not torch.allclose(head.block(other, h, pos)[0][:, 0], got[:, 0])  # position 0's token counts


def test_qwen3_next_checkpoint_round_trip_with_vllm_names(tmp_path):
    policy, head = qwen3_next_pair()
    directory = save_model(policy, build_char_tokenizer("abcdefghij"), tmp_path / "qwen3_next")
    head.save_vllm(directory)
    assert has_native_mtp(directory)
    assert json.loads((directory / "config.json").read_text())["num_nextn_predict_layers"] == 1
    from safetensors.torch import load_file
    saved = load_file(str(directory / "mtp.safetensors"))
    attn = {f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")}
    experts = {f"mlp.experts.{e}.{p}_proj.weight" for e in range(4) for p in ("gate", "up", "down")}
    shared = {f"mlp.shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")} | {"mlp.shared_expert_gate.weight"}
    layer = {f"layers.0.{n}" for n in attn | experts | shared | {"mlp.gate.weight", "input_layernorm.weight",
                                                                 "post_attention_layernorm.weight"}}
    assert set(saved) == {"mtp." + n for n in layer | {"fc.weight", "pre_fc_norm_embedding.weight",
                                                       "pre_fc_norm_hidden.weight", "norm.weight"}}
    # transformers' save of the policy names experts the same way, one tensor per expert and projection
    assert any(".mlp.experts.0.gate_proj.weight" in k for k in load_file(str(directory / "model.safetensors")))
    fused = head.layers[0].mlp.experts
    assert torch.equal(saved["mtp.layers.0.mlp.experts.2.up_proj.weight"], fused.gate_up_proj[2, 32:])
    assert torch.equal(saved["mtp.layers.0.mlp.experts.3.down_proj.weight"], fused.down_proj[3])
    again = Qwen3NextMTPHead.load_vllm(directory)
    assert again.state_dict().keys() == head.state_dict().keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in head.state_dict().items())


def test_a_dense_qwen3_next_mtp_block_is_refused():
    with pytest.raises(ValueError, match="mixture of experts"):
        Qwen3NextMTPHead(micro_qwen3_next(num_experts=0))
    with pytest.raises(ValueError, match="mixture of experts"):
        Qwen3NextMTPHead(micro_qwen3_next(mlp_only_layers=[0]))


def test_a_mixture_of_experts_mtp_block_is_refused_and_forms_follow_the_model_type():
    config = micro_deepseek(first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                            topk_group=1)
    with pytest.raises(ValueError, match="mixture of experts"):
        DeepSeekMTPHead(config)
    assert native_form("qwen2") is MiMoMTPHead and native_form("deepseek_v3") is DeepSeekMTPHead
    assert native_form("qwen3_next") is Qwen3NextMTPHead
    with pytest.raises(ValueError, match="use mtp.head=eagle"):
        native_form("llama")


def test_mtp_train_refuses_a_policy_without_a_native_form_before_sampling(tiny_model_dir, tmp_path):
    from mtp.train import train
    from orchestration.config import ConfigError, load_config
    config = load_config("configs/tiny.yaml", ["mtp.head=native", f"model.path={tiny_model_dir}",
                                               f"logging.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="the policy is 'qwen3': use mtp.head=eagle"):
        train(config, progress=False)
