"""The adaptive speculation schedule (rollout/adaptive.py): pure arithmetic on measured costs."""

import json

import pytest

from rollout.adaptive import MAX_BATCH, best_k, cached_step_costs, derive_schedule, expected_tokens


def test_expected_tokens_is_the_accepted_prefix_plus_one():
    assert expected_tokens([0.5, 0.5, 0.5], 0) == 1.0
    assert expected_tokens([0.5, 0.5, 0.5], 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens([1.0, 0.0, 1.0], 3) == 2.0  # nothing after a rejected position
    assert expected_tokens([0.9], 3) == pytest.approx(1.9)  # only as many positions as measured


def test_best_k_trades_tokens_per_step_for_step_cost():
    acc = [0.8, 0.8, 0.8]
    # memory-bound: a 4-token verify costs 1.3 steps -> k=3 (2.95 tokens / 1.3) beats off (1 / 1)
    assert best_k({0: 1.0, 1: 1.1, 2: 1.2, 3: 1.3}, acc) == 3
    # compute-bound: cost grows with the tokens verified -> off
    assert best_k({0: 1.0, 1: 1.9, 2: 2.8, 3: 3.7}, acc) == 0
    # low acceptance makes even cheap drafts lose
    assert best_k({0: 1.0, 1: 1.1, 2: 1.2, 3: 1.3}, [0.05, 0.05, 0.05]) == 0
    # a predicted gain inside the calibration's noise (5% < the 10% margin) keeps the drafter off
    assert best_k({0: 1.0, 1: 1.71}, [0.8]) == 0 and best_k({0: 1.0, 1: 1.71}, [0.8], margin=0.0) == 1


def test_schedule_covers_every_batch_size_and_merges_equal_k():
    cheap = {0: 1.0, 1: 1.05, 2: 1.1, 3: 1.15}
    costly = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    schedule = derive_schedule({1: cheap, 4: cheap, 16: costly, 64: costly}, [0.8, 0.7, 0.6])
    assert schedule == [[1, 4, 3], [5, MAX_BATCH, 0]]
    covered = [k for lo, hi, k in schedule for _ in range(lo, min(hi, 100) + 1)]
    assert len(covered) == 100


def test_drift_in_acceptance_changes_the_schedule():
    costs = {1: {0: 1.0, 1: 1.2, 2: 1.4, 3: 1.6}, 16: {0: 1.0, 1: 1.5, 2: 2.2, 3: 2.9}}
    assert derive_schedule(costs, [0.9, 0.9, 0.9]) == [[1, 1, 3], [2, MAX_BATCH, 1]]
    assert derive_schedule(costs, [0.2, 0.2, 0.2]) == [[1, MAX_BATCH, 0]]


def test_cached_step_costs_are_measured_once_per_key_and_batch_size(tmp_path):
    table = {1: {0: 0.05, 1: 0.06}, 16: {0: 0.08, 1: 0.13}, 32: {0: 0.11, 1: 0.24}}
    calls = []

    def measure(batches):
        calls.append(tuple(batches))
        return {b: table[b] for b in batches}
    key = {"model": {"hidden_size": 64}, "threads": 1}
    assert cached_step_costs(None, key, (1, 32), measure) == {1: table[1], 32: table[32]}  # no cache: measured
    assert cached_step_costs(tmp_path, key, (1, 32), measure) == {1: table[1], 32: table[32]}
    # The same key (in any order): read back with int batch sizes and k, not measured again...
    assert cached_step_costs(tmp_path, dict(reversed(key.items())), (1, 32), measure) == {1: table[1], 32: table[32]}
    # ... and a batch size the file lacks is measured alone and added.
    assert cached_step_costs(tmp_path, key, (1, 16), measure) == {1: table[1], 16: table[16]}
    assert cached_step_costs(tmp_path, key, (1, 16, 32), measure) == table
    assert calls == [(1, 32), (1, 32), (16,)]
    # Anything the key names differs (here the threads): measured, and kept apart.
    assert cached_step_costs(tmp_path, {**key, "threads": 2}, (1,), measure) == {1: table[1]}
    assert calls[-1] == (1,) and len(list(tmp_path.glob("step-costs-*.json"))) == 2
    # A damaged file is measured again and replaced.
    for path in tmp_path.glob("step-costs-*.json"):
        path.write_text("{not json")
    assert cached_step_costs(tmp_path, key, (1, 32), measure) == {1: table[1], 32: table[32]}
    assert calls[-1] == (1, 32) and len(calls) == 5
    assert cached_step_costs(tmp_path, key, (32,), measure) == {32: table[32]} and len(calls) == 5
    # A file under this key's name that holds another key's table (a hash collision, a hand edit)
    # is not trusted either; neither is an empty cache setting a directory.
    path = next(p for p in tmp_path.glob("step-costs-*.json") if json.loads(p.read_text())["key"] == key)
    path.write_text(json.dumps({**json.loads(path.read_text()), "key": {**key, "threads": 3}}))
    assert cached_step_costs(tmp_path, key, (32,), measure) == {32: table[32]} and calls[-1] == (32,)
    assert cached_step_costs("", key, (1,), measure) == {1: table[1]} and calls[-1] == (1,)


def test_cached_rows_measured_apart_are_made_monotone_together(tmp_path):
    """A batch size measured in a later run can cost less than a smaller one measured earlier
    (noise); the table returned is non-decreasing in the batch size, as one calibration's is."""
    runs = iter([{16: {0: 0.10, 1: 0.20}}, {32: {0: 0.09, 1: 0.25}}])
    cached_step_costs(tmp_path, {}, (16,), lambda batches: next(runs))
    assert cached_step_costs(tmp_path, {}, (16, 32), lambda batches: next(runs)) == {
        16: {0: 0.10, 1: 0.20}, 32: {0: 0.10, 1: 0.25}}


def test_step_costs_are_made_monotone_in_k_and_batch():
    from rollout.adaptive import monotone
    noisy = {1: {0: 0.019, 1: 0.038, 2: 0.029, 3: 0.039}, 4: {0: 0.021, 1: 0.030, 2: 0.042, 3: 0.080}}
    fixed = monotone(noisy)
    assert fixed[1] == {0: 0.019, 1: 0.038, 2: 0.038, 3: 0.039}  # k = 2 cannot cost less than k = 1
    assert fixed[4] == {0: 0.021, 1: 0.038, 2: 0.042, 3: 0.080}  # batch 4 cannot cost less than batch 1
    assert monotone(fixed) == fixed


def _run_check(check, shape, seconds_per_arm: dict, calls: int) -> list[str]:
    """Drive a ScheduleCheck with calls of 100 tokens taking seconds_per_arm[arm]; the arms used."""
    arms = []
    for _ in range(calls):
        arm = check.arm(shape)
        check.record(shape, arm, 100, seconds_per_arm[arm])
        arms.append(arm)
    return arms


def test_the_check_falls_back_to_speculation_off_when_the_schedule_loses_on_the_workload():
    from rollout.adaptive import ScheduleCheck
    check, shape = ScheduleCheck(), (32, 8, 8)
    arms = _run_check(check, shape, {"schedule": 0.25, "off": 0.18}, 60)
    # both timed in turn (the first call of each not timed), then off, the schedule probed ever more rarely
    assert arms[:6] == ["schedule", "off"] * 3
    assert check.winner(shape) == "off"
    probes = [i for i, a in enumerate(arms) if a == "schedule" and i >= 6]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]  # doubling intervals
    assert arms[6:].count("schedule") <= 6  # at most ~10% of 54 calls spent probing the loser
    assert check.mean_rate(shape, "off") == pytest.approx(100 / 0.18)


