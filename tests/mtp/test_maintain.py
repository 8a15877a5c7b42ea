"""The drafter head's online maintenance (mtp.maintain.HeadMaintainer) on the tiny policy."""

import pytest
import torch

from mtp.heads import EagleHead
from mtp.maintain import HeadMaintainer
from orchestration.config import load_config
from policy.batch import Group
from policy.models import load_model


def _groups() -> list[Group]:
    responses = [[4, 1], [5, 6, 1], [4, 4, 1], [7, 1]]
    return [Group(prompt="1+1=", prompt_ids=[3, 74, 3, 82], responses=responses,
                  behaviour_logprobs=[[0.0] * len(r) for r in responses], version=0,
                  completions=[""] * 4, rewards=[1.0, 0.0, 0.0, 0.0], row={}, index=0)]


@pytest.fixture()
def maintainer(tiny_model_dir, tmp_path):
    policy = load_model(tiny_model_dir)  # trainable, as the trainer's is
    EagleHead.for_policy(policy, num_layers=1).save_vllm(tmp_path / "head")
    cfg = load_config(None, ["mtp.maintain_lr=1e-3"]).mtp
    return policy, HeadMaintainer(tmp_path / "head", cfg, temperature=1.0, pad_id=0), cfg


def test_maintenance_trains_the_head_and_leaves_the_policy_without_gradients(maintainer):
    policy, m, _ = maintainer
    before = {k: v.clone() for k, v in m.head.state_dict().items()}
    metrics = m.step(policy, _groups())
    assert metrics["head_maintain_skipped"] == 0.0
    assert any(not torch.equal(before[k], v) for k, v in m.head.state_dict().items())
    # the head's loss reaches the policy's embedding through the drafted tokens' embeddings: it
    # must stop there (an untied model would hold a dense V x H gradient until the next update)
    assert all(p.grad is None for p in policy.parameters())


def test_a_non_finite_head_step_is_skipped_and_the_head_kept(maintainer):
    policy, m, _ = maintainer
    with torch.no_grad():
        next(m.head.parameters()).view(-1)[0] = float("inf")
    before = {k: v.clone() for k, v in m.head.state_dict().items()}
    metrics = m.step(policy, _groups())
    assert metrics["head_maintain_skipped"] == 1.0
    for k, v in m.head.state_dict().items():  # nothing applied: no NaN spread over the weights
        assert torch.equal(before[k], v), k


def test_a_resumed_head_optimizer_takes_the_configured_learning_rate(maintainer, tmp_path):
    policy, m, cfg = maintainer
    m.step(policy, _groups())
    m.save(tmp_path)
    cfg.maintain_lr = 2e-5
    resumed = HeadMaintainer(tmp_path / "head", cfg, temperature=1.0, pad_id=0)
    resumed.load(tmp_path)
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [2e-5]
    assert resumed.optimizer.state_dict()["state"]  # the moments came back
