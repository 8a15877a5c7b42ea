import math

import pytest
import torch

from orchestration.config import load_config
from policy.batch import Group, pad_sequences
from policy.models import load_model, state_checksum
from policy.trainer import PolicyTrainer, token_logprobs


def test_pad_sequences_positions():
    b = pad_sequences([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    assert b.predict_pos[0, :2].tolist() == [2, 3] and b.predict_pos[1].tolist() == [0, 1, 2]
    assert b.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_padded_logprobs_equal_one_sequence_at_a_time(tiny_model_dir):
    model = load_model(tiny_model_dir, torch.float64).eval()
    prompts, responses = [[5, 6, 7, 8], [9], [10, 11]], [[12, 13], [14, 15, 16, 17], [18]]
    batch = pad_sequences(prompts, responses, pad_id=0)
    with torch.no_grad():
        together = token_logprobs(model, batch, temperature=0.7)
        for i in range(3):
            alone = token_logprobs(model, pad_sequences([prompts[i]], [responses[i]], 0), temperature=0.7)
            n = len(responses[i])
            # float64 reference: padding must not change a single logprob beyond rounding
            assert torch.allclose(together[i, :n], alone[0, :n], atol=1e-12, rtol=0)
            assert torch.all(together[i, n:] == 0)


@pytest.mark.parametrize("head_at_positions", [True, False])
def test_logprobs_equal_the_full_logits_reference(tiny_model_dir, monkeypatch, head_at_positions):
    """The LM head applied only at the predicting positions (and the whole-forward fallback for
    families that post-process their logits) equals the model's own full-row logits."""
    if not head_at_positions:
        monkeypatch.setattr("policy.trainer.PLAIN_LM_HEAD", set())
    model = load_model(tiny_model_dir, torch.float64).eval()
    batch = pad_sequences([[5, 6, 7, 8], [9], [10, 11]], [[12, 13], [14, 15, 16, 17], [18]], pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        picked = logits.gather(1, batch.predict_pos[..., None].expand(-1, -1, logits.shape[-1]))
        ref = torch.log_softmax(picked / 0.7, -1).gather(-1, batch.targets[..., None])[..., 0] * batch.response_mask
        got = token_logprobs(model, batch, temperature=0.7)
    # float64, the same operations on the same rows: equal up to rounding
    assert torch.allclose(got, ref, atol=1e-12, rtol=0)
    assert ref.abs().sum() > 0


def _groups(rewards):
    return [Group(prompt="1+1=", prompt_ids=[3, 74, 3, 82], responses=[[4, 1], [5, 1], [4, 4, 1], [1]],
                  behaviour_logprobs=[[0.0] * 2, [0.0] * 2, [0.0] * 3, [0.0]], version=0,
                  completions=["2", "3", "22", ""], rewards=list(r), row={"answer": "2"}) for r in rewards]


@pytest.fixture()
def trainer(tiny_model_dir):
    cfg = load_config(None, ["trainer.lr=1e-2", "trainer.micro_batch_size=3"])
    return PolicyTrainer(tiny_model_dir, cfg.trainer, cfg.algorithm, temperature=1.0, max_tokens=8)


def test_step_moves_probability_towards_rewarded_responses(trainer):
    groups = _groups([[1.0, 0.0, 0.0, 0.0]])
    batch = pad_sequences([g.prompt_ids for g in groups for _ in range(4)], groups[0].responses, 0)
    before = token_logprobs(trainer.model, batch).sum(1).detach()
    checksum = state_checksum(trainer.state_dict())
    metrics = trainer.step(groups)
    after = token_logprobs(trainer.model, batch).sum(1).detach()
    assert trainer.version == 1 and state_checksum(trainer.state_dict()) != checksum
    # responses 0 ("2") and 1 ("3") differ only in their first token: the rewarded one must
    # gain on the penalised one
    assert after[0] - after[1] > before[0] - before[1]
    assert after[0] > before[0]
    assert metrics["grad_norm"] > 0 and metrics["logp_mismatch_max"] > 0  # behaviour logprobs were dummies


def test_non_finite_rewards_are_refused(trainer):
    with pytest.raises(ValueError, match="non-finite rewards"):
        trainer.step(_groups([[1.0, float("nan"), 0.0, 0.0]]))
    assert trainer.version == 0


def test_a_non_finite_loss_in_the_first_mini_batch_is_refused_with_nothing_applied(trainer):
    """A stale sample whose behaviour logprob is NaN makes its importance weight, and so the loss,
    NaN: the step is refused as UpdateNotApplied (the driver then keeps a resumable checkpoint),
    the weights, the optimizer and the version untouched; the trainer steps on afterwards."""
    from policy.distributed import UpdateNotApplied
    trainer.step(_groups([[1.0, 0.0, 0.0, 1.0]]))  # version 1: version-0 samples are stale
    checksum, state = state_checksum(trainer.state_dict()), trainer.update.optimizer.state_dict()["state"][0]
    moments = state["exp_avg"].clone()
    groups = _groups([[1.0, 0.0, 0.0, 0.0]])
    groups[0].behaviour_logprobs[0][0] = float("nan")
    with pytest.raises(UpdateNotApplied, match=r"non-finite loss at policy version 1 \(mini-batch 1 of 1\)"):
        trainer.step(groups)
    assert trainer.version == 1 and state_checksum(trainer.state_dict()) == checksum
    assert torch.equal(trainer.update.optimizer.state_dict()["state"][0]["exp_avg"], moments)
    assert trainer.step(_groups([[1.0, 0.0, 0.0, 0.0]]))["grad_norm"] > 0 and trainer.version == 2


def test_checkpoint_round_trip(trainer, tiny_model_dir, tmp_path):
    trainer.step(_groups([[1.0, 0.0, 0.0, 1.0]]))
    trainer.save_checkpoint(tmp_path / "ckpt")
    cfg = load_config()
    other = PolicyTrainer(tiny_model_dir, cfg.trainer, cfg.algorithm, 1.0, 8)
    other.load_checkpoint(tmp_path / "ckpt")
    assert other.version == 1
    assert state_checksum(other.state_dict()) == state_checksum(trainer.state_dict())
    assert torch.equal(other.update.optimizer.state_dict()["state"][0]["exp_avg"],
                       trainer.update.optimizer.state_dict()["state"][0]["exp_avg"])
    # the resumed run's config sets the learning rate, betas and weight decay (torch's
    # load_state_dict would restore the checkpoint's lr=1e-2)
    assert cfg.trainer.lr != 1e-2
    for group in other.update.optimizer.param_groups:
        assert (group["lr"], tuple(group["betas"]), group["weight_decay"]) == (
            cfg.trainer.lr, (cfg.trainer.beta1, cfg.trainer.beta2), cfg.trainer.weight_decay)


def test_mini_batches_take_several_steps_against_the_pre_update_policy(tiny_model_dir):
    cfg = load_config(None, ["trainer.lr=1e-3", "trainer.mini_batches=3", "trainer.micro_batch_size=2"])
    trainer = PolicyTrainer(tiny_model_dir, cfg.trainer, cfg.algorithm, temperature=1.0, max_tokens=8)
    groups = _groups([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])  # a group each
    for g in groups:  # behaviour logprobs = the trainer's own, as from an exact sampler
        batch = pad_sequences([g.prompt_ids] * g.n, g.responses, 0)
        with torch.no_grad():
            lp = token_logprobs(trainer.model, batch)
        g.behaviour_logprobs = [lp[i, :len(r)].tolist() for i, r in enumerate(g.responses)]
    metrics = trainer.step(groups)
    assert trainer.version == 1
    assert trainer.update.optimizer.state_dict()["state"][0]["step"] == 3  # three optimizer steps
    assert metrics["logp_mismatch_max"] < 1e-5  # old logprobs were taken before the first update
    assert metrics["ratio_mean"] != 1.0  # later mini-batches see a moved policy


def test_stale_samples_get_the_truncated_behaviour_weight(trainer):
    old = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]])
    behaviour = [[-1.5, -0.5], [-3.0, -1.0]]
    assert trainer._behaviour_weight(old, behaviour, [0, 0]) is None  # all on-policy (version 0)
    trainer.version = 1
    w = trainer._behaviour_weight(old, behaviour, [0, 1])
    # row 0 is one version old: min(exp(old - behaviour), C=2); row 1 is on-policy: exactly 1
    expected = torch.tensor([[min(math.exp(0.5), 2.0), math.exp(-1.5)], [1.0, 1.0]])
    assert torch.allclose(w, expected)
    # the cap binds: old - behaviour = 2 gives e^2 = 7.4, truncated to is_cap exactly
    assert trainer.algo.is_cap == 2.0
    capped = trainer._behaviour_weight(torch.tensor([[0.0, -1.0]]), [[-2.0, -1.5]], [0])
    assert torch.equal(capped, torch.tensor([[2.0, math.exp(0.5)]], dtype=capped.dtype))


