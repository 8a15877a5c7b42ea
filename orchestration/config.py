"""Typed run configuration: one dataclass per component, YAML presets, ``a.b=c`` overrides.

Schema and merging come from OmegaConf structured configs: an unknown key or a value of
the wrong type fails at load with the key's full path. Value ranges and choices that a
type cannot express are checked by :func:`orchestration.validation.validate`, which names the
key and what is allowed. Each component receives only its own section (``config.rollout`` goes to the
rollout worker, ``config.trainer`` to the trainer, ...).

Every field is documented once, here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESET_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A configuration problem, worded for the user: which key, what is wrong, what to do."""


@dataclass
class ModelConfig:
    # A built-in architecture ("tiny": ~1M-parameter Qwen3 with a character tokenizer,
    # "small": ~100M-parameter Qwen3), built locally and warm-started on the task.
    # Ignored when `path` is set.
    name: str = "tiny"
    # A local Hugging Face model directory (config.json, weights, tokenizer). No hub downloads.
    path: str | None = None
    # Supervised warm-start steps for a built-in model (0 = start from random weights).
    warm_start_steps: int = 400
    warm_start_lr: float = 3e-3
    warm_start_batch: int = 64
    # Label smoothing of the warm start: > 0 leaves the policy diffuse (see policy/warm_start.py).
    warm_start_label_smoothing: float = 0.0
    # Training and rollout dtype. CPU runs use float32.
    dtype: str = "float32"


@dataclass
class DataConfig:
    # "arithmetic" (built-in, seeded) or a local .jsonl / .parquet file or a directory
    # saved with `datasets.Dataset.save_to_disk`.
    source: str = "arithmetic"
    # Column names for file datasets (the built-in task always uses "prompt"/"answer").
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    # Built-in task: number of distinct training prompts, operand digits, operators.
    num_prompts: int = 4096
    min_digits: int = 1
    max_digits: int = 2
    operators: str = "+-"
    seed: int = 1234
    # Built-in task: solved examples ("a+b=c" lines, the same for every prompt) put before each
    # question, a long shared prompt prefix (each example is ~7-10 tokens with the tiny tokenizer).
    few_shot: int = 0
    # Prompts longer than this (in tokens) are an error naming the row.
    max_prompt_tokens: int = 64
    # Send each prompt through the model tokenizer's chat template (a text prompt as one user
    # message; a prompt field holding a conversation, [{"role", "content"}, ...], as it is), with
    # the assistant turn opened: the templated text is the prompt the model, the length limit and
    # the reward functions see. For instruct/chat models; false: prompts are text as given.
    chat_template: bool = False
    # Keyword arguments for the chat template (transformers' apply_chat_template passes them to
    # the template), e.g. {enable_thinking: false} for Qwen3's non-thinking mode.
    chat_template_kwargs: dict = field(default_factory=dict)


