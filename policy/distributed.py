"""The optimizer side of :class:`policy.trainer.PolicyTrainer`: one process, or a data-parallel
group of ranks under DeepSpeed ZeRO.

Both expose the same small interface (``backward``, ``step``, ``all_sum``, ``all_max``,
``save``/``load``), so the GRPO step is one piece of code. Data parallelism is exact: every
rank normalises its loss by the *global* token/sequence totals of the mini-batch and scales it
by the world size, DeepSpeed averages the gradients over ranks, so the applied gradient is the
sum of the per-sequence gradients — the single-process gradient (tests/policy/test_distributed.py).

DeepSpeed runs with ``managed_gradient_accumulation=false``: gradients accumulate locally over a
rank's micro-batches and ``step()`` is the boundary, because ranks hold different numbers of
micro-batches. ZeRO-2 reduces during each backward, so ranks pad their backward count to the
largest with zero-loss backwards. ZeRO-0 (DeepSpeed's plain data parallel)
does not report the gradient norm and refuses float64 gradients: use ZeRO-1, the same
arithmetic. ZeRO-3 is refused (config validation): it partitions the
parameters themselves, and the packed attention path and the weight export read them directly.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def adamw(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """torch's fused AdamW (one vectorised kernel over all parameters; transformers' default
    optimizer since torch 2.8, so TRL's too). The per-tensor default took ~1 s per step for the
    ~100M preset on one CPU thread, the fused one ~0.2 s; the same update up to float rounding."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
                             fused=True)


def keep_configured_hyperparameters(param_groups: list[dict], cfg) -> None:
    """After an optimizer's state is loaded from a checkpoint: the learning rate, betas and weight
    decay are the run's config's, not the checkpoint's (torch's ``load_state_dict`` restores
    those too, so a resume with a lower ``trainer.lr`` would otherwise train at the old one)."""
    configured = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    for group in param_groups:
        had = {k: group[k] for k, v in configured.items() if (tuple(group[k]) if k == "betas" else group[k]) != v}
        if had:
            log.info("resume: the optimizer's %s from the config, %s (the checkpoint had %s)", sorted(had),
                     {k: configured[k] for k in had}, had)
        group.update(configured)


class UpdateNotApplied(FloatingPointError):
    """A step refused before any of its mini-batches changed the weights or the optimizer (a
    non-finite loss, or on one process a non-finite gradient norm: DeepSpeed applies before the
    norm is known, and its error is a plain FloatingPointError): the policy is as it was, and the
    step's batch can be trained on again."""


class LocalUpdate:
    """One process: torch AdamW with gradient-norm clipping."""

    world_size, rank = 1, 0

    def __init__(self, model: torch.nn.Module, cfg):
        self.model, self.max_grad_norm, self.cfg = model, cfg.max_grad_norm, cfg
        self.optimizer = adamw(model, cfg)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def pad_backwards(self, count: int) -> None:
        """Zero-loss backwards to match the group's backward count (no-op: there is no group)."""

    def step(self) -> float:
        """Clip, apply; returns the pre-clip gradient norm. A non-finite norm is not applied."""
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm))
        if not torch.isfinite(torch.tensor(norm)):
            self.zero_grad()
            raise UpdateNotApplied("non-finite gradient norm; this mini-batch was not applied")
        self.optimizer.step()
        return norm

    def all_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def all_max(self, values: list[float]) -> list[float]:
        return list(values)

    def save(self, directory: Path) -> None:
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        keep_configured_hyperparameters(self.optimizer.param_groups, self.cfg)


def init_process_group(rank: int, world_size: int, master_addr: str, master_port: int, device: str) -> None:
    """torch.distributed for the trainer group: gloo on CPU, NCCL on GPU (via DeepSpeed)."""
    import deepspeed

    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl", verbose=False)


class DeepSpeedUpdate:
    """A data-parallel rank: DeepSpeed ZeRO (stage ``trainer.zero_stage``) around torch AdamW."""

    def __init__(self, model: torch.nn.Module, cfg):
        import deepspeed
        import torch.distributed as dist

        self.model, self.dist, self.cfg = model, dist, cfg
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        optimizer = adamw(model, cfg)
        config = {
            "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False, "gradient_clipping": cfg.max_grad_norm,
            "zero_optimization": {"stage": cfg.zero_stage}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 2 ** 31, "wall_clock_breakdown": False,
        }
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def zero_grad(self) -> None:
        self.engine.zero_grad()
        self.engine.optimizer.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is normalised by global totals; DeepSpeed averages over ranks: sum = × world.
        self.engine.backward(loss * self.world_size)

    def pad_backwards(self, count: int) -> None:
        """``count`` zero-loss backwards: ranks with fewer micro-batches match the group's count
        (ZeRO-2 reduces in each backward, a collective). The zero loss goes through a real
        forward: ZeRO-2 fills its reduce buckets in the order gradients become ready, which
        must be the same on every rank (a sum over the parameters gives another order, and the
        ranks then add up different parameters' gradients)."""
        device = next(self.model.parameters()).device
        for _ in range(count):
            logits = self.model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device)).logits
            self.engine.backward(logits.sum() * 0.0)

    def step(self) -> float:
        self.engine.step()
        norm = float(self.engine.get_global_grad_norm())  # ZeRO 1-2 record the pre-clip norm
        if not torch.isfinite(torch.tensor(norm)):
            raise FloatingPointError("non-finite gradient norm in a data-parallel step (already applied: "
                                     "DeepSpeed steps before the norm is known); resume from the last checkpoint")
        return norm

    def all_sum(self, values: list[float]) -> list[float]:
        return self._reduce(values, self.dist.ReduceOp.SUM)

    def all_max(self, values: list[float]) -> list[float]:
        return self._reduce(values, self.dist.ReduceOp.MAX)

    def _reduce(self, values, op) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        self.dist.all_reduce(t, op=op)
        return t.tolist()

    def save(self, directory: Path) -> None:
        """Every rank writes its optimizer partition (a collective: all ranks call it)."""
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False)

    def load(self, directory: Path) -> None:
        self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state", load_optimizer_states=True,
                                    load_lr_scheduler_states=False)
        keep_configured_hyperparameters(self.engine.optimizer.param_groups, self.cfg)
