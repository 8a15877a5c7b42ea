"""Data-parallel training (2 trainer ranks, DeepSpeed ZeRO over gloo, as Ray actors) equals
single-process training on the same groups.

float32 (DeepSpeed reduces float32/half gradients only): the only difference is summation
order (per-rank partial gradients summed by the all-reduce), relative ~1e-7 per element and
≲ sqrt(#terms)·2⁻²⁴ ≈ 1e-5 for norms and losses in the worst case. AdamW's update
lr·m̂/(√v̂+eps) is nearly scale-free, so the pre-clip gradient norm is compared too: a wrong
reduction scale (averaging instead of summing, a missing world-size factor) changes it 2×.
Parameters after the AdamW steps: AdamW divides each element's gradient by its own running
RMS, so an element whose gradient is near zero (a few ulps of cancellation) can move by a
sizeable fraction of lr either way; a genuine reduction bug (a rank's gradient lost or added
to another parameter) moves most elements by ~lr. So: no element off by more than 0.1·lr, and
fewer than 0.1% off by more than 0.01·lr (measured: max 3.6e-2·lr, 0.01% of elements).
"""

import random

import pytest
import ray
import torch

from orchestration.config import load_config
from orchestration.trainer_actor import TrainerActor, TrainerGroup, shard_step, split_groups
from policy.batch import Group
from policy.models import state_checksum, unpack_state
from policy.trainer import PolicyTrainer

pytestmark = pytest.mark.slow


def _groups(n_groups: int, seed: int = 0) -> list[Group]:
    rng = random.Random(seed)
    groups = []
    for i in range(n_groups):
        prompt = [rng.randrange(3, 60) for _ in range(rng.randrange(3, 9))]
        responses = [[rng.randrange(3, 60) for _ in range(rng.randrange(1, 7))] for _ in range(4)]
        groups.append(Group(prompt=str(i), prompt_ids=prompt, responses=responses,
                            behaviour_logprobs=[[0.0] * len(r) for r in responses], version=0,
                            completions=[""] * 4, rewards=[float(rng.random() < 0.5) for _ in range(4)],
                            row={}, index=i))
    return groups


def test_split_groups_balances_whole_groups():
    groups = _groups(7)
    shards = split_groups(groups, 2)
    assert sorted(g.index for s in shards for g in s) == list(range(7))
    assert all(s == sorted(s, key=lambda g: g.index) for s in shards)
    cost = [sum(len(g.prompt_ids) * g.n + sum(map(len, g.responses)) for g in s) for s in shards]
    largest = max(len(g.prompt_ids) * g.n + sum(map(len, g.responses)) for g in groups)
    assert abs(cost[0] - cost[1]) <= largest


def test_shared_prompt_ranks_are_balanced_by_the_tokens_they_train():
    """One long prompt with short responses against three short prompts with long ones: per
    response the costs are 16,400 and 15,600 (balanced), but trained with the prompt once the
    first rank had 2,400 tokens and the second 14,550. Balanced by what is trained, neither waits
    on the other by more than the largest group."""
    def group(i, prompt, response):
        rs = [[5] * response for _ in range(8)]
        return Group(prompt=str(i), prompt_ids=[3] * prompt, responses=rs, behaviour_logprobs=[[0.0] * response] * 8,
                     version=0, completions=[""] * 8, rewards=[0.0, 1.0] * 4, row={}, index=i)
    groups = [group(0, 2000, 50)] + [group(i, 50, 600) for i in (1, 2, 3)]
    packed = [2000 + 8 * 50] + [50 + 8 * 600] * 3
    shards = split_groups(groups, 2, shared_prompt=True)
    trained = [sum(packed[g.index] for g in s) for s in shards]
    assert abs(trained[0] - trained[1]) <= max(packed) and sorted(trained) == [7250, 9700]
    unpacked = [sum(packed[g.index] for g in s) for s in split_groups(groups, 2)]
    assert sorted(unpacked) == [2400, 14550]


def test_every_rank_gets_groups_when_mini_batches_split_them_one_by_one():
    """4 groups in 4 mini-batches over 2 ranks: each mini-batch's one group goes to the rank with
    less so far, so each rank trains 2 (a split from zero per mini-batch gave rank 1 none)."""
    groups = _groups(4)
    shards, minis = shard_step(groups, 2, 4)
    assert [len(s) for s in shards] == [2, 2]
    assert sorted(g.index for s in shards for g in s) == [0, 1, 2, 3]
    assert sorted(m for ms in minis for m in ms) == [0, 1, 2, 3]
    for shard, ms in zip(shards, minis):  # each group keeps its mini-batch (group i is mini-batch i here)
        assert [g.index for g in shard] == ms
    # the same with 3 ranks and 3 groups, 3 mini-batches
    shards, _ = shard_step(_groups(3), 3, 3)
    assert [len(s) for s in shards] == [1, 1, 1]