@dataclass
class RolloutConfig:
    # "vllm" (the rollout engine) or "hf" (transformers `generate`, the reference path).
    backend: str = "vllm"
    num_workers: int = 1
    # Times Ray restarts a rollout worker whose process died; its unfinished prompts are
    # re-sampled after it gets the current weights (none with orchestration.weight_sync=broadcast).
    max_restarts: int = 3
    # Group size N: responses sampled per prompt.
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 8
    # Extra stop strings (the tokenizer's EOS always stops).
    stop: list[str] = field(default_factory=list)
    # CPU threads for this worker's engine.
    threads: int = 1
    # vLLM: KV cache size in GiB on CPU (VLLM_CPU_KVCACHE_SPACE); max_model_len.
    kv_cache_gib: int = 1
    max_model_len: int = 128
    # vLLM's KV-cache block size (tokens); null: vLLM's default (128 on CPU), but 32 (the CPU
    # attention's smallest) for a speculative CPU engine whose prompts may span two 128-token blocks
    # (max_model_len - max_tokens >= 256): with an EAGLE-form drafter vLLM drops the last matched
    # block of every prefix-cache hit (the drafter needs that block's hidden states), so 128-token
    # blocks cost each later sample of a prompt up to 128 recomputed prompt tokens. Shorter prompts
    # keep 128: decoding with 32-token blocks is slower (100M preset, plain engine, 64 new tokens:
    # ~8% at batch 1, ~15% at 4, ~3% at 64).
    block_size: int | None = None
    # CPU engines of a dense Qwen2 / Qwen3 / Llama / Mistral policy keep each linear layer's weight
    # beside the packed (oneDNN) kernel vLLM makes of it: the policy's linear weights twice in the
    # worker's memory. A weight sync then copies into them with vLLM's loader and repacks instead of
    # vLLM's layerwise reload (a worker's whole sync 0.55 against 0.68 s on the 100M preset, one
    # thread: benchmarks/cpu_sync.py). An EAGLE drafter built beside such a policy keeps its linear
    # weights too (its syncs stay on the layerwise reload). false: the layerwise reload, for a
    # policy too large to hold twice (GPU engines never pack).
    cpu_keep_weights: bool = True
    # The weight sync's probe (rollout/worker.py): the most a probe token's logprob from the
    # engine may differ from the reference forward's on the same received weights; null: 1e-3 in
    # float32/float64, 0.5 in bfloat16/float16 (policy.models.sync_tolerance). If a sync fails
    # with a difference near the bound while the earlier probes' sync_probe_diff (logged each step)
    # came close to it, raise this; a failed load (wrong or mixed-up tensors) moves logprobs by nats.
    sync_probe_tolerance: float | None = None
    # Where the worker computes the probe's reference itself (a CPU trainer sends none) and the
    # sender checksums the weights, the probe runs on an engine's first sync, after a failed one
    # and on every Nth (sync_probed counts the workers that probed; a sync without a probe logs
    # sync_probe_diff 0); otherwise (a GPU trainer, whose forward gives the reference) on every
    # sync. Each sync still checks the checksum and, on vLLM, reads the engine's norm weights back
    # exactly; a load those miss (wrong or mixed-up tensors from a later sync on) shows at the next
    # probe, up to N-1 syncs later, and the rollouts sampled in between are trained on. A probe
    # costs two forwards of its 32 tokens on a CPU worker: on the 100M preset in bfloat16, async
    # with one thread each, a sync took 0.20 s with every sync probing and 0.13 s with every 8th
    # (mean sync_s), 57.3 against 59.0 samples/s (three alternating runs each, 56.1-58.0 against
    # 57.7-59.8; ad hoc). In half precision a probe tells a partly stale reload only once the
    # policy has drifted past its 0.5-nat bound, many syncs later anyway. 1: every sync.
    sync_probe_every: int = 8
    # GPUs per rollout worker, Ray's num_gpus for its actor (Ray shows a Ray actor only the GPUs it
    # was given: with 0 a CUDA engine finds none). 0: a CPU engine (vllm-cpu). GPU presets: 1.
    gpus: int = 0
    # vLLM: fraction of GPU memory for the engine (GPU presets only).
    gpu_memory_utilization: float = 0.5
    # vLLM: eager mode is required on CPU; CUDA graphs on GPU.
    enforce_eager: bool = True
    # Speculative rollout: a drafter head directory written by `python -m mtp.train` (vLLM's
    # `eagle` method, or `eagle3` for a head with mtp.draft_vocab > 0: read from the checkpoint),
    # verified by lossless probabilistic rejection sampling; null = off.
    draft_model: str | None = None
    # "eagle": the rlaccel head in rollout.draft_model drafts; "mtp": the model's own native MTP
    # layers draft (vLLM's mtp method; a checkpoint with MTP layers: MiMo, DeepSeek-V3, Qwen3.5, or
    # one from mtp.train mtp.head=native).
    spec_method: str = "eagle"
    # Draft tokens per step (k).
    num_speculative_tokens: int = 3
    # "probabilistic": drafts sampled from the head's q, full q in the acceptance test;
    # "greedy": vLLM's default (argmax drafts, q treated as one-hot).
    draft_sample_method: str = "probabilistic"
    # Draft tokens by live batch size, [[lo, hi, k], ...] (vLLM's
    # num_speculative_tokens_per_batch_size; k = 0 turns speculation off); null: always k.
    spec_schedule: list[list[int]] | None = None
    # Choose k per live batch size from this engine's measured step costs (a calibration at
    # start-up, a few seconds) and the live acceptance, re-derived as acceptance drifts; k = 0
    # skips the drafter (rollout/adaptive.py). Overrides spec_schedule.
    adaptive_spec: bool = False
    # With adaptive_spec: time rollout calls under the derived schedule and with speculation off,
    # and keep whichever is faster on this workload, probing the other ever more rarely
    # (rollout/adaptive.py::ScheduleCheck); false trusts the schedule's model alone.
    adaptive_check: bool = True
    # With adaptive_spec: every N-th rollout call drafts one position more than the schedule at
    # every batch size (not timed by the check), so the positions the schedule does not draft are
    # measured too and k can rise when acceptance does; 0: never.
    adaptive_explore: int = 8
    # vLLM's own statistics (Prometheus histograms per request and token, llm.get_metrics()).
    # rlaccel counts speculation itself; vLLM's statistics cost ~9% of a rollout call on the tiny preset.
    vllm_stats: bool = False
    # The largest live batch the calibration measures (1, 4, 16, 64, 256 below it, then it; larger
    # batches take its k); 0: the most one rollout call decodes, algorithm.prompts_per_step × rollout.n.
    adaptive_max_batch: int = 0
    # A directory to keep the calibration's step costs in, shared by later runs of the same model
    # architecture, drafter, settings and machine (~1 min saved per start on the 100M preset);
    # null: measure at every start. Delete its files to measure again.
    calibration_cache: str | None = None


