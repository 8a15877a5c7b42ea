"""Online maintenance of the drafter head during RL: after each policy update, a few optimizer
steps on the head alone, against the updated policy's distributions of the batch just trained
on (detached: the policy is not touched). The head follows the moving policy so acceptance does
not decay (Bebop). Its weights travel with the policy's in the verified weight sync, under the
``drafter.`` prefix, and are saved in the trainer's checkpoints.

A step runs in micro-batches of the trainer's ``micro_batch_size`` sequences (each a policy
forward with its full-vocabulary logits, then the head's k steps), their gradients accumulated:
every loss term is a mean over the whole batch's positions, counted before any forward
(:func:`mtp.batch.loss_counts`), so the step is the whole batch's, up to summation order.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from mtp import losses
from mtp.batch import draft_targets, head_support, loss_counts, loss_fn
from mtp.heads import load_head
from mtp.optim import HeadOptimizer

PREFIX = "drafter."
HEAD_DIR = "drafter"


class HeadMaintainer:
    def __init__(self, head_dir: str | Path, mtp_cfg, temperature: float, pad_id: int, device: str = "cpu",
                 micro_batch: int = 64):
        self.cfg, self.temperature, self.pad_id, self.micro_batch = mtp_cfg, temperature, pad_id, micro_batch
        self.head = load_head(head_dir).to(device)
        self.optimizer = HeadOptimizer(self.head, mtp_cfg.maintain_lr)

    def step(self, policy, groups) -> dict[str, float]:
        t0 = time.perf_counter()
        seqs = [(g.prompt_ids + r, len(g.prompt_ids)) for g in groups for r in g.responses if r]
        k, parts = self.cfg.k, [seqs[i:i + self.micro_batch] for i in range(0, len(seqs), self.micro_batch)]
        anchors = loss_counts(seqs, k, self.pad_id)  # the valid anchors of each draft step
        counts = (loss_counts(seqs, k, self.pad_id, head_support(self.head, policy.lm_head.weight))
                  if self.cfg.objective == "ce" else anchors)
        metrics, skipped = {}, 0
        for _ in range(self.cfg.maintain_steps):
            self.optimizer.zero_grad()
            loss, alpha1, coverage = 0.0, 0.0, 0.0
            for part in parts:
                steps = draft_targets(policy, self.head, part, k, self.pad_id)
                part_loss = loss_fn(steps, self.cfg.objective, False, self.temperature, self.cfg.kl_weight, counts)
                part_loss.backward()
                loss += float(part_loss)
                with torch.no_grad():  # of the step's pre-update head, at the first draft position
                    p, q, _, valid = steps[0]
                    alpha1 += float(losses.masked_mean(losses.acceptance(p, q, self.temperature), valid, anchors[0]))
                    # the updated policy's mass on the head's draft vocabulary (1 for a full one):
                    # a policy drifting out of it caps acceptance whatever the head learns
                    coverage += float(losses.masked_mean(losses.coverage(p, q, self.temperature), valid, anchors[0]))
            # one NaN step would leave every weight NaN, and the workers would draft with them
            if not math.isfinite(loss):
                self.optimizer.zero_grad()
                skipped += 1
            elif not math.isfinite(self.optimizer.step(1.0)):  # a non-finite norm is not applied
                skipped += 1
            metrics = {"head_alpha1": alpha1, "head_draft_coverage": coverage}
        # head_maintain_skipped: steps not applied for a non-finite loss or gradient (the head kept)
        return {**metrics, "head_maintain_skipped": float(skipped), "head_maintain_s": time.perf_counter() - t0}

    def state(self) -> dict[str, torch.Tensor]:
        """The head's weights under vLLM's checkpoint names, prefixed for the weight sync."""
        return {PREFIX + k: v.to("cpu", copy=True) for k, v in self.head.vllm_state().items()}

    def save(self, directory: Path) -> None:
        self.head.save_vllm(directory / HEAD_DIR)
        torch.save(self.optimizer.state_dict(), directory / "drafter_optimizer.pt")

    def load(self, directory: Path) -> None:
        saved = load_head(directory / HEAD_DIR)
        if type(saved) is not type(self.head) or _shapes(saved) != _shapes(self.head):
            raise ValueError(f"{directory / HEAD_DIR} holds a {type(saved).__name__} ({saved.config}); the run "
                             f"maintains a {type(self.head).__name__} ({self.head.config}) from rollout.draft_model: "
                             f"resume with the rollout.draft_model the checkpoint was trained with")
        self.head.load_state_dict(saved.state_dict())
        self.optimizer.load_state_dict(torch.load(directory / "drafter_optimizer.pt", weights_only=True))
        # the learning rates are the run's config's (mtp.maintain_lr), not the checkpoint's
        for group, configured in zip(self.optimizer.param_groups, self.head.param_groups(self.cfg.maintain_lr)):
            group["lr"] = configured["lr"]


def _shapes(head) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in head.state_dict().items()}


def split_drafter(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(policy weights, drafter weights without the prefix) of a synced state dict."""
    policy = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    head = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    return policy, head
