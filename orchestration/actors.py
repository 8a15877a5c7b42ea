"""The run's Ray processes: joining or starting Ray, placing rollout workers and trainer ranks in
a placement group, their allocator settings (``orchestration.keep_freed_memory``), and
:class:`Actors`, which keeps the processes for the next run of the same shape (tests,
benchmarks). The GRPO loop that drives them is ``orchestration.grpo``.
"""

from __future__ import annotations

import logging
import os

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestration.config import Config, ConfigError
from orchestration.trainer_actor import TrainerActor
from rollout.worker import RolloutWorker

log = logging.getLogger("rlaccel")


def init_ray(config: Config) -> None:
    """Join the cluster of a `ray job submit` (RAY_ADDRESS is set), else start a local Ray
    bound to ``orchestration.bind_host``."""
    o = config.orchestration
    needed = slots(config)
    if not ray.is_initialized():
        env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL":
                            os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}}
        if os.environ.get("RAY_ADDRESS"):
            ray.init(runtime_env=env, log_to_driver=True)
        else:  # address="local" ignores a stale cluster file from an earlier `ray start`
            if o.bind_host in ("127.0.0.1", "localhost"):
                # Ray turns a loopback node address into the machine's outward IP and then serves
                # the metrics endpoint on 0.0.0.0; its single-machine mode (macOS's default) keeps
                # every address on loopback. A local Ray has no other nodes to reach it.
                from ray._private import ray_constants
                os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
                ray_constants.ENABLE_RAY_CLUSTER = False
            ray.init(address="local", num_cpus=max(o.num_cpus, needed), include_dashboard=o.dashboard,
                     dashboard_host=o.bind_host, _node_ip_address=o.bind_host, runtime_env=env,
                     log_to_driver=True)
            threads = (config.rollout.threads * config.rollout.num_workers
                       + config.trainer.threads * config.trainer.world_size)
            if o.max_staleness > 0 and threads > (os.cpu_count() or threads):
                # Async: rollout and update compute at the same time on one machine.
                log.warning("orchestration.max_staleness=%d runs rollout and update at once, and their threads "
                            "(rollout.threads x num_workers + trainer.threads x world_size = %d) exceed this "
                            "machine's %d cores: they slow each other down; lower rollout.threads or "
                            "trainer.threads so that they sum to the cores", o.max_staleness, threads, os.cpu_count())
    have = ray.cluster_resources().get("CPU", 0)
    if have < needed:  # the actors would wait for CPUs forever
        raise ConfigError(f"the Ray cluster has {have:g} CPUs but rollout.num_workers="
                          f"{config.rollout.num_workers} workers + trainer.world_size={config.trainer.world_size} "
                          f"trainer ranks need {needed}; lower them or add CPUs (orchestration.num_cpus for a "
                          f"local Ray)")
    gpus = sum(b.get("GPU", 0) for b in bundles(config))
    if ray.cluster_resources().get("GPU", 0) < gpus:
        raise ConfigError(f"the Ray cluster has {ray.cluster_resources().get('GPU', 0):g} GPUs but rollout.gpus="
                          f"{config.rollout.gpus} x {config.rollout.num_workers} workers + {trainer_gpus(config)} x "
                          f"trainer.world_size={config.trainer.world_size} (trainer.device={config.trainer.device}) "
                          f"need {gpus}; for a CPU run set rollout.gpus=0 and trainer.device=cpu")


def slots(config: Config) -> int:
    """CPU slots (placement-group bundles): one per rollout worker and per trainer rank."""
    return config.rollout.num_workers + config.trainer.world_size


def trainer_gpus(config: Config) -> int:
    """GPUs per trainer rank: one on a CUDA trainer."""
    return 0 if config.trainer.device == "cpu" else 1


def worker_restarts(config: Config) -> int:
    """Times Ray restarts a dead rollout worker: rollout.max_restarts, but none with a broadcast
    weight sync, whose group cannot take in the new process (every call to the dead worker then
    fails, and the run ends with orchestration.weight_sync.WorkerLost)."""
    return config.rollout.max_restarts if config.orchestration.weight_sync == "object_store" else 0


