"""GRPO on Ray: ``python -m orchestration.grpo --config configs/tiny.yaml [a.b=c ...]``.

One step of the synchronous loop (``orchestration.max_staleness=0``):

    rows --RolloutWorker.generate--> groups (n responses, behaviour logprobs, version v)
         --reward fns-->             rewarded groups
         --TrainerActor.step-->      policy v+1
         --weight sync-->            RolloutWorker (checksum + probe verified)

Weights go trainer -> Ray object store -> worker without passing through this driver, or by a
torch.distributed broadcast (orchestration/weight_sync.py); the Ray processes and their placement
are orchestration/actors.py.
Metrics go to ``<logging.dir>/metrics.jsonl``, TensorBoard, Ray gauges (the dashboard) and
a console progress bar; every trained response to ``<logging.dir>/trajectories.parquet`` (from
each periodic checkpoint on, ``trajectories.from-step<N>.parquet``).
The final policy is saved to ``<logging.dir>/checkpoint``.
Embed it with ``orchestration.grpo.main(config)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
import uuid
from collections import deque
from pathlib import Path

import ray
from tqdm import tqdm

from orchestration import checkpoint
from orchestration.actors import Actors, init_ray
from orchestration.config import Config, ConfigError, load_config, to_yaml
from orchestration.data import DataError, PromptStream, load_prompts
from orchestration.metrics import RunLogger
from orchestration.model_prep import prepare_model
from orchestration.trajectories import TrajectoryLog, drop_steps_from
from orchestration.trainer_actor import TrainerGroup
from orchestration.validation import validate
from orchestration.weight_sync import WORKER_GONE, WorkerLost, make_sync
from policy.distributed import UpdateNotApplied
from policy.models import load_tokenizer
from rollout.rewards import RewardError, check_signatures, load_reward_fn, score_groups
from rollout.worker import WorkerRestarted
from rollout.vllm_spec import spec_decode_rates

log = logging.getLogger("rlaccel")


COUNTS = {"rollout_tokens", "rollout_sequences", "rollout_truncated", "sync_bytes", "sync_probed"}


def merge_worker_metrics(per_worker: list[dict[str, float]],
                         resampled: list[dict[str, float]] = ()) -> dict[str, float]:
    """Workers run in parallel: counts add up; seconds and diffs are the slowest/worst.
    ``resampled``: the workers' metrics of a re-sample that ran after them (a batch's groups too
    stale to train on, sampled again): its counts and seconds add to theirs."""
    merged = _in_parallel(per_worker)
    if resampled:
        again = _in_parallel(resampled)
        merged = {k: (merged.get(k, 0.0) + again.get(k, 0.0) if _adds(k) or k.endswith("_s") else
                      max(merged.get(k, -math.inf), again.get(k, -math.inf))) for k in {**merged, **again}}
    k = sum(key.startswith("spec_accepted_pos") for key in merged)
    rates = spec_decode_rates({"drafts": merged.get("spec_drafts", 0), "draft_tokens": merged.get("spec_draft_tokens"),
                               "accepted": merged.get("spec_accepted"),
                               "accepted_per_pos": [merged[f"spec_accepted_pos{i}"] for i in range(1, k + 1)],
                               "verified_per_pos": [merged[f"spec_verified_pos{i}"] for i in range(1, k + 1)
                                                    if f"spec_verified_pos{i}" in merged]})
    if rates:  # speculative rollout: acceptance per position given the earlier drafts accepted (where drafted)
        merged.update({f"spec_acceptance_pos{i + 1}": a for i, a in enumerate(rates["acceptance_per_pos"])
                       if a is not None})
        merged.update(spec_mean_accepted_len=rates["mean_accepted_len"], spec_acceptance=rates["draft_acceptance"])
    if "rollout_tokens" in merged:
        merged["rollout_tok_s"] = merged["rollout_tokens"] / merged["rollout_s"]
        merged["response_len"] = merged["rollout_tokens"] / merged["rollout_sequences"]
        merged["truncated_frac"] = merged["rollout_truncated"] / merged["rollout_sequences"]
    return merged


def _adds(key: str) -> bool:
    return key in COUNTS or key.startswith("spec_")


def _in_parallel(per_worker: list[dict[str, float]]) -> dict[str, float]:
    return {k: (sum if _adds(k) else max)(m[k] for m in per_worker) for k in per_worker[0]}


def in_flight_depth(max_staleness: int, rollout_s: float, update_s: float) -> int:
    """Rollout batches to keep in flight: the one consumed next plus enough queued behind it
    that the workers keep sampling through one trainer update (ceil(update / rollout)), and no
    more than the staleness bound allows (max_staleness + 1). More would only add staleness."""
    return min(max_staleness + 1, 1 + math.ceil(update_s / max(rollout_s, 1e-6)))


# The weight-sync probe (rollout.worker: the engine's logprobs of these tokens against a reference
# forward with the received weights) is the end of the first prompt and its answer, at most this
# many tokens. Every layer's weights and the whole LM head take part at any length (the embedding
# rows checked are those of its tokens, the positions its first 32); it costs two forwards of its
# length per probed sync on a CPU worker (benchmarks/cpu_sync.py, 100M preset, 2 threads: with a 322-token
# few-shot prompt as the probe a sync took 2.1 s, with its last 32 tokens 0.81 s, no probe 0.50 s).
PROBE_TOKENS = 32


def in_flight_start(o, state: dict | None) -> tuple[int, tuple[float, float] | None]:
    """The batches to keep in flight at the start and the (rollout_s, update_s) EMA that sets them
    (orchestration.adaptive_in_flight): all the bound allows, or a resumed checkpoint's."""
    if state and o.adaptive_in_flight and state.get("timing") is not None:
        timing = tuple(state["timing"])
        return in_flight_depth(o.max_staleness, *timing), timing
    return o.max_staleness + 1, None


