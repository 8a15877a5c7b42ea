"""The trainer's decoder layers compiled by torch.compile (``trainer.compile``).

Each decoder layer (the classes a transformers model names in ``_no_split_modules``) is compiled
on its own, with dynamic shapes, forward and backward (inductor through AOTAutograd): the
elementwise work around the matrix products (RMSNorm, rotary embedding, SiLU and gate, residual
adds) runs as fused loops, and a step dispatches far fewer small ops. Dynamo breaks the graph
where the shared-prompt attention reads its region sizes as Python ints (``attention.shared_prompt``),
so a packed layer runs as several compiled pieces.

The same math up to float rounding: fused loops keep their intermediates in float32 where eager
rounds each op's result to the tensor's dtype. ``tests/policy/test_compiled.py`` holds a compiled
step's weights to the eager one's in float64, packed and unpacked, and in bfloat16 compares both
with a float64 oracle. The layers compile in the trainer's set-up, on a dummy forward and backward
(:meth:`policy.trainer.PolicyTrainer._warm_up`), so that a failure shows there and the first step's
time is a step's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from policy.fused_adamw import AUTO_MIN_PARAMETERS, MODES

log = logging.getLogger(__name__)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's decoder layers: its modules of the classes it names in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_layers(model, mode: str, device: str, world_size: int, gradient_checkpointing: bool,
                   warm_up: Callable[[], None]) -> int:
    """Compile ``model``'s decoder layers in place (``trainer.compile``) and run ``warm_up`` (a
    forward and backward of the kind the steps run), so that they compile now rather than in the
    first step; returns how many layers are compiled.

    "auto" compiles on a CPU trainer of one rank without gradient checkpointing, for a model of at
    least :data:`policy.fused_adamw.AUTO_MIN_PARAMETERS` parameters (below, a step is too short
    for the compile, ~10-40 s, to pay), and leaves the layers eager with a warning where the
    compile fails (no C++ compiler, an op inductor cannot build); "on" compiles wherever it can and
    raises where it cannot; "off" leaves the layers eager."""
    if mode not in MODES:
        raise ValueError(f"trainer.compile={mode!r}: choose one of {list(MODES)}")
    if mode == "off":
        return 0
    layers = decoder_layers(model)
    if mode == "auto" and (not layers or str(device) != "cpu" or world_size > 1 or gradient_checkpointing
                           or sum(p.numel() for p in model.parameters()) < AUTO_MIN_PARAMETERS):
        return 0
    if not layers:
        raise ValueError(f"trainer.compile=on: {type(model).__name__} names no decoder layer class in "
                         f"_no_split_modules, so there is nothing to compile; set trainer.compile=auto or off")
    if gradient_checkpointing:
        raise ValueError("trainer.compile=on with trainer.gradient_checkpointing: compiled checkpointed layers are "
                         "untested here; set trainer.compile=off (or auto, which leaves them eager)")
    t0 = time.perf_counter()
    try:
        for layer in layers:
            layer.compile(dynamic=True)
        warm_up()
    except Exception as exc:  # noqa: BLE001 (a missing compiler, a failed build: inductor raises many kinds)
        for layer in layers:
            layer._compiled_call_impl = None  # what nn.Module.compile set: the layer's own forward again
        hint = ("inductor builds C++ on a CPU (g++ on PATH, or CXX) and Triton kernels on a GPU; "
                "trainer.compile=off trains eager layers")
        if mode == "on":
            raise RuntimeError(f"trainer.compile=on: compiling the decoder layers failed ({type(exc).__name__}: "
                               f"{exc}); {hint}") from exc
        log.warning("trainer.compile=auto: compiling the decoder layers failed (%s: %s); they stay eager. %s",
                    type(exc).__name__, exc, hint)
        return 0
    log.info("trainer.compile: %d decoder layers compiled in %.1f s", len(layers), time.perf_counter() - t0)
    return len(layers)
