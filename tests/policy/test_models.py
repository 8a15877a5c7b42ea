"""The weight-sync wire format, its checksum and the probe's reference forward."""

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from policy.models import empty_model, load_model, pack_state, probe_logprobs, state_checksum, unpack_state


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 5, generator=g), "half": torch.randn(4, generator=g).to(torch.bfloat16),
            "ids": torch.arange(7), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
            "strided": torch.randn(4, 6, generator=g).t()}


def test_pack_round_trip_is_bit_exact():
    state = _state()
    got = unpack_state(pack_state(state))
    assert list(got) == list(state)
    for k, t in state.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    assert state_checksum(got) == state_checksum(state)


def test_a_tied_weight_goes_once_and_comes_back_as_one_memory_under_both_names():
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    packed = pack_state(state)
    sent = sum(a.nbytes for a in packed["buffers"].values())
    assert sent == sum(t.numel() * t.element_size() for t in state.values()) - 32 * 16 * 4
    got = unpack_state(packed)
    assert list(got) == list(state)
    assert got["lm_head.weight"].data_ptr() == got["model.embed_tokens.weight"].data_ptr()
    assert all(torch.equal(got[k], t) for k, t in state.items())
    # the checksum does not depend on whether the two names share memory (a broadcast's receiver
    # holds separate buffers), only on the names and bytes
    separate = {k: v.clone() for k, v in state.items()}
    assert state_checksum(got) == state_checksum(state) == state_checksum(separate)
    separate["lm_head.weight"].view(torch.int32)[0, 0] ^= 1  # untied after all: one bit differs
    assert state_checksum(separate) != state_checksum(state)


def test_only_the_callers_own_contiguous_tensors_count_as_shared_memory():
    """Sharing is judged on the tensors passed in: a contiguous copy made of a strided one is freed
    after use, and a later copy at the same address is other bytes."""
    from policy.models import _memory_key
    w = torch.randn(6, 4)
    assert _memory_key(w) == _memory_key(w.view(6, 4)) != _memory_key(w.view(24))
    assert _memory_key(w.t()) is None and _memory_key(torch.zeros(0, 4)) is None
    a, b = torch.randn(6, 4).t(), torch.randn(6, 4).t()
    assert state_checksum({"a": a, "b": b}) == state_checksum({"a": a.contiguous(), "b": b.contiguous()})
    assert state_checksum({"a": a, "b": b}) != state_checksum({"a": a, "b": a})


def test_flattened_parameters_go_as_one_array_and_train_alike():
    from policy.models import flatten_parameters
    config = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    flat, plain = Qwen2ForCausalLM(config), Qwen2ForCausalLM(config)
    plain.load_state_dict(flat.state_dict())
    flatten_parameters(flat, align=64)
    params = list(flat.parameters())
    block = params[0].untyped_storage()
    assert all(p.untyped_storage().data_ptr() == block.data_ptr() for p in params)
    assert all(p.data_ptr() % 64 == 0 for p in params)
    assert flat.lm_head.weight is flat.model.embed_tokens.weight
    state = {k: v.detach() for k, v in flat.state_dict().items()}
    packed = pack_state(state)
    assert len(packed["buffers"]) == 1 and packed["buffers"]["0"].nbytes == block.nbytes()
    got = unpack_state(packed)
    assert all(torch.equal(got[k], v) for k, v in state.items())
    assert state_checksum(got) == state_checksum(state) == state_checksum(plain.state_dict())
    # the same training step, bit for bit, and the block keeps the updated weights
    x = torch.tensor([[1, 5, 7, 2, 9]])
    for model in (flat, plain):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model(x, labels=x).loss.backward()
        opt.step()
    assert state_checksum(flat.state_dict()) == state_checksum(plain.state_dict())
    assert all(p.untyped_storage().data_ptr() == block.data_ptr() for p in flat.parameters())


def test_parameters_sharing_memory_as_two_objects_are_not_flattened():
    from policy.models import flatten_parameters
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(torch.randn(4, 3))
    model.b = torch.nn.Parameter(model.a.data[1:])  # a second Parameter over part of the first's memory
    flatten_parameters(model)
    assert model.b.data_ptr() == model.a.data_ptr() + 3 * 4  # still tied


def test_a_view_of_part_of_a_tensor_sends_only_its_own_bytes():
    big = torch.arange(1000, dtype=torch.float32)
    packed = pack_state({"head": big[:10], "tail": big[-5:], "again": big[:10]})
    assert sum(a.nbytes for a in packed["buffers"].values()) == 15 * 4
    got = unpack_state(packed)
    assert torch.equal(got["head"], big[:10]) and torch.equal(got["tail"], big[-5:])
    assert torch.equal(got["again"], big[:10]) and got["again"].data_ptr() == got["head"].data_ptr()


def test_checksum_sees_one_flipped_bit_a_dtype_and_a_name():
    state, want = _state(), state_checksum(_state())
    flipped = dict(state, w=state["w"].clone())
    flipped["w"].view(torch.int32)[1, 2] ^= 1  # the lowest mantissa bit of one element
    assert state_checksum(flipped) != want
    assert state_checksum(dict(state, ids=state["ids"].to(torch.int32))) != want
    renamed = {("v" if k == "w" else k): t for k, t in state.items()}
    assert state_checksum(renamed) != want


