"""Stops, failures and resumes of the GRPO loop through real Ray actors: what a stop saves, what a
resume trains (every prompt once per epoch, nothing lost, nothing doubled), refused updates,
killed workers."""

import copy
import json
from collections import Counter

import pyarrow.parquet as pq
import pytest

from orchestration.config import ConfigError
from orchestration.data import DataError
from orchestration.grpo import in_flight_depth, main
from orchestration.metrics import read_metrics
from tests.orchestration.loop import _calls, run_config, trained_record

pytestmark = pytest.mark.usefixtures("ray_session")


def test_failed_run_keeps_the_policy_and_names_the_sample(tmp_path, cache, kept_actors):
    from rollout.rewards import RewardError
    config = run_config(tmp_path, "hf")
    config.algorithm.reward_fns = ["tests.orchestration.loop:reward_that_breaks"]
    with pytest.raises(RewardError, match="reward_that_breaks raised RuntimeError"):
        main(config, progress=False, actors=kept_actors)
    assert (tmp_path / "run" / "checkpoint-interrupted" / "model.safetensors").is_file()
    # it stopped before the update: resumable at step 0, the failed batch queued again
    state = json.loads((tmp_path / "run" / "checkpoint-interrupted" / "loop_state.json").read_text())
    assert state["step"] == 0 and len(state["in_flight"]) == 1 and len(state["in_flight"][0][0]) == 4
    assert len(read_metrics(tmp_path / "run")) == 0


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_a_diverged_update_is_named_and_a_half_applied_one_keeps_the_weights(tmp_path, cache, kept_actors,
                                                                            mini_batches):
    """An absurd learning rate sends the weights to ~1e10 in step 0's first mini-batch, and the next
    forward overflows. With one mini-batch a step, sampling with version 1 finds non-finite
    probabilities and names the divergence (not torch's sampler error). With two, the
    trainer refuses step 0's second one after the first was applied: the step is half done, so the
    weights are saved and not the loop. (A refusal in a step's first mini-batch, which leaves a
    resumable checkpoint: tests/policy/test_trainer.py and test_a_refused_update_is_resumable.)"""
    from rollout.worker import PolicyDiverged
    config = run_config(tmp_path, "hf")
    config.trainer.lr, config.trainer.mini_batches = 1e10, mini_batches
    config.algorithm.reward_fns = ["tests.orchestration.loop:reward_by_length"]  # a gradient at once
    stopped = tmp_path / "run" / "checkpoint-interrupted"
    if mini_batches == 1:
        with pytest.raises(PolicyDiverged, match="version 1 gives non-finite probabilities.*diverged.*trainer.lr"):
            main(config, progress=False, actors=kept_actors)
    else:
        with pytest.raises(FloatingPointError, match="mini-batch 2 of 2; the 1 before it were applied"):
            main(config, progress=False, actors=kept_actors)
        weights = tmp_path / "run" / "checkpoint-interrupted-weights"  # beside, never in place of, a resumable one
        assert (weights / "model.safetensors").is_file() and not (weights / "loop_state.json").exists()
        assert not stopped.exists()


def test_an_update_refused_before_anything_was_applied_stays_resumable(tmp_path, cache, kept_actors):
    """Async (max_staleness=1): step 1 trains on samples of version 0 with the overflowing weights
    of version 1, and the trainer refuses its first (only) mini-batch (UpdateNotApplied: here its
    gradient norm overflows). Nothing
    was applied, so the run stops with a checkpoint at step 1: its batch and the one queued behind
    it sampled again on resume, no trajectories logged for it, step 0's metrics kept."""
    from policy.distributed import UpdateNotApplied
    config = run_config(tmp_path, "hf")
    config.trainer.lr, config.orchestration.max_staleness = 1e10, 1
    config.orchestration.adaptive_in_flight = False  # 2 batches in flight
    config.algorithm.reward_fns = ["tests.orchestration.loop:reward_by_length"]
    with pytest.raises(UpdateNotApplied, match=r"non-finite (loss|gradient norm).*policy version 1.*mini-batch 1 of 1"):
        main(config, progress=False, actors=kept_actors)
    state = json.loads((tmp_path / "run" / "checkpoint-interrupted" / "loop_state.json").read_text())
    assert state["step"] == 1 and state["version"] == 1 and len(state["in_flight"]) == 2
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0]
    assert sorted({r[0] for r in trained_record(tmp_path / "run")}) == [0]