@dataclass
class TrainerConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    max_grad_norm: float = 1.0
    # Optimizer steps per rollout batch (the batch is split into this many mini-batches,
    # PPO-style; ratios are taken against the policy before the first of them).
    mini_batches: int = 1
    # Sequences per forward/backward; gradients accumulate over a mini-batch. With shared_prompt,
    # whole groups up to the tokens of this many rows of the step's longest sequence.
    micro_batch_size: int = 64
    threads: int = 1
    device: str = "cpu"
    # CPU: treat float32 values below 2^-126 (~1.2e-38) as zero (x86 FTZ/DAZ), in the trainer and
    # in mtp.train. Softmax tails of a large vocabulary fill the LM head's gradient and AdamW's
    # moments with such denormals, and CPU arithmetic on them is slow: for the 100M preset on one
    # thread, gradient clipping 0.30 -> 0.11 s and AdamW 0.72 -> 0.16 s per step. The update
    # changes by far less than a float32 rounding of any weight (tests/policy/test_trainer.py).
    flush_denormal: bool = True
    # The AdamW step of bfloat16/float16 weights through their float32 master copy in two passes
    # over memory (the norm; then the update, written into the weights) instead of five
    # (policy/fused_adamw.py, compiled by torch.compile, which needs a C++ compiler): 0.29 -> 0.16 s
    # a step for the 100M preset on one CPU thread, the same update up to float rounding
    # (tests/policy/test_fused_adamw.py). "auto": for a master copy of >= 10M parameters on the CPU
    # (the compile takes 4-12 s at start-up, and ~45 s at the first step on the 100M preset, ad hoc,
    # for the pass over all tensors in one call, policy/fused_adamw.py; less from inductor's cache
    # on disk), falling back with a warning where it cannot compile (the one-call form falls back to
    # per-tensor calls with a warning under "on" too);
    # "on": for every master copy on the CPU, an error where it cannot compile; "off": the reference
    # path. Float32 weights have no master copy and DeepSpeed's ranks their own: neither is affected.
    fused_master_step: str = "auto"
    # Compile each decoder layer with torch.compile (inductor, dynamic shapes, forward and backward;
    # policy/compiled.py): fused elementwise loops and far fewer small ops a step. On the 100M preset
    # (one thread, real small-short batches, compiled and eager steps interleaved) bfloat16 0.664 ->
    # 0.590 s a step, float32 1.077 -> 1.036 s; the trainer's set-up compiles them (~10 s from
    # inductor's cache on disk, ~40 s without). The same math up to float rounding
    # (tests/policy/test_compiled.py).
    # "auto": on a CPU trainer of one rank, without gradient checkpointing, for models of >= 10M
    # parameters, eager with a warning where it cannot compile; "on": wherever it can, an error
    # where it cannot; "off": eager layers.
    compile: str = "auto"
    # Skip the forward and backward of responses whose advantage is exactly 0 (the groups whose
    # rewards are all equal, with binary rewards): they add exactly nothing to the loss or its
    # gradient unless algorithm.kl_coef > 0 (then nothing is skipped). Exact up to float rounding
    # (tests/policy/test_trainer.py); the metric update_skipped is the fraction left out.
    skip_zero_advantage: bool = True
    # Pack each group as one row [prompt | r_1 | … | r_N] so the prompt is processed once
    # (attention/layout.py); exact, see tests/policy/test_packed.py.
    shared_prompt: bool = False
    # Recompute each decoder layer's activations in the backward instead of keeping them
    # (transformers' gradient checkpointing, non-reentrant): ~1/3 more compute, activation memory
    # of one layer instead of all; long responses on a real model need it. Exact (same gradients).
    gradient_checkpointing: bool = False
    # Response tokens whose LM-head logits exist at once in the update. 0: all of a micro-batch's
    # (fastest): their [tokens, vocabulary] float32 logits, log-softmax and its gradient are alive
    # together, ~12 bytes x tokens x vocabulary (6k tokens of Qwen3's 152k vocabulary: ~11 GB).
    # N > 0: the head runs over N tokens at a time under activation checkpointing, recomputed in
    # the backward (one more head multiply): one chunk's logits at a time. Exact (the same
    # logprobs and gradients up to float rounding; tests/policy/test_packed.py; in bfloat16 the
    # head's gradient is rounded once per chunk before the chunks are summed). Families whose
    # forward post-processes the logits (not in policy.packed.PLAIN_LM_HEAD) are not chunked.
    logit_chunk: int = 0
    # Shared-prompt attention backend: "regions" (CPU fast path), "reference" (dense mask),
    # "flex" (FlexAttention block mask; training needs a GPU).
    attention_backend: str = "regions"
    # Data-parallel trainer ranks (Ray actors, one CPU slot each). > 1 trains under DeepSpeed
    # ZeRO over torch.distributed (gloo on CPU, NCCL on GPU); policy/distributed.py.
    world_size: int = 1
    # ZeRO stage for world_size > 1: 1 (optimizer states partitioned) or 2 (+ gradients).
    zero_stage: int = 1