def bundles(config: Config) -> list[dict[str, int]]:
    """A placement-group bundle per rollout worker, then one per trainer rank: a CPU each, and the
    GPUs each uses (Ray hides every other GPU from an actor's process)."""
    worker = {"CPU": 1, **({"GPU": config.rollout.gpus} if config.rollout.gpus else {})}
    rank = {"CPU": 1, **({"GPU": trainer_gpus(config)} if trainer_gpus(config) else {})}
    return ([dict(worker) for _ in range(config.rollout.num_workers)]
            + [dict(rank) for _ in range(config.trainer.world_size)])


def place(config: Config, timeout_s: float = 120.0):
    """A placement group with a bundle per rollout worker, then one per trainer rank."""
    pg = placement_group(bundles(config), strategy=config.orchestration.placement_strategy)
    if not pg.wait(timeout_s):
        remove_placement_group(pg)
        raise ConfigError(f"could not place the bundles {bundles(config)} with orchestration.placement_strategy="
                          f"{config.orchestration.placement_strategy} within {timeout_s:.0f}s (cluster: "
                          f"{ray.cluster_resources()}); use PACK/SPREAD or add nodes")
    return pg


# glibc malloc settings (read once, at process start) under which a process keeps the memory it
# frees for its next allocations: nothing below 4 GiB is mmap'd (a freed mmap goes back to the
# OS at once), and the heap is trimmed only above 64 GiB free (orchestration.keep_freed_memory).
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}


def actor_options(config: Config, gpus: int) -> dict:
    """Ray options for a rollout worker or trainer rank that asks for ``gpus`` GPUs, beyond its
    resources: a CPU actor keeps the memory it frees (orchestration.keep_freed_memory); a GPU
    actor does not, whose host copies (a checkpoint of a multi-GB policy) would stay allocated.
    A CPU actor sees no GPU: Ray (2.60) no longer hides a node's GPUs from an actor given none,
    so on a GPU node a CPU worker with a CUDA build of vLLM or torch would start on GPU 0, beside
    the trainer's rank there."""
    if gpus:
        return {}
    env = {"CUDA_VISIBLE_DEVICES": "", **(KEEP_FREED_MEMORY if keeps_freed_memory(config, gpus) else {})}
    return {"runtime_env": {"env_vars": env}}


def keeps_freed_memory(config: Config, gpus: int) -> bool:
    """Whether an actor that asks for ``gpus`` GPUs starts with :data:`KEEP_FREED_MEMORY`."""
    return config.orchestration.keep_freed_memory and gpus == 0


