"""policy.weight_broadcast: a gloo group of a sender and two receivers in separate processes (the
NCCL backend is the same calls on GPUs and is not exercised here)."""

import multiprocessing as mp
import socket

import pytest
import torch

from policy import weight_broadcast


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"b.weight": torch.randn(3, 5, generator=g), "a.bias": torch.randn(7, generator=g).to(torch.bfloat16),
            "c.count": torch.arange(4), "d.empty": torch.empty(0, 2)}


def _member(rank: int, port: int, out) -> None:
    torch.set_num_threads(1)
    group = weight_broadcast.join(("127.0.0.1", port), rank, 3, "gloo", "127.0.0.1", timeout_s=60)
    layout = weight_broadcast.layout(_state(0))
    if rank == 0:
        for seed in (1, 2):  # two syncs through the same group
            weight_broadcast.send(group, _state(seed), layout, "cpu")
        try:  # a parameter reshaped since the group formed: refused before anything is sent
            weight_broadcast.send(group, {**_state(3), "c.count": torch.arange(5)}, layout, "cpu")
        except ValueError as exc:
            out.put((rank, "refused", str(exc)))
        return
    into = weight_broadcast.buffers(layout, "cpu")
    for seed in (1, 2):  # compared here: tensors put on a queue outlive their sender only by luck
        received, want = weight_broadcast.receive(group, into), _state(seed)
        wrong = sorted(k for k in want if received[k].dtype != want[k].dtype or not torch.equal(received[k], want[k]))
        out.put((rank, seed, sorted(received) == sorted(want) and not wrong, wrong))


def test_receivers_get_every_tensor_of_each_broadcast_exactly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_member, args=(rank, port, out)) for rank in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in range(5)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    refused = [r for r in results if r[1] == "refused"]
    assert len(refused) == 1 and "layout" in refused[0][2]
    received = sorted(r for r in results if r[1] != "refused")
    assert [(rank, seed) for rank, seed, _, _ in received] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(exact for _, _, exact, _ in received), [(rank, seed, wrong) for rank, seed, _, wrong in received]


def test_backend_follows_the_trainer_device_and_unknown_backends_are_refused():
    assert weight_broadcast.backend_for("cpu") == "gloo"
    assert weight_broadcast.backend_for("cuda") == weight_broadcast.backend_for("cuda:0") == "nccl"
    with pytest.raises(ValueError, match="gloo .CPU. or nccl"):
        weight_broadcast.join(("127.0.0.1", 0), 0, 1, "mpi", "127.0.0.1", timeout_s=5)
