"""Many workers, one trainer group, on a two-node local Ray cluster (`ray.cluster_utils.Cluster`):
rollout workers and data-parallel trainer ranks placed through a placement group, and a local
Ray's endpoints bound to 127.0.0.1."""

import json

import psutil
import pytest
import ray
from ray._private.worker import get_dashboard_url
from ray.cluster_utils import Cluster

from orchestration.config import load_config
from orchestration.actors import init_ray
from orchestration.grpo import main

pytestmark = pytest.mark.slow


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLACCEL_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def two_nodes():
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.vllm
def test_two_workers_and_two_trainer_ranks_spread_over_two_nodes(tmp_path, cache, two_nodes):
    config = load_config("tiny", [
        "rollout.num_workers=2", "trainer.world_size=2", "trainer.zero_stage=2", "trainer.threads=1",
        "orchestration.placement_strategy=SPREAD", "orchestration.steps=3", "algorithm.prompts_per_step=4",
        "model.warm_start_steps=20", "data.num_prompts=64", f"logging.dir={tmp_path / 'run'}",
        "rollout.sync_probe_every=1"])
    history = main(config, progress=False)
    assert [h["version"] for h in history] == [1.0, 2.0, 3.0]
    assert all(h["rollout_sequences"] == 4 * 8 for h in history)
    # rollout worker k received weights of version k+1 that the trainer group exported, verified
    assert max(h["sync_probe_diff"] for h in history) < 1e-4
    placement = json.loads((tmp_path / "run" / "placement.json").read_text())
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert set(placement["rollout_workers"]) == nodes  # one worker on each node
    assert set(placement["trainer_ranks"]) == nodes
    assert (tmp_path / "run" / "checkpoint" / "deepspeed").is_dir()  # each rank's optimizer partition


def test_local_ray_binds_its_endpoints_to_localhost(tmp_path):
    ray.shutdown()
    config = load_config("tiny", ["orchestration.dashboard=true", f"logging.dir={tmp_path}"])
    init_ray(config)
    try:
        node = ray.nodes()[0]
        assert node["NodeManagerAddress"] == "127.0.0.1"
        ports = {node["MetricsExportPort"], int(get_dashboard_url().rsplit(":", 1)[1])}
        listening = {c.laddr.port: c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN"}
        assert ports <= set(listening)
        assert all(listening[p] == "127.0.0.1" for p in ports), {p: listening[p] for p in ports}
    finally:
        ray.shutdown()