def resumed_draft_model(config: Config) -> str | None:
    """The head the workers draft with at the start: ``rollout.draft_model``, or, resuming with
    ``mtp.maintain=true``, the checkpoint's maintained head (``<checkpoint>/drafter``, which the
    trainer's maintainer also continues from). A checkpoint's head is not used otherwise: a
    resume with the drafter off, another head or a frozen one gets what its config says."""
    resume, configured = config.orchestration.resume, config.rollout.draft_model
    saved = Path(resume) / "drafter" if resume else None
    if saved is None or not saved.is_dir():
        if saved is not None and config.mtp.maintain:
            log.info("resume: the checkpoint has no maintained drafter head; mtp.maintain=true maintains "
                     "rollout.draft_model=%s from here", configured)
        return configured
    if config.mtp.maintain:
        if configured is not None and Path(configured).resolve() != saved.resolve():
            log.info("resume: drafting with the checkpoint's maintained head %s (mtp.maintain=true continues it), "
                     "not rollout.draft_model=%s", saved, configured)
        return str(saved)
    log.warning("resume: the checkpoint's maintained drafter head %s is not used (mtp.maintain=false): drafting "
                "with rollout.draft_model=%s. Resume with mtp.maintain=true to continue it, or draft with it frozen: "
                "rollout.draft_model=%s", saved, configured, saved)
    return configured


def step_seed(seed: int, step: int) -> int:
    return (seed * 7_919 + step * 104_729) % (2 ** 31)


