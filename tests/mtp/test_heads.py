"""The EAGLE head: its block equals fc then transformers Llama decoder layers (the first
without input norm), for one and two layers; its parallel k-step unroll equals the engine's step-by-step drafting, and its draft
checkpoint holds exactly the names vLLM's ``eagle`` loader accepts. The same unroll and checkpoint
checks for the EAGLE-3 head over a reduced vocabulary (its computation is compared with vLLM's
``eagle3`` drafter itself in tests/rollout/test_speculative.py)."""

import json

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from mtp.heads import Eagle3Head, EagleHead, draft_method, load_head, policy_states
from policy.models import load_model


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_model(tiny_model_dir).eval()


def _perturbed(head):
    torch.manual_seed(1)
    with torch.no_grad():  # away from the [0 | I] start so that every weight matters
        for p in head.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return head


@pytest.fixture(scope="module", params=[1, 2], ids=["1-layer", "2-layer"])
def head(policy, request):
    return _perturbed(EagleHead.for_policy(policy, num_layers=request.param))


DRAFT_IDS = torch.tensor([3, 4, 9, 10, 20, 33, 41, 50])


@pytest.fixture(scope="module")
def head3(policy):
    return _perturbed(Eagle3Head.for_policy(policy, DRAFT_IDS))


@pytest.fixture(scope="module")
def phead(policy):
    """A P-EAGLE head (vLLM's parallel drafting), mask state and fc away from their start."""
    return _perturbed(Eagle3Head.for_policy(policy, DRAFT_IDS, parallel=True, mask_token_id=1))


def test_block_is_fc_then_llama_layers_first_without_input_norm(head):
    config = LlamaConfig(**{k: v for k, v in head.config.vllm_config().items() if k != "architectures"})
    config._attn_implementation = "sdpa"
    layers = []
    for i in range(head.config.num_layers):
        layer = LlamaDecoderLayer(config, layer_idx=i)
        if i == 0:
            layer.input_layernorm = torch.nn.Identity()
        missing, unexpected = layer.load_state_dict({k.removeprefix(f"layers.{i}."): v for k, v in
                                                     head.state_dict().items() if k.startswith(f"layers.{i}.")},
                                                    strict=False)
        assert not missing and not unexpected
        layers.append(layer)
    torch.manual_seed(0)
    emb, h = torch.randn(2, 7, config.hidden_size), torch.randn(2, 7, config.hidden_size)
    pos = torch.arange(3, 10).expand(2, 7)
    want = head.fc(torch.cat([emb, h], -1))
    with torch.no_grad():
        for layer in layers:
            want = layer(want, attention_mask=None, position_ids=pos,
                         position_embeddings=LlamaRotaryEmbedding(config)(want, pos))
            want = want[0] if isinstance(want, tuple) else want
        got, _ = head.block(emb, h, pos)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_unroll_equals_the_engines_step_by_step_drafting(policy, head):
    _check_unroll(policy, head)


def test_eagle3_unroll_equals_the_engines_step_by_step_drafting(policy, head3):
    _check_unroll(policy, head3)


@torch.no_grad()
def test_parallel_unroll_equals_one_causal_forward_over_the_bonus_and_mask_slots(policy, phead):
    """vLLM's parallel drafting at anchor q: one drafter forward over the real pairs up to q (the
    bonus token last) and k - 1 mask slots at the next positions, plain causal attention; drafts
    1..k are its outputs at rows q..q+k-1. The unroll's outputs must be those, and must not depend
    on the tokens after x_{q+1} (the drafts are independent of one another)."""
    torch.manual_seed(2)
    tokens = torch.randint(2, 60, (2, 12))
    hidden, _ = policy_states(policy, tokens, aux_layers=phead.aux_layers)
    N = policy.config.num_hidden_layers
    assert phead.aux_layers == (N - 2, N - 1, N) and hidden.shape[-1] == 3 * phead.config.hidden_size
    k = 3
    outs = phead.unroll(policy.model.embed_tokens, tokens, hidden, k)
    embed = policy.model.embed_tokens
    for q in (0, 4, 8):
        ids = torch.cat([tokens[:, 1:q + 2], torch.full((2, k - 1), phead.mask_token_id)], 1)
        states = torch.cat([phead.fc(hidden[:, :q + 1]), phead.fc(phead.mask_hidden).expand(2, k - 1, -1)], 1)
        got, _ = phead.block(embed(ids), states, torch.arange(q + k).expand(2, q + k))
        for j in range(k):
            assert torch.allclose(got[:, q + j], outs[j][:, q], atol=1e-5), (q, j)
    changed = tokens.clone()
    changed[:, 6:] = torch.randint(2, 60, (2, 6))
    again = phead.unroll(embed, changed, policy_states(policy, changed, aux_layers=phead.aux_layers)[0], k)
    assert all(torch.allclose(a[:, 4], b[:, 4], atol=1e-6) for a, b in zip(outs, again))  # anchor 4 sees x_0..x_5