def test_the_check_keeps_a_winning_schedule_and_follows_a_change_in_the_workload():
    from rollout.adaptive import ScheduleCheck
    check, shape = ScheduleCheck(), (1, 1, 64)
    arms = _run_check(check, shape, {"schedule": 0.5, "off": 1.0}, 30)
    assert check.winner(shape) == "schedule" and arms[6:].count("schedule") >= 20
    # the policy drifts and speculation starts losing: the next probe of off finds it
    arms = _run_check(check, shape, {"schedule": 2.0, "off": 1.0}, 40)
    assert check.winner(shape) == "off" and arms[-10:].count("off") >= 8
    assert check.winner((4, 1, 64)) is None  # shapes are judged apart


def test_the_check_judges_a_probe_against_the_same_stretch_of_the_run():
    """Both arms slow down together (longer responses): the arm in use stays, though the other
    arm's timings from before the slow-down are faster than the arm in use's new ones."""
    from rollout.adaptive import ScheduleCheck
    check, shape = ScheduleCheck(), (32, 8, 8)
    _run_check(check, shape, {"schedule": 0.9, "off": 1.0}, 20)
    assert check.winner(shape) == "schedule"
    arms = _run_check(check, shape, {"schedule": 1.08, "off": 1.2}, 60)
    assert check.winner(shape) == "schedule" and arms.count("schedule") >= 50