def main(config: Config, progress: bool | None = None, actors: Actors | None = None) -> list[dict]:
    """Run GRPO as configured; returns the per-step metrics (also in metrics.jsonl).
    ``actors``: the processes to run in, kept for the caller's next run (see :class:`Actors`);
    by default the run starts its own and stops them at its end. Where ``logging.dir`` holds an
    earlier run that this one does not resume, ``config.logging.dir`` is set to the directory the
    run logs to instead (:func:`orchestration.checkpoint.claim_run_dir`)."""
    validate(config, warn=False)  # again: a caller may have built or changed it after load_config
    o, a = config.orchestration, config.algorithm
    progress = config.logging.progress_bar if progress is None else progress
    run_dir = checkpoint.claim_run_dir(config.logging.dir, o.resume, config.logging.overwrite)
    if run_dir.resolve() != Path(config.logging.dir).resolve():
        if o.resume:
            log.info("logging.dir=%s: the resumed run continues in %s, where its checkpoint is", config.logging.dir,
                     run_dir)
        else:
            log.warning("logging.dir=%s holds an earlier run, kept: this run logs to %s (logging.overwrite=true "
                        "would replace it; --resume %s/checkpoint continues it)", config.logging.dir, run_dir,
                        config.logging.dir)
        config.logging.dir = str(run_dir)  # what the caller reads the run's logs from
    run_dir.mkdir(parents=True, exist_ok=True)

    reward_fns = {path: load_reward_fn(path) for path in a.reward_fns}  # before minutes of warm start
    model_dir = prepare_model(config, progress=progress)
    tokenizer = load_tokenizer(model_dir)
    rows = load_prompts(config.data, tokenizer)
    check_signatures(reward_fns, list(dict.fromkeys(k for row in rows for k in row if k != "prompt")))
    stream = PromptStream(rows, o.seed)
    probe_ids = tokenizer(rows[0]["prompt"] + rows[0]["answer"], add_special_tokens=False).input_ids[-PROBE_TOKENS:]

    data = checkpoint.data_identity(rows, o.seed)
    if o.resume:
        checkpoint.finish_swap(o.resume)
    state = checkpoint.load(o.resume) if o.resume else None
    start = state["step"] if state else 0
    setup = checkpoint.setup_identity(config)
    if state:
        checkpoint.check_data(state, data, o.resume)
        stream.restore(state["stream"])
        log.info("resuming at step %d from %s", start, o.resume)
    (run_dir / "config.yaml").write_text(to_yaml(config))  # once a resume's checks passed

    init_ray(config)
    own = actors is None
    actors = Actors() if own else actors
    # Workers start from the checkpoint's weights; the trainer from the original model (its
    # KL reference) and then loads the checkpoint's weights and optimizer. A checkpoint holds the
    # policy only: native MTP layers (rollout.spec_method=mtp, frozen during RL) are the original
    # model's, so such workers start from it and get the checkpoint's policy by a verified sync.
    # Such a worker is labelled older than the staleness bound admits (Ray restarts a worker with
    # these arguments): should it ever sample with the original weights, its groups are sampled
    # again after a sync (the too-old rule), never trained on.
    from_model = bool(o.resume) and config.rollout.spec_method == "mtp"
    rollout_cfg = dataclasses.replace(config.rollout, draft_model=resumed_draft_model(config))
    version = state["version"] if state else 0
    if from_model:
        version -= o.max_staleness + 1
    run = uuid.uuid4().hex  # which run a worker process's settings are for (RolloutWorker.adopt)
    workers, trainer_actors = actors.start(config, (str(model_dir if from_model else o.resume or model_dir),
                                                    rollout_cfg, config.model.dtype, o.seed, version, run))
    try:
        trainer = TrainerGroup(
            trainer_actors, str(model_dir), config.trainer, config.algorithm, config.rollout.temperature,
            config.rollout.max_tokens, config.model.dtype, probe_ids,
            drafter=(config.rollout.draft_model, config.mtp) if config.mtp.maintain else None)
        if state:
            trainer.load(o.resume)
        (run_dir / "placement.json").write_text(json.dumps({
            "rollout_workers": actors.worker_nodes(), "trainer_ranks": trainer.node_ids(),
            "rollout_worker_gpus": ray.get([w.gpu_ids.remote() for w in workers]),
            "trainer_rank_gpus": trainer.gpu_ids()}))
        sync = make_sync(o.weight_sync, trainer, workers, config.trainer.device)  # the workers are ready
        if from_model:
            sync.results(sync.push())  # the checkpoint's policy, before any rollout
        if state and drop_steps_from(run_dir, start):
            log.info("resume at step %d: the trajectories of steps >= %d logged before are dropped (trained again)",
                     start, start)
        for moved in checkpoint.set_aside_later(run_dir, start, Path(o.resume)) if state else []:
            log.warning("resume at step %d: a checkpoint of the branch this run leaves (it resumes later) is set "
                        "aside as %s", start, moved)
    except BaseException:
        actors.close()
        raise

    logger = RunLogger(run_dir, config.logging.tensorboard, append=bool(state), before_step=start if state else None)
    trajectories = TrajectoryLog.from_step(run_dir, start)
    history: list[dict] = []
    bar = tqdm(range(start, o.steps), desc="GRPO", disable=not progress, dynamic_ncols=True,
               initial=start, total=o.steps)
    # Rollouts in flight, oldest first: (refs, batch, seed). At the start of step t,
    # max_staleness + 1 of them are queued on the workers; one is consumed and the others keep
    # sampling, with the weights of version <= t, while the trainer trains, ahead of the
    # update to t + 1. So a batch consumed at step t was sampled with version >= t -
    # max_staleness. 0 is the synchronous loop.
    in_flight: deque = deque()
    submitted = state["submitted"] if state else 0
    regenerated = state["regenerated"] if state else 0
    pending_sync: list = []
    # Worker deaths handled, and per worker the submissions made before its last restart was
    # handled: those went to the process that died, so a second batch of theirs failing is the
    # same death (not counted again; the worker already has the current weights).
    restarts, sends, handled = 0, 0, {}
    rewards_worked: set[str] = set()  # reward functions that have scored a sample (rollout.rewards)
    # Where a checkpoint taken now would resume: the next step, and the batch popped for this
    # step until the update has it (it is queued again on resume). While the trainer updates
    # (update_refs), a stop waits for the update to end, then records the step's samples.
    next_step, head, update_refs = start, None, None
    # batches kept in flight and the EMA of (rollout_s, update_s) that sets it; a resume goes on with
    # the checkpoint's (within this run's staleness bound)
    depth, timing = in_flight_start(o, state)

    def submit(batch, seed: int | None = None) -> tuple:
        nonlocal submitted, sends
        if seed is None:
            seed, submitted = step_seed(o.seed, submitted), submitted + 1
        size = -(-len(batch) // len(workers))  # contiguous shards keep the batch order
        shards = [(k, batch[k * size:(k + 1) * size]) for k in range(len(workers)) if batch[k * size:(k + 1) * size]]
        refs = [workers[k].generate.remote(shard, seed + k) for k, shard in shards]
        sends += 1
        return refs, batch, seed, shards, sends

    def on_restarted(method, *args, timeout_s: float = 300.0):
        """Call an actor method, waiting while Ray restarts the actor."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get(method.remote(*args))
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
            except ray.exceptions.ActorDiedError as exc:  # no restart left
                raise WorkerLost(
                    f"a rollout worker died and Ray will not restart it (rollout.max_restarts="
                    f"{config.rollout.max_restarts} used up, or its node is gone): look for the cause in its log "
                    f"(out of memory is the usual one: rollout.kv_cache_gib, rollout.gpu_memory_utilization), "
                    f"then --resume the checkpoint this run saves; Ray's report: {' '.join(str(exc).split())[:300]}"
                ) from None

    def restarted(k: int) -> None:
        """Take worker k back after Ray restarted it (its process refuses to sample or load weights
        until then, rollout.worker.WorkerRestarted): this run's settings (a reset, where Ray started
        it with an earlier run's, in actors kept from run to run) and the current weights. Counted;
        again, and counted again, while a restarted process dies in turn before it has the weights
        (rollout.max_restarts bounds this: then WorkerLost). One that dies during the adopt or reset
        call itself is not seen (Ray answers it as unavailable, and on_restarted retries the call on
        the next process): handled, counted with the restart before it."""
        nonlocal restarts

        def take_back() -> None:
            if not on_restarted(workers[k].adopt, run):  # Ray started it with an earlier run's arguments
                on_restarted(workers[k].reset, *actors.worker_args(k))
        while True:
            restarts += 1
            try:
                sync.restarted(k, on_restarted, take_back)
                handled[k] = sends  # the batches sent before now went to a process that is gone
                return
            except WorkerRestarted:
                log.warning("rollout worker %d died again while it was being taken back", k)

    def collect(entry) -> list:
        """Results of a submitted batch. A shard whose worker died is sampled again on the
        process Ray restarted, once taken back (:func:`restarted`), as often as it dies: nothing is
        lost, nothing is sampled with start-up weights or another run's settings."""
        nonlocal sends
        refs, _, seed, shards, sent = entry
        outs = []
        for ref, (k, shard) in zip(refs, shards):
            while True:
                try:
                    outs.append(ray.get(ref))
                    break
                except (*WORKER_GONE, WorkerRestarted) as exc:
                    if sent > handled.get(k, 0):  # not a batch of a death handled already
                        log.warning("rollout worker %d died (%s)", k, type(exc).__name__)
                        restarted(k)
                    log.warning("re-sampling worker %d's %d prompts on its restarted process", k, len(shard))
                    sends += 1
                    ref, sent = workers[k].generate.remote(shard, seed + k), sends
        return outs

    def loop_state(step: int, queued: list) -> dict:
        """A checkpoint's loop state (orchestration.checkpoint) resuming at ``step`` with the
        batches ``queued`` (sampled again first, with their seeds)."""
        return {"step": step, "version": step, "submitted": submitted, "regenerated": regenerated,
                "stream": stream.state(), "data": data, "setup": setup,
                "in_flight": [[[i for i, _ in batch], seed] for _, batch, seed, *_ in queued],
                "timing": None if timing is None else list(timing)}

    for batch, seed in (state["in_flight"] if state else []):  # sampled again, none lost
        in_flight.append(submit([(i, rows[i]) for i in checkpoint.batch_indices(batch)], seed))

    try:
        for step in bar:
            t0 = time.perf_counter()
            next_step = step
            while len(in_flight) < depth:
                in_flight.append(submit(stream.next_batch(a.prompts_per_step)))
            head = in_flight.popleft()
            outs = collect(head)
            groups = [g for gs, _ in outs for g in gs]
            too_old = [g for g in groups if step - g.version > o.max_staleness]
            again = []
            if too_old:  # never silently dropped: sampled again with the current weights
                regenerated += len(too_old)
                sync.everyone(on_restarted, restarted)
                again = collect(submit([(g.index, g.row) for g in too_old]))
                groups = [g for g in groups if step - g.version <= o.max_staleness] + [g for gs, _ in again for g in gs]
            # the rollout's seconds and tokens: the batch's and its re-sample's (every sampled token cost time)
            metrics = merge_worker_metrics([m for _, m in outs], [m for _, m in again])
            metrics.update(score_groups(groups, reward_fns, a.on_reward_error, rewards_worked))
            sampled = [lp for g in groups for lps in g.behaviour_logprobs for lp in lps]
            metrics["entropy"] = -sum(sampled) / max(len(sampled), 1)  # E[-log p] of sampled tokens
            # The max_staleness rollouts still queued run on the workers while the trainer
            # trains; the weight update below is queued behind them.
            update_refs = trainer.step(groups)
            # Nothing waits for the weight update here: each worker runs it before any rollout
            # submitted after it (actor call order), and its verification result is collected
            # one step later (step 0 has no earlier update: zeros). From the object store that is
            # off the trainer's critical path; a broadcast holds the trainer until the workers receive.
            pushed = sync.push()
            synced = sync.results(pending_sync)
            metrics.update(merge_worker_metrics(synced) if synced else
                           {"sync_s": 0.0, "sync_probe_diff": 0.0, "sync_probed": 0.0})
            pending_sync = pushed
            table = trajectories.table(step, groups)  # while the trainer trains
            metrics.update(trainer.metrics(update_refs))
            trajectories.write(table)  # once trained on: a refused update's samples are not
            next_step, head, update_refs = step + 1, None, None
            metrics["step_s"] = time.perf_counter() - t0
            metrics["epoch"] = float(stream.epoch)
            metrics["regenerated_groups"] = float(regenerated)
            metrics["worker_restarts"] = float(restarts)
            metrics["trainer_idle_frac"] = max(0.0, 1 - metrics["update_s"] / metrics["step_s"])
            metrics["rollout_idle_frac"] = max(0.0, 1 - metrics["rollout_s"] / metrics["step_s"])
            metrics["in_flight"] = float(depth)
            if o.adaptive_in_flight:
                now = (metrics["rollout_s"], metrics["update_s"])
                timing = now if timing is None else tuple(0.8 * t + 0.2 * x for t, x in zip(timing, now))
                depth = in_flight_depth(o.max_staleness, *timing)
            logger.observe("staleness", [step - g.version for g in groups])
            logger.log(step, metrics)
            history.append({"step": step, **metrics})
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", roll_tok_s=f"{metrics['rollout_tok_s']:.0f}",
                            roll_s=f"{metrics['rollout_s']:.2f}", upd_s=f"{metrics['update_s']:.2f}")
            if o.checkpoint_every and (step + 1) % o.checkpoint_every == 0 and step + 1 < o.steps:
                # A Parquet file is readable once closed: a new one from each checkpoint, the one before
                # closed first, so a killed run loses no row a resume from its last checkpoint keeps
                trajectories.close()
                checkpoint.save(run_dir / "checkpoints" / f"step-{step + 1}", trainer, loop_state(step + 1, in_flight))
                for gone in checkpoint.prune(run_dir, o.keep_checkpoints, o.resume):
                    log.info("deleted the checkpoint %s (orchestration.keep_checkpoints=%d)", gone, o.keep_checkpoints)
                trajectories = TrajectoryLog.from_step(run_dir, step + 1)
        sync.results(pending_sync)  # the last update must verify too
        trajectories.close()  # complete on disk before the checkpoint a resume would continue from
        # a run can be continued from its end: --resume <logging.dir>/checkpoint orchestration.steps=<more>
        checkpoint.save(run_dir / "checkpoint", trainer, loop_state(o.steps, in_flight))
        for refs, *_ in in_flight:  # rollouts still queued (async) would delay kept actors' next run
            for ref in refs:
                ray.cancel(ref)  # a queued actor call is dropped, a running one finishes
    except BaseException:
        # Keep what was learned so far (the trainer is a separate process and usually alive). The
        # rollouts still queued go first: a broadcast sync the save is queued behind waits for them.
        for refs, *_ in in_flight:
            for ref in refs:
                ray.cancel(ref)
        again = False  # a second Ctrl-C while the update ran: nothing is saved
        # The update and the save may take as long as they need, except where a dead worker can hold
        # the trainer in a broadcast: NCCL does not report a lost peer (the group's 30-minute timeout)
        wait = 300 if o.weight_sync == "broadcast" and config.trainer.device != "cpu" else None
        if update_refs is not None:  # e.g. Ctrl-C while the driver waited: let the update end
            log.warning("stopping: waiting for the update of step %d to end, then saving (Ctrl-C again to stop "
                        "without saving)", next_step)
            try:
                metrics.update(ray.get(update_refs, timeout=wait)[0])  # every rank's metrics are the same
                trajectories.write(TrajectoryLog.table(next_step, groups))
                logger.log(next_step, metrics)  # the step's record, without its timings
                next_step, head, update_refs = next_step + 1, None, None
            except KeyboardInterrupt:
                again = True
            except BaseException as failed:  # noqa: BLE001 (the update itself failed)
                if _not_applied(failed):  # refused before it changed anything: the step's batch is queued again
                    update_refs = None
        trajectories.close()  # every step recorded so far, complete on disk before the checkpoint
        if again:
            saved, how = None, "stopped again during the update: nothing saved"
        elif update_refs is not None:  # a failed update may have applied some of its mini-batches: weights only,
            # beside (never in place of) a checkpoint the run could resume from
            saved = _try_save(trainer, run_dir / checkpoint.WEIGHTS_ONLY, None, wait)
            how = (f"policy saved to {saved}; it stopped during the update of step {next_step}, so the loop "
                   f"cannot resume there: resume from an earlier checkpoint of the run (checkpoint-interrupted or "
                   f"checkpoints/step-N, if it has one: orchestration.checkpoint_every), or start a new run from "
                   f"these weights (model.path={saved})") if saved else None
        else:
            saved = _try_save(trainer, run_dir / "checkpoint-interrupted",
                              loop_state(next_step, ([head] if head else []) + list(in_flight)), wait)
            how = f"checkpoint saved to {saved}; continue with --resume {saved}" if saved else None
        log.error("run stopped at step %d of %d; %s", next_step, o.steps, how or "the policy could not be saved")
        actors.close()  # a failed run's processes are not reused
        raise
    finally:
        logger.close()
        trajectories.close()
        bar.close()
        if own:
            actors.close()
    return history


