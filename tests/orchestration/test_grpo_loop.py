"""The GRPO loop (sync and bounded-staleness async) through real Ray actors, on both rollout engines."""

import copy
import json
import os
import pyarrow.parquet as pq
import torch
import pytest
import ray

from orchestration.config import ConfigError, load_config
from orchestration.data import DataError
from orchestration.grpo import (KEEP_FREED_MEMORY, Actors, actor_options, cli, heap_keeps_large_blocks, in_flight_depth,
                                main)
from orchestration.metrics import read_metrics


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def kept_actors():
    """Actor processes kept from one run of this module to the next, as a sweep keeps them
    (orchestration.grpo.Actors), for the runs that do not test start-up or a restart with a run's
    own arguments: each skips ~15 s of process start and imports. A run that needs its own
    processes closes these first (on 2 CPUs their placement group would leave it none)."""
    kept = Actors()
    yield kept
    kept.close()


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLACCEL_CACHE", str(tmp_path / "cache"))


def _config(tmp_path, backend):
    # every response through the trainer: logp_mismatch_max then compares every sampled token's
    # behaviour logprob with the trainer's (a skipped zero-advantage response is not compared)
    return load_config("tiny", [f"rollout.backend={backend}", "orchestration.steps=3", "algorithm.prompts_per_step=4",
                                "model.warm_start_steps=20", "data.num_prompts=64", f"logging.dir={tmp_path / 'run'}",
                                "trainer.skip_zero_advantage=false"])


def _check_run(tmp_path, history):
    assert [h["step"] for h in history] == [0, 1, 2]
    assert read_metrics(tmp_path / "run") == [{k: float(v) if k != "step" else v for k, v in h.items()}
                                               for h in history]
    assert [h["version"] for h in history] == [1.0, 2.0, 3.0]
    for h in history:
        assert 0.0 <= h["reward"] <= 1.0 and h["rollout_tokens"] > 0 and h["update_s"] > 0
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "tensorboard").is_dir()


def test_loop_with_transformers_engine(tmp_path, cache, kept_actors):
    history = main(_config(tmp_path, "hf"), progress=False, actors=kept_actors)
    _check_run(tmp_path, history)
    assert max(h["logp_mismatch_max"] for h in history) < 1e-4
    for actor in (*kept_actors.workers, *kept_actors.trainers):  # orchestration.keep_freed_memory (default)
        assert _memory(actor) == (KEEP_FREED_MEMORY["MALLOC_MMAP_THRESHOLD_"], True, "false")
    log = pq.read_table(tmp_path / "run" / "trajectories.parquet").to_pylist()
    assert len(log) == 3 * 4 * 8  # steps x prompts x n: every trained response, once
    assert [r["step"] for r in log] == sorted(r["step"] for r in log)
    assert all(len(r["response_ids"]) == len(r["behaviour_logprobs"]) for r in log)
    by_step = {s: sum(r["reward"] for r in log if r["step"] == s) / 32 for s in range(3)}
    assert by_step == pytest.approx({h["step"]: h["reward"] for h in history})


@pytest.mark.vllm
def test_loop_with_vllm_engine(tmp_path, cache, kept_actors):
    history = main(_config(tmp_path, "vllm"), progress=False, actors=kept_actors)
    _check_run(tmp_path, history)
    # trainer vs vLLM behaviour logprobs of every sampled token, at every step: two float32
    # implementations (typically ~1e-5 apart, rare tokens up to ~4e-4 in the default run);
    # the weight-sync bound of policy.models.sync_tolerance
    assert max(h["logp_mismatch_max"] for h in history) < 1e-3
    assert max(h["sync_probe_diff"] for h in history) < 1e-4


def test_too_few_cpus_is_an_error_not_a_hang(tmp_path, cache):
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    config = _config(tmp_path, "hf")
    config.rollout.num_workers = 2
    with pytest.raises(ConfigError, match="has 2 CPUs but rollout.num_workers=2 workers"):
        main(config, progress=False)
    ray.shutdown()


