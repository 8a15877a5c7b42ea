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


def test_non_finite_reward_is_an_error():
    groups = [_group("1+1=", ["2"] * 2, "2")]
    with pytest.raises(RewardError, match="nan"):
        score_groups(groups, {"m:nan": lambda p, c, **_: [math.nan] * len(c)})


def test_load_reward_fn():
    assert load_reward_fn("rollout.rewards:arithmetic_reward") is arithmetic_reward
    with pytest.raises(RewardError, match="cannot import 'rollout.rewards:nope'"):
        load_reward_fn("rollout.rewards:nope")
