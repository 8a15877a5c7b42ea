"""Run metrics: one JSON line per step, TensorBoard scalars, Ray gauges for the dashboard."""

from __future__ import annotations

import json
import math
from pathlib import Path

# Ray gauges exported to the dashboard / Prometheus under `ray job submit`.
GAUGES = {
    "reward": "Mean reward of the step's samples",
    "rollout_tok_s": "Rollout (sampling) tokens per second",
    "update_tok_s": "Trainer update tokens per second: the step's samples' prompt+response tokens, a shared prompt "
                    "and skipped (zero-advantage) responses counted as trained",
    "rollout_s": "Seconds spent sampling in the step",
    "update_s": "Seconds spent in the trainer update in the step (with the drafter head's maintenance, mtp.maintain)",
    "sync_s": "Seconds the rollout workers spent on the weight sync of the previous step's update (verified "
              "during this step; 0 at the first)",
    "step_s": "Wall-clock seconds of the step",
    "sync_bytes": "Bytes of weights received by the rollout workers in the sync of the previous step's update",
    "response_len": "Mean tokens per sampled response",
    "truncated_frac": "Fraction of the sampled responses cut at rollout.max_tokens",
    "loss": "Policy loss of the step's update",
    "grad_norm": "Mean pre-clip gradient norm of the step's optimizer steps",
    "trainer_idle_frac": "Fraction of the step the trainer was idle",
    "rollout_idle_frac": "Fraction of the step the rollout workers were idle",
    "in_flight": "Rollout batches kept in flight (the buffer depth)",
    "staleness_mean": "Mean policy versions a trained sample lagged the trainer",
    "update_skipped": "Fraction of the step's responses whose forward and backward were skipped (advantage 0)",
    "regenerated_groups": "Groups sampled again because they exceeded orchestration.max_staleness (total)",
    "worker_restarts": "Rollout workers restarted by Ray (total)",
    "entropy": "Mean negative log-probability of the sampled tokens",
    "kl": "KL to the reference policy (k3 estimator)",
    "is_weight_mean": "Mean truncated behaviour importance weight of the trained tokens (1: none weighted; "
                      "algorithm.behaviour_weight)",
    "logp_mismatch_max": "Max |trainer - sampler| logprob over the step's computed on-policy tokens",
    "spec_acceptance": "Speculative rollout: accepted / drafted tokens",
    "spec_acceptance_pos1": "Speculative rollout: acceptance of the first draft token",
    "spec_mean_accepted_len": "Speculative rollout: tokens emitted per target forward",
}
# Ray histograms: name -> (description, bucket boundaries).
HISTOGRAMS = {"staleness": ("Policy versions each trained group lagged the trainer", [0.5, 1.5, 2.5, 3.5, 4.5, 8.5])}


class RunLogger:
    def __init__(self, directory: str | Path, tensorboard: bool = True, append: bool = False,
                 before_step: int | None = None):
        """``append``: continue the directory's metrics.jsonl and TensorBoard log (a resumed run),
        keeping only the records of steps before ``before_step`` if given (a run resumed from an
        earlier checkpoint than its last step logs those steps again)."""
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "metrics.jsonl"
        if append and before_step is not None and path.is_file():
            lines = path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] < before_step]
            if len(kept) < len(lines):
                tmp = path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(kept))
                tmp.replace(path)
        self._jsonl = open(path, "a" if append else "w")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: TensorBoard hides the earlier run's events from that step on
            self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=before_step if append else None)
        self._gauges, self._histograms = {}, {}
        try:
            import ray
            from ray.util.metrics import Gauge, Histogram
            if ray.is_initialized():
                self._gauges = {k: Gauge(f"rlaccel_{k}", description=d) for k, d in GAUGES.items()}
                self._histograms = {k: Histogram(f"rlaccel_{k}", description=d, boundaries=b)
                                    for k, (d, b) in HISTOGRAMS.items()}
        except Exception:  # metrics are best effort outside a Ray job
            self._gauges, self._histograms = {}, {}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for k, v in record.items():
            if k == "step" or not math.isfinite(v):
                continue
            if self._tb is not None:
                self._tb.add_scalar(k, v, step)
            if k in self._gauges:
                self._gauges[k].set(v)

    def observe(self, name: str, values: list[float]) -> None:
        """Observations for the Ray histogram ``rlaccel_<name>`` (e.g. per-group staleness)."""
        if name in self._histograms:
            for v in values:
                self._histograms[name].observe(float(v))

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(directory: str | Path) -> list[dict]:
    with open(Path(directory) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
