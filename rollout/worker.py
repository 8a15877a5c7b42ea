"""The rollout worker: a plain class owning one engine; ``ray.remote`` wraps it as an actor.

It turns dataset rows into :class:`policy.batch.Group` s (tokenise, sample, decode) and
applies verified weight updates: the received tensors must match the sender's checksum (when
it sends one: a GPU sender does not), and, when the sender names probe tokens (at least one of
the two), the engine's logprobs of them after the update must
match the reference ones (the trainer's, or a transformers forward of the policy's model class
with the received weights), proving the engine samples with the new weights. Where the worker
computes the reference itself (a CPU trainer sends none) and the update is checksummed, the probe
runs on an engine's first update, after a failed one and on every ``rollout.sync_probe_every``-th
(a vLLM reload that did not happen fails the engine's read-back of its norm weights at every
update: ``rollout.vllm_adapter.reload_weights``); otherwise on every update.
"""

from __future__ import annotations

import math
import time

from policy import weight_broadcast
from policy.batch import Group
from policy.models import (PackedState, empty_model, encode_prompt, load_tokenizer, probe_logprobs, state_checksum,
                           sync_tolerance, unpack_state)


class WeightSyncError(RuntimeError):
    pass


class PolicyDiverged(FloatingPointError):
    """The policy the worker samples from gives non-finite probabilities."""


class WorkerRestarted(RuntimeError):
    """This process is Ray's restart of a worker that died: it neither samples nor loads weights
    until the driver takes it back (:meth:`RolloutWorker.adopt`; a :meth:`RolloutWorker.reset`
    first if Ray started it with another run's arguments, those it was created with)."""