@dataclass
class AlgorithmConfig:
    # Advantage estimator: "grpo" (group mean/std) or "dr_grpo" (group mean only).
    advantage: str = "grpo"
    # Loss aggregation: "token_mean" (DAPO), "seq_mean" (original GRPO), "seq_sum_norm"
    # (Dr. GRPO: token sum over a constant, max_tokens).
    loss_agg: str = "token_mean"
    clip_low: float = 0.2
    clip_high: float = 0.2
    # KL to the initial policy (k3 estimator); 0 disables and skips the reference model.
    kl_coef: float = 0.0
    # Prompts per step (each gets `rollout.n` responses).
    prompts_per_step: int = 16
    # Reward functions as "module:function" import paths, TRL signature
    # fn(prompts, completions, **columns) -> list[float]. Rewards are summed.
    reward_fns: list[str] = field(default_factory=lambda: ["rollout.rewards:arithmetic_reward"])
    # Truncation C of the behaviour importance weight min(π_prox/π_behav, C) (policy/grpo.py).
    is_cap: float = 2.0
    # Which samples get that weight: "stale" (those of an older policy version: async rollout),
    # "all" (every sample: it also corrects the sampler's numerical mismatch with the trainer, e.g.
    # vLLM's bfloat16 kernels against the trainer's; TRL's vllm_importance_sampling_correction,
    # token_truncate mode), "auto" ("all" when model.dtype is bfloat16 or float16, else "stale": a
    # float32 engine agrees with the trainer to ~1e-6, see logp_mismatch_max).
    behaviour_weight: str = "auto"
    # What to do when a reward function raises on a sample: "fail" or "zero" (reward 0, counted).
    on_reward_error: str = "fail"


