"""AdamW for a drafter head, through a float32 master copy where the head is in bfloat16 or float16.

The head has the policy's dtype (vLLM drafts with it in the engine's). Applied to bfloat16
weights directly, AdamW steps of ~lr round away for weights above ~256·lr
(:class:`policy.distributed.MasterCopy`, which the policy's update uses too): at
``mtp.maintain_lr`` 3e-4 every norm weight (~1.0) and every entry above ~0.08 would never move.
"""

from __future__ import annotations

import math

import torch

from policy.distributed import MasterCopy


class HeadOptimizer(MasterCopy):
    """AdamW (no weight decay) over the head's parameter groups (a form may slow a part: its own lr)."""

    def __init__(self, head: torch.nn.Module, lr: float):
        groups = head.param_groups(lr)
        super().__init__([p for g in groups for p in g["params"]])
        self.optimizer = torch.optim.AdamW([{**g, "params": self.stepped(g["params"])} for g in groups],
                                           weight_decay=0.0)  # what a schedule drives

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None

    def step(self, max_norm: float = 1.0) -> float:
        """Clip to ``max_norm`` and apply; returns the pre-clip gradient norm. A non-finite norm is
        not applied (the gradients are dropped): check the return value."""
        norm = self.clip_and_step(self.optimizer, max_norm)
        if not math.isfinite(norm):
            self.zero_grad()
        return norm

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "master": self.master_state()}

    def load_state_dict(self, state: dict) -> None:
        """A state of :meth:`state_dict`, or a bare AdamW state (a checkpoint from before the master
        copy: the master then starts from the head's weights, to be loaded first)."""
        bare = "optimizer" not in state
        self.optimizer.load_state_dict(state if bare else state["optimizer"])
        self.restore(None if bare else state["master"], "the drafter head's optimizer state")
