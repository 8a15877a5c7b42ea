"""AdamW for a drafter head, through a float32 master copy where the head is in bfloat16 or float16.

The head has the policy's dtype (vLLM drafts with it in the engine's). Applied to bfloat16
weights directly, an AdamW step of ~lr per element is below half a rounding step of any weight
larger than ~256·lr (policy.distributed.LocalUpdate, which trains the policy the same way): at
``mtp.maintain_lr`` 3e-4 every norm weight (~1.0) and every entry above ~0.08 would never move.
So the optimizer steps float32 copies and the head's weights are those copies rounded.
"""

from __future__ import annotations

import torch

from policy.distributed import LOW_PRECISION


class HeadOptimizer:
    def __init__(self, head: torch.nn.Module, lr: float):
        groups = head.param_groups(lr)
        self.params = [p for g in groups for p in g["params"]]
        self.master = None
        if any(p.dtype in LOW_PRECISION for p in self.params):
            self.master = [torch.nn.Parameter(p.detach().to(torch.float32, copy=True)) for p in self.params]
            copies = iter(self.master)
            groups = [{**g, "params": [next(copies) for _ in g["params"]]} for g in groups]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)  # what a schedule drives

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
        if self.master is not None:
            for p, m in zip(self.params, self.master):
                m.grad = None if p.grad is None else p.grad.to(torch.float32)
        norm = float(torch.nn.utils.clip_grad_norm_(self.master or self.params, max_norm))
        if not torch.isfinite(torch.tensor(norm)):
            self.zero_grad()
            return norm
        self.optimizer.step()
        if self.master is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.master)  # rounded to the head's dtype
        return norm

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "master": None if self.master is None else [m.detach() for m in self.master]}

    def load_state_dict(self, state: dict) -> None:
        """A state of :meth:`state_dict`, or a bare AdamW state (a checkpoint from before the master
        copy: the master then starts from the head's weights, to be loaded first)."""
        bare = "optimizer" not in state
        self.optimizer.load_state_dict(state if bare else state["optimizer"])
        if self.master is not None:
            saved = None if bare else state["master"]
            with torch.no_grad():
                torch._foreach_copy_(self.master, [t.to(torch.float32) for t in (saved or self.params)])