@pytest.mark.slow  # its own Ray session and actor processes (40-47 s on a Zen 3 core pair)
def test_each_actor_gets_its_gpus_from_ray_and_too_few_is_an_error(tmp_path, cache):
    """Ray shows an actor's process only the GPUs it asked for (a CUDA engine or trainer that asks
    for none finds none), so every actor asks for its own: rollout.gpus per worker, one per trainer
    rank on a CUDA trainer. Here on Ray's declared (not real) GPUs, with the transformers engine,
    which does not use them; a cluster without enough GPUs is an error naming the settings."""
    from orchestration.grpo import bundles
    data = tmp_path / "d.jsonl"
    data.write_text("")
    preset = load_config("qwen3_8gpu", [f"model.path={tmp_path}", f"data.source={data}"])
    assert bundles(preset) == [{"CPU": 1, "GPU": 1}] * 8  # 4 workers, 4 trainer ranks
    assert bundles(_config(tmp_path, "hf")) == [{"CPU": 1}] * 2
    ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False)
    config = _config(tmp_path, "hf")
    config.rollout.gpus = 1
    main(config, progress=False)
    placement = json.loads((tmp_path / "run" / "placement.json").read_text())
    assert len(placement["rollout_worker_gpus"][0]) == 1 and placement["trainer_rank_gpus"] == [[]]
    config.rollout.gpus, config.logging.dir = 3, str(tmp_path / "run3")
    with pytest.raises(ConfigError, match="has 2 GPUs but rollout.gpus=3"):
        main(config, progress=False)
    ray.shutdown()


def _memory(actor) -> tuple:
    """In ``actor``'s process: MALLOC_MMAP_THRESHOLD_, whether glibc serves a large block from its
    heap (orchestration.keep_freed_memory) and the job's environment beside the actor's."""
    return ray.get(actor.__ray_call__.remote(lambda self: (
        os.environ.get("MALLOC_MMAP_THRESHOLD_"), heap_keeps_large_blocks(), os.environ.get("TOKENIZERS_PARALLELISM"))))


@pytest.mark.slow
def test_cpu_actors_keep_freed_memory_unless_configured_not_to(tmp_path, cache, kept_actors):
    """Without orchestration.keep_freed_memory glibc maps a large block (its default); switching the
    setting starts new processes (the environment is read at start). A GPU actor never gets it.
    The default's side: test_loop_with_transformers_engine."""
    config = _config(tmp_path, "hf")
    config.orchestration.steps = 1
    assert actor_options(config, 0) and not actor_options(config, 1)
    config.orchestration.keep_freed_memory = False
    main(config, progress=False, actors=kept_actors)
    for actor in (*kept_actors.workers, *kept_actors.trainers):
        assert _memory(actor) == (None, False, "false")
    config.orchestration.keep_freed_memory = True  # the other tests' setting: their kept actors last
    first = (tmp_path / "run" / "metrics.jsonl").read_text()
    main(config, progress=False, actors=kept_actors)
    # the same logging.dir: the run above is kept, this one logs beside it
    assert config.logging.dir == str(tmp_path / "run-2") and (tmp_path / "run-2" / "metrics.jsonl").is_file()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == first
    assert not kept_actors.reused
    for actor in (*kept_actors.workers, *kept_actors.trainers):
        assert _memory(actor) == (KEEP_FREED_MEMORY["MALLOC_MMAP_THRESHOLD_"], True, "false")


@pytest.mark.slow  # its own Ray session and actor processes (40-47 s on a Zen 3 core pair)
def test_loop_with_two_rollout_workers(tmp_path, cache):
    ray.shutdown()  # main() starts a local Ray with a CPU slot for each actor
    config = _config(tmp_path, "hf")
    config.rollout.num_workers = 2
    config.algorithm.prompts_per_step = 5  # uneven shards: 3 + 2 prompts
    history = main(config, progress=False)
    _check_run(tmp_path, history)
    assert all(h["rollout_sequences"] == 5 * config.rollout.n for h in history)


def test_cli_reports_config_errors_without_a_traceback(capsys):
    assert cli(["--config", "tiny", "rollout.n=1"]) == 2
    assert "rollout.n=1" in capsys.readouterr().err


def test_failed_run_keeps_the_policy_and_names_the_sample(tmp_path, cache, kept_actors):
    from rollout.rewards import RewardError
    config = _config(tmp_path, "hf")
    config.algorithm.reward_fns = ["tests.orchestration.test_grpo_loop:reward_that_breaks"]
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
    config = _config(tmp_path, "hf")
    config.trainer.lr, config.trainer.mini_batches = 1e10, mini_batches
    config.algorithm.reward_fns = ["tests.orchestration.test_grpo_loop:reward_by_length"]  # a gradient at once
    stopped = tmp_path / "run" / "checkpoint-interrupted"
    if mini_batches == 1:
        with pytest.raises(PolicyDiverged, match="version 1 gives non-finite probabilities.*diverged.*trainer.lr"):
            main(config, progress=False, actors=kept_actors)
    else:
        with pytest.raises(FloatingPointError, match="mini-batch 2 of 2; the 1 before it were applied"):
            main(config, progress=False, actors=kept_actors)
        assert (stopped / "model.safetensors").is_file() and not (stopped / "loop_state.json").exists()