def test_a_refused_update_is_resumable():
    """The driver tells a refusal that changed nothing from one that did, as ray.get raises them."""
    import ray.exceptions

    from orchestration.grpo import _not_applied
    from policy.distributed import UpdateNotApplied
    for cause, applied in ((UpdateNotApplied("non-finite loss"), False), (FloatingPointError("half"), True),
                           (KeyboardInterrupt(), True)):
        try:
            raise cause
        except BaseException as exc:  # noqa: BLE001
            wrapped = ray.exceptions.RayTaskError("TrainerActor.step", "traceback", exc).as_instanceof_cause()
        assert _not_applied(cause) is not applied and _not_applied(wrapped) is not applied


def test_a_stop_while_the_update_runs_waits_for_it_and_stays_resumable(tmp_path, cache, kept_actors, monkeypatch):
    """An interruption while the driver waits for the trainer (here the trajectory log's rows
    failing once at step 1, built while the trainer trains, as a Ctrl-C would land there) lets the
    update end: the step's samples and metrics are recorded and the checkpoint resumes after it."""
    from orchestration.trajectories import TrajectoryLog
    table, failed = TrajectoryLog.table, []

    def table_failing_once_at_step_1(step, groups):
        if step == 1 and not failed:
            failed.append(step)
            raise KeyboardInterrupt
        return table(step, groups)
    monkeypatch.setattr(TrajectoryLog, "table", staticmethod(table_failing_once_at_step_1))
    with pytest.raises(KeyboardInterrupt):
        main(run_config(tmp_path, "hf"), progress=False, actors=kept_actors)
    state = json.loads((tmp_path / "run" / "checkpoint-interrupted" / "loop_state.json").read_text())
    assert state["step"] == 2 and state["version"] == 2
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 1]
    assert sorted({r[0] for r in trained_record(tmp_path / "run")}) == [0, 1]


def test_a_resume_keeps_the_checkpoint_s_in_flight_depth():
    """orchestration.adaptive_in_flight: a resumed run starts with the depth its checkpoint's timing
    gives (an update a tenth of a rollout: 2 batches), not all the bound allows (4)."""
    from types import SimpleNamespace

    from orchestration.grpo import in_flight_start
    o = SimpleNamespace(max_staleness=3, adaptive_in_flight=True)
    assert in_flight_start(o, None) == (4, None)
    assert in_flight_start(o, {"timing": [1.0, 0.1]}) == (2, (1.0, 0.1))
    assert in_flight_start(o, {}) == (4, None)  # a checkpoint from before the timing was kept
    o.adaptive_in_flight = False
    assert in_flight_start(o, {"timing": [1.0, 0.1]}) == (4, None)


