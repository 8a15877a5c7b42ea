"""AdamW through a float32 master copy in two passes over memory (CPU), beside its reference.

The reference, :meth:`policy.distributed.MasterCopy.clip_and_step`, makes float32 gradients of
the bfloat16 ones, takes their norm, clips them, runs torch's fused AdamW on the master and rounds
the master into the parameters: five passes, ~44 bytes of memory traffic a parameter, all of it
memory-bound on a CPU (0.29 s a step for the 100M preset on one thread, ~40% of its update).
:class:`FusedMasterAdamW` reads the bfloat16 gradients once for the norm (2 bytes) and then makes
one pass that reads gradient, master and both moments and writes master, moments and parameter
(28 bytes): 0.16 s. Both are compiled by ``torch.compile`` (inductor's C++ backend, with
symbolic sizes: one kernel for every tensor length, two for the norm's reduction, which inductor
generates differently up to 4096 elements and beyond), with inductor's dynamic threads: each
call runs on the process's threads at that call (by default inductor writes the compiling
process's count into the kernel, one thread as a serial loop, and a kept trainer process,
orchestration.actors.Actors, reuses the compiled kernel in a later run with other threads). A step
where every parameter has a gradient and the same scalars makes one call of each pass over all
tensors instead of one per tensor (compiled for the parameters' shapes at the first such step: on
the 100M preset ~45 s on an empty inductor cache, ad hoc): the update 0.506 -> 0.484 s a step,
57.2 -> 59.1 samples/s async in bfloat16 (three alternating runs each, ad hoc), where per tensor
the 134 calls cost ~20 ms a step more.
The pass updates the optimizer's own state (``exp_avg``, ``exp_avg_sq``, ``step``) with its
groups' current hyperparameters, so checkpoints, a learning-rate schedule and the reference path
read and write the same state; the optimizer's step hooks are not run (none is registered here).

The arithmetic is torch's fused CPU kernel's (``aten/src/ATen/native/cpu/FusedAdamKernel.cpp``,
ADAMW mode, the lerp branch of β1 > 0.5; other betas take the reference path), in its order,
with its scalars computed in double and rounded to float32:
``p ← p·(1 − lr·wd)``, ``m ← m + (1 − β1)·(g − m)``, ``v ← v·β2 + (1 − β2)·g·g``,
``p ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)``, with ``g`` the float32 gradient times the
clip coefficient (1 when the norm is within ``max_norm``: the reference does not multiply then,
and a multiply by 1 is exact). Deviations, each a float rounding: torch computes the lerp with a
fused multiply-add (here two roundings); the norm is summed differently (here each tensor's squares
in float32 by inductor's vectorised reduction and the tensors' sums in float64), so a clip
coefficient may differ in its last bits: on 100M bfloat16 gradients shaped as the 100M preset's
(ad hoc) this norm was within 2.7e-6 of the exact one, relative, and torch's within 2.7e-4.
tests/policy/test_fused_adamw.py compares the two paths step by step with bounds derived from
these roundings.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)

# "auto" fuses a CPU master copy of at least this many parameters: below, the reference's extra
# passes cost little (~3 ms for 1M parameters) and the compile (4-12 s at start-up) is not repaid.
AUTO_MIN_PARAMETERS = 10_000_000
MODES = ("auto", "on", "off")


def _sum_of_squares(grad: torch.Tensor) -> torch.Tensor:
    g = grad.to(torch.float32)  # [n]
    return (g * g).sum()


def _sums_of_squares(grads: list[torch.Tensor]) -> torch.Tensor:
    """[len(grads)]: each tensor's sum of squares (:func:`_sum_of_squares`), in one call."""
    return torch.stack([_sum_of_squares(g) for g in grads])


def _adamw_master_update(grad, master, exp_avg, exp_avg_sq, param, coef, decay, lerp_weight, beta2,
                         square_weight, bias_correction2_sqrt, eps, neg_step_size) -> None:
    """One element-wise pass (all tensors [n]; the scalars 0-d float32): the master, the moments
    and the low-precision parameter updated in place."""
    g = grad.to(torch.float32) * coef
    p = master * decay
    m = exp_avg + lerp_weight * (g - exp_avg)
    v = exp_avg_sq * beta2 + square_weight * g * g
    p = p + neg_step_size * m / (v.sqrt() / bias_correction2_sqrt + eps)
    master.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    param.copy_(p)  # rounded to the parameter's dtype


def _adamw_master_updates(grads, masters, exp_avgs, exp_avg_sqs, params, *scalars) -> None:
    """:func:`_adamw_master_update` for every parameter, with the same scalars, in one call."""
    for g, m, a, v, p in zip(grads, masters, exp_avgs, exp_avg_sqs, params):
        _adamw_master_update(g, m, a, v, p, *scalars)


