"""A broadcast group for weight syncs: the trainer's rank 0 (group rank 0) and the rollout
workers (ranks 1..W), gloo on a CPU trainer, NCCL on GPUs (``orchestration.weight_sync=broadcast``).

The group is built on its own TCPStore and is never torch.distributed's default group: that one
belongs to others in these processes (a data-parallel trainer's DeepSpeed group, the vLLM engine's
own in a worker), so collectives run on the group object itself (``group.broadcast(tensor, root)``,
whose root is a rank of this group). Every member walks the same layout (names, shapes, dtypes in
name order, fixed when the group forms), so one broadcast per tensor needs no metadata on the wire.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

Layout = list[tuple[str, tuple[int, ...], str]]


def backend_for(device: str) -> str:
    """gloo for a CPU trainer, NCCL for a GPU one."""
    return "gloo" if str(device) == "cpu" else "nccl"


def join(address: tuple[str, int], rank: int, world_size: int, backend: str, own_ip: str,
         timeout_s: float = 1800.0, join_timeout_s: float = 300.0):
    """This process's member of the group whose rank 0 listens at ``address`` (host, port); its
    own gloo connections on ``own_ip`` (its node's address, as Ray knows it: a local Ray's is
    loopback). Blocks until all ``world_size`` members have joined (at most ``join_timeout_s``).
    ``timeout_s`` bounds a collective: a worker's receive is queued behind its rollouts in flight,
    so the trainer may wait that long for it."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"weight broadcast backend {backend!r}: gloo (CPU) or nccl (GPU)")
    host, port = address
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timedelta(seconds=join_timeout_s))
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._devices, options._timeout = [dist.ProcessGroupGloo.create_device(hostname=own_ip)], timeout
        return dist.ProcessGroupGloo(store, rank, world_size, options)
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = False
    options._timeout = timeout  # as torch.distributed's own group helper sets it
    return dist.ProcessGroupNCCL(store, rank, world_size, options)


def layout(state_dict: dict[str, torch.Tensor]) -> Layout:
    return [(name, tuple(state_dict[name].shape), str(state_dict[name].dtype).removeprefix("torch."))
            for name in sorted(state_dict)]


def send(group, state_dict: dict[str, torch.Tensor], expected: Layout, device: str) -> None:
    """Broadcast ``state_dict`` (rank 0) in the layout every member agreed on."""
    if layout(state_dict) != expected:
        raise ValueError("the weights to broadcast no longer have the layout the group was formed with "
                         "(a parameter added, removed or reshaped since the run started)")
    for name, _, _ in expected:
        group.broadcast(state_dict[name].detach().to(device).contiguous(), 0).wait()
    _finish(device)


def buffers(expected: Layout, device: str) -> dict[str, torch.Tensor]:
    """A receiver's tensors for the layout, allocated once and filled by every :func:`receive`."""
    return {name: torch.empty(shape, dtype=getattr(torch, dtype), device=device) for name, shape, dtype in expected}


def receive(group, into: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fill ``into`` (from :func:`buffers`) from rank 0's broadcast; returns it."""
    for name in sorted(into):
        group.broadcast(into[name], 0).wait()
    _finish(next(iter(into.values())).device if into else "cpu")
    return into


def _finish(device) -> None:
    """On a GPU a collective's wait() only orders the current stream after it: wait for the
    transfer itself, so that a send or receive that returns is complete (and fails where it fails)."""
    if torch.device(device).type == "cuda":
        torch.cuda.current_stream().synchronize()
