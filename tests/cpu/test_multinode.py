"""A three-node Ray cluster on one machine: prefill actors on one node, decode on another."""
from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster as RayTestCluster

from tests.cpu.harness import RunningServer, hf_greedy, prompts, tiny_config


@pytest.fixture(scope="module")
def nodes():
    c = RayTestCluster(initialize_head=True, head_node_args={"num_cpus": 1})
    prefill_node = c.add_node(num_cpus=2, resources={"prefill_node": 4})
    decode_node = c.add_node(num_cpus=2, resources={"decode_node": 4})
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="pdserve-test")
    yield prefill_node.node_id, decode_node.node_id
    ray.shutdown()
    c.shutdown()


def test_prefill_and_decode_land_on_their_nodes_and_outputs_match(nodes: tuple[str, str]) -> None:
    prefill_node, decode_node = nodes
    cfg = tiny_config(
        prefill={"replicas": 2, "resources": {"prefill_node": 1}},
        decode={"replicas": 1, "resources": {"decode_node": 1}},
        cluster={"address": "auto"},
    )
    srv = RunningServer(cfg)
    try:
        placed = srv.cluster.nodes
        assert {placed["prefill-0"], placed["prefill-1"]} == {prefill_node[:12]}
        assert placed["decode-0"] == decode_node[:12]
        by_role = {(w.role, w.node) for w in srv.status()}
        assert by_role == {("prefill", prefill_node[:12]), ("decode", decode_node[:12])}
        for p in prompts(6, seed=5):
            assert list(srv.generate(prompt=p, max_tokens=12).token_ids) == hf_greedy(p, 12)
        links = ray.get([w.stats.remote() for w in srv.cluster.prefills])
        assert all(s.extra["links"] == {"decode-0": "gloo"} for s in links)  # across nodes: a gloo pair each
    finally:
        srv.stop()


def test_unsatisfiable_resources_are_refused_at_startup(nodes: tuple[str, str]) -> None:
    from cluster.launcher import Cluster, StartupError

    cfg = tiny_config(decode={"resources": {"gpu_node": 1}}, cluster={"address": "auto"})
    with pytest.raises(StartupError, match="gpu_node"):
        Cluster(cfg).start()
