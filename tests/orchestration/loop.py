"""Shared by the GRPO-loop tests (test_grpo_loop.py, test_resume.py): a small run's config and
checks, the trajectory log read back, and reward functions the runs import by path
(``tests.orchestration.loop:<name>``)."""

import pyarrow.parquet as pq
import ray

from orchestration.config import load_config
from orchestration.metrics import read_metrics


def run_config(tmp_path, backend):
    # every response through the trainer: logp_mismatch_max then compares every sampled token's
    # behaviour logprob with the trainer's (a skipped zero-advantage response is not compared);
    # every weight sync probed, so that each sync's sync_probe_diff is a measured one
    return load_config("tiny", [f"rollout.backend={backend}", "orchestration.steps=3", "algorithm.prompts_per_step=4",
                                "model.warm_start_steps=20", "data.num_prompts=64", f"logging.dir={tmp_path / 'run'}",
                                "trainer.skip_zero_advantage=false", "rollout.sync_probe_every=1"])


def check_run(tmp_path, history):
    assert [h["step"] for h in history] == [0, 1, 2]
    assert read_metrics(tmp_path / "run") == [{k: float(v) if k != "step" else v for k, v in h.items()}
                                               for h in history]
    assert [h["version"] for h in history] == [1.0, 2.0, 3.0]
    for h in history:
        assert 0.0 <= h["reward"] <= 1.0 and h["rollout_tokens"] > 0 and h["update_s"] > 0
    assert (tmp_path / "run" / "checkpoint" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "tensorboard").is_dir()


def trained_record(*run_dirs):
    """(step, prompt index, completion, reward) of every trained response, from the Parquet logs."""
    rows = [r for d in run_dirs for f in sorted(d.glob("trajectories*.parquet")) for r in pq.read_table(f).to_pylist()]
    return sorted((r["step"], r["prompt_index"], r["completion"], r["reward"]) for r in rows)


_calls = {"n": 0}


def reward_that_breaks(prompts, completions, **_):
    raise RuntimeError("judge unavailable")


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


def reward_that_kills_the_rollout_worker_and_waits_for_its_restart(prompts, completions, answer, **kw):
    """As :func:`reward_that_kills_the_rollout_worker`, then waits (up to 60 s) until Ray has the
    worker alive again in a new process: the run's next call reaches the restarted process
    without ever seeing the death (a worker dying idle, between two calls)."""
    import time

    from ray._private.state import actors
    rewards = reward_that_kills_the_rollout_worker(prompts, completions, answer, **kw)
    if _calls["n"] == 2:
        deadline = time.monotonic() + 60
        while not any(a["ActorClassName"] == "RolloutWorker" and a["NumRestarts"] >= 1 and a["State"] == "ALIVE"
                      for a in actors().values()):
            assert time.monotonic() < deadline, "Ray did not restart the killed rollout worker within 60 s"
            time.sleep(0.1)
    return rewards


def reward_by_length(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def reward_that_breaks_from_its_second_call(prompts, completions, answer, **kw):
    _calls["n"] += 1
    if _calls["n"] >= 2:
        raise RuntimeError("judge unavailable")
    from rollout.rewards import arithmetic_reward
    return arithmetic_reward(prompts, completions, answer)
