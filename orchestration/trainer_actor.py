"""The trainer: ``trainer.world_size`` Ray actors around :class:`policy.trainer.PolicyTrainer`.

One rank is a plain trainer; several form a data-parallel group (DeepSpeed ZeRO over
torch.distributed, policy/distributed.py). The driver talks to :class:`TrainerGroup`: a step's
groups are split over the ranks by token count, every rank returns the same (group-reduced)
metrics, rank 0 exports the weights (ZeRO 1–2 keep whole parameters on every rank).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import ray

from orchestration.config import REPO_ROOT
from policy import weight_broadcast
from policy.batch import Group
from policy.models import pack_state, probe_logprobs, set_cpu_math, state_checksum
from policy.trainer import PolicyTrainer, mini_batch_ids


class TrainerActor:
    def __init__(self, rank: int = 0):
        self.rank = rank
        self.trainer: PolicyTrainer | None = None

    def address(self) -> tuple[str, int]:
        """(node IP, a free port): the rendezvous of the group, asked of rank 0."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def gpu_ids(self) -> list[str]:
        return [str(i) for i in ray.get_gpu_ids()]

    def setup(self, model_dir: str, trainer_cfg, algorithm_cfg, temperature: float, max_tokens: int,
              dtype: str, probe_ids: list[int], master: tuple[str, int] | None = None,
              drafter: tuple[str, object] | None = None) -> None:
        """``drafter``: (head directory, mtp config) to maintain the drafter head online. Again for
        the next run in the same process (:class:`orchestration.actors.Actors`): a new trainer."""
        self.trainer = self.maintainer = None  # an earlier run's, freed before the new one is built
        self._weight_group = None  # and its weight broadcast group
        set_cpu_math(trainer_cfg.threads, trainer_cfg.flush_denormal)  # before any tensor work
        if trainer_cfg.world_size > 1:
            from policy.distributed import init_process_group
            # DeepSpeed compiles a CPU op on its first start (~30 s): once per checkout, not per run.
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))
            init_process_group(self.rank, trainer_cfg.world_size, *master, trainer_cfg.device)
        self.trainer = PolicyTrainer(model_dir, trainer_cfg, algorithm_cfg, temperature, max_tokens, dtype)
        self.probe_ids = probe_ids
        if drafter is not None:
            from mtp.maintain import HeadMaintainer
            self.maintainer = HeadMaintainer(drafter[0], drafter[1], temperature, self.trainer.tokenizer.pad_token_id,
                                             trainer_cfg.device, trainer_cfg.micro_batch_size)

    def step(self, groups: list[Group], mini_batch: list[int] | None = None) -> dict[str, float]:
        metrics = self.trainer.step(groups, mini_batch)
        if self.maintainer is not None:  # the head follows the updated policy, in the step's update time
            metrics.update(self.maintainer.step(self.trainer.model, groups))
            metrics["update_s"] += metrics["head_maintain_s"]
        return metrics

    def export(self):
        """(weights, version, checksum, probe) for a verified weight sync, the weights packed for the
        object store (:func:`policy.models.pack_state`); a maintained drafter head's weights travel
        in the same state dict (``drafter.`` prefix). probe = (token ids, their logprobs or None):
        on a CPU trainer the worker computes the reference logprobs from the weights it received
        (checksum-equal to these), since a forward here would read every weight once more on the
        trainer's core (~0.17 s a step on the 100M preset), the critical path of an async run; on
        a GPU the trainer's forward costs milliseconds and a worker's would run on its CPU."""
        # No copy: the packed arrays view the live parameters. This is safe because Ray serialises a
        # task's return value into the object store (one copy) before this actor runs its next method,
        # and TrainerActor is a plain single-threaded actor (no max_concurrency, no async methods) that
        # returns through the object store (no tensor_transport / GPU-object path, which would keep a
        # reference instead of a copy). Change either and export must pass copy=True.
        state = self._sync_state(cpu=True)
        return pack_state(state), self.trainer.version, state_checksum(state), self._probe()

    # ---- weight sync by broadcast (orchestration.weight_sync=broadcast; rank 0 only) -------------

    def weight_layout(self) -> weight_broadcast.Layout:
        """The names, shapes and dtypes a broadcast sends, in its order (workers allocate for it)."""
        self._weight_layout = weight_broadcast.layout(self._sync_state(cpu=False))
        return self._weight_layout

    def join_weight_group(self, address: tuple[str, int], world_size: int) -> None:
        """Form this run's broadcast group as its rank 0; returns once every worker has joined."""
        self._weight_group = weight_broadcast.join(address, 0, world_size, weight_broadcast.backend_for(
            self.trainer.cfg.device), ray.util.get_node_ip_address())

    def weights_meta(self):
        """(version, checksum, probe) of the weights the next :meth:`broadcast_weights` sends: the
        checksum on a CPU trainer only (on a GPU it would copy every weight to the host)."""
        checksum = state_checksum(self._sync_state(cpu=True)) if self._on_cpu() else None
        return self.trainer.version, checksum, self._probe()

    def broadcast_weights(self) -> None:
        """Send the live weights to the workers; returns once every worker has received them (each
        receives after the rollouts queued on it before), so the next step cannot change them
        mid-send."""
        weight_broadcast.send(self._weight_group, self._sync_state(cpu=False), self._weight_layout,
                              str(self.trainer.cfg.device))

    def _sync_state(self, cpu: bool) -> dict:
        """The weights a sync sends, viewing the live parameters: the policy's (on the CPU, or on
        the trainer's device) and a maintained drafter head's (``drafter.`` prefix)."""
        state = (self.trainer.state_dict(copy=False) if cpu else
                 {k: v.detach() for k, v in self.trainer.model.state_dict().items()})
        if self.maintainer is not None:
            state.update(self.maintainer.state())
        return state

    def _probe(self) -> tuple[list[int], list[float] | None]:
        return self.probe_ids, None if self._on_cpu() else probe_logprobs(self.trainer.model, self.probe_ids)

    def _on_cpu(self) -> bool:
        return str(self.trainer.cfg.device) == "cpu"

    def save(self, directory: str) -> str:
        path = self.trainer.save_checkpoint(directory)
        if self.maintainer is not None:
            self.maintainer.save(path)
        return str(path)

    def load(self, directory: str) -> int:
        """The checkpoint's policy and optimizer, and its maintained head's if it has one (a resume
        that turns mtp.maintain on maintains rollout.draft_model's head from there)."""
        from mtp.maintain import HEAD_DIR
        self.trainer.load_checkpoint(directory)
        if self.maintainer is not None and (Path(directory) / HEAD_DIR).is_dir():
            self.maintainer.load(Path(directory))
        return self.trainer.version


