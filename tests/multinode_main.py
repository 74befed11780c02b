"""Run the smoke loop on a multi-node cluster simulated with `ray.cluster_utils.Cluster`: the
learner's workers on one node, the rollout actors on another, placed by custom Ray resources.
Run as a script by tests/test_ray_jobs.py (a separate process owns the simulated cluster)."""

import json
import sys

import ray
from ray.cluster_utils import Cluster

from cluster.control import NAMESPACE
from cluster.shared.config_file import load_config
from cluster.train import train

config, out, *overrides = sys.argv[1:]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"learner_node": 2}})
worker = cluster.add_node(num_cpus=2, resources={"rollout_node": 4})
ray.init(address=cluster.address, namespace=NAMESPACE)
cfg = load_config(config, [*overrides, "learner.resources={learner_node: 1}", "rollout.resources={rollout_node: 1}"])
summary = train(cfg, log=lambda *_: None)
nodes = {"head": cluster.head_node.node_id, "worker": worker.node_id}
with open(out, "w") as f:
    json.dump({"summary": summary, "nodes": nodes}, f)
ray.shutdown()
cluster.shutdown()