@pytest.mark.parametrize("mode, dtype, weighted", [("stale", "float32", False), ("all", "float32", True),
                                                   ("auto", "float32", False), ("auto", "bfloat16", True),
                                                   ("stale", "bfloat16", False)])
def test_behaviour_weight_chooses_whether_on_policy_samples_are_weighted(tiny_model_dir, mode, dtype, weighted):
    """algorithm.behaviour_weight: "all" (and "auto" in half precision) weights on-policy samples
    with the same truncated weight as stale ones; "stale" (and "auto" in float32) leaves them at 1."""
    cfg = load_config(None, [f"algorithm.behaviour_weight={mode}"])
    trainer = PolicyTrainer(tiny_model_dir, cfg.trainer, cfg.algorithm, 1.0, 8, dtype=dtype)
    old = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]])
    w = trainer._behaviour_weight(old, [[-1.5, -0.5], [-3.0, -1.0]], [0, 0])  # both on-policy (version 0)
    if not weighted:
        assert w is None
    else:  # min(exp(old - behaviour), C = 2) on every token
        expected = torch.tensor([[math.exp(0.5), math.exp(-1.5)], [2.0, 1.0]])
        assert torch.allclose(w, expected, rtol=4 * torch.finfo(torch.float32).eps, atol=0)