def _restarted_by_ray() -> bool:
    """Whether this process is a Ray actor that Ray restarted (False outside an actor)."""
    try:
        import ray
        return bool(ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 (not in an actor: Ray asserts)
        return False


def spec_metrics(delta: dict) -> dict[str, float]:
    """Speculative-decoding counts of one generate call (:func:`spec_decode_delta`) as flat
    metrics (summed over workers by the driver): ``spec_drafts``, ``spec_draft_tokens``,
    ``spec_accepted`` and, per position i, ``spec_accepted_pos{i}`` (rounds whose first i drafts
    were all accepted) and ``spec_verified_pos{i}`` (rounds that drafted position i and accepted
    the ones before it)."""
    if not delta:
        return {}
    out = {f"spec_{k}": float(delta[k]) for k in ("drafts", "draft_tokens", "accepted")}
    out.update({f"spec_accepted_pos{i + 1}": float(a) for i, a in enumerate(delta["accepted_per_pos"])})
    out.update({f"spec_verified_pos{i + 1}": float(v) for i, v in enumerate(delta.get("verified_per_pos", []))})
    return out


def make_engine(model_dir: str, rollout_cfg, dtype: str, seed: int):
    if rollout_cfg.backend == "vllm":
        from rollout.vllm_engine import VLLMEngine
        return VLLMEngine(model_dir, rollout_cfg, dtype, seed)
    from rollout.engine import HFEngine
    return HFEngine(model_dir, rollout_cfg, dtype)


class RolloutWorker:
    def __init__(self, model_dir: str, rollout_cfg, dtype: str = "float32", seed: int = 0, worker_id: int = 0,
                 version: int = 0, run: str = ""):
        """``version``: the policy version of the weights in ``model_dir`` (a checkpoint's).
        ``run``: the run these arguments are for (the driver's token; see :meth:`adopt`)."""
        self.engine = None
        restarted = _restarted_by_ray()
        self.reset(model_dir, rollout_cfg, dtype, seed, worker_id, version, run)
        # Ray restarts a dead worker with the arguments it was created with: its start-up weights,
        # and in processes kept from run to run another run's settings (orchestration.actors.Actors).
        self.adopted = not restarted

    def reset(self, model_dir: str, rollout_cfg, dtype: str = "float32", seed: int = 0, worker_id: int = 0,
              version: int = 0, run: str = "") -> None:
        """Start over as if constructed with these arguments, in the same process (the next run of
        an :class:`orchestration.actors.Actors`, or a restarted worker taken back by another run
        than it was created for): the engine is shut down and a new one built."""
        self.adopted, self.run = True, run
        if self.engine is not None and hasattr(self.engine, "close"):
            self.engine.close()
        self.engine = None
        self._weight_group = self._weight_buffers = None  # an earlier run's broadcast group and buffers
        self.cfg, self.dtype, self.worker_id = rollout_cfg, dtype, worker_id
        self.tokenizer = load_tokenizer(model_dir)
        self.engine = make_engine(model_dir, rollout_cfg, dtype, seed)
        # The probe's reference when the trainer sends none: the model without weights (they come
        # with each update); built here, not at the first update, where the ~3 s of importing
        # accelerate would land in a timed step.
        self._reference = empty_model(model_dir)
        self.version = version
        # Set when an update fails verification: the engine's weights are then unknown, and
        # the worker refuses to sample until a verified update succeeds.
        self.sync_error: str | None = None
        # Updates since the engine's last probe; infinite until one: a new engine's first update and
        # the one after a failed update probe.
        self._unprobed = math.inf

    def adopt(self, run: str) -> bool:
        """Take this process back for ``run`` after Ray restarted it: False if it was started for
        another run (then :meth:`reset` it with this run's arguments). The driver then sends it
        the current weights (:meth:`update_weights`) before it samples."""
        if run != self.run:
            return False
        self.adopted = True
        return True

    def _taken_back(self) -> None:
        if not self.adopted:
            raise WorkerRestarted(f"worker {self.worker_id} was restarted by Ray after its process died and has "
                                  f"not been taken back by the run (orchestration.grpo)")

    def generate(self, batch: list[tuple[int, dict]], seed: int) -> tuple[list[Group], dict]:
        """Sample ``n`` responses for each (index, row); returns groups and metrics."""
        self._taken_back()
        if self.sync_error:
            raise WeightSyncError(f"refusing to sample: {self.sync_error}")
        t0 = time.perf_counter()
        prompt_ids = [encode_prompt(self.tokenizer, row["prompt"]) for _, row in batch]
        diverged = self._diverged(self.version, "probabilities while sampling")
        try:
            outputs = self.engine.generate(prompt_ids, seed)
        except RuntimeError as exc:  # torch's sampler refuses NaN probabilities (transformers' generate)
            if "probability tensor contains" in str(exc):
                raise PolicyDiverged(diverged) from exc
            raise
        # logprobs are <= 0, so their sum is finite exactly when each is (vLLM samples some token from NaN logits)
        if not math.isfinite(sum(sum(c.logprobs) for comps in outputs for c in comps)):
            raise PolicyDiverged(diverged)
        call = getattr(self.engine, "last_call", {})  # the vLLM engine's counters and metrics of this call
        groups = []
        for (index, row), ids, comps in zip(batch, prompt_ids, outputs):
            groups.append(Group(
                prompt=row["prompt"], prompt_ids=ids, responses=[c.token_ids for c in comps],
                behaviour_logprobs=[c.logprobs for c in comps], version=self.version,
                completions=self.tokenizer.batch_decode([c.token_ids for c in comps], skip_special_tokens=True),
                finish_reasons=[c.finish_reason for c in comps], row=row, index=index))
        return groups, {"rollout_s": time.perf_counter() - t0,
                        "rollout_tokens": float(sum(len(r) for g in groups for r in g.responses)),
                        "rollout_sequences": float(sum(g.n for g in groups)),
                        "rollout_truncated": float(sum(f == "length" for g in groups for f in g.finish_reasons)),
                        **spec_metrics(call.get("spec_delta", {})), **call.get("metrics", {})}

    def _diverged(self, version: int, where: str) -> str:
        return (f"worker {self.worker_id}: the policy of version {version} gives non-finite {where}: training "
                f"diverged by this version. Lower trainer.lr (or trainer.max_grad_norm) and resume from a checkpoint "
                f"taken before it (orchestration.checkpoint_every)")

    def node_id(self) -> str:
        """The Ray node this worker runs on (placement report)."""
        import ray
        return ray.get_runtime_context().get_node_id()

    def gpu_ids(self) -> list[str]:
        """The GPUs Ray gave this worker (placement report; rollout.gpus)."""
        import ray
        return [str(i) for i in ray.get_gpu_ids()]

    def update_weights(self, weights: PackedState, version: int, checksum: str | None,
                       probe: tuple[list[int], list[float] | None] | None = None) -> dict:
        """Load new weights (packed by :func:`policy.models.pack_state`) in place; raises
        :class:`WeightSyncError` unless verified. ``checksum``: the sender's
        :func:`policy.models.state_checksum` of them (None: not checked). ``probe``: (token ids,
        the logprobs the engine must then give them, or None for a transformers forward with these
        weights here)."""
        self._taken_back()
        t0 = time.perf_counter()
        return self._apply(unpack_state(weights), version, checksum, probe, t0)

    def join_weight_group(self, address: tuple[str, int], rank: int, world_size: int,
                          layout: weight_broadcast.Layout, backend: str) -> None:
        """Join this run's weight broadcast group (orchestration.weight_sync=broadcast) as ``rank``
        and allocate the tensors every :meth:`receive_weights` fills (on the GPU with NCCL)."""
        self._weight_group = self._weight_buffers = None  # an earlier group of this run's worker
        import ray
        self._weight_group = weight_broadcast.join(address, rank, world_size, backend, ray.util.get_node_ip_address())
        self._weight_buffers = weight_broadcast.buffers(layout, "cpu" if backend == "gloo" else "cuda")

    def receive_weights(self, version: int, checksum: str | None,
                        probe: tuple[list[int], list[float] | None] | None = None) -> dict:
        """Receive the trainer's broadcast of ``version`` and load it as :meth:`update_weights` does."""
        self._taken_back()
        t0 = time.perf_counter()
        state_dict = weight_broadcast.receive(self._weight_group, self._weight_buffers)
        return self._apply(state_dict, version, checksum, probe, t0)

    def _apply(self, state_dict: dict, version: int, checksum: str | None, probe, t0: float) -> dict:
        if checksum is None and probe is None:
            raise WeightSyncError(f"worker {self.worker_id}: an update to version {version} with neither a checksum "
                                  f"nor a probe cannot be verified; the engine keeps version {self.version}")
        received = state_checksum(state_dict) if checksum is not None else None
        if received != checksum:
            raise WeightSyncError(f"worker {self.worker_id}: weights for version {version} arrived corrupted "
                                  f"(checksum {received} != {checksum}); the engine keeps version {self.version}")
        self.sync_error = "a weight update is in progress"
        unprobed, self._unprobed = self._unprobed, math.inf  # until this update verifies
        due = probe is not None and (checksum is None or probe[1] is not None
                                     or unprobed + 1 >= self.cfg.sync_probe_every)
        self.engine.load_weights(state_dict)
        memory = {(t.data_ptr(), t.numel() * t.element_size()) for t in state_dict.values()}  # a tied matrix once
        metrics = {"sync_s": 0.0, "sync_probe_diff": 0.0, "sync_probed": float(due),
                   "sync_bytes": float(sum(n for _, n in memory))}
        if due:
            ids, expected = probe
            if expected is None:
                from mtp.maintain import split_drafter
                expected = probe_logprobs(self._reference, ids, split_drafter(state_dict)[0])
            if not all(math.isfinite(x) for x in expected):
                self.sync_error = self._diverged(version, "logprobs on the weight-sync probe (its reference forward, "
                                                          "from the weights as sent)")
                raise WeightSyncError(self.sync_error)
            got = self.engine.prompt_logprobs(ids)
            diffs = [abs(a - b) for a, b in zip(got, expected)]
            diff = math.inf if not all(math.isfinite(d) for d in diffs) else max(diffs)  # max() skips a NaN
            bound = self.cfg.sync_probe_tolerance or sync_tolerance(self.dtype)
            if diff > bound:
                self.sync_error = (
                    f"worker {self.worker_id}: after loading version {version} the engine's probe logprobs differ "
                    f"from the reference ones for the same weights by {diff:.2e} (> {bound:g}, "
                    f"rollout.sync_probe_tolerance): the engine is not sampling with the new weights, a vLLM "
                    f"adapter failure (rollout/vllm_adapter.py). Unless the difference is small and the earlier "
                    f"syncs' sync_probe_diff (metrics.jsonl) came close to the bound: then it is the engine's "
                    f"kernels against the reference's (half precision), and rollout.sync_probe_tolerance "
                    f"can be raised.")
                raise WeightSyncError(self.sync_error)
            metrics["sync_probe_diff"] = diff
        self.version, self.sync_error = version, None
        self._unprobed = 0 if due else unprobed + 1
        metrics["sync_s"] = time.perf_counter() - t0
        return metrics