def test_an_update_refused_before_anything_was_applied_stays_resumable(tmp_path, cache, kept_actors):
    """Async (max_staleness=1): step 1 trains on samples of version 0 with the overflowing weights
    of version 1, and the trainer refuses its first (only) mini-batch (UpdateNotApplied: here its
    gradient norm overflows). Nothing
    was applied, so the run stops with a checkpoint at step 1: its batch and the one queued behind
    it sampled again on resume, no trajectories logged for it, step 0's metrics kept."""
    from policy.distributed import UpdateNotApplied
    config = _config(tmp_path, "hf")
    config.trainer.lr, config.orchestration.max_staleness = 1e10, 1
    config.orchestration.adaptive_in_flight = False  # 2 batches in flight
    config.algorithm.reward_fns = ["tests.orchestration.test_grpo_loop:reward_by_length"]
    with pytest.raises(UpdateNotApplied, match=r"non-finite (loss|gradient norm).*policy version 1.*mini-batch 1 of 1"):
        main(config, progress=False, actors=kept_actors)
    state = json.loads((tmp_path / "run" / "checkpoint-interrupted" / "loop_state.json").read_text())
    assert state["step"] == 1 and state["version"] == 1 and len(state["in_flight"]) == 2
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0]
    assert sorted({r[0] for r in _trained_record(tmp_path / "run")}) == [0]


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
        main(_config(tmp_path, "hf"), progress=False, actors=kept_actors)
    state = json.loads((tmp_path / "run" / "checkpoint-interrupted" / "loop_state.json").read_text())
    assert state["step"] == 2 and state["version"] == 2
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 1]
    assert sorted({r[0] for r in _trained_record(tmp_path / "run")}) == [0, 1]


def reward_that_breaks(prompts, completions, **_):
    raise RuntimeError("judge unavailable")


@pytest.mark.parametrize("max_staleness", [1, 2])
def test_async_loop_respects_the_staleness_bound(tmp_path, cache, kept_actors, max_staleness):
    config = _config(tmp_path, "hf")
    config.orchestration.max_staleness = max_staleness
    config.orchestration.adaptive_in_flight = False  # all max_staleness + 1 batches in flight
    config.orchestration.steps = 5
    history = main(config, progress=False, actors=kept_actors)
    assert [h["staleness_max"] for h in history] == [min(s, max_staleness) for s in range(5)]
    assert [h["in_flight"] for h in history] == [max_staleness + 1] * 5
    assert history[-1]["regenerated_groups"] == 0


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


def test_in_flight_depth_covers_one_update_within_the_bound():
    from orchestration.grpo import in_flight_depth
    assert in_flight_depth(2, rollout_s=0.1, update_s=0.3) == 3  # trainer-bound: all the bound allows
    assert in_flight_depth(5, rollout_s=0.1, update_s=0.25) == 4  # 1 consumed + 3 sampled during the update
    assert in_flight_depth(3, rollout_s=0.4, update_s=0.1) == 2  # rollout-bound: one queued is enough
    assert in_flight_depth(0, rollout_s=0.1, update_s=1.0) == 1  # synchronous stays synchronous


def _trained_record(*run_dirs):
    """(step, prompt index, completion, reward) of every trained response, from the Parquet logs."""
    rows = [r for d in run_dirs for f in sorted(d.glob("trajectories*.parquet")) for r in pq.read_table(f).to_pylist()]
    return sorted((r["step"], r["prompt_index"], r["completion"], r["reward"]) for r in rows)