@pytest.mark.parametrize("mini_batches, shared", [(1, False), (1, True), (2, False)])
def test_weighting_on_policy_samples_scales_their_loss_by_the_weight(tiny_model_dir, mini_batches, shared):
    """A sampler whose logprobs are log(1.5) below the trainer's on every token: with
    behaviour_weight=all every token's surrogate is weighted by 1.5 (under the cap of 2), so with
    one mini-batch the step's loss is 1.5 times the unweighted one (float64: equal up to rounding);
    with two, the second mini-batch's weight is taken against the pre-pass's logprobs, still 1.5."""
    losses = {}
    for mode in ("stale", "all"):
        cfg = load_config(None, ["trainer.micro_batch_size=3", f"algorithm.behaviour_weight={mode}",
                                 f"trainer.mini_batches={mini_batches}", f"trainer.shared_prompt={shared}"])
        trainer = PolicyTrainer(tiny_model_dir, cfg.trainer, cfg.algorithm, 1.0, 8, dtype="float64")
        groups = _groups([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
        for g in groups:
            batch = pad_sequences([g.prompt_ids] * g.n, g.responses, 0)
            with torch.no_grad():
                lp = token_logprobs(trainer.model, batch)
            g.behaviour_logprobs = [(lp[i, :len(r)] - math.log(1.5)).tolist() for i, r in enumerate(g.responses)]
        metrics = trainer.step(groups)
        losses[mode] = metrics["loss"]
        assert metrics["is_weight_mean"] == pytest.approx(1.5 if mode == "all" else 1.0, rel=1e-12)
        assert metrics["logp_mismatch_max"] == pytest.approx(math.log(1.5), rel=1e-12)
    assert losses["stale"] != 0
    if mini_batches == 1:
        assert losses["all"] == pytest.approx(1.5 * losses["stale"], rel=1e-12)


def test_a_checkpoint_round_trip_is_exact_in_float64(tiny_model_dir, tmp_path):
    """The resumed policy is the saved one bit for bit in its own dtype (not through float32)."""
    cfg = load_config(None, ["trainer.lr=1e-2", "trainer.micro_batch_size=3"])
    trainer = PolicyTrainer(tiny_model_dir, cfg.trainer, cfg.algorithm, 1.0, 8, dtype="float64")
    trainer.step(_groups([[1.0, 0.0, 0.0, 1.0]]))
    trainer.save_checkpoint(tmp_path / "ckpt")
    other = PolicyTrainer(tiny_model_dir, cfg.trainer, cfg.algorithm, 1.0, 8, dtype="float64")
    other.load_checkpoint(tmp_path / "ckpt")
    assert state_checksum(other.state_dict()) == state_checksum(trainer.state_dict())


def _constant_gradient_steps(update, model, steps: int) -> None:
    for _ in range(steps):
        update.zero_grad()
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3, dtype=torch.bfloat16).to(p.dtype)  # the same value in both models
        update.step()


def test_bfloat16_weights_are_trained_through_a_float32_master_copy(tmp_path):
    """lr 1e-6 with a constant gradient moves each weight by ~lr a step (Adam's normalised step):
    100 steps move a float32 weight by ~1e-4, more than half the rounding step of a bfloat16
    weight of ~0.02 (1.2e-4), which then shows the move only through a master copy; applied to
    the bfloat16 weights directly, every step rounds away. The model holds the master rounded,
    and a checkpoint restores the master."""
    from policy.distributed import LocalUpdate
    cfg = load_config(None, ["trainer.lr=1e-6", "trainer.weight_decay=0.0"]).trainer
    torch.manual_seed(0)
    reference = torch.nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        reference.weight.copy_(0.02 + 0.001 * torch.rand(64, 64))
    model = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.copy_(reference.weight)
    start = model.weight.detach().clone()
    reference.weight.data = model.weight.detach().float()  # both start from the same (bf16) values
    update, ref_update = LocalUpdate(model, cfg), LocalUpdate(reference, cfg)
    _constant_gradient_steps(update, model, 100)
    _constant_gradient_steps(ref_update, reference, 100)
    moved = (start.float() - reference.weight.detach()).abs()
    assert moved.min() > 6.2e-5  # the float32 reference moved every weight by ~100 lr: over half a step
    assert torch.equal(update.master[0].detach(), reference.weight.detach())  # the same float32 arithmetic
    assert torch.equal(model.weight.detach(), reference.weight.detach().to(torch.bfloat16))
    assert (model.weight != start).all()  # so every bfloat16 weight changed
    update.save(tmp_path)
    fresh = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        fresh.weight.copy_(model.weight)
    resumed = LocalUpdate(fresh, cfg)
    resumed.load(tmp_path)
    assert torch.equal(resumed.master[0].detach(), update.master[0].detach())


@pytest.mark.parametrize("scale, at", [(1e-3, 0.999), (1.0, 0.999), (10.0, 0.999), (1.0, 1.0), (1.0, None),
                                       (float("inf"), 0.999), (float("nan"), 0.999)])
def test_clip_grad_norm_equals_torchs_bit_for_bit(scale, at):
    """policy.distributed.clip_grad_norm skips torch's multiply by a coefficient clamped to 1:
    below, at and above max_norm (max_norm = at x the unscaled norm; None: the norm + 1e-6, where
    torch's coefficient is exactly 1) and with an infinite norm, the gradients and the norm are
    torch's; with a NaN norm the norm is (torch then multiplies the gradients by NaN, which the
    callers drop)."""
    from policy.distributed import clip_grad_norm
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(7, 5, generator=g), torch.randn(11, generator=g)]
    unscaled = torch.nn.utils.get_total_norm(grads)
    max_norm = float(unscaled + 1e-6) if at is None else float(unscaled) * at
    ours, theirs = ([torch.nn.Parameter(torch.zeros_like(t)) for t in grads] for _ in range(2))
    for a, b, t in zip(ours, theirs, grads):
        a.grad, b.grad = t * scale, t * scale
    norm = clip_grad_norm(ours, max_norm)
    ref = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    torch.testing.assert_close(norm, ref, rtol=0, atol=0, equal_nan=True)
    if not math.isnan(scale):
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, equal_nan=True)  # inf x 0 = NaN in both
    if scale == 10.0:
        assert not torch.equal(ours[0].grad, grads[0] * scale)  # clipped: the comparison above is not vacuous


