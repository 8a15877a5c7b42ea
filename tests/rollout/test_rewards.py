import math

import pytest

from policy.batch import Group
from rollout.rewards import RewardError, arithmetic_reward, load_reward_fn, score_groups


def _group(prompt, completions, answer, index=0):
    n = len(completions)
    return Group(prompt=prompt, prompt_ids=[1], responses=[[2]] * n, behaviour_logprobs=[[0.0]] * n, version=0,
                 completions=completions, row={"prompt": prompt, "answer": answer}, index=index)


def test_arithmetic_reward_is_exact_match_after_strip():
    assert arithmetic_reward(["1+1="] * 4, ["2", " 2 ", "22", ""], ["2"] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_score_groups_passes_columns_like_trl_and_sums_functions():
    seen = {}

    def length_bonus(prompts, completions, answer, **kwargs):
        seen.update(prompts=prompts, answer=answer, kwargs=kwargs)
        return [0.5] * len(completions)

    groups = [_group("1+1=", ["2", "3"], "2"), _group("2+2=", ["4", "4"], "4", index=1)]
    m = score_groups(groups, {"a:arithmetic_reward": arithmetic_reward, "b:length_bonus": length_bonus})
    assert groups[0].rewards == [1.5, 0.5] and groups[1].rewards == [1.5, 1.5]
    assert seen["prompts"] == ["1+1=", "1+1=", "2+2=", "2+2="] and seen["answer"] == ["2", "2", "4", "4"]
    assert m["reward"] == pytest.approx(5.0 / 4) and m["reward_errors"] == 0


def _fragile(prompts, completions, **_):
    return [1.0 / float(c) for c in completions]  # raises on "0" and on non-numbers


def test_raising_reward_fails_naming_the_sample():
    groups = [_group("1-1=", ["1", "0"], "0")]
    with pytest.raises(RewardError, match=r"mod:fragile raised ZeroDivisionError.*completion='0'.*on_reward_error"):
        score_groups(groups, {"mod:fragile": _fragile}, on_error="fail")


def test_raising_reward_scored_zero_and_counted():
    groups = [_group("1-1=", ["1", "0", "x"], "0")]
    m = score_groups(groups, {"mod:fragile": _fragile}, on_error="zero")
    assert groups[0].rewards == [1.0, 0.0, 0.0] and m["reward_errors"] == 2


def test_non_finite_reward_is_an_error_or_with_zero_scored_0_and_counted_once():
    groups = [_group("1+1=", ["2"] * 2, "2")]
    with pytest.raises(RewardError, match="returned nan.*on_reward_error=zero"):
        score_groups(groups, {"m:nan": lambda prompts, completions, **_: [math.nan] * len(completions)})

    def half_nan(prompts, completions, **_):  # e.g. np.mean of an empty list for the first sample
        return [math.nan] + [1.0] * (len(completions) - 1)

    def raises_on_first(prompts, completions, **_):
        if completions[0] == "first":
            raise ValueError("unparsable")
        return [0.5] * len(completions)
    groups = [_group("1+1=", ["first", "2"], "2")]
    m = score_groups(groups, {"m:half_nan": half_nan, "m:raises_on_first": raises_on_first}, on_error="zero")
    assert groups[0].rewards == [0.0, 1.5]
    assert m["reward_errors"] == 1  # one sample, though two functions failed on it


def test_a_batch_call_that_raises_is_logged_and_counted(caplog):
    """A function that raises on the batch (an API's batch limit, a transient error) is scored one
    sample at a time: the step says so (a warning, reward_fallbacks) rather than calling it 1 + N
    times unseen."""
    def at_most_two(prompts, completions, **_):
        if len(completions) > 2:
            raise RuntimeError("batch too large")
        return [1.0] * len(completions)
    groups = [_group("1+1=", ["2"] * 4, "2")]
    with caplog.at_level("WARNING"):
        m = score_groups(groups, {"m:at_most_two": at_most_two}, on_error="fail")
    assert groups[0].rewards == [1.0] * 4 and m["reward_errors"] == 0 and m["reward_fallbacks"] == 1
    assert "m:at_most_two raised RuntimeError: batch too large on the step's batch of 4 samples" in caplog.text
    assert m["reward_s"] >= 0


def test_functions_sharing_a_name_get_a_metric_each():
    groups = [_group("1+1=", ["2", "3"], "2")]
    m = score_groups(groups, {"a:score": lambda prompts, completions, **_: [1.0] * 2,
                              "b:score": lambda prompts, completions, **_: [0.0] * 2,
                              "c:other": lambda prompts, completions, **_: [0.5] * 2})
    assert m["reward/a:score"] == 1.0 and m["reward/b:score"] == 0.0 and m["reward/other"] == 0.5
    assert "reward/score" not in m


def test_a_function_whose_package_is_missing_is_refused_when_loaded(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    with pytest.raises(RewardError, match=r"math_verify_reward' needs math-verify: pip install math-verify"):
        load_reward_fn("rollout.rewards:math_verify_reward")


def test_load_reward_fn():
    assert load_reward_fn("rollout.rewards:arithmetic_reward") is arithmetic_reward
    with pytest.raises(RewardError, match="cannot import 'rollout.rewards:nope'"):
        load_reward_fn("rollout.rewards:nope")


def test_none_means_the_function_does_not_apply_as_in_trl():
    """TRL's convention: a function returns None for samples it does not score; the others' sum
    is the reward. A sample no function scores is an error (or 0, counted, with on_error=zero)."""
    def only_even(prompts, completions, **_):
        return [1.0 if c == "2" else None for c in completions]

    def bonus(prompts, completions, **_):
        return [0.5 if c != "x" else None for c in completions]

    groups = [_group("1+1=", ["2", "3", "x"], "2")]
    with pytest.raises(RewardError, match="every reward function returned None.*completion='x'"):
        score_groups(groups, {"m:only_even": only_even, "m:bonus": bonus})
    m = score_groups(groups, {"m:only_even": only_even, "m:bonus": bonus}, on_error="zero")
    assert groups[0].rewards == [1.5, 0.5, 0.0] and m["reward_errors"] == 1
    assert m["reward/only_even"] == 1.0 and m["reward/bonus"] == 0.5  # means over the samples each scored


def test_rows_with_different_columns_get_their_own_values():
    """A JSONL file's rows may carry different extra fields: each sample gets its own row's value
    (None where its row has none), also when scored one sample at a time after an error."""
    seen = []

    def by_difficulty(prompts, completions, difficulty, **_):
        seen.append(list(difficulty))
        if len(completions) > 1:
            raise RuntimeError("batch call fails: scored one at a time")
        return [float(difficulty[0] or 0)]

    groups = [_group("1+1=", ["2"] * 2, "2"), _group("2+2=", ["4"] * 2, "4", index=1)]
    groups[1].row = {**groups[1].row, "difficulty": 5}
    score_groups(groups, {"m:by_difficulty": by_difficulty})
    assert seen[0] == [None, None, 5, 5]
    assert groups[0].rewards == [0.0, 0.0] and groups[1].rewards == [5.0, 5.0]


def test_a_function_breaking_its_contract_fails_at_once_not_sample_by_sample():
    """A wrong number of rewards, or not a list, is the function's fault: no sample-by-sample retry
    (a batched judge would be called once per sample, unseen), an error naming what it returned."""
    calls = []

    def short(prompts, completions, **_):
        calls.append(len(completions))
        return [1.0]

    groups = [_group("1+1=", ["2", "3"], "2")]
    with pytest.raises(RewardError, match=r"m:short returned 1 values for 2 completions.*one reward"):
        score_groups(groups, {"m:short": short}, on_error="zero")
    assert calls == [2]
    with pytest.raises(RewardError, match="m:scalar returned a float, not a list"):
        score_groups(groups, {"m:scalar": lambda prompts, completions, **_: 1.0}, on_error="zero")


def test_a_function_failing_on_every_sample_is_an_error_even_when_failures_score_zero():
    """...before it ever scored a sample; once it has, such a step is scored 0 and counted (a parser
    that raises on malformed output, every output of a step malformed)."""
    def parse(prompts, completions, **_):
        return [float(c) for c in completions]

    worked: set[str] = set()
    with pytest.raises(RewardError, match=r"m:parse raised or returned a non-finite reward on every one of the "
                                          r"step's 2 samples and has scored none"):
        score_groups([_group("1+1=", ["x", "y"], "2")], {"m:parse": parse}, on_error="zero", worked=worked)
    score_groups([_group("1+1=", ["2", "y"], "2")], {"m:parse": parse}, on_error="zero", worked=worked)
    groups = [_group("1+1=", ["x", "y"], "2")]
    m = score_groups(groups, {"m:parse": parse}, on_error="zero", worked=worked)
    assert groups[0].rewards == [0.0, 0.0] and m["reward_errors"] == 2
    # the same for a function that returns NaN for every sample (it never raises)
    with pytest.raises(RewardError, match=r"m:nan raised or returned a non-finite reward on every one"):
        score_groups([_group("1+1=", ["2", "3"], "2")], {"m:nan": lambda prompts, completions, **_: [math.nan] * 2},
                     on_error="zero", worked=set())


def test_a_sum_out_of_float_range_is_an_error():
    groups = [_group("1+1=", ["2"], "2")]
    with pytest.raises(RewardError, match="sum is inf"):
        score_groups(groups, {"m:a": lambda prompts, completions, **_: [1e308], "m:b": lambda prompts, completions, **_: [1e308]})


def test_reward_paths_that_cannot_load_are_named(tmp_path, monkeypatch):
    with pytest.raises(RewardError, match="is not 'module:function'"):
        load_reward_fn(":arithmetic_reward")
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('no API key')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match="importing 'raises_on_import'.*RuntimeError: no API key"):
        load_reward_fn("raises_on_import:score")


def test_a_function_that_cannot_take_the_data_columns_is_refused_before_sampling():
    from rollout.rewards import check_signatures
    check_signatures({"a": arithmetic_reward, "b": lambda prompts, completions, **kw: []}, ["answer", "level"])
    with pytest.raises(RewardError, match=r"m:judge cannot take the data's columns.*'rubric'.*\['answer'\]"):
        check_signatures({"m:judge": lambda prompts, completions, answer, rubric: []}, ["answer"])
    with pytest.raises(RewardError, match="m:strict cannot take"):  # a column it has no parameter for
        check_signatures({"m:strict": lambda prompts, completions, answer: []}, ["answer", "level"])


def test_functions_are_called_by_keyword_as_trl_calls_them():
    """TRL calls fn(prompts=..., completions=..., **columns): a TRL function that takes its
    completions first, or no prompts at all, gets what its parameter names say."""
    from rollout.rewards import check_signatures

    def completions_first(completions, answer, **kwargs):  # e.g. TRL's accuracy_reward(completions, solution, **kw)
        return [float(c == a) for c, a in zip(completions, answer)]

    def no_prompts(completions, **kwargs):  # e.g. trl.rewards.think_format_reward
        return [float(len(c)) for c in completions]

    check_signatures({"m:first": completions_first, "m:no_prompts": no_prompts}, ["answer"])
    groups = [_group("1+1=", ["2", "3"], "2")]
    score_groups(groups, {"m:first": completions_first, "m:no_prompts": no_prompts})
    assert groups[0].rewards == [2.0, 1.0]