@pytest.mark.vllm
def test_broadcast_weight_sync_gives_the_object_store_run(tmp_path, cache, kept_actors):
    """orchestration.weight_sync=broadcast (a gloo group of trainer and worker here, NCCL on GPUs)
    runs the same as the object store, async included: the same samples and rewards, each update
    verified in the vLLM engine, the same final policy to the bit; the worker's broadcast buffers
    hold that policy after the run (they carried it), and a kept worker drops them for the next run."""
    from safetensors.torch import load_file

    def run(mode):
        cfg = _config(tmp_path / mode, "vllm")
        cfg.orchestration.weight_sync, cfg.orchestration.max_staleness = mode, 1
        cfg.orchestration.adaptive_in_flight = False  # batches in flight by the bound, not by timings
        return main(cfg, progress=False, actors=kept_actors)

    def received(worker):
        return ray.get(worker.__ray_call__.remote(lambda self: self._weight_buffers))

    broadcast = run("broadcast")
    final = load_file(tmp_path / "broadcast" / "run" / "checkpoint" / "model.safetensors")
    buffers = received(kept_actors.workers[0])
    assert all(torch.equal(buffers[k], final[k]) for k in final)
    store = run("object_store")
    assert received(kept_actors.workers[0]) is None
    _check_run(tmp_path / "broadcast", broadcast)
    assert [h["reward"] for h in broadcast] == [h["reward"] for h in store]
    assert [h["staleness_max"] for h in broadcast] == [h["staleness_max"] for h in store]
    assert max(h["staleness_max"] for h in broadcast) == 1  # the trainer trained on samples of an older policy
    assert _trained_record(tmp_path / "broadcast" / "run") == _trained_record(tmp_path / "object_store" / "run")
    assert all(h["sync_bytes"] > 0 and h["sync_probe_diff"] < 1e-4 for h in broadcast[1:])
    other = load_file(tmp_path / "object_store" / "run" / "checkpoint" / "model.safetensors")
    assert final.keys() == other.keys() and all(torch.equal(final[k], other[k]) for k in final)


@pytest.mark.slow  # two or three Ray runs each (~15-20 s)
@pytest.mark.parametrize("max_staleness", [0, 1])
def test_checkpoint_and_resume_lose_and_double_nothing(tmp_path, cache, kept_actors, max_staleness):
    def config(run):
        cfg = _config(tmp_path / run, "hf")
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

    first_half = [r for r in _trained_record(tmp_path / "straight" / "run") if r[0] < 3]
    combined = first_half + _trained_record(tmp_path / "resumed" / "run")
    counts: dict[int, int] = {}
    for _, index, _, _ in combined:
        counts[index] = counts.get(index, 0) + 1
    assert counts == {i: 2 * 8 for i in range(12)}  # every prompt once per epoch, n responses each
    straight_record = _trained_record(tmp_path / "straight" / "run")
    assert [(s, i) for s, i, _, _ in combined] == [(s, i) for s, i, _, _ in straight_record]
    if max_staleness == 0:  # synchronous and seeded: the resumed run is the straight run, exactly
        assert combined == straight_record
        assert [h["reward"] for h in straight[3:]] == [h["reward"] for h in resumed]


_calls = {"n": 0}


def reward_that_kills_the_rollout_worker(prompts, completions, answer, **kw):
    """Scores normally; on its second call SIGKILLs this Ray session's rollout worker processes
    (children of its raylet, so that a concurrent run elsewhere on the machine is untouched)."""
    import os
    import signal

    import psutil
    _calls["n"] += 1
    if _calls["n"] == 2:
        raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
        for proc in psutil.Process(raylet).children():
            cmdline = proc.cmdline()
            if cmdline and cmdline[0].startswith("ray::RolloutWorker"):
                os.kill(proc.pid, signal.SIGKILL)
    from rollout.rewards import arithmetic_reward
    return arithmetic_reward(prompts, completions, answer)