def test_the_check_keeps_the_arm_in_use_against_a_challenger_within_the_margin():
    from rollout.adaptive import ScheduleCheck
    check, shape = ScheduleCheck(margin=0.05), (32, 8, 8)
    _run_check(check, shape, {"schedule": 1.0, "off": 0.9}, 10)
    assert check.winner(shape) == "off"
    arms = _run_check(check, shape, {"schedule": 0.88, "off": 0.9}, 40)  # 2% faster: not worth a flip
    assert check.winner(shape) == "off" and arms.count("off") >= 26  # probed every 2 calls, being close
    _run_check(check, shape, {"schedule": 0.8, "off": 0.9}, 10)  # 12% faster: taken at the next probe
    assert check.winner(shape) == "schedule"


def _fake_llm(num_spec_tokens: int):
    """An object shaped like vllm.LLM as far as rlaccel's scheduler-side counters and live
    schedule reach into it."""
    from types import SimpleNamespace
    scheduler = SimpleNamespace(num_spec_tokens=num_spec_tokens, dynamic_sd_lookup={},
                                make_spec_decoding_stats=lambda stats, **kw: stats)
    return SimpleNamespace(llm_engine=SimpleNamespace(engine_core=SimpleNamespace(
        engine_core=SimpleNamespace(scheduler=scheduler)))), scheduler


def test_counters_count_a_position_only_where_it_was_drafted():
    """A round under a schedule drafts k <= K positions: positions past k are not rejections."""
    from rollout.vllm_spec import count_spec_decoding, spec_decode_counters, spec_decode_rates
    llm, scheduler = _fake_llm(3)
    count_spec_decoding(llm)
    for accepted in [1] * 9 + [0]:  # ten rounds of k = 1, nine accepted
        scheduler.make_spec_decoding_stats(None, num_draft_tokens=1, num_accepted_tokens=accepted,
                                           num_invalid_spec_tokens=None, request_id="r")
    scheduler.make_spec_decoding_stats(None, num_draft_tokens=3, num_accepted_tokens=1,  # one round of k = 3
                                       num_invalid_spec_tokens=None, request_id="r")
    counts = spec_decode_counters(llm)
    assert counts["accepted_per_pos"] == [10, 0, 0] and counts["verified_per_pos"] == [11, 1, 0]
    rates = spec_decode_rates(counts)
    assert rates["acceptance_per_pos"] == [pytest.approx(10 / 11), 0.0, None]


