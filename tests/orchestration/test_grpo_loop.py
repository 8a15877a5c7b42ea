"""The GRPO loop (sync and bounded-staleness async) through real Ray actors, on both rollout engines:
runs, placement, actor processes, weight-sync transports, speculation. Stops, failures and
resumes are in test_resume.py."""

import json
import os
from collections import Counter

import pyarrow.parquet as pq
import pytest
import ray
import torch

from orchestration.actors import KEEP_FREED_MEMORY, Actors, actor_options, heap_keeps_large_blocks
from orchestration.config import ConfigError, load_config
from orchestration.grpo import cli, main
from tests.orchestration.loop import _calls, check_run, run_config, trained_record

pytestmark = pytest.mark.usefixtures("ray_session")


def test_loop_with_transformers_engine(tmp_path, cache, kept_actors):
    history = main(run_config(tmp_path, "hf"), progress=False, actors=kept_actors)
    check_run(tmp_path, history)
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
    history = main(run_config(tmp_path, "vllm"), progress=False, actors=kept_actors)
    check_run(tmp_path, history)
    # trainer vs vLLM behaviour logprobs of every sampled token, at every step: two float32
    # implementations (typically ~1e-5 apart, rare tokens up to ~4e-4 in the default run);
    # the weight-sync bound of policy.models.sync_tolerance
    assert max(h["logp_mismatch_max"] for h in history) < 1e-3
    assert max(h["sync_probe_diff"] for h in history) < 1e-4
    assert [h["sync_probed"] for h in history] == [0.0, 1.0, 1.0]  # step 0 collects no sync yet


def test_too_few_cpus_is_an_error_not_a_hang(tmp_path, cache):
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    config = run_config(tmp_path, "hf")
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
    from orchestration.actors import bundles
    data = tmp_path / "d.jsonl"
    data.write_text("")
    preset = load_config("qwen3_8gpu", [f"model.path={tmp_path}", f"data.source={data}"])
    assert bundles(preset) == [{"CPU": 1, "GPU": 1}] * 8  # 4 workers, 4 trainer ranks
    assert bundles(run_config(tmp_path, "hf")) == [{"CPU": 1}] * 2
    ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False)
    config = run_config(tmp_path, "hf")
    config.rollout.gpus = 1
    main(config, progress=False)
    placement = json.loads((tmp_path / "run" / "placement.json").read_text())
    assert len(placement["rollout_worker_gpus"][0]) == 1 and placement["trainer_rank_gpus"] == [[]]
    ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)
    config.trainer.device, config.logging.dir = "cuda", str(tmp_path / "run2")  # a GPU worker and a GPU rank
    with pytest.raises(ConfigError, match=r"has 1 GPUs but rollout.gpus=1 x 1 workers \+ 1 x trainer.world_size=1 "
                                          r"\(trainer.device=cuda\) need 2"):
        main(config, progress=False)
    ray.shutdown()


def _memory(actor) -> tuple:
    """In ``actor``'s process: MALLOC_MMAP_THRESHOLD_, whether glibc serves a large block from its
    heap (orchestration.keep_freed_memory) and the job's environment beside the actor's. A CPU
    actor sees no GPU (checked here for every actor these tests start: all are CPU actors)."""
    visible = ray.get(actor.__ray_call__.remote(lambda self: os.environ.get("CUDA_VISIBLE_DEVICES")))
    assert visible == "", visible
    return ray.get(actor.__ray_call__.remote(lambda self: (
        os.environ.get("MALLOC_MMAP_THRESHOLD_"), heap_keeps_large_blocks(), os.environ.get("TOKENIZERS_PARALLELISM"))))