def heap_keeps_large_blocks(_actor=None) -> bool | None:
    """Whether this process's glibc serves a new 64 MiB block from its heap, as KEEP_FREED_MEMORY
    asks, rather than mapping it (glibc's default above 32 MiB); None where malloc cannot be asked
    (not glibc, or glibc before 2.33). Runs in an actor through ``actor.__ray_call__`` (which
    passes the actor as the argument). A task of a plain Ray actor runs on the process's main
    thread: other threads' arenas map blocks of 64 MiB and more whatever the threshold."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2
    before = mallinfo2().hblkhd
    block = bytearray(64 << 20)
    return mallinfo2().hblkhd - before < len(block)


def in_bundle(pg, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)


class Actors:
    """A run's rollout workers and trainer ranks, a bundle each (a CPU, and its GPUs) in a placement group.

    :func:`main` starts its own and stops them when the run ends. Runs one after another in one
    Ray session (a sweep, ``benchmarks/e2e_vs_trl.py``) can share one ``Actors``: each run then
    re-initialises the same processes (a new engine in each worker, a new trainer in each rank)
    instead of starting new ones, and skips their imports and first engine build (tiny preset: ~15
    s of a run's ~17 s start-up). New processes are started when the number of workers or ranks,
    ``rollout.max_restarts``, ``trainer.flush_denormal`` (fixed in a process's threads once they
    run), ``orchestration.keep_freed_memory`` (their environment) or the GPUs an actor asks Ray for
    (``rollout.gpus``, ``trainer.device``) changes, for a
    data-parallel trainer (its process group lives for one run), and after a failed run. Ray
    restarts a dead worker (with the object-store weight sync) with the arguments it was created
    with, an earlier run's: :func:`main` resets it to its own before it samples again. ``close()``
    after the last run.
    """

    def __init__(self) -> None:
        self.pg = None
        self.workers: list = []
        self.trainers: list = []
        self.reused = False  # this run's processes were started by an earlier run
        self._shape: tuple | None = None
        self._worker_args: tuple = ()
        self._resets: list = []
        self._memory_checks: list = []
        self._session = None

    def start(self, config: Config, worker_args: tuple) -> tuple[list, list]:
        """Worker and trainer-rank handles for a run; ``worker_args``: (model dir, rollout config,
        dtype, seed, policy version, run token) for :class:`RolloutWorker`. The trainer ranks are set up by
        :class:`TrainerGroup`."""
        nw, ranks = config.rollout.num_workers, config.trainer.world_size
        shape = (nw, ranks, worker_restarts(config), config.trainer.flush_denormal, config.rollout.gpus,
                 trainer_gpus(config), config.orchestration.keep_freed_memory)
        if self.pg is not None and self._session != ray_session():
            self.pg, self.workers, self.trainers = None, [], []  # gone with an earlier Ray session
        if self.pg is not None and (shape != self._shape or ranks > 1):
            self.close()
        self._worker_args, self.reused = worker_args, self.pg is not None
        if self.reused:  # queued behind at most the rollout the last run left running (it cancelled the rest)
            self._resets = [w.reset.remote(*self.worker_args(i)) for i, w in enumerate(self.workers)]
            return self.workers, self.trainers
        self.pg, self._shape, self._session = place(config), shape, ray_session()
        worker_options = actor_options(config, config.rollout.gpus)
        trainer_options = actor_options(config, trainer_gpus(config))
        # A restarted worker returns to its bundle.
        self.workers = [ray.remote(num_cpus=1, num_gpus=config.rollout.gpus, max_restarts=worker_restarts(config))(
            RolloutWorker).options(scheduling_strategy=in_bundle(self.pg, i), **worker_options).remote(
            *self.worker_args(i)) for i in range(nw)]
        self.trainers = [ray.remote(num_cpus=1, num_gpus=trainer_gpus(config))(TrainerActor).options(
            scheduling_strategy=in_bundle(self.pg, nw + r), **trainer_options).remote(r) for r in range(ranks)]
        # Checked once the workers are ready (worker_nodes): queued behind their start.
        self._memory_checks = [actor.__ray_call__.remote(heap_keeps_large_blocks) for actors, gpus in
                               ((self.workers, config.rollout.gpus), (self.trainers, trainer_gpus(config)))
                               if keeps_freed_memory(config, gpus) for actor in actors]
        return self.workers, self.trainers

    def worker_nodes(self) -> list[str]:
        """The workers' Ray nodes, once they are ready (a reset's error is raised here, as a new
        worker's constructor error would be)."""
        resets, self._resets = self._resets, []
        ray.get(resets)
        checks, self._memory_checks = ray.get(self._memory_checks), []
        if False in checks or None in checks:
            log.warning("orchestration.keep_freed_memory: %s; set orchestration.keep_freed_memory=false (README "
                        "\"Memory\")", "this glibc ignored MALLOC_MMAP_THRESHOLD_=4 GiB (an older glibc caps it at "
                        "32 MiB, and MALLOC_TRIM_THRESHOLD_ then leaves every block over 128 KiB mapped)"
                        if False in checks else "the actors' malloc is not glibc 2.33 or later, where it can be checked")
        return ray.get([w.node_id.remote() for w in self.workers])

    def worker_args(self, i: int) -> tuple:
        model_dir, rollout_cfg, dtype, seed, version, run = self._worker_args
        return model_dir, rollout_cfg, dtype, seed, i, version, run

    def close(self) -> None:
        """Stop the processes (idempotent; nothing to stop once their Ray session has ended)."""
        if self.pg is not None and ray.is_initialized() and self._session == ray_session():
            for actor in (*self.workers, *self.trainers):
                ray.kill(actor)
            remove_placement_group(self.pg)
        self.pg, self.workers, self.trainers, self.reused, self._resets, self._memory_checks = None, [], [], False, [], []


def ray_session() -> str:
    """The Ray session this process is connected to. Not the job id: every new local Ray numbers
    its first driver's job 01000000 again; the driver's node is new with each local Ray (and the
    same for every driver of one cluster)."""
    return ray.get_runtime_context().get_node_id()