@pytest.fixture()
def denormals_restored():
    yield
    torch.set_flush_denormal(False)


def test_flushing_denormals_changes_the_update_by_less_than_float32_rounding(tiny_model_dir, denormals_restored):
    """trainer.flush_denormal treats float32 values below 2^-126 as zero. At temperature 0.02 the
    softmax tails underflow, so the LM head's gradient holds denormals (checked). Flushed, a
    gradient element moves by < 2^-126 and its AdamW step by < lr * 2^-126 / eps ~ 1e-32, far
    below one float32 rounding of any weight: the weights after two steps agree to one ulp."""
    tiny = torch.finfo(torch.float32).tiny
    weights, denormals = {}, {}
    for flush in (False, True):
        cfg = load_config(None, ["trainer.lr=1e-2", f"trainer.flush_denormal={flush}"])
        t = PolicyTrainer(tiny_model_dir, cfg.trainer, cfg.algorithm, temperature=0.02, max_tokens=8)
        for _ in range(2):
            for g in (groups := _groups([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])):
                g.version = t.version
            t.step(groups)
        grads = [p.grad for p in t.model.parameters() if p.grad is not None]
        denormals[flush] = sum(int(((g != 0) & (g.abs() < tiny)).sum()) for g in grads)
        weights[flush] = {k: v.clone() for k, v in t.model.state_dict().items()}
    assert denormals[False] > 0 and denormals[True] == 0
    for k, w in weights[False].items():
        ulp = torch.finfo(torch.float32).eps * w.abs().clamp_min(tiny)
        assert ((weights[True][k] - w).abs() <= ulp).all(), k


