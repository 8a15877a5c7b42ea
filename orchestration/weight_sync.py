"""The driver's side of the weight sync after each update (``orchestration.weight_sync``).

``object_store`` (:class:`ObjectStoreSync`): trainer rank 0 puts the packed weights in Ray's
object store once (:meth:`TrainerActor.export`) and every worker reads them there (zero-copy on
its node). The trainer goes on at once: a worker loads them before any rollout submitted after
the call (actor order).

``broadcast`` (:class:`BroadcastSync`): trainer rank 0 and the workers form a torch.distributed
group when the run starts (:mod:`policy.weight_broadcast`: gloo on a CPU trainer, NCCL on GPUs,
where the policy's weights go from device to device) and rank 0 broadcasts its live weights
into buffers each worker keeps. The send ends when every worker has received, and a worker
receives after the rollouts queued on it before: the trainer's next step waits for them (with
``max_staleness`` >= 2 it no longer overlaps the rollout after the one it trains on).

Either way the worker verifies what it loaded the same way (:meth:`RolloutWorker._apply`: the
sender's checksum where the weights are on the CPU, the probe logprobs: rollout.sync_probe_every). A worker that Ray
restarts is re-synced from the object store; a broadcast group cannot take in a new member, so
with ``broadcast`` Ray does not restart workers and a worker's death ends the run
(:class:`WorkerLost`). Its policy is then saved with gloo, which reports the lost peer at once;
NCCL does not, so the trainer stays in its broadcast until the group's timeout and the save, queued
behind it, gives up (after 5 minutes: orchestration.grpo): on GPUs resume from the last periodic
checkpoint (``checkpoint_every``).
"""

from __future__ import annotations

import ray

from orchestration.trainer_actor import TrainerGroup
from policy import weight_broadcast
from rollout.worker import WorkerRestarted


# A worker process that died (RayActorError) or is being restarted by Ray.
WORKER_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class WorkerLost(RuntimeError):
    pass


class _Sync:
    workers: list

    def lost(self, k: int) -> None:
        raise NotImplementedError

    def results(self, refs: list) -> list[dict]:
        """The workers' sync metrics from :meth:`push`'s refs. A worker that died comes first
        (:meth:`lost`): with a broadcast the others' errors follow from it."""
        results, gone, failed = [], [], None
        for k, ref in enumerate(refs):
            try:
                result = ray.get(ref)
            except (*WORKER_GONE, WorkerRestarted):  # died, or restarted and not yet taken back
                if k >= len(self.workers):  # the trainer's own send (broadcast)
                    raise
                gone.append(k)
                continue
            except Exception as exc:  # noqa: BLE001 (raised below, after a dead worker's)
                failed = failed or exc
                continue
            if result is not None:  # a broadcast's send returns None
                results.append(result)
        for k in gone:
            self.lost(k)
        if failed is not None:
            raise failed
        return results


class ObjectStoreSync(_Sync):
    def __init__(self, trainer: TrainerGroup, workers: list):
        self.trainer, self.workers = trainer, workers
        self.last_export = None  # refs of the latest (weights, version, checksum, probe)

    def push(self) -> list:
        """Send the trainer's current weights to every worker; refs of the workers' sync metrics."""
        self.last_export = self.trainer.export()
        return [w.update_weights.remote(*self.last_export) for w in self.workers]

    def everyone(self, call, recover) -> None:
        """Every worker on the current weights, waiting for each (``call(method, *args)`` waits
        through a restart; ``recover(k)`` takes back a worker Ray restarted, syncing it)."""
        for k, w in enumerate(self.workers):
            try:
                call(w.update_weights, *self._current())
            except WorkerRestarted:
                recover(k)

    def restarted(self, k: int, call, take_back) -> None:
        """Take worker k back after Ray restarted it (``take_back()``: this run's settings) and give
        it the current weights (the run's first, when no update has been sent yet: a restart has
        its start-up ones)."""
        take_back()
        call(self.workers[k].update_weights, *self._current())

    def _current(self) -> tuple:
        """The latest export (the trainer's current weights; exported now if none has been yet)."""
        if self.last_export is None:
            self.last_export = self.trainer.export()
        return self.last_export

    def lost(self, k: int) -> None:
        """Worker k died during a sync: its restarted process refuses to sample until the driver
        takes it back and :meth:`restarted` syncs it (rollout.worker.WorkerRestarted)."""


class BroadcastSync(_Sync):
    def __init__(self, trainer: TrainerGroup, workers: list, device: str):
        self.trainer, self.workers = trainer, workers
        rank0, world = trainer.actors[0], 1 + len(workers)
        layout = ray.get(rank0.weight_layout.remote())
        address = ray.get(rank0.address.remote())
        backend = weight_broadcast.backend_for(device)
        ray.get([*[w.join_weight_group.remote(address, 1 + k, world, layout, backend) for k, w in enumerate(workers)],
                 rank0.join_weight_group.remote(address, world)])

    def push(self) -> list:
        """Refs of the workers' sync metrics and of the trainer's send (which returns None)."""
        rank0 = self.trainer.actors[0]
        meta = rank0.weights_meta.options(num_returns=3).remote()  # before the send: the receivers wait for it
        sending = rank0.broadcast_weights.remote()
        return [w.receive_weights.remote(*meta) for w in self.workers] + [sending]

    def everyone(self, call, recover) -> None:
        self.results(self.push())

    def restarted(self, k: int, call, take_back) -> None:
        self.lost(k)

    def lost(self, k: int) -> None:
        raise WorkerLost(
            f"rollout worker {k} died, and a weight broadcast group cannot take in its restarted process "
            f"(orchestration.weight_sync=broadcast): resume from the last checkpoint (orchestration.checkpoint_every, "
            f"--resume), or run with orchestration.weight_sync=object_store, which re-syncs a restarted worker")


def make_sync(mode: str, trainer: TrainerGroup, workers: list, device: str):
    return ObjectStoreSync(trainer, workers) if mode == "object_store" else BroadcastSync(trainer, workers, device)