def split_groups(groups: list[Group], ranks: int, load: list[int] | None = None,
                 shared_prompt: bool = False) -> list[list[Group]]:
    """Whole groups per rank, balanced by the tokens trained (largest first onto the lightest rank,
    given the ranks' ``load`` so far, which it adds to; a group's prompt once with
    ``shared_prompt``, else once per response), each rank's groups in their original order."""
    cost = [len(g.prompt_ids) * (1 if shared_prompt else g.n) + sum(len(r) for r in g.responses) for g in groups]
    load, shards = load if load is not None else [0] * ranks, [[] for _ in range(ranks)]
    for i in sorted(range(len(groups)), key=lambda i: -cost[i]):
        r = min(range(ranks), key=lambda r: (load[r], r))
        load[r] += cost[i]
        shards[r].append(i)
    return [[groups[i] for i in sorted(s)] for s in shards]


def shard_step(groups: list[Group], ranks: int, mini_batches: int,
               shared_prompt: bool = False) -> tuple[list[list[Group]], list[list[int]]]:
    """Each rank's groups of a step and their mini-batches: mini-batch m is the m-th run of the
    groups (as in one process), split over the ranks. The ranks' loads carry over from one
    mini-batch to the next, so a rank short in one gets more in the next, and every rank gets a
    group when there are as many groups as ranks (a split per mini-batch from zero gave every
    odd group to rank 0: 4 groups in 4 mini-batches left rank 1 none, and its step failed)."""
    ids, load = mini_batch_ids(len(groups), mini_batches), [0] * ranks
    shards: list[list[Group]] = [[] for _ in range(ranks)]
    minis: list[list[int]] = [[] for _ in range(ranks)]
    for m in range(mini_batches):
        for r, part in enumerate(split_groups([g for g, i in zip(groups, ids) if i == m], ranks, load, shared_prompt)):
            shards[r] += part
            minis[r] += [m] * len(part)
    return shards, minis


class TrainerGroup:
    """The driver's handle on the trainer ranks (a list of :class:`TrainerActor` handles)."""

    def __init__(self, actors: list, model_dir: str, trainer_cfg, algorithm_cfg, temperature: float,
                 max_tokens: int, dtype: str, probe_ids: list[int], drafter: tuple[str, object] | None = None):
        self.actors, self.mini_batches, self.shared_prompt = actors, trainer_cfg.mini_batches, trainer_cfg.shared_prompt
        master = ray.get(actors[0].address.remote()) if len(actors) > 1 else None
        ray.get([a.setup.remote(model_dir, trainer_cfg, algorithm_cfg, temperature, max_tokens, dtype, probe_ids,
                                master, drafter) for a in actors])

    def step(self, groups: list[Group]) -> list:
        """Refs of every rank's metrics (identical on every rank); :meth:`metrics` reads them.
        Mini-batch m is the m-th run of the groups (as in one process), split over the ranks."""
        shards, minis = shard_step(groups, len(self.actors), self.mini_batches, self.shared_prompt)
        return [a.step.remote(shard, mini) for a, shard, mini in zip(self.actors, shards, minis)]

    @staticmethod
    def metrics(refs: list) -> dict[str, float]:
        return ray.get(refs)[0]

    def export(self):
        """Refs of rank 0's (weights, version, checksum, probe)."""
        return self.actors[0].export.options(num_returns=4).remote()

    def save(self, directory: str, timeout: float | None = None) -> str:
        return ray.get([a.save.remote(directory) for a in self.actors], timeout=timeout)[0]

    def load(self, directory: str) -> int:
        return ray.get([a.load.remote(directory) for a in self.actors])[0]

    def node_ids(self) -> list[str]:
        return ray.get([a.node_id.remote() for a in self.actors])

    def gpu_ids(self) -> list[list[str]]:
        return ray.get([a.gpu_ids.remote() for a in self.actors])