def _skip_and_compute(tiny_model_dir, rewards, *overrides, stale=()):
    """The same float64 step by a trainer that skips zero-advantage responses and by one that
    computes them: (their metrics, their gradients as AdamW's first moment, their weights, AdamW's
    step count). Group g has its own prompt; the groups in ``stale`` were sampled one version back."""
    out = []
    for skip in (True, False):
        cfg = load_config(None, ["trainer.lr=1e-2", "trainer.micro_batch_size=3", "trainer.weight_decay=0.1",
                                 f"trainer.skip_zero_advantage={skip}", *overrides])
        t = PolicyTrainer(tiny_model_dir, cfg.trainer, cfg.algorithm, temperature=1.0, max_tokens=8, dtype="float64")
        t.version = 1
        groups = _groups(rewards)
        for g, group in enumerate(groups):
            group.prompt_ids = [3, 70 + g, 3, 82]
            group.version = 0 if g in stale else 1
        metrics = t.step(groups)
        state = t.update.optimizer.state
        out.append((metrics, {n: state[p]["exp_avg"] for n, p in t.model.named_parameters()},
                    {k: v.clone() for k, v in t.model.state_dict().items()}, int(state[next(t.model.parameters())]["step"])))
    return out


def _assert_same_update(a: dict, b: dict) -> None:
    # float64: the same sums grouped into other micro-batches agree to ~1e-13 of their size; a
    # skipped response that should have counted, or a denominator that left skipped ones out,
    # moves a gradient by a sizeable fraction of itself
    for k in a:
        scale = float(b[k].abs().max())
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-10 * max(scale, 1e-30)), (k, float((a[k] - b[k]).abs().max()), scale)


@pytest.mark.parametrize("overrides", [
    ["trainer.shared_prompt=false", "algorithm.loss_agg=token_mean"],
    ["trainer.shared_prompt=true", "algorithm.loss_agg=token_mean"],
    ["trainer.shared_prompt=false", "algorithm.loss_agg=seq_mean"],
    ["trainer.shared_prompt=true", "algorithm.loss_agg=seq_sum_norm"],
    # two optimizer steps: the second mini-batch's ratios are taken against the policy before the
    # first (they move, and clip), and stale groups get the truncated behaviour weight
    ["trainer.mini_batches=2", "algorithm.clip_low=0.01", "algorithm.clip_high=0.01"],
], ids=["unpacked", "packed", "seq_mean", "packed-seq_sum_norm", "two_mini_batches-stale"])
def test_skipping_zero_advantage_responses_leaves_the_update_unchanged(tiny_model_dir, overrides):
    # groups of equal rewards (advantage exactly 0) among groups that learn; by mini-batch (of 2):
    # a learning group and two equal ones, then a learning group, an equal one and a learning one
    rewards = [[1.0, 0.0, 0.0, 1.0], [0.0] * 4, [1.0] * 4, [0.0, 1.0, 0.0, 0.0], [0.0] * 4, [0.0, 0.0, 1.0, 1.0]]
    (m_skip, g_skip, w_skip, steps_skip), (m_all, g_all, w_all, steps_all) = _skip_and_compute(
        tiny_model_dir, rewards, *overrides, stale=(0, 1, 5))
    assert m_skip["update_skipped"] == 0.5 and m_all["update_skipped"] == 0.0
    assert steps_skip == steps_all
    assert max(float(g.abs().max()) for g in g_all.values()) > 0
    if "trainer.mini_batches=2" in overrides:
        assert m_all["clip_frac"] > 0 and m_all["ratio_mean"] != 1.0  # the clip and the ratio were at work
    _assert_same_update(g_skip, g_all)
    _assert_same_update(w_skip, w_all)
    assert math.isclose(m_skip["grad_norm"], m_all["grad_norm"], rel_tol=1e-10)