def test_the_probe_reference_reads_the_received_weights_without_a_model_copy(tiny_model_dir_b):
    model = load_model(tiny_model_dir_b).eval()
    ids = [3, 4, 74, 5, 82, 6]
    empty = empty_model(tiny_model_dir_b)
    assert all(p.is_meta for p in empty.parameters())
    assert probe_logprobs(empty, ids, model.state_dict()) == probe_logprobs(model, ids)  # the same forward, bit for bit
    partial = {k: v for k, v in model.state_dict().items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match="lack 1 of the model's parameters"):
        probe_logprobs(empty, ids, partial)


def test_a_mimo_checkpoints_reference_is_its_qwen2_policy(tmp_path):
    """MiMo's config.json names a remote-code model type; the policy is the Qwen2 part (as load_model reads it)."""
    config = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "mimo", "num_nextn_predict_layers": 1}))
    assert type(empty_model(tmp_path)) is Qwen2ForCausalLM


def _built_in_round_trip(name: str, tmp_path):
    """The built-in model ``name``, checked to come back from save and load with the same logits."""
    from policy.models import build_char_tokenizer, build_model, save_model
    tokenizer = build_char_tokenizer()
    model = build_model(name, tokenizer)
    again = load_model(save_model(model, tokenizer, tmp_path / name))
    x = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(again(x).logits, model(x).logits, atol=1e-6)
    return model


def test_the_built_in_deepseek_model_has_latent_attention_and_no_mtp_layer_yet(tmp_path):
    model = _built_in_round_trip("tiny_deepseek", tmp_path)
    config = model.config
    assert config.model_type == "deepseek_v3" and not config.tie_word_embeddings
    assert (config.kv_lora_rank, config.qk_rope_head_dim, config.num_nextn_predict_layers) == (512, 64, 0)
    assert all(type(layer.mlp).__name__ == "DeepseekV3MLP" for layer in model.model.layers)  # dense


def test_the_built_in_moe_model_is_a_mixture_of_experts(tmp_path):
    model = _built_in_round_trip("tiny_moe", tmp_path)
    config = model.config
    assert config.model_type == "qwen3_moe" and config.tie_word_embeddings
    assert (config.num_experts, config.num_experts_per_tok) == (4, 2)
    assert all(type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in model.model.layers)


def test_the_built_in_qwen3_next_model_is_untied_with_gated_delta_net_layers(tmp_path):
    config = _built_in_round_trip("tiny_qwen3_next", tmp_path).config
    assert config.model_type == "qwen3_next" and not config.tie_word_embeddings  # vLLM 0.32 would not tie it
    assert config.layer_types.count("linear_attention") == 3 and config.linear_key_head_dim == 128


def test_checkpoint_names_are_the_saved_checkpoints(tmp_path):
    """transformers 5 holds a mixture of experts' projections fused ([experts, ...] tensors) and
    saves them one per expert; vLLM loads the saved names, so the weight sync sends those."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from policy.models import build_char_tokenizer, checkpoint_names, empty_model, save_model
    config = Qwen3MoeConfig(vocab_size=12, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    directory = save_model(model, build_char_tokenizer("abcdefghij"), tmp_path / "moe")
    state = model.state_dict()
    assert any(k.endswith("experts.gate_up_proj") for k in state)  # fused in memory
    saved = load_file(str(directory / "model.safetensors"))
    named = checkpoint_names(empty_model(directory), state)
    assert named.keys() == saved.keys() and any(".experts.3.up_proj.weight" in k for k in named)
    assert all(torch.equal(named[k], saved[k]) for k in saved)
    qwen2 = Qwen2ForCausalLM(Qwen2Config(vocab_size=12, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    plain = qwen2.state_dict()
    assert checkpoint_names(qwen2, plain) is plain  # a model without conversions: untouched


def test_the_probe_has_no_dropout_in_a_training_model():
    """A trainer's model is in training mode; a model with dropout (GPT-2, OPT, Phi) would give the
    probe noisy logprobs there, and a sync of correct weights would fail. The probe runs in eval
    mode and leaves the mode as it found it."""
    config = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, attention_dropout=0.5)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    ids = [3, 4, 7, 5, 8, 6, 9, 1]
    want = probe_logprobs(model.eval(), ids)
    model.train()
    with torch.no_grad():  # dropout is live in training mode: two forwards differ
        first, second = (model(torch.tensor([ids])).logits for _ in range(2))
    assert not torch.equal(first, second)
    assert probe_logprobs(model, ids) == want and model.training


def test_a_prompt_gets_the_bos_its_tokenizer_puts_before_text(tmp_path):
    """A Llama-style tokenizer adds <s> before text by default; prompts are encoded without special
    tokens (a chat template writes its own), so the BOS is put back in front of a text prompt, once."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from policy.models import build_char_tokenizer, encode_prompt
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate("abc +=")}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    llama_like = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    assert llama_like("ab", add_special_tokens=True).input_ids == [0, 2, 3]
    assert encode_prompt(llama_like, "ab") == [0, 2, 3]
    assert encode_prompt(llama_like, "<s>ab") == [0, 2, 3]  # a template's own BOS: not doubled
    char = build_char_tokenizer()  # the built-in models' tokenizer has no BOS: unchanged
    assert encode_prompt(char, "12+3=") == char("12+3=", add_special_tokens=False).input_ids