@dataclass
class OrchestrationConfig:
    steps: int = 60
    seed: int = 0
    # Policy versions a sample may lag the trainer (0 = synchronous on-policy).
    max_staleness: int = 0
    # CPUs given to a local Ray started by the job (ignored when joining a cluster).
    num_cpus: int = 2
    # Write a lossless checkpoint every this many steps to <logging.dir>/checkpoints/step-N
    # (0: none; the final policy is always saved to <logging.dir>/checkpoint).
    checkpoint_every: int = 0
    # Periodic checkpoints kept: the newest N (older ones deleted once a new one is complete);
    # 0 keeps all. A real model's checkpoint (weights, optimizer, master copy) is tens of GB.
    keep_checkpoints: int = 0
    # Resume from such a checkpoint directory (also `--resume DIR` on the command line).
    resume: str | None = None
    # Keep up to max_staleness + 1 rollout batches in flight, but only as many as it takes
    # to keep the trainer busy (measured rollout vs update time); false: always all of them.
    adaptive_in_flight: bool = True
    # Ray placement group strategy for the rollout workers and trainer ranks: PACK (fill
    # nodes in turn), SPREAD (across nodes), STRICT_PACK, STRICT_SPREAD.
    placement_strategy: str = "PACK"
    # A local Ray started by the job binds its node, dashboard and metrics endpoints here
    # (0.0.0.0 exposes them to the network); a cluster joined with RAY_ADDRESS keeps its own.
    bind_host: str = "127.0.0.1"
    # Start the dashboard with a local Ray (`ray job submit` clusters have their own).
    dashboard: bool = False
    # How the weights reach the rollout workers after each update (orchestration/weight_sync.py):
    # "object_store" (rank 0 puts them in Ray's object store once, each worker reads them; a worker
    # Ray restarts is re-synced from there) or "broadcast" (a torch.distributed group of rank 0 and
    # the workers, gloo on a CPU trainer, NCCL on GPUs: GPU to GPU). Verified alike. A broadcast
    # waits for the rollouts queued on the workers before it, so with max_staleness >= 2 the
    # trainer's next step no longer overlaps all of them; a worker's death ends a broadcast run
    # (resume from a checkpoint).
    weight_sync: str = "object_store"
    # Start the CPU rollout workers and trainer ranks with glibc malloc keeping the memory they
    # free for reuse (orchestration.actors.KEEP_FREED_MEMORY) instead of handing it back to the OS,
    # which gives it again as fresh pages, zeroed and faulted in one by one: a weight sync into a
    # CPU vLLM engine re-allocates the policy's size every step. A process keeps its peak memory.
    # Not for GPU actors; a warning where glibc ignores it. Measured: README "Memory".
    keep_freed_memory: bool = True