def test_a_schedule_drafting_fewer_positions_does_not_lock_k_down(monkeypatch):
    """True acceptance 0.9 at every position on an engine where k = 3 pays most: the live
    counters of rounds drafting k < 3 must not pull the undrafted positions' estimates to 0
    (which held k at 2 for good from a 0.5 start)."""
    import rollout.vllm_spec as spec_module
    from rollout.adaptive import AdaptiveSchedule, starting_acceptance
    monkeypatch.setattr(spec_module, "set_spec_schedule", lambda llm, schedule: None)
    costs = {1: {0: 1.0, 1: 1.3, 2: 1.5, 3: 1.7}}
    schedule = AdaptiveSchedule(type("Engine", (), {"llm": None})(), costs, starting_acceptance(None, 3))
    assert schedule.k_at(1) < 3  # the 0.5 guess: fewer drafts pay
    for _ in range(20):
        k, rounds = schedule.k_at(1), 1000
        verified = [round(rounds * 0.9 ** i) if i < k else 0 for i in range(3)]
        accepted = [round(rounds * 0.9 ** (i + 1)) if i < k else 0 for i in range(3)]
        counts = {"drafts": rounds, "draft_tokens": sum(verified), "accepted": sum(accepted),
                  "accepted_per_pos": accepted, "verified_per_pos": verified}
        schedule.observe(spec_module.spec_decode_rates(counts)["acceptance_per_pos"])
    assert schedule.k_at(1) == 3
    assert schedule.acceptance == pytest.approx([0.9, 0.9, 0.9], abs=0.01)


def test_the_starting_acceptance_is_padded_or_cut_to_the_engine_s_k():
    from rollout.adaptive import GUESSED_ACCEPTANCE, starting_acceptance
    assert starting_acceptance([0.8, None], 3) == [0.8, GUESSED_ACCEPTANCE, GUESSED_ACCEPTANCE]
    assert starting_acceptance([0.8, 0.7, 0.6], 2) == [0.8, 0.7]
    assert starting_acceptance(None, 2) == [GUESSED_ACCEPTANCE] * 2


def _calls_at_true_acceptance(schedule, calls: int, true: float = 0.9) -> list[int]:
    """Feed ``schedule`` the counters of ``calls`` rollout calls at batch size 1, each drafting the
    k its schedule (or its exploring one) gives, at acceptance ``true`` per position; the k used."""
    from rollout.vllm_spec import spec_decode_rates
    used = []
    for _ in range(calls):
        explore = schedule.exploring()
        k = next(k for lo, hi, k in (explore or schedule.schedule) if lo <= 1 <= hi)
        used.append(k)
        verified = [round(1000 * true ** i) if i < k else 0 for i in range(3)]
        accepted = [round(1000 * true ** (i + 1)) if i < k else 0 for i in range(3)]
        rates = spec_decode_rates({"drafts": 1000 if k else 0, "draft_tokens": sum(verified),
                                   "accepted": sum(accepted), "accepted_per_pos": accepted,
                                   "verified_per_pos": verified})
        schedule.observe(rates.get("acceptance_per_pos", []))
    return used


@pytest.mark.parametrize("start", [[0.9, 0.1, 0.1], [0.1, 0.1, 0.1]])
def test_exploring_lets_k_rise_past_a_pessimistic_start(monkeypatch, start):
    """A start (the drafter's report, or a dip since recovered) that holds k at 1, or at 0 where
    nothing is drafted and nothing measured: without exploring, the undrafted positions are never
    measured and k stays; every 4th call drafting one more position finds the true acceptance
    (0.9: k = 3 pays most)."""
    import rollout.vllm_spec as spec_module
    from rollout.adaptive import AdaptiveSchedule
    monkeypatch.setattr(spec_module, "set_spec_schedule", lambda llm, schedule: None)
    costs = {1: {0: 1.0, 1: 1.3, 2: 1.5, 3: 1.7}}
    engine = type("Engine", (), {"llm": None})()
    stuck = AdaptiveSchedule(engine, costs, start)
    first = stuck.k_at(1)
    assert first < 3 and set(_calls_at_true_acceptance(stuck, 40)) == {first}
    explorer = AdaptiveSchedule(engine, costs, start, explore_every=4)
    used = _calls_at_true_acceptance(explorer, 40)
    assert explorer.k_at(1) == 3 and used[-4:].count(3) == 4  # k = 3 is the schedule, and at its top
    assert [explorer.exploring() for _ in range(4)] == [None] * 4  # nothing left to explore above k = 3