class FusedMasterAdamW:
    """Steps ``optimizer`` (torch's fused ``AdamW`` over ``master``, the float32 copies of
    ``params``) from the gradients of ``params``, and rounds the result into ``params``. Build it
    with :func:`fused_master_adamw`, which checks that the pass implements the optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                 master: list[torch.nn.Parameter]):
        self.optimizer, self.params, self.master = optimizer, params, master
        self._fell_back = False
        options = {"cpp.dynamic_threads": True}  # the threads at each call (module docstring)
        self._update = torch.compile(_adamw_master_update, dynamic=True, fullgraph=True, options=options)
        self._norm_part = torch.compile(_sum_of_squares, dynamic=True, fullgraph=True, options=options)
        # Compile now, for each kind of length the steps pass (a length of 1 is specialised; the
        # norm's reduction differs up to 4096 elements and beyond): a failure shows at start-up.
        # The steps pass detached views: a Parameter's sizes would be compiled as constants.
        lengths = {64, 8192} | ({1} if any(p.numel() == 1 for p in params) else set())
        with torch.no_grad():
            for dtype in {p.dtype for p in params}:
                for n in lengths:
                    grad, moment = torch.ones(n, dtype=dtype), torch.ones(n)
                    self._norm_part(grad)
                    self._update(grad, moment.clone(), moment.clone(), moment.clone(), grad.clone(),
                                 *(torch.ones(()) for _ in range(8)))
        # A step where every parameter has a gradient and the same scalars (step count and group)
        # makes one call of each form instead of one per tensor (:meth:`_call_once`), compiled for
        # these parameters' shapes at the first such step.
        self._one_call = {"norms": torch.compile(_sums_of_squares, dynamic=False, fullgraph=True, options=options),
                          "updates": torch.compile(_adamw_master_updates, dynamic=False, fullgraph=True,
                                                   options=options)}
        self._one_call_ran: set[str] = set()

    def _call_once(self, name: str, *args) -> tuple[bool, object]:
        """(True, the one-call form ``name``'s result), or (False, None) where it is not compiled
        and cannot be (logged once; the steps then call per tensor). Only compiling is caught, which
        raises before the form computes anything: dynamo's and inductor's errors (a missing
        compiler comes as one) and dynamo's recompile limit (``fullgraph`` raises there rather than
        run uncompiled); an error while it runs would leave the tensors half-stepped and is raised."""
        from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException
        fn = self._one_call.get(name)
        if fn is None:
            return False, None
        if name not in self._one_call_ran:
            log.info("trainer.fused_master_step: compiling the one-call %s over %d tensors (with the other form ~45 s "
                     "on the 100M preset with an empty inductor cache, ad hoc; seconds from it)", name, len(self.params))
        try:
            out = fn(*args)
        except (TorchDynamoException, FailOnRecompileLimitHit) as exc:
            log.warning("trainer.fused_master_step: the one-call %s did not compile (%s: %s); each tensor takes its "
                        "own call (the same arithmetic, ~20 ms more a step on the 100M preset)",
                        name, type(exc).__name__, exc)
            del self._one_call[name]
            return False, None
        self._one_call_ran.add(name)
        return True, out

    def applies(self) -> bool:
        """Whether this step suits the pass: dense, contiguous gradients, and parameter groups it
        implements (a loaded checkpoint restores a group's options); else the reference path steps
        (logged once)."""
        why = _unsupported_groups(self.optimizer) or next(
            (f"a {p.grad.layout} or non-contiguous gradient" for p in self.params
             if p.grad is not None and (p.grad.layout != torch.strided or not p.grad.is_contiguous())), None)
        if why and not self._fell_back:
            log.warning("trainer.fused_master_step: %s; the update takes the reference path", why)
            self._fell_back = True
        return why is None

    def grad_norm(self) -> torch.Tensor:
        """The 2-norm of all parameters' gradients, as a float32 0-d tensor: each tensor's sum of
        squares in float32 (inductor's vectorised reduction), their total in float64."""
        with torch.no_grad():
            grads = [p.grad.detach().view(-1) for p in self.params if p.grad is not None]
            if not grads:
                return torch.zeros(())
            done, parts = self._call_once("norms", grads) if len(grads) == len(self.params) else (False, None)
            if not done:
                parts = torch.stack([self._norm_part(g) for g in grads])
            return parts.double().sum().sqrt().to(torch.float32)

    def clip_and_step(self, max_norm: float) -> float:
        """Clip to ``max_norm`` and apply AdamW; returns the pre-clip norm. A non-finite norm
        steps nothing (the caller drops the gradients)."""
        norm = self.grad_norm()
        if not math.isfinite(float(norm)):
            return float(norm)
        # torch's clip coefficient (clip_grads_with_norm_), exactly 1 where the norm is within max_norm
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        group_of = {id(m): g for g in self.optimizer.param_groups for m in g["params"]}  # current: a load replaces them
        scalars: dict[tuple, list[torch.Tensor]] = {}
        stepped = []  # per parameter with a gradient: (the pass's tensors, its scalars' key)
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                if p.grad is None:  # as torch's AdamW: no state change for a parameter without a gradient
                    continue
                group, state = group_of[id(m)], self.optimizer.state[m]
                if not state:  # torch's initial state for the fused implementation
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(m, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(m, memory_format=torch.preserve_format)
                state["step"] += 1
                key = (float(state["step"]), id(group))
                if key not in scalars:
                    scalars[key] = _scalars(group, float(state["step"]))
                stepped.append(((p.grad.detach().view(-1), m.detach().view(-1), state["exp_avg"].view(-1),
                                 state["exp_avg_sq"].view(-1), p.detach().view(-1)), key))
            if len(stepped) == len(self.params) and len(scalars) == 1:
                columns = [list(c) for c in zip(*(tensors for tensors, _ in stepped))]
                if self._call_once("updates", *columns, coef, *next(iter(scalars.values())))[0]:
                    return float(norm)
            for tensors, key in stepped:
                self._update(*tensors, coef, *scalars[key])
        return float(norm)


def _scalars(group: dict, step: float) -> list[torch.Tensor]:
    """The kernel's scalars for a parameter group at ``step``, computed in double as torch's
    fused kernel does and rounded to float32 as it rounds them."""
    lr, (beta1, beta2), eps, wd = float(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    values = (1 - lr * wd, 1 - beta1, beta2, 1 - beta2, math.sqrt(bias_correction2), eps, -(lr / bias_correction1))
    return [torch.tensor(v, dtype=torch.float32) for v in values]


def _unsupported_groups(optimizer: torch.optim.Optimizer) -> str | None:
    """Why the pass does not implement ``optimizer``'s groups, or None: it is torch's fused AdamW
    (the kernel whose rounding it follows) without amsgrad, maximize, capturable or differentiable,
    with beta1 > 0.5 (torch's lerp takes its other form below)."""
    if not isinstance(optimizer, torch.optim.AdamW):
        return f"the optimizer is {type(optimizer).__name__}, not AdamW"
    for g in optimizer.param_groups:
        options = [k for k in ("amsgrad", "maximize", "capturable", "differentiable") if g.get(k)]
        if options or not g.get("fused"):
            return f"an AdamW group with {options or 'fused=False'}"
        if g["betas"][0] <= 0.5:
            return f"beta1={g['betas'][0]} <= 0.5"
    return None


def fused_master_adamw(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                       master: list[torch.nn.Parameter] | None, mode: str) -> FusedMasterAdamW | None:
    """The fused pass for this master copy, or None for the reference path: ``mode`` "off", no
    master copy (float32 weights), or under "auto" parameters off the CPU, an optimizer the pass
    does not implement (:func:`_unsupported_groups`), fewer than :data:`AUTO_MIN_PARAMETERS`
    parameters or a failed compile (a warning). "on" raises where "auto" would fall back."""
    if mode not in MODES:
        raise ValueError(f"trainer.fused_master_step={mode!r}: choose one of {list(MODES)}")
    if mode == "off" or master is None:
        return None
    why = (_unsupported_groups(optimizer)
           or next((f"a parameter on {p.device} (trainer.device)" for p in params if p.device.type != "cpu"), None)
           or next(("a non-contiguous parameter" for p in params if not p.is_contiguous()), None))
    if why:
        if mode == "on":
            raise ValueError(f"trainer.fused_master_step=on: the fused pass runs torch's fused AdamW on contiguous "
                             f"CPU parameters, and here there is {why}; set trainer.fused_master_step=auto or off")
        return None
    if mode == "auto" and sum(p.numel() for p in params) < AUTO_MIN_PARAMETERS:
        return None
    try:
        return FusedMasterAdamW(optimizer, params, master)
    except Exception as exc:  # noqa: BLE001 (inductor raises many kinds: a missing compiler, a failed build)
        hint = ("torch.compile builds it with a C++ compiler (g++ on PATH, or CXX); trainer.fused_master_step=off "
                "takes the reference path (slower, the same result)")
        if mode == "on":
            raise RuntimeError(f"trainer.fused_master_step=on: compiling the fused AdamW pass failed "
                               f"({type(exc).__name__}: {exc}); {hint}") from exc
        log.warning("trainer.fused_master_step=auto: compiling the fused AdamW pass failed (%s: %s); the update "
                    "takes the reference path. %s", type(exc).__name__, exc, hint)
        return None