def reward_by_length(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def reward_that_breaks_from_its_second_call(prompts, completions, answer, **kw):
    _calls["n"] += 1
    if _calls["n"] >= 2:
        raise RuntimeError("judge unavailable")
    from rollout.rewards import arithmetic_reward
    return arithmetic_reward(prompts, completions, answer)


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
    config = _config(tmp_path, "hf")
    config.orchestration.steps, config.orchestration.max_staleness = 4, 1
    config.orchestration.adaptive_in_flight = False  # 2 batches in flight
    config.orchestration.checkpoint_every = 2
    config.data.num_prompts = 16  # 4 steps x 4 prompts: one epoch
    config.algorithm.reward_fns = ["tests.orchestration.test_grpo_loop:reward_that_breaks_from_its_second_call"]
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
    counts: dict[int, int] = {}
    for _, index, _, _ in _trained_record(tmp_path / "run"):
        counts[index] = counts.get(index, 0) + 1
    assert counts == {i: 8 for i in range(16)}  # every prompt trained once, n responses each
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 1, 2, 3]

    config.orchestration.resume, config.orchestration.steps = str(tmp_path / "run" / "checkpoint"), 5
    more = main(config, progress=False, actors=kept_actors)
    assert [h["step"] for h in more] == [4] and more[0]["version"] == 5.0
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 1, 2, 3, 4]

    # resumed from an earlier checkpoint into the same directory: the steps after it are logged anew, once
    config.orchestration.resume = str(tmp_path / "run" / "checkpoints" / "step-2")
    again = main(config, progress=False, actors=kept_actors)
    assert [h["step"] for h in again] == [2, 3, 4]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 1, 2, 3, 4]
    per_step: dict[tuple[int, int], int] = {}  # the re-trained steps' trajectories once, as their metrics
    for step, index, _, _ in _trained_record(tmp_path / "run"):
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
    config = _config(tmp_path, "hf")
    config.orchestration.steps, config.orchestration.max_staleness = 4, max_staleness
    config.data.num_prompts = 16  # 4 steps x 4 prompts: one epoch
    config.algorithm.reward_fns = ["tests.orchestration.test_grpo_loop:reward_that_kills_the_rollout_worker"]
    history = main(config, progress=False)
    assert [h["step"] for h in history] == [0, 1, 2, 3]
    assert history[-1]["worker_restarts"] + history[-1]["regenerated_groups"] >= 1
    assert history[-1]["worker_restarts"] <= 1  # one death, however many batches it had in flight
    record = _trained_record(tmp_path / "run")
    counts: dict[int, int] = {}
    for _, index, _, _ in record:
        counts[index] = counts.get(index, 0) + 1
    assert counts == {i: 8 for i in range(16)}  # every prompt trained once, n responses each
    assert max(h["staleness_max"] for h in history) <= max_staleness


@pytest.mark.slow  # its own Ray processes (~15-20 s)
def test_a_worker_without_restarts_left_ends_the_run_resumably(tmp_path, cache, kept_actors):
    """rollout.max_restarts=0: the worker's death ends the run naming the setting, with a
    checkpoint to resume from (the step's batch queued again)."""
    from orchestration.weight_sync import WorkerLost
    kept_actors.close()
    _calls["n"] = 0
    config = _config(tmp_path, "hf")
    config.orchestration.steps, config.rollout.max_restarts = 4, 0
    config.algorithm.reward_fns = ["tests.orchestration.test_grpo_loop:reward_that_kills_the_rollout_worker"]
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
    config = _config(tmp_path, "hf")
    config.orchestration.steps, config.orchestration.max_staleness = 4, max_staleness
    config.orchestration.weight_sync = "broadcast"
    config.data.num_prompts = 16
    config.algorithm.reward_fns = ["tests.orchestration.test_grpo_loop:reward_that_kills_the_rollout_worker"]
    with pytest.raises(WorkerLost, match="cannot take in its restarted process.*weight_sync=object_store"):
        main(config, progress=False)
    assert (tmp_path / "run" / "checkpoint-interrupted" / "model.safetensors").is_file()


@pytest.mark.vllm
@pytest.mark.parametrize("form", ["eagle", "peagle"])
def test_speculative_loop_with_a_maintained_drafter(tmp_path, cache, kept_actors, form):
    """Rollout with an EAGLE drafter in vLLM (or a P-EAGLE head over 48 of the 128 tokens under vLLM's
    parallel drafting: the EAGLE-3 form with fc and a mask state, the superset of what a drafter sync
    carries), the head maintained by the trainer and synced with the policy (verified), acceptance
    reported per step, the head saved in checkpoints."""
    from mtp.heads import Eagle3Head, EagleHead, load_head
    from orchestration.model_prep import prepare_model
    from policy.models import load_model
    config = _config(tmp_path, "vllm")
    policy = load_model(prepare_model(config, progress=False))
    head = EagleHead.for_policy(policy) if form == "eagle" else Eagle3Head.for_policy(
        policy, torch.arange(48), parallel=True, mask_token_id=policy.config.pad_token_id)
    config.rollout.draft_model = str(head.save_vllm(tmp_path / "drafter"))
    config.rollout.num_speculative_tokens = 2
    config.mtp.maintain, config.mtp.k = True, 2
    config.orchestration.checkpoint_every = 2
    history = main(config, progress=False, actors=kept_actors)
    _check_run(tmp_path, history)
    for h in history:
        assert h["spec_drafts"] > 0 and 0.0 <= h["spec_acceptance_pos1"] <= 1.0 and h["spec_mean_accepted_len"] >= 1.0
        assert 0.0 < h["head_alpha1"] <= 1.0
        # the policy's mass on the draft vocabulary: all of it for the EAGLE head, part for 48 of 128 ids
        assert h["head_draft_coverage"] == pytest.approx(1.0) if form == "eagle" else 0.0 < h["head_draft_coverage"] < 1.0
    assert max(h["logp_mismatch_max"] for h in history) < 1e-3  # speculation leaves the logprobs exact
    ckpt = tmp_path / "run" / "checkpoints" / "step-2"
    saved = load_head(ckpt / "drafter")
    assert type(saved) is type(head) and saved.parallel == (form == "peagle")
    assert not torch.equal(saved.layers[0].mlp.down_proj.weight, head.layers[0].mlp.down_proj.weight)  # it moved
    if form == "peagle":
        assert not torch.equal(saved.mask_hidden, head.mask_hidden)
    assert (ckpt / "drafter_optimizer.pt").is_file()
    if form == "peagle":  # resuming goes through the same load_head / vLLM paths: tested once, below
        return
    # resume: the trainer restores head + head optimizer, the workers draft with the saved head
    config.orchestration.resume, config.logging.dir = str(ckpt), str(tmp_path / "resumed")
    resumed = main(config, progress=False, actors=kept_actors)
    assert [h["step"] for h in resumed] == [2] and resumed[0]["spec_drafts"] > 0


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
    config = _config(tmp_path, "vllm")
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