def test_a_step_of_only_equal_rewards_still_steps_the_optimizer(tiny_model_dir):
    """No response carries a gradient, yet AdamW must count the step and decay the weights as
    the trainer that computes them all does (one response is computed: zero gradients, not none)."""
    (m_skip, g_skip, w_skip, steps_skip), (_, g_all, w_all, steps_all) = _skip_and_compute(
        tiny_model_dir, [[0.0] * 4, [1.0] * 4])
    assert m_skip["update_skipped"] == 7 / 8
    assert steps_skip == steps_all == 1
    assert all(float(g.abs().max()) == 0 for g in g_skip.values())
    _assert_same_update(w_skip, w_all)
    initial = load_model(tiny_model_dir, torch.float64).state_dict()
    assert not torch.equal(w_skip["model.norm.weight"], initial["model.norm.weight"])  # decayed


def test_nothing_is_skipped_with_a_kl_term(tiny_model_dir):
    # the k3 KL's gradient does not vanish with the advantage
    (m_skip, g_skip, _, _), (_, g_all, _, _) = _skip_and_compute(
        tiny_model_dir, [[0.0] * 4, [1.0, 0.0, 0.0, 0.0]], "algorithm.kl_coef=0.1")
    assert m_skip["update_skipped"] == 0.0
    _assert_same_update(g_skip, g_all)


@pytest.mark.parametrize("overrides", [["trainer.shared_prompt=false"], ["trainer.shared_prompt=true"]],
                         ids=["unpacked", "packed"])
def test_the_sparse_tied_embedding_gradient_equals_the_dense_one(tiny_model_dir, overrides):
    """The tied embedding's rows (sparse) added into the LM head's dense gradient give the same
    weight gradient and update as the dense embedding backward: float64, micro-batches of 3 (the
    unpacked step's three backwards also accumulate into ``.grad``), tokens repeated within and
    across sequences."""
    grads, weights = {}, {}
    for sparse in (True, False):
        cfg = load_config(None, ["trainer.lr=1e-2", "trainer.micro_batch_size=3", *overrides])
        t = PolicyTrainer(tiny_model_dir, cfg.trainer, cfg.algorithm, temperature=1.0, max_tokens=8, dtype="float64")
        embed = t.model.get_input_embeddings()
        assert embed.sparse and embed.weight is t.model.get_output_embeddings().weight
        embed.sparse = sparse
        t.step(_groups([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.5, 0.0]]))
        assert not embed.weight.grad.is_sparse
        grads[sparse] = {n: p.grad.clone() for n, p in t.model.named_parameters()}
        weights[sparse] = {k: v.clone() for k, v in t.model.state_dict().items()}
    used = sorted({3, 74, 82, 4, 5, 1})  # the embedding rows the batch reads
    emb = "model.embed_tokens.weight"
    assert grads[True][emb][used].abs().sum() > 0
    _assert_same_update(grads[True], grads[False])
    _assert_same_update(weights[True], weights[False])


def test_an_untied_embedding_keeps_its_dense_gradient():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from policy.trainer import sparse_tied_embedding
    config = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8)
    untied = Qwen3ForCausalLM(Qwen3Config(**config, tie_word_embeddings=False))
    assert not sparse_tied_embedding(untied) and not untied.get_input_embeddings().sparse
    tied = Qwen3ForCausalLM(Qwen3Config(**config, tie_word_embeddings=True))
    assert sparse_tied_embedding(tied) and tied.get_input_embeddings().sparse


def test_the_loss_metrics_are_token_means_over_the_step(tiny_model_dir):
    """kl (and clip_frac, ratio_mean the same way) over micro-batches of unequal token counts:
    the mean over every response token of the step, not a per-sequence weighting of the
    micro-batches' means."""
    from policy.grpo import k3_kl
    cfg = load_config(None, ["trainer.lr=1e-2", "trainer.micro_batch_size=3", "algorithm.kl_coef=0.1"])
    trainer = PolicyTrainer(tiny_model_dir, cfg.trainer, cfg.algorithm, temperature=1.0, max_tokens=8)
    trainer.step(_groups([[1.0, 0.0, 0.0, 1.0]]))  # the policy moves away from the reference
    groups = _groups([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
    groups[1].responses = [[4, 4, 4, 4, 1], [5], [1], [4, 5, 6, 7, 1]]  # 8 responses in micro-batches of 3
    groups[1].behaviour_logprobs = [[0.0] * len(r) for r in groups[1].responses]
    batch = pad_sequences([g.prompt_ids for g in groups for _ in range(g.n)],
                          [r for g in groups for r in g.responses], 0)
    with torch.no_grad():
        kl = k3_kl(token_logprobs(trainer.model, batch), token_logprobs(trainer.ref_model, batch))
    expected = float((kl * batch.response_mask).sum() / batch.response_mask.sum())
    assert trainer.step(groups)["kl"] == pytest.approx(expected, rel=1e-5)