@pytest.fixture(scope="module")
def ray_2cpu():
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


@pytest.mark.parametrize("zero_stage,shared_prompt,mini_batches", [(1, False, 2), (2, True, 3)])
def test_data_parallel_step_equals_single_process(tiny_model_dir, ray_2cpu, zero_stage, shared_prompt, mini_batches):
    # 5 groups: with 3 mini-batches one holds a single group, so a rank has an empty one
    overrides = ["trainer.lr=1e-3", "trainer.micro_batch_size=6", f"trainer.mini_batches={mini_batches}",
                 f"trainer.shared_prompt={shared_prompt}", f"trainer.zero_stage={zero_stage}"]
    single_cfg = load_config(None, overrides)
    dp_cfg = load_config(None, overrides + ["trainer.world_size=2"])
    steps = [_groups(5, seed=1), _groups(5, seed=2)]

    single = PolicyTrainer(tiny_model_dir, single_cfg.trainer, single_cfg.algorithm, 1.0, 8, "float32")
    group = TrainerGroup([ray.remote(num_cpus=1)(TrainerActor).remote(r) for r in range(2)], str(tiny_model_dir),
                         dp_cfg.trainer, dp_cfg.algorithm, 1.0, 8, "float32", probe_ids=[3, 4, 5])
    try:
        for groups in steps:
            want = single.step(groups)
            got = group.metrics(group.step(groups))
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-7)
            assert got["update_tokens"] == want["update_tokens"]
        weights = unpack_state(ray.get(group.export()[0]))
        for name, value in single.state_dict().items():
            diff, lr = (weights[name] - value).abs(), single_cfg.trainer.lr
            assert float(diff.max()) <= 0.1 * lr, name
            assert float((diff > 0.01 * lr).float().mean()) < 1e-3, name
    finally:
        for actor in group.actors:
            ray.kill(actor)


def test_data_parallel_checkpoint_resumes_the_same_training(tiny_model_dir, ray_2cpu, tmp_path):
    """Weights from rank 0 and every rank's ZeRO optimizer partition: a group restored from the
    checkpoint takes the same next step as the group that wrote it."""
    cfg = load_config(None, ["trainer.lr=1e-3", "trainer.world_size=2", "trainer.zero_stage=1"])

    def new_group():
        return TrainerGroup([ray.remote(num_cpus=1)(TrainerActor).remote(r) for r in range(2)], str(tiny_model_dir),
                            cfg.trainer, cfg.algorithm, 1.0, 8, "float32", probe_ids=[3, 4, 5])

    first = new_group()
    try:
        first.metrics(first.step(_groups(4, seed=3)))
        first.save(str(tmp_path / "ckpt"))
        want = first.metrics(first.step(_groups(4, seed=4)))
        want_weights = unpack_state(ray.get(first.export()[0]))
    finally:
        for actor in first.actors:
            ray.kill(actor)
    second = new_group()
    try:
        assert second.load(str(tmp_path / "ckpt")) == 1
        got = second.metrics(second.step(_groups(4, seed=4)))
        got_weights = unpack_state(ray.get(second.export()[0]))
    finally:
        for actor in second.actors:
            ray.kill(actor)
    assert got["loss"] == want["loss"] and got["grad_norm"] == want["grad_norm"]
    # identical state, identical arithmetic: bit-equal (a fresh optimizer would differ by ~lr)
    assert all(torch.equal(got_weights[k], want_weights[k]) for k in want_weights)


def test_an_export_is_a_snapshot_of_its_version(tiny_model_dir, ray_2cpu):
    """The trainer exports its live parameters without copying them (Ray copies an actor
    method's return value into the object store when the method returns): an export read
    after later steps must still hold its own version's weights, and match its checksum."""
    cfg = load_config(None, ["trainer.lr=1e-2"])
    group = TrainerGroup([ray.remote(num_cpus=1)(TrainerActor).remote(0)], str(tiny_model_dir),
                         cfg.trainer, cfg.algorithm, 1.0, 8, "float32", probe_ids=[3, 4, 5])
    try:
        group.metrics(group.step(_groups(2, seed=1)))
        first = group.export()
        group.metrics(group.step(_groups(2, seed=2)))
        second = group.export()
        (w1, v1, c1, _), (w2, v2, c2, _) = ray.get(list(first)), ray.get(list(second))
    finally:
        for actor in group.actors:
            ray.kill(actor)
    w1, w2 = unpack_state(w1), unpack_state(w2)
    assert (v1, v2) == (1, 2)
    assert state_checksum(w1) == c1 and state_checksum(w2) == c2 and c1 != c2
    moved = [k for k in w1 if not torch.equal(w1[k], w2[k])]
    assert len(moved) > len(w1) // 2  # the second step moved the weights; the first export kept its own