@pytest.mark.slow  # two or three Ray runs each (~15-20 s)
@pytest.mark.parametrize("max_staleness", [0, 1])
def test_checkpoint_and_resume_lose_and_double_nothing(tmp_path, cache, kept_actors, max_staleness):
    def config(run):
        cfg = run_config(tmp_path / run, "hf")
        cfg.orchestration.steps, cfg.orchestration.max_staleness = 6, max_staleness
        cfg.orchestration.checkpoint_every = 3
        cfg.data.num_prompts = 12  # 6 steps x 4 prompts: two epochs
        return cfg

    straight = main(config("straight"), progress=False, actors=kept_actors)
    ckpt = tmp_path / "straight" / "run" / "checkpoints" / "step-3"
    assert (ckpt / "loop_state.json").is_file() and (ckpt / "model.safetensors").is_file()
    for name, steps in (("trajectories.parquet", {0, 1, 2}), ("trajectories.from-step3.parquet", {3, 4, 5})):
        assert set(pq.read_table(tmp_path / "straight" / "run" / name).column("step").to_pylist()) == steps
    resumed_cfg = config("resumed")
    resumed_cfg.orchestration.resume = str(ckpt)
    resumed = main(resumed_cfg, progress=False, actors=kept_actors)
    assert [h["step"] for h in resumed] == [3, 4, 5]
    timing = json.loads((ckpt / "loop_state.json").read_text())["timing"]  # the adaptive in-flight depth's EMA
    assert len(timing) == 2 and resumed[0]["in_flight"] == in_flight_depth(max_staleness, *timing)

    first_half = [r for r in trained_record(tmp_path / "straight" / "run") if r[0] < 3]
    combined = first_half + trained_record(tmp_path / "resumed" / "run")
    counts = Counter(index for _, index, _, _ in combined)
    assert counts == {i: 2 * 8 for i in range(12)}  # every prompt once per epoch, n responses each
    straight_record = trained_record(tmp_path / "straight" / "run")
    assert [(s, i) for s, i, _, _ in combined] == [(s, i) for s, i, _, _ in straight_record]
    if max_staleness == 0:  # synchronous and seeded: the resumed run is the straight run, exactly
        assert combined == straight_record
        assert [h["reward"] for h in straight[3:]] == [h["reward"] for h in resumed]


@pytest.mark.slow  # four Ray runs (~25-30 s)
def test_a_failed_run_resumes_where_it_stopped_and_a_finished_one_trains_on(tmp_path, cache, kept_actors):
    """A reward function that raises at step 1 (async: batches queued) stops the run with a
    checkpoint to resume from: step 1's batch and the queued ones sampled again, every prompt
    trained once per epoch, the metrics of each step logged once in the same directory. The
    finished run's own checkpoint then takes it on by more steps, and so does a periodic one,
    whose later steps are then logged anew. A resume with other prompts or another data order
    is refused."""
    from rollout.rewards import RewardError
    _calls["n"] = 0
    config = run_config(tmp_path, "hf")
    config.orchestration.steps, config.orchestration.max_staleness = 4, 1
    config.orchestration.adaptive_in_flight = False  # 2 batches in flight
    config.orchestration.checkpoint_every = 2
    config.data.num_prompts = 16  # 4 steps x 4 prompts: one epoch
    config.algorithm.reward_fns = ["tests.orchestration.loop:reward_that_breaks_from_its_second_call"]
    with pytest.raises(RewardError, match="judge unavailable"):
        main(config, progress=False, actors=kept_actors)
    stopped = tmp_path / "run" / "checkpoint-interrupted"
    state = json.loads((stopped / "loop_state.json").read_text())
    assert state["step"] == 1 and len(state["in_flight"]) == 2  # step 1's batch and the one queued behind it
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0]

    for section, key, value, error in (("data", "num_prompts", 15, DataError), ("orchestration", "seed", 1, ConfigError)):
        other = copy.deepcopy(config)
        setattr(getattr(other, section), key, value)
        other.orchestration.resume = str(stopped)
        with pytest.raises(error, match="checkpoint"):
            main(other, progress=False, actors=kept_actors)
    config.algorithm.reward_fns = ["rollout.rewards:arithmetic_reward"]
    config.orchestration.resume = str(stopped)
    resumed = main(config, progress=False, actors=kept_actors)
    assert [h["step"] for h in resumed] == [1, 2, 3]
    counts = Counter(index for _, index, _, _ in trained_record(tmp_path / "run"))
    assert counts == {i: 8 for i in range(16)}  # every prompt trained once, n responses each
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 1, 2, 3]

    config.orchestration.resume, config.orchestration.steps = str(tmp_path / "run" / "checkpoint"), 5
    more = main(config, progress=False, actors=kept_actors)
    assert [h["step"] for h in more] == [4] and more[0]["version"] == 5.0
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 1, 2, 3, 4]

    # resumed from an earlier checkpoint into the same directory: the steps after it are logged anew,
    # once, and the end of the branch it leaves (step 5) is set aside
    config.orchestration.resume = str(tmp_path / "run" / "checkpoints" / "step-2")
    again = main(config, progress=False, actors=kept_actors)
    assert [h["step"] for h in again] == [2, 3, 4]
    assert json.loads((tmp_path / "run" / "checkpoint.abandoned" / "loop_state.json").read_text())["step"] == 5
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 1, 2, 3, 4]
    per_step: dict[tuple[int, int], int] = {}  # the re-trained steps' trajectories once, as their metrics
    for step, index, _, _ in trained_record(tmp_path / "run"):
        per_step[step, index] = per_step.get((step, index), 0) + 1
    assert sorted({s for s, _ in per_step}) == [0, 1, 2, 3, 4] and set(per_step.values()) == {8}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("reward")] == [0, 1, 2, 3, 4]  # the re-logged steps once