def test_policy_states_aux_layers_are_the_residual_streams_vllm_captures(policy):
    """vLLM's EAGLE-3 auxiliary state after i layers is hidden + residual entering layer i, and for
    i = N the final norm's input: Hugging Face's hidden_states[i] for i < N; the norm of the last is
    the final hidden state."""
    tokens = torch.randint(2, 60, (2, 7))
    N, H = policy.config.num_hidden_layers, policy.config.hidden_size
    with torch.no_grad():
        want = policy(tokens, output_hidden_states=True).hidden_states
        got, _ = policy_states(policy, tokens, aux_layers=(0, N - 1, N))
        final, _ = policy_states(policy, tokens)
    assert torch.equal(got[..., :H], want[0]) and torch.equal(got[..., H:2 * H], want[N - 1])
    assert torch.allclose(policy.model.norm(got[..., 2 * H:]), final, atol=1e-6)


@torch.no_grad()
def _check_unroll(policy, head):
    torch.manual_seed(2)
    tokens = torch.randint(2, 60, (2, 12))
    hidden, _ = policy_states(policy, tokens)
    k = 3
    outs = head.unroll(policy.model.embed_tokens, tokens, hidden, k)
    embed = policy.model.embed_tokens
    for q in (0, 4, 8):  # anchors whose k targets x_{q+2..q+k+1} lie inside the 12 tokens
        # the engine: first pass over rows 0..q, then one row per step with a growing KV cache
        pos = torch.arange(q + 1).expand(2, q + 1)
        out, cache = head.block(embed(tokens[:, 1:q + 2]), hidden[:, :q + 1], pos)  # [(k, v) per layer]
        prev = out[:, -1:]
        assert torch.allclose(prev, outs[0][:, q:q + 1], atol=1e-5)
        for j in range(2, k + 1):
            mask = torch.ones(1, cache[0][0].shape[2] + 1, dtype=torch.bool)
            prev, new = head.block(embed(tokens[:, q + j:q + j + 1]), prev, torch.full((2, 1), q + j - 1), cache, mask)
            cache = [(torch.cat([c[0], n[0]], 2), torch.cat([c[1], n[1]], 2)) for c, n in zip(cache, new)]
            assert torch.allclose(prev, outs[j - 1][:, q:q + 1], atol=1e-5), (q, j)


def test_vllm_checkpoint_has_exactly_the_eagle_names(head, tmp_path):
    directory = head.save_vllm(tmp_path / "draft")
    from safetensors.torch import load_file
    names = set(load_file(str(directory / "model.safetensors")))
    n = head.config.num_layers
    assert names == {"fc.weight", *(f"layers.{i}.post_attention_layernorm.weight" for i in range(n)),
                     *(f"layers.{i}.input_layernorm.weight" for i in range(1, n)),
                     *(f"layers.{i}.self_attn.{p}_proj.weight" for i in range(n) for p in "qkvo"),
                     *(f"layers.{i}.mlp.{p}_proj.weight" for i in range(n) for p in ("gate", "up", "down"))}
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == n
    again = EagleHead.load_vllm(directory)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), head.state_dict().values()))