def _actor_pids() -> dict[str, set[int]]:
    """This Ray session's rollout-worker and trainer processes (children of its raylet)."""
    import psutil
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    pids: dict[str, set[int]] = {"RolloutWorker": set(), "TrainerActor": set()}
    for proc in psutil.Process(raylet).children():
        cmdline = proc.cmdline()
        for name in pids:
            if cmdline and cmdline[0].startswith(f"ray::{name}"):
                pids[name].add(proc.pid)
    return pids


@pytest.mark.slow  # three Ray runs, the later two in the first one's processes (~35 s)
def test_kept_actors_run_again_the_same_and_a_restarted_worker_takes_the_new_settings(tmp_path, cache, kept_actors):
    """Runs sharing one orchestration.grpo.Actors run in the same processes with a new engine and
    trainer: the same config and seed give the same run. A worker that Ray restarts comes back
    with the first run's arguments (rollout.n=8 here) and must be reset to the current run's
    (n=4) before it samples again: every trained prompt then has 4 responses. (The transformers
    engine keeps this cheap; a vLLM engine shut down and built again in one process is tested in
    tests/rollout/test_vllm_engine.py.) Kept actors of a Ray session that has ended are not
    reused: the next run starts its own in the new session."""
    kept_actors.close()  # the module's kept processes: this test starts and counts its own
    actors = Actors()
    try:
        first = main(_config(tmp_path / "a", "hf"), progress=False, actors=actors)
        pids = _actor_pids()
        assert len(pids["RolloutWorker"]) == 1 and len(pids["TrainerActor"]) == 1
        again = main(_config(tmp_path / "b", "hf"), progress=False, actors=actors)
        assert actors.reused and _actor_pids() == pids
        assert [h["reward"] for h in again] == [h["reward"] for h in first]
        assert _trained_record(tmp_path / "b" / "run") == _trained_record(tmp_path / "a" / "run")

        _calls["n"] = 0
        config = _config(tmp_path / "c", "hf")
        config.rollout.n, config.data.num_prompts = 4, 12  # 3 steps x 4 prompts: one epoch
        config.algorithm.reward_fns = ["tests.orchestration.test_grpo_loop:reward_that_kills_the_rollout_worker"]
        history = main(config, progress=False, actors=actors)
        assert history[-1]["worker_restarts"] >= 1
        assert _actor_pids()["TrainerActor"] == pids["TrainerActor"]
        assert _actor_pids()["RolloutWorker"] != pids["RolloutWorker"]  # restarted by Ray
        counts: dict[int, int] = {}
        for _, index, _, _ in _trained_record(tmp_path / "c" / "run"):
            counts[index] = counts.get(index, 0) + 1
        assert counts == {i: 4 for i in range(12)}

        ray.shutdown()  # kept actors of an ended session: the next run starts its own in a new one
        history = main(_config(tmp_path / "d", "hf"), progress=False, actors=actors)
        assert not actors.reused and [h["step"] for h in history] == [0, 1, 2]
    finally:
        actors.close()
