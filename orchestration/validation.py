"""Value checks of a run configuration (orchestration/config.py's schema) that a type cannot
express: ranges, choices, combinations, and a resume's checkpoint against the config. Each
error names the key, its value and what is allowed; settings that run but cost acceptance or
exactness are warned about.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from orchestration import checkpoint
from orchestration.config import SWITCHES, Config, ConfigError, ModelConfig

log = logging.getLogger("rlaccel")


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {sorted(allowed)}")


def _check(key: str, ok: bool, what: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: must be {what}")


def _max_positions(m: ModelConfig, builtin: dict) -> int | None:
    """The model's max_position_embeddings, if its config says (a built-in one, or model.path's config.json)."""
    if m.path is None:
        return builtin[m.name].get("max_position_embeddings")
    try:
        hf = json.loads((Path(m.path) / "config.json").read_text())
        if hf.get("rope_scaling") or hf.get("rope_parameters", {}).get("rope_type", "default") != "default":
            return None  # scaled positions (YaRN, ...): vLLM derives the limit, and names it if too small
        return int(hf["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # likewise: vLLM's to tell
        return None


def validate(config: Config, warn: bool = True) -> None:
    """Value checks a type cannot express. Registries are consulted, not copied. ``warn``: also log
    the warnings of settings that run but cost acceptance (false for a second check of one config)."""
    from attention.shared_prompt import BACKENDS
    from policy.fused_adamw import MODES as SWITCH_MODES  # "auto" | "on" | "off"
    from policy.grpo import ADVANTAGES, BEHAVIOUR_WEIGHTS, LOSS_AGGREGATIONS, weighs_on_policy
    from policy.models import BUILTIN_MODELS

    m, d, r, t, a, o = (config.model, config.data, config.rollout, config.trainer,
                        config.algorithm, config.orchestration)
    if m.path is None:
        _choice("model.name", m.name, BUILTIN_MODELS)
    elif not Path(m.path).is_dir():
        raise ConfigError(f"model.path={m.path!r} is not a directory; give a local Hugging Face "
                          f"model directory (config.json + weights + tokenizer)")
    _check("model.warm_start_steps", m.warm_start_steps >= 0, ">= 0", m.warm_start_steps)
    _check("model.warm_start_lr", math.isfinite(m.warm_start_lr) and m.warm_start_lr > 0, "finite, > 0", m.warm_start_lr)
    _check("model.warm_start_batch", m.warm_start_batch >= 1, ">= 1", m.warm_start_batch)
    _check("model.warm_start_label_smoothing", 0 <= m.warm_start_label_smoothing < 1, "in [0, 1)",
           m.warm_start_label_smoothing)
    _choice("model.dtype", m.dtype, {"float32", "bfloat16", "float16", "float64"})
    if d.source != "arithmetic" and not Path(d.source).exists():
        raise ConfigError(f"data.source={d.source!r}: no such file or directory; give 'arithmetic', a local "
                          f".jsonl/.parquet file or a directory saved with datasets' save_to_disk")
    _check("data.num_prompts", d.num_prompts >= 1, ">= 1", d.num_prompts)
    _check("data.few_shot", d.few_shot >= 0, ">= 0", d.few_shot)
    _check("data.min_digits", 1 <= d.min_digits <= d.max_digits <= 9,
           "1 <= data.min_digits <= data.max_digits <= 9", (d.min_digits, d.max_digits))
    _check("data.operators", bool(d.operators) and set(d.operators) <= set("+-*"),
           "a non-empty string of the characters '+-*'", d.operators)
    _check("data.max_prompt_tokens", d.max_prompt_tokens >= 1, ">= 1", d.max_prompt_tokens)
    _choice("rollout.backend", r.backend, {"vllm", "hf"})
    _check("rollout.num_workers", r.num_workers >= 1, ">= 1", r.num_workers)
    _check("rollout.max_restarts", r.max_restarts >= 0, ">= 0", r.max_restarts)
    _check("rollout.gpus", r.gpus in (0, 1), "0 (a CPU engine) or 1: a worker's engine runs on one GPU (no tensor "
           "parallelism here; more GPUs: more rollout.num_workers)", r.gpus)
    _check("rollout.n", r.n >= 2, ">= 2 (group-relative advantages need two responses)", r.n)
    _check("rollout.temperature", math.isfinite(r.temperature) and r.temperature > 0,
           "finite, > 0 (GRPO needs sampling)", r.temperature)
    _check("rollout.kv_cache_gib", r.kv_cache_gib >= 1, ">= 1", r.kv_cache_gib)
    _check("rollout.sync_probe_tolerance", r.sync_probe_tolerance is None or (
        math.isfinite(r.sync_probe_tolerance) and r.sync_probe_tolerance > 0), "null or finite, > 0",
        r.sync_probe_tolerance)
    _check("rollout.sync_probe_every", r.sync_probe_every >= 1, ">= 1 (1: a probe at every weight sync)",
           r.sync_probe_every)
    _check("rollout.gpu_memory_utilization", 0 < r.gpu_memory_utilization <= 1, "in (0, 1]", r.gpu_memory_utilization)
    _check("rollout.block_size", r.block_size is None or r.block_size >= 1, ">= 1 (or unset)", r.block_size)
    _check("rollout.top_p", 0 < r.top_p <= 1, "in (0, 1]", r.top_p)
    _check("rollout.max_tokens", r.max_tokens >= 1, ">= 1", r.max_tokens)
    _check("rollout.threads", r.threads >= 1, ">= 1", r.threads)
    if r.draft_model is not None:
        if r.backend != "vllm":
            raise ConfigError("rollout.draft_model needs rollout.backend=vllm (speculative decoding is vLLM's)")
        if not (Path(r.draft_model) / "config.json").is_file():
            raise ConfigError(f"rollout.draft_model={r.draft_model!r} is not a drafter directory (no config.json); "
                              f"train one with `python -m mtp.train`")
    _choice("rollout.spec_method", r.spec_method, {"eagle", "mtp"})
    if r.spec_method == "mtp":
        if r.draft_model is not None:
            raise ConfigError("rollout.spec_method=mtp drafts with the model's own MTP layers: unset rollout.draft_model")
        if r.backend != "vllm":
            raise ConfigError("rollout.spec_method=mtp needs rollout.backend=vllm (speculative decoding is vLLM's)")
    _check("rollout.num_speculative_tokens", r.num_speculative_tokens >= 1, ">= 1", r.num_speculative_tokens)
    if r.spec_schedule is not None:
        rows_ok = all(isinstance(row, (list, tuple)) and len(row) == 3 and 1 <= row[0] <= row[1]
                      and 0 <= row[2] <= r.num_speculative_tokens for row in r.spec_schedule)
        _check("rollout.spec_schedule", bool(r.spec_schedule) and rows_ok, "rows [lo, hi, k] of live batch sizes "
               f"1 <= lo <= hi and draft tokens 0 <= k <= rollout.num_speculative_tokens="
               f"{r.num_speculative_tokens}, e.g. [[1,8,3],[9,256,0]] (or unset: always k)", r.spec_schedule)
    _check("rollout.adaptive_explore", r.adaptive_explore == 0 or r.adaptive_explore >= 2, "0 (never) or >= 2 "
           "(1 would explore every call: the schedule itself would never run, nor the check time it)",
           r.adaptive_explore)
    if r.adaptive_spec and r.draft_model is None and r.spec_method != "mtp":
        raise ConfigError("rollout.adaptive_spec=true needs a drafter (rollout.draft_model, or rollout.spec_method=mtp)")
    _check("rollout.adaptive_max_batch", r.adaptive_max_batch >= 0, ">= 0", r.adaptive_max_batch)
    _choice("rollout.draft_sample_method", r.draft_sample_method, {"probabilistic", "greedy"})
    _check("rollout.max_model_len", r.max_model_len >= d.max_prompt_tokens + r.max_tokens,
           f">= data.max_prompt_tokens + rollout.max_tokens = {d.max_prompt_tokens + r.max_tokens}",
           r.max_model_len)
    positions = _max_positions(m, BUILTIN_MODELS)
    if positions is not None:
        _check("rollout.max_model_len", r.max_model_len <= positions,
               f"<= the model's max_position_embeddings={positions} (lower data.max_prompt_tokens or "
               f"rollout.max_tokens with it)", r.max_model_len)
    _check("trainer.lr", math.isfinite(t.lr) and t.lr > 0, "finite, > 0", t.lr)
    _check("trainer.weight_decay", math.isfinite(t.weight_decay) and t.weight_decay >= 0, "finite, >= 0",
           t.weight_decay)
    for key, beta in (("trainer.beta1", t.beta1), ("trainer.beta2", t.beta2)):
        _check(key, 0 <= beta < 1, "in [0, 1) (AdamW's moment decay)", beta)
    _check("trainer.mini_batches", t.mini_batches >= 1, ">= 1", t.mini_batches)
    _check("trainer.mini_batches", t.mini_batches <= a.prompts_per_step,
           f"<= algorithm.prompts_per_step={a.prompts_per_step} (a mini-batch holds whole groups)", t.mini_batches)
    _check("trainer.micro_batch_size", t.micro_batch_size >= 1, ">= 1", t.micro_batch_size)
    _check("trainer.logit_chunk", t.logit_chunk >= 0, ">= 0 (0: no chunks)", t.logit_chunk)
    _check("trainer.threads", t.threads >= 1, ">= 1", t.threads)
    _check("trainer.max_grad_norm", math.isfinite(t.max_grad_norm) and t.max_grad_norm > 0, "finite, > 0",
           t.max_grad_norm)
    _choice("trainer.attention_backend", t.attention_backend, BACKENDS)
    for section, key in SWITCHES:
        _choice(f"{section}.{key}", getattr(getattr(config, section), key), SWITCH_MODES)
    _check("trainer.world_size", t.world_size >= 1, ">= 1", t.world_size)
    _check("trainer.device", t.device in ("cpu", "cuda", "cuda:0"), "'cpu' or 'cuda' (Ray shows each trainer rank "
           "its own GPU only, as cuda:0)", t.device)
    if t.shared_prompt and t.attention_backend == "flex" and t.device == "cpu":
        raise ConfigError("trainer.attention_backend=flex needs trainer.device=cuda: torch has no FlexAttention "
                          "backward on CPU (the run would fail at its first update); use attention_backend=regions")
    if t.zero_stage == 3:
        raise ConfigError("trainer.zero_stage=3 is not supported: ZeRO-3 partitions the parameters, which the "
                          "packed attention path and the weight export read whole; use 1 or 2")
    _choice("trainer.zero_stage", t.zero_stage, {1, 2})
    if t.world_size > 1:
        _check("algorithm.prompts_per_step", a.prompts_per_step >= t.world_size,
               f">= trainer.world_size={t.world_size} (every rank trains whole groups)", a.prompts_per_step)
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError("trainer.world_size > 1 needs DeepSpeed; run scripts/install.sh (it installs "
                              "deepspeed), or set trainer.world_size=1") from None
    _choice("algorithm.advantage", a.advantage, ADVANTAGES)
    _choice("algorithm.loss_agg", a.loss_agg, LOSS_AGGREGATIONS)
    _check("algorithm.clip_low", 0 <= a.clip_low < 1, "in [0, 1)", a.clip_low)
    _check("algorithm.clip_high", math.isfinite(a.clip_high) and a.clip_high >= 0, "finite, >= 0", a.clip_high)
    _check("algorithm.kl_coef", math.isfinite(a.kl_coef) and a.kl_coef >= 0, "finite, >= 0", a.kl_coef)
    _check("algorithm.prompts_per_step", a.prompts_per_step >= 1, ">= 1", a.prompts_per_step)
    _check("algorithm.reward_fns", len(a.reward_fns) >= 1 and all(":" in s for s in a.reward_fns),
           "a non-empty list of 'module:function' paths", a.reward_fns)
    _check("algorithm.reward_fns", len(set(a.reward_fns)) == len(a.reward_fns), "each function once (their "
           "rewards are summed; to weight one, wrap it in a function that scales its rewards)", a.reward_fns)
    _choice("algorithm.on_reward_error", a.on_reward_error, {"fail", "zero"})
    _check("orchestration.steps", o.steps >= 1, ">= 1", o.steps)
    _check("orchestration.max_staleness", o.max_staleness >= 0, ">= 0", o.max_staleness)
    _check("algorithm.is_cap", math.isfinite(a.is_cap) and a.is_cap >= 1, "finite, >= 1", a.is_cap)
    _choice("algorithm.behaviour_weight", a.behaviour_weight, BEHAVIOUR_WEIGHTS)
    _check("orchestration.num_cpus", o.num_cpus >= 1, ">= 1", o.num_cpus)
    _check("orchestration.checkpoint_every", o.checkpoint_every >= 0, ">= 0", o.checkpoint_every)
    _check("orchestration.keep_checkpoints", o.keep_checkpoints >= 0, ">= 0 (0 keeps all)", o.keep_checkpoints)
    _choice("orchestration.weight_sync", o.weight_sync, {"object_store", "broadcast"})
    if o.weight_sync == "broadcast" and t.device != "cpu" and r.gpus == 0:
        raise ConfigError("orchestration.weight_sync=broadcast with trainer.device="
                          f"{t.device} sends the weights over NCCL into a GPU of each rollout worker, "
                          "which has none (rollout.gpus=0): set rollout.gpus=1, or weight_sync=object_store")
    _choice("orchestration.placement_strategy", o.placement_strategy,
            {"PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"})
    _check("mtp.k", config.mtp.k >= 1, ">= 1", config.mtp.k)
    _check("mtp.layers", config.mtp.layers >= 1, ">= 1", config.mtp.layers)
    _choice("mtp.objective", config.mtp.objective, {"tv", "ce"})
    _choice("mtp.head", config.mtp.head, {"eagle", "native"})
    if config.mtp.head == "native":
        _check("mtp.layers", config.mtp.layers == 1, "1 with mtp.head=native (vLLM drafts every step with MTP "
               "layer 0)", config.mtp.layers)
        _check("mtp.draft_vocab", config.mtp.draft_vocab == 0, "0 with mtp.head=native (a native MTP layer drafts "
               "through the policy's LM head)", config.mtp.draft_vocab)
    _check("mtp.draft_vocab", config.mtp.draft_vocab >= 0, ">= 0 (0 = the whole vocabulary)", config.mtp.draft_vocab)
    if config.mtp.parallel:
        _check("mtp.draft_vocab", config.mtp.draft_vocab > 0, "> 0 with mtp.parallel=true (vLLM drafts in parallel "
               "with EAGLE-3 heads only)", config.mtp.draft_vocab)
    if config.mtp.draft_vocab:
        _check("mtp.layers", config.mtp.layers == 1, "1 with mtp.draft_vocab > 0 (an EAGLE-3 head has one layer)",
               config.mtp.layers)
    _check("mtp.warm_steps", 0 <= config.mtp.warm_steps <= config.mtp.steps, "in [0, mtp.steps]",
           config.mtp.warm_steps)
    _check("mtp.kl_weight", math.isfinite(config.mtp.kl_weight) and config.mtp.kl_weight >= 0, "finite, >= 0",
           config.mtp.kl_weight)
    if warn and r.top_p < 1.0:
        fresh = ("gets it too (algorithm.behaviour_weight=%s): every token's weight is then about the nucleus's "
                 "mass, < 1, which scales the update down rather than correcting a numerical mismatch"
                 if weighs_on_policy(a.behaviour_weight, config.model.dtype) else
                 "does not (weight 1, algorithm.behaviour_weight=%s): the loss treats fresh samples as on-policy, as "
                 "TRL and verl do")
        log.warning("rollout.top_p=%s: the samples follow the top-p-truncated distribution and the sampler logs its "
                    "logprobs, while the trainer's policy is the whole softmax(z/T): logp_mismatch_max measures the "
                    "truncation and a stale sample's importance weight includes it; a fresh one's " + fresh +
                    ". top_p=1 keeps them exact", r.top_p, a.behaviour_weight)
    if warn and (r.draft_model is not None or r.spec_method == "mtp"):
        _warn_head_target(config)
    if config.mtp.maintain:
        if r.spec_method == "mtp":
            raise ConfigError("mtp.maintain=true is implemented for EAGLE heads (rollout.draft_model); native MTP "
                              "layers (rollout.spec_method=mtp) stay frozen during RL: set mtp.maintain=false")
        if r.draft_model is None:
            raise ConfigError("mtp.maintain=true needs rollout.draft_model (a head from `python -m mtp.train`)")
        if t.world_size != 1:
            raise ConfigError("mtp.maintain=true is implemented for trainer.world_size=1 only")
        _check("mtp.maintain_steps", config.mtp.maintain_steps >= 1, ">= 1 with mtp.maintain=true (0 would train "
               "nothing and report no head metrics; set mtp.maintain=false for a frozen head)",
               config.mtp.maintain_steps)
        _check("mtp.maintain_lr", math.isfinite(config.mtp.maintain_lr) and config.mtp.maintain_lr > 0,
               "finite, > 0", config.mtp.maintain_lr)
    if o.resume is not None:
        state = checkpoint.load(o.resume)
        _check("orchestration.steps", o.steps > state["step"], f"> {state['step']}, the step the checkpoint "
               f"{o.resume} resumes at (the total number of steps, not the steps still to run)", o.steps)
        checkpoint.check_setup(state, checkpoint.setup_identity(config), config, o.resume, warn=warn)


def _warn_head_target(config: Config) -> None:
    """Settings under which vLLM verifies drafts against another target than the drafter head is
    trained for (mtp.train, mtp.maintain): sampling stays exact, acceptance is lower than the
    head's training and report predict."""
    r = config.rollout
    if r.top_p < 1.0:
        log.warning("rollout.top_p=%s with a drafter: vLLM verifies drafts against the top-p-truncated "
                    "distribution, while the head is trained against the whole softmax(z/T); sampling stays exact, "
                    "acceptance is lower than mtp.train's report predicts", r.top_p)
    if r.draft_sample_method == "greedy" and config.mtp.maintain and config.mtp.objective == "tv":
        log.warning("rollout.draft_sample_method=greedy with mtp.maintain and mtp.objective=tv: the TV objective raises the "
                    "acceptance of probabilistic drafting (sum of min(p, q)); a greedy draft is accepted with "
                    "p(argmax q). Sampling stays exact; use draft_sample_method=probabilistic (the default)")