@dataclass
class LoggingConfig:
    # Run directory: metrics.jsonl, TensorBoard events, the resolved config.
    dir: str = "runs/tiny"
    # A directory holding an earlier run (its metrics, trajectories, checkpoints) that this run
    # does not resume is kept: the run logs to <dir>-2 (-3, ...) instead, and says so. true:
    # that earlier run's files are deleted first.
    overwrite: bool = False
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class MTPConfig:
    """Drafter heads for speculative rollout (`python -m mtp.train`)."""
    # Draft steps unrolled in training (the recursion the engine runs).
    k: int = 3
    # "tv": KL(p‖q) warm start, then the multi-step acceptance objective Σ_k Π_{j≤k} α_j;
    # "ce": cross-entropy on the policy's sampled tokens (the baseline).
    objective: str = "tv"
    # "eagle": an EAGLE-form head, or EAGLE-3-form with mtp.draft_vocab > 0 (a draft checkpoint
    # for rollout.draft_model); "native": the
    # model's own MTP layer (vLLM's mtp method) in MiMo's form for a Qwen2/MiMo policy, DeepSeek-V3's
    # (dense block) for a DeepSeek-V3 one, written into a copy of the policy checkpoint at mtp.out
    # (then model.path=<out> rollout.spec_method=mtp).
    head: str = "eagle"
    # Decoder layers in the head (vLLM's eagle drafter runs any number; more = closer to the
    # policy, each costs one more layer per draft step).
    layers: int = 1
    # With mtp.head=eagle: 0 = draft over the policy's whole vocabulary through its LM head (vLLM's
    # eagle); N > 0 = an EAGLE-3-form head with its own LM head over the N tokens the policy samples
    # most (vLLM's eagle3), so a draft step does not pay for the whole vocabulary; acceptance is at
    # most the policy's mass on those N tokens (reported as draft_vocab_coverage).
    draft_vocab: int = 0
    # With mtp.draft_vocab > 0: a P-EAGLE head for vLLM's parallel drafting (one drafter forward
    # drafts all k tokens; draft steps 2..k are mask slots, a learned state and mask token, not
    # the previous draft), over the policy's last three residual streams (EAGLE-3's auxiliary
    # states). Its per-batch-size k (rollout.adaptive_spec, rollout.spec_schedule) is 0 or k only.
    parallel: bool = False
    # Self-distillation data: the policy's own samples (rollout.n each) on this many prompts,
    # plus held-out prompts for the offline and in-vLLM acceptance report.
    prompts: int = 512
    heldout_prompts: int = 64
    steps: int = 600
    warm_steps: int = 150
    # "tv" after the warm start (and in maintenance): weight of KL(p‖q) kept beside the acceptance
    # objective, an anchor whose gradient never vanishes (see mtp/losses.py); 0 = the objective alone.
    kl_weight: float = 0.1
    lr: float = 1e-3
    batch: int = 64
    threads: int = 2
    # Where the vLLM draft checkpoint goes (default <logging.dir>/drafter).
    out: str | None = None
    # During RL (with rollout.draft_model): keep training the head on each batch against the
    # updated policy (mtp.objective, no warm start) and sync it with the policy; false: frozen.
    maintain: bool = False
    maintain_lr: float = 3e-4
    maintain_steps: int = 1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    orchestration: OrchestrationConfig = field(default_factory=OrchestrationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)


# The str fields of "auto" | "on" | "off": read as such from YAML's booleans here, validated together
SWITCHES = (("trainer", "fused_master_step"), ("trainer", "compile"))


def resolve_preset(path_or_name: str) -> Path:
    """A preset path as given, else relative to the repository, else `configs/<name>.yaml`."""
    for candidate in (Path(path_or_name), REPO_ROOT / path_or_name, PRESET_DIR / f"{path_or_name}.yaml"):
        if candidate.is_file():
            return candidate
    presets = ", ".join(sorted(p.name for p in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"config file {path_or_name!r} not found; presets in {PRESET_DIR}: {presets}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML preset <- ``a.b=c`` overrides, typed and validated."""
    merged = OmegaConf.structured(Config)
    where = "defaults"
    try:  # one layer at a time, so that an error names the layer it is in
        if path is not None:
            where = str(path)
            preset = OmegaConf.load(resolve_preset(str(path)))
            if not isinstance(preset, DictConfig):
                raise ConfigError(f"{path}: a preset is a mapping of sections (model:, rollout:, ...), not a list")
            merged = OmegaConf.merge(merged, preset)
        for item in overrides:
            where = f"override {item!r}"
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form section.key=value")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        config: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        hint = (" A list is written in brackets: key=[a,b]." if "ListConfig" in str(exc) else "")
        raise ConfigError(f"{where}: bad config key {key!r}: {exc.msg if hasattr(exc, 'msg') else exc}.{hint} "
                          f"Valid keys are the fields of orchestration/config.py.") from None
    except yaml.YAMLError as exc:  # a preset's YAML, or an override's value (parsed as YAML)
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(exc).split())}") from None
    for section, key in SWITCHES:  # YAML reads a bare on / off as a boolean: the str field holds "True" / "False"
        value = getattr(getattr(config, section), key)
        setattr(getattr(config, section), key, {"True": "on", "False": "off"}.get(value, value))
    from orchestration.validation import validate  # it reads this module's schema
    validate(config)
    if config.rollout.adaptive_max_batch == 0:
        config.rollout.adaptive_max_batch = config.algorithm.prompts_per_step * config.rollout.n
    if config.rollout.calibration_cache:  # the rollout actors' working directory is not the caller's
        config.rollout.calibration_cache = str(Path(config.rollout.calibration_cache).resolve())
    return config


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