def _not_applied(exc: BaseException) -> bool:
    """Whether ``exc`` (as raised by ``ray.get``) is the trainer refusing an update before it changed
    the weights or the optimizer."""
    return isinstance(exc, UpdateNotApplied) or isinstance(getattr(exc, "cause", None), UpdateNotApplied)


def _try_save(trainer, directory: Path, state: dict | None, timeout: float | None = None) -> str | None:
    """The trainer's state in ``directory``, with the loop ``state`` a resume needs if given (an
    earlier checkpoint there is replaced once this one is complete), as long as the save takes
    while the trainer lives (a large model on a network filesystem takes minutes), or ``timeout``
    seconds; None if the trainer is gone, the time is up or a Ctrl-C stops the save (the earlier
    checkpoint is then kept as it was)."""
    log.warning("saving %s (Ctrl-C to stop without saving)", directory)
    try:
        return str(checkpoint.save(directory, trainer, state, timeout=timeout))
    except (Exception, KeyboardInterrupt):  # noqa: BLE001 (the trainer itself may be what failed)
        log.exception("the save to %s failed", directory)
        return None


def parse_args(argv: list[str] | None = None) -> tuple[str, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m orchestration.grpo", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml",
                        help="YAML preset (a path, or a name in configs/)")
    parser.add_argument("--resume", metavar="DIR", help="continue from <logging.dir>/checkpoints/step-N")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. orchestration.steps=10")
    args = parser.parse_args(argv)
    return args.config, args.overrides + ([f"orchestration.resume={args.resume}"] if args.resume else [])


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config_path, overrides = parse_args(argv)
    try:
        config = load_config(config_path, overrides)
        history = main(config)
    except (ConfigError, DataError, RewardError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FloatingPointError, WorkerLost) as exc:  # the log above says what was saved
        print(f"error: {getattr(exc, 'cause', None) or exc}", file=sys.stderr)
        return 1
    first = history[: max(1, len(history) // 10)]
    last = history[-max(1, len(history) // 10):]
    mean = lambda hs: sum(h["reward"] for h in hs) / len(hs)  # noqa: E731
    mismatch = max(h["logp_mismatch_max"] for h in history)
    print(f"done: {len(history)} steps; mean reward first 10% {mean(first):.3f}, last 10% {mean(last):.3f}; "
          f"max |trainer - sampler| logprob {mismatch:.1e}; logs in {config.logging.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