@pytest.mark.slow
def test_cpu_actors_keep_freed_memory_unless_configured_not_to(tmp_path, cache, kept_actors):
    """Without orchestration.keep_freed_memory glibc maps a large block (its default); switching the
    setting starts new processes (the environment is read at start). A GPU actor never gets it.
    The default's side: test_loop_with_transformers_engine."""
    config = run_config(tmp_path, "hf")
    config.orchestration.steps = 1
    assert actor_options(config, 0)["runtime_env"]["env_vars"]["CUDA_VISIBLE_DEVICES"] == ""
    assert not actor_options(config, 1)  # a GPU actor: Ray sets its CUDA_VISIBLE_DEVICES
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
    config = run_config(tmp_path, "hf")
    config.rollout.num_workers = 2
    config.algorithm.prompts_per_step = 5  # uneven shards: 3 + 2 prompts
    history = main(config, progress=False)
    check_run(tmp_path, history)
    assert all(h["rollout_sequences"] == 5 * config.rollout.n for h in history)


def test_cli_reports_config_errors_without_a_traceback(capsys):
    assert cli(["--config", "tiny", "rollout.n=1"]) == 2
    assert "rollout.n=1" in capsys.readouterr().err


@pytest.mark.parametrize("max_staleness", [1, 2])
def test_async_loop_respects_the_staleness_bound(tmp_path, cache, kept_actors, max_staleness):
    config = run_config(tmp_path, "hf")
    config.orchestration.max_staleness = max_staleness
    config.orchestration.adaptive_in_flight = False  # all max_staleness + 1 batches in flight
    config.orchestration.steps = 5
    history = main(config, progress=False, actors=kept_actors)
    assert [h["staleness_max"] for h in history] == [min(s, max_staleness) for s in range(5)]
    assert [h["in_flight"] for h in history] == [max_staleness + 1] * 5
    assert history[-1]["regenerated_groups"] == 0


def test_worker_metrics_merge_parallel_workers_and_add_a_resample_after_them():
    """Two workers in parallel: counts add, seconds are the slower's. A re-sample of stale groups
    after them adds its tokens and seconds (the rates follow), and the worst diff stays."""
    from orchestration.grpo import merge_worker_metrics
    w = [{"rollout_s": 2.0, "rollout_tokens": 100.0, "rollout_sequences": 10.0, "rollout_truncated": 1.0,
          "sync_probe_diff": 1e-6},
         {"rollout_s": 1.0, "rollout_tokens": 60.0, "rollout_sequences": 10.0, "rollout_truncated": 0.0,
          "sync_probe_diff": 3e-6}]
    m = merge_worker_metrics(w)
    assert (m["rollout_s"], m["rollout_tokens"], m["rollout_tok_s"], m["response_len"]) == (2.0, 160.0, 80.0, 8.0)
    again = [{"rollout_s": 1.0, "rollout_tokens": 40.0, "rollout_sequences": 5.0, "rollout_truncated": 4.0,
              "sync_probe_diff": 2e-6}]
    m = merge_worker_metrics(w, again)
    assert (m["rollout_s"], m["rollout_tokens"], m["rollout_sequences"]) == (3.0, 200.0, 25.0)
    assert m["rollout_tok_s"] == pytest.approx(200 / 3) and m["truncated_frac"] == pytest.approx(5 / 25)
    assert m["sync_probe_diff"] == 3e-6


def test_in_flight_depth_covers_one_update_within_the_bound():
    from orchestration.grpo import in_flight_depth
    assert in_flight_depth(2, rollout_s=0.1, update_s=0.3) == 3  # trainer-bound: all the bound allows
    assert in_flight_depth(5, rollout_s=0.1, update_s=0.25) == 4  # 1 consumed + 3 sampled during the update
    assert in_flight_depth(3, rollout_s=0.4, update_s=0.1) == 2  # rollout-bound: one queued is enough
    assert in_flight_depth(0, rollout_s=0.1, update_s=1.0) == 1  # synchronous stays synchronous


