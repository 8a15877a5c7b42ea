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
import math
import os
from pathlib import Path

import torch

from policy.fused_adamw import FusedMasterAdamW, fused_master_adamw

log = logging.getLogger(__name__)


def adamw(params, cfg) -> torch.optim.AdamW:
    """torch's fused AdamW (one vectorised kernel over all parameters; transformers' default
    optimizer since torch 2.8, so TRL's too). The per-tensor default took ~1 s per step for the
    ~100M preset on one CPU thread, the fused one ~0.2 s; the same update up to float rounding."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
                             fused=True)


# Weights in these dtypes are updated through a float32 master copy (LocalUpdate).
LOW_PRECISION = (torch.bfloat16, torch.float16)


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


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_``, without its multiply by a coefficient clamped to 1
    when the norm is within ``max_norm`` (torch always multiplies, to avoid a host-device sync
    on GPUs; here the norm is read on the host anyway): for a finite norm the same gradients,
    bit for bit, and one pass over them fewer (~38 ms of a ~0.8 s bfloat16 update of the ~100M
    preset on one CPU thread). A NaN norm leaves them as they are (torch multiplies them by NaN);
    the callers drop them then. Returns the total norm, as torch does."""
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if max_norm / (norm + 1e-6) < 1.0:  # torch's coefficient, as torch computes it
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


class UpdateNotApplied(FloatingPointError):
    """A step refused before any of its mini-batches changed the weights or the optimizer (a
    non-finite loss, or on one process a non-finite gradient norm: DeepSpeed applies before the
    norm is known, and its error is a plain FloatingPointError): the policy is as it was, and the
    step's batch can be trained on again."""


class MasterCopy:
    """Parameters an optimizer steps through float32 copies where they are bfloat16 or float16
    (``master``; None where they are float32 already), as DeepSpeed's ZeRO keeps one: the
    gradients are copied to it, clipped and applied there, and the parameters are the master
    rounded. Applied to bfloat16 weights directly, an AdamW step of ~lr per element is below half
    a rounding step of any weight larger than ~256·lr (bfloat16 keeps 8 significant bits), so at
    lr 1e-6 nearly every update of a weight above 2.6e-4 rounds away. For the policy
    (:class:`LocalUpdate`) and a drafter head (``mtp.optim.HeadOptimizer``)."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.master = ([torch.nn.Parameter(p.detach().to(torch.float32, copy=True)) for p in params]
                       if any(p.dtype in LOW_PRECISION for p in params) else None)
        self.fused: FusedMasterAdamW | None = None  # the fused two-pass step (policy.fused_adamw), where set

    def stepped(self, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """What the optimizer steps for ``params`` (some of :attr:`params`): their copies, or themselves."""
        if self.master is None:
            return list(params)
        index = {id(p): i for i, p in enumerate(self.params)}
        return [self.master[index[id(p)]] for p in params]

    def clip_and_step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
        """Clip the gradients to ``max_norm`` and step ``optimizer``; returns the pre-clip norm. A
        non-finite norm steps nothing (the caller drops the gradients)."""
        if self.fused is not None and self.fused.applies():
            return self.fused.clip_and_step(max_norm)
        if self.master is not None:
            for p, m in zip(self.params, self.master):
                m.grad = None if p.grad is None else p.grad.to(torch.float32)
        norm = float(clip_grad_norm(self.master or self.params, max_norm))
        if math.isfinite(norm):
            optimizer.step()
            if self.master is not None:
                with torch.no_grad():
                    torch._foreach_copy_(self.params, self.master)  # rounded to the parameters' dtype
        return norm

    def master_state(self) -> list[torch.Tensor] | None:
        return None if self.master is None else [m.detach() for m in self.master]

    def restore(self, saved: list[torch.Tensor] | None, where) -> None:
        """The copies from a checkpoint's (:meth:`master_state`), or, from a checkpoint without
        (a float32 run's, or one from before), from the parameters as loaded."""
        if self.master is None:
            return
        if saved is not None and [t.shape for t in saved] != [m.shape for m in self.master]:
            raise ValueError(f"{where} does not match the parameters (another model's checkpoint?)")
        with torch.no_grad():
            torch._foreach_copy_(self.master, [t.to(torch.float32) for t in (saved or self.params)])


class LocalUpdate(MasterCopy):
    """One process: torch AdamW with gradient-norm clipping, through a float32 master copy of
    bfloat16 or float16 weights (:class:`MasterCopy`), saved with the optimizer, so a resume
    continues from it, not from the rounded weights."""

    world_size, rank = 1, 0

    def __init__(self, model: torch.nn.Module, cfg):
        super().__init__([p for p in model.parameters() if p.requires_grad])
        self.model, self.max_grad_norm, self.cfg = model, cfg.max_grad_norm, cfg
        self.optimizer = adamw(self.stepped(self.params), cfg)
        self.fused = fused_master_adamw(self.optimizer, self.params, self.master, cfg.fused_master_step)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.master is not None:
            self.model.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def pad_backwards(self, count: int) -> None:
        """Zero-loss backwards to match the group's backward count (no-op: there is no group)."""

    def step(self) -> float:
        """Clip, apply; returns the pre-clip gradient norm. A non-finite norm is not applied."""
        norm = self.clip_and_step(self.optimizer, self.max_grad_norm)
        if not math.isfinite(norm):
            self.zero_grad()
            raise UpdateNotApplied("non-finite gradient norm; this mini-batch was not applied")
        return norm

    def all_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def all_max(self, values: list[float]) -> list[float]:
        return list(values)

    def save(self, directory: Path) -> None:
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
        if self.master is not None:
            torch.save(self.master_state(), directory / "master_weights.pt")

    def load(self, directory: Path) -> None:
        """The optimizer's state, and the master copy where the model is low-precision (from a
        checkpoint of a float32 run: its weights, which the model holds rounded)."""
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        keep_configured_hyperparameters(self.optimizer.param_groups, self.cfg)
        path = directory / "master_weights.pt"
        saved = torch.load(path, weights_only=True) if self.master is not None and path.is_file() else None
        self.restore(saved, path)


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
        optimizer = adamw(model.parameters(), cfg)
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