@pytest.mark.slow  # two or three Ray runs each (~15-20 s)
@pytest.mark.parametrize("max_staleness", [0, 1])
def test_a_killed_worker_is_restarted_and_loses_nothing(tmp_path, cache, kept_actors, max_staleness):
    kept_actors.close()  # its own processes: Ray restarts the worker with this run's arguments
    _calls["n"] = 0
    config = run_config(tmp_path, "hf")
    config.orchestration.steps, config.orchestration.max_staleness = 4, max_staleness
    config.data.num_prompts = 16  # 4 steps x 4 prompts: one epoch
    config.algorithm.reward_fns = ["tests.orchestration.loop:reward_that_kills_the_rollout_worker"]
    history = main(config, progress=False)
    assert [h["step"] for h in history] == [0, 1, 2, 3]
    assert history[-1]["worker_restarts"] + history[-1]["regenerated_groups"] >= 1
    assert history[-1]["worker_restarts"] <= 1  # one death, however many batches it had in flight
    record = trained_record(tmp_path / "run")
    counts = Counter(index for _, index, _, _ in record)
    assert counts == {i: 8 for i in range(16)}  # every prompt trained once, n responses each
    assert max(h["staleness_max"] for h in history) <= max_staleness


@pytest.mark.slow  # two Ray runs (~20-30 s)
def test_a_restarted_worker_of_kept_processes_samples_with_this_run_s_settings(tmp_path, cache, kept_actors):
    """Ray restarts a dead worker with the arguments it was created with: in processes kept from
    run to run (orchestration.actors.Actors, a sweep), an earlier run's. The restarted process
    refuses to sample until the run takes it back (reset to its own settings, synced): the earlier
    run here sampled 4 responses a prompt, this one 8, and every prompt is trained with 8 after
    the worker is killed between two steps (idle: no call of the run sees it die)."""
    kept_actors.close()  # processes created by the first run below
    earlier = run_config(tmp_path / "earlier", "hf")
    earlier.rollout.n, earlier.orchestration.steps = 4, 1
    main(earlier, progress=False, actors=kept_actors)
    _calls["n"] = 0
    config = run_config(tmp_path, "hf")
    config.orchestration.steps, config.data.num_prompts = 4, 16  # 4 steps x 4 prompts: one epoch
    # synchronous: no batch is in flight while the reward function kills the worker, and it returns
    # once Ray has restarted it (with the earlier run's arguments)
    config.orchestration.max_staleness = 0
    config.algorithm.reward_fns = ["tests.orchestration.loop:reward_that_kills_the_rollout_worker_and_waits_for_its_restart"]
    history = main(config, progress=False, actors=kept_actors)
    counts = Counter(index for _, index, _, _ in trained_record(tmp_path / "run"))
    assert counts == {i: 8 for i in range(16)}  # every prompt trained once, with this run's n
    assert kept_actors.reused and history[-1]["worker_restarts"] == 1  # counted, once