@pytest.mark.vllm
def test_broadcast_weight_sync_gives_the_object_store_run(tmp_path, cache, kept_actors):
    """orchestration.weight_sync=broadcast (a gloo group of trainer and worker here, NCCL on GPUs)
    runs the same as the object store, async included: the same samples and rewards, each update
    verified in the vLLM engine, the same final policy to the bit; the worker's broadcast buffers
    hold that policy after the run (they carried it), and a kept worker drops them for the next run."""
    from safetensors.torch import load_file

    def run(mode):
        cfg = run_config(tmp_path / mode, "vllm")
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
    check_run(tmp_path / "broadcast", broadcast)
    assert [h["reward"] for h in broadcast] == [h["reward"] for h in store]
    assert [h["staleness_max"] for h in broadcast] == [h["staleness_max"] for h in store]
    assert max(h["staleness_max"] for h in broadcast) == 1  # the trainer trained on samples of an older policy
    assert trained_record(tmp_path / "broadcast" / "run") == trained_record(tmp_path / "object_store" / "run")
    assert all(h["sync_bytes"] > 0 and h["sync_probed"] == 1 and h["sync_probe_diff"] < 1e-4 for h in broadcast[1:])
    other = load_file(tmp_path / "object_store" / "run" / "checkpoint" / "model.safetensors")
    assert final.keys() == other.keys() and all(torch.equal(final[k], other[k]) for k in final)


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
    config = run_config(tmp_path, "vllm")
    policy = load_model(prepare_model(config, progress=False))
    head = EagleHead.for_policy(policy) if form == "eagle" else Eagle3Head.for_policy(
        policy, torch.arange(48), parallel=True, mask_token_id=policy.config.pad_token_id)
    config.rollout.draft_model = str(head.save_vllm(tmp_path / "drafter"))
    config.rollout.num_speculative_tokens = 2
    config.mtp.maintain, config.mtp.k = True, 2
    config.orchestration.checkpoint_every = 2
    history = main(config, progress=False, actors=kept_actors)
    check_run(tmp_path, history)
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
    """Runs sharing one orchestration.actors.Actors run in the same processes with a new engine and
    trainer: the same config and seed give the same run. A worker that Ray restarts comes back
    with the first run's arguments (rollout.n=8 here) and must be reset to the current run's
    (n=4) before it samples again: every trained prompt then has 4 responses. (The transformers
    engine keeps this cheap; a vLLM engine shut down and built again in one process is tested in
    tests/rollout/test_vllm_engine.py.) Kept actors of a Ray session that has ended are not
    reused: the next run starts its own in the new session."""
    kept_actors.close()  # the module's kept processes: this test starts and counts its own
    actors = Actors()
    try:
        first = main(run_config(tmp_path / "a", "hf"), progress=False, actors=actors)
        pids = _actor_pids()
        assert len(pids["RolloutWorker"]) == 1 and len(pids["TrainerActor"]) == 1
        again = main(run_config(tmp_path / "b", "hf"), progress=False, actors=actors)
        assert actors.reused and _actor_pids() == pids
        assert [h["reward"] for h in again] == [h["reward"] for h in first]
        assert trained_record(tmp_path / "b" / "run") == trained_record(tmp_path / "a" / "run")

        _calls["n"] = 0
        config = run_config(tmp_path / "c", "hf")
        config.rollout.n, config.data.num_prompts = 4, 12  # 3 steps x 4 prompts: one epoch
        config.algorithm.reward_fns = ["tests.orchestration.loop:reward_that_kills_the_rollout_worker"]
        history = main(config, progress=False, actors=actors)
        assert history[-1]["worker_restarts"] >= 1
        assert _actor_pids()["TrainerActor"] == pids["TrainerActor"]
        assert _actor_pids()["RolloutWorker"] != pids["RolloutWorker"]  # restarted by Ray
        counts = Counter(index for _, index, _, _ in trained_record(tmp_path / "c" / "run"))
        assert counts == {i: 4 for i in range(12)}

        ray.shutdown()  # kept actors of an ended session: the next run starts its own in a new one
        history = main(run_config(tmp_path / "d", "hf"), progress=False, actors=actors)
        assert not actors.reused and [h["step"] for h in history] == [0, 1, 2]
    finally:
        actors.close()