def test_eagle3_checkpoint_has_exactly_the_eagle3_names_and_drafts_only_its_vocabulary(head3, tmp_path):
    directory = head3.save_vllm(tmp_path / "draft3")
    from safetensors.torch import load_file
    state = load_file(str(directory / "model.safetensors"))
    assert set(state) == {"d2t", "norm.weight", "lm_head.weight", "layers.0.input_layernorm.weight",
                          "layers.0.hidden_norm.weight", "layers.0.post_attention_layernorm.weight",
                          *(f"layers.0.self_attn.{p}_proj.weight" for p in "qkvo"),
                          *(f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down"))}
    assert torch.equal(torch.arange(len(DRAFT_IDS)) + state["d2t"], DRAFT_IDS)  # vLLM: target id = i + d2t[i]
    H = head3.config.hidden_size
    assert state["layers.0.self_attn.q_proj.weight"].shape[1] == 2 * H and state["lm_head.weight"].shape == (8, H)
    config = json.loads((directory / "config.json").read_text())
    assert config["draft_vocab_size"] == 8 and config["eagle_config"] == {"use_aux_hidden_state": False}
    assert draft_method(directory) == "eagle3"
    again = load_head(directory)
    assert isinstance(again, Eagle3Head) and torch.equal(again.draft_ids, DRAFT_IDS)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), head3.state_dict().values()))
    logits = head3.draft_logits(torch.randn(2, 5, H))
    outside = torch.ones(head3.config.vocab_size, dtype=torch.bool).index_fill(0, DRAFT_IDS, False)
    assert torch.isinf(logits[..., outside]).all() and torch.isfinite(logits[..., DRAFT_IDS]).all()


def test_eagle3_checkpoints_this_form_does_not_compute_are_refused(head3, tmp_path, policy):
    directory = head3.save_vllm(tmp_path / "aux")
    config = json.loads((directory / "config.json").read_text())
    config["eagle_config"] = {"use_aux_hidden_state": True}  # vLLM would feed three target layers
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="use_aux_hidden_state"):
        load_head(directory)
    with pytest.raises(ValueError, match="fewer than all"):
        Eagle3Head.for_policy(policy, torch.arange(policy.config.vocab_size))


def test_parallel_checkpoint_carries_fc_the_mask_state_and_vllms_keys(phead, tmp_path, policy):
    from safetensors.torch import load_file

    from mtp.heads import parallel_drafting
    directory = phead.save_vllm(tmp_path / "peagle")
    state = load_file(str(directory / "model.safetensors"))
    H, N = phead.config.hidden_size, policy.config.num_hidden_layers
    assert state["fc.weight"].shape == (H, 3 * H) and state["mask_hidden"].shape == (3 * H,)
    config = json.loads((directory / "config.json").read_text())
    assert config["eagle_config"] == {"use_aux_hidden_state": True,
                                      "eagle_aux_hidden_state_layer_ids": [N - 2, N - 1, N]}
    assert config["num_aux_hidden_states"] == 3 and config["mask_token_id"] == 1
    assert config["architectures"] == ["LlamaForCausalLM"]  # vLLM's EAGLE config makes it Eagle3LlamaForCausalLM
    assert draft_method(directory) == "eagle3" and parallel_drafting(directory)
    again = load_head(directory)
    assert again.parallel and again.aux_layers == phead.aux_layers and again.mask_token_id == 1
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), phead.state_dict().values()))
    assert not parallel_drafting(Eagle3Head.for_policy(policy, DRAFT_IDS).save_vllm(tmp_path / "chained"))
    with pytest.raises(ValueError, match="needs aux_layers"):
        Eagle3Head(phead.config, DRAFT_IDS, None, mask_token_id=1)
    with pytest.raises(ValueError, match="distinct"):
        Eagle3Head(phead.config, DRAFT_IDS, (N, N, N - 1))


def test_the_auxiliary_fc_trains_slower_and_every_parameter_is_in_one_group(phead, head3):
    from mtp.heads import AUX_FC_LR_SCALE
    for h in (phead, head3):
        groups = h.param_groups(1e-3)
        ids = [id(p) for g in groups for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in h.parameters())  # each once
    (rest, fc), (only,) = phead.param_groups(1e-3), head3.param_groups(1e-3)
    assert fc["params"] == [phead.fc.weight] and fc["lr"] == pytest.approx(1e-3 * AUX_FC_LR_SCALE)
    assert rest["lr"] == only["lr"] == 1e-3
