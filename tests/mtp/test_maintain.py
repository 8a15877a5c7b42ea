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
    assert resumed.optimizer.state_dict()["optimizer"]["state"]  # the moments came back


def _uneven_groups() -> list[Group]:
    """Two groups whose responses differ in length (the valid anchors per sequence: 1 to 6)."""
    rows = [([3, 74, 3, 82], [[4, 1], [5, 6, 9, 2, 1], [4, 4, 1], [7, 1, 8, 8, 8, 1]]),
            ([5, 71, 6], [[8, 2, 3, 1], [6, 1], [9, 9, 9, 9, 9, 4, 1], [2, 1]])]
    return [Group(prompt=str(i), prompt_ids=p, responses=rs, behaviour_logprobs=[[0.0] * len(r) for r in rs],
                  version=0, completions=[""] * len(rs), rewards=[0.0] * len(rs), row={}, index=i)
            for i, (p, rs) in enumerate(rows)]


def _grads(head) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in head.parameters() if p.grad is not None])


@pytest.mark.parametrize("form,objective", [("eagle", "tv"), ("eagle3", "ce"), ("eagle3", "tv")])
def test_a_micro_batched_maintenance_step_is_the_whole_batch_step(tiny_model_dir, tmp_path, form, objective):
    """The maintainer's step in micro-batches of 64 (one), 3 and 1 sequences has the gradient of
    mtp.batch.loss_fn over the whole batch (clipped as the step clips it): every loss term divides
    by the whole batch's positions (mtp.batch.loss_counts; for "ce" those whose target a reduced
    draft vocabulary can propose). The head is float64, so its gradient sums differ only in
    order: ~1e-16 relative each over a few hundred terms, far below 1e-10, and far below the
    per-micro-batch means' error (checked below to be > 1e-3). The metrics are float32 sums
    (mtp.losses computes in float32): 1e-6 relative, ~10 float32 roundings."""
    from mtp.batch import draft_targets, loss_fn
    from mtp.heads import Eagle3Head
    policy = load_model(tiny_model_dir).double()
    # eagle3: a draft vocabulary without tokens 6-9, which the responses hold
    head = (EagleHead.for_policy(policy, num_layers=1) if form == "eagle" else
            Eagle3Head.for_policy(policy, torch.tensor([0, 1, 2, 3, 4, 5, 74, 82])))
    head.save_vllm(tmp_path / "head")
    cfg = load_config(None, ["mtp.maintain_lr=1e-3", f"mtp.objective={objective}", "mtp.k=3"]).mtp
    seqs = [(g.prompt_ids + r, len(g.prompt_ids)) for g in _uneven_groups() for r in g.responses]

    def fresh(micro: int = 64) -> HeadMaintainer:
        m = HeadMaintainer(tmp_path / "head", cfg, temperature=1.0, pad_id=0, micro_batch=micro)
        m.head.double()
        return m
    reference = fresh().head
    loss_fn(draft_targets(policy, reference, seqs, 3, 0), objective, False, 1.0, cfg.kl_weight).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    expected = _grads(reference)
    scale = expected.abs().max()
    assert scale > 0
    metrics = {}
    for micro in (64, 3, 1):
        m = fresh(micro)
        metrics[micro] = m.step(policy, _uneven_groups())
        assert metrics[micro]["head_maintain_skipped"] == 0.0
        assert (_grads(m.head) - expected).abs().max() <= 1e-10 * scale, micro
        for key in ("head_alpha1", "head_draft_coverage"):
            assert metrics[micro][key] == pytest.approx(metrics[64][key], rel=1e-6), key
    # the test's batch tells the two apart: per-micro-batch means weight its sequences unevenly
    naive = fresh().head
    for seq in seqs:
        (loss_fn(draft_targets(policy, naive, [seq], 3, 0), objective, False, 1.0, cfg.kl_weight)
         / len(seqs)).backward()
    torch.nn.utils.clip_grad_norm_(naive.parameters(), 1.0)
    assert (_grads(naive) - expected).abs().max() > 1e-3 * scale