@pytest.mark.slow  # its own Ray processes (~15-20 s)
def test_a_worker_without_restarts_left_ends_the_run_resumably(tmp_path, cache, kept_actors):
    """rollout.max_restarts=0: the worker's death ends the run naming the setting, with a
    checkpoint to resume from (the step's batch queued again)."""
    from orchestration.weight_sync import WorkerLost
    kept_actors.close()
    _calls["n"] = 0
    config = run_config(tmp_path, "hf")
    config.orchestration.steps, config.rollout.max_restarts = 4, 0
    config.algorithm.reward_fns = ["tests.orchestration.loop:reward_that_kills_the_rollout_worker"]
    with pytest.raises(WorkerLost, match=r"Ray will not restart it \(rollout.max_restarts=0"):
        main(config, progress=False)
    state = json.loads((tmp_path / "run" / "checkpoint-interrupted" / "loop_state.json").read_text())
    assert state["step"] == 2 and len(state["in_flight"]) == 1  # step 1 trained; step 2's batch queued again


@pytest.mark.slow  # its own Ray processes (~15-25 s each)
@pytest.mark.parametrize("max_staleness", [0, 1])
def test_a_worker_death_ends_a_broadcast_run_with_the_policy_saved(tmp_path, cache, kept_actors, max_staleness):
    """A broadcast group cannot take in a restarted process, so Ray restarts none: the run stops
    with the reason and the way on (resume, or the object store), its policy saved, the trainer not
    left waiting in a broadcast to the dead worker (gloo reports the lost peer). Synchronous, the
    worker dies idle, with its weight update still to come."""
    from orchestration.weight_sync import WorkerLost
    kept_actors.close()
    _calls["n"] = 0
    config = run_config(tmp_path, "hf")
    config.orchestration.steps, config.orchestration.max_staleness = 4, max_staleness
    config.orchestration.weight_sync = "broadcast"
    config.data.num_prompts = 16
    config.algorithm.reward_fns = ["tests.orchestration.loop:reward_that_kills_the_rollout_worker"]
    with pytest.raises(WorkerLost, match="cannot take in its restarted process.*weight_sync=object_store"):
        main(config, progress=False)
    assert (tmp_path / "run" / "checkpoint-interrupted" / "model.safetensors").is_file()


@pytest.mark.vllm
@pytest.mark.slow  # three Ray runs (~40 s)
def test_a_native_mtp_run_resumes_drafting_with_its_layer(tmp_path, cache, kept_actors):
    """rollout.spec_method=mtp: the MTP layer is the model's (frozen in RL), not the checkpoint's
    (the policy only): a resumed run's workers draft with it and sample the checkpoint's policy
    (logprobs equal to the trainer's)."""
    import shutil

    from mtp.native import MiMoMTPHead
    from orchestration.model_prep import prepare_model
    from policy.models import load_model
    config = run_config(tmp_path, "vllm")
    config.model.name = "tiny_mimo"
    model_dir = tmp_path / "mimo"
    shutil.copytree(prepare_model(config, progress=False), model_dir)
    MiMoMTPHead.for_policy(load_model(model_dir)).save_vllm(model_dir)
    config.model.path = str(model_dir)
    config.rollout.spec_method, config.rollout.num_speculative_tokens = "mtp", 2
    config.orchestration.checkpoint_every = 2
    history = main(config, progress=False, actors=kept_actors)
    assert all(h["spec_drafts"] > 0 for h in history)
    config.orchestration.resume, config.logging.dir = str(tmp_path / "run" / "checkpoints" / "step-2"), str(
        tmp_path / "resumed")
    resumed = main(config, progress=False, actors=kept_actors)
    assert [h["step"] for h in resumed] == [2] and resumed[0]["spec_drafts"] > 0
    assert resumed[0]["logp_mismatch_max"] < 1e-3  # sampled with the checkpoint's policy, not the model's
