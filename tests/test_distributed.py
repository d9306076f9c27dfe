"""broadface_jax.distributed: the launch decision on fake environments, the
single-process no-op, and a real 2-process jax.distributed run on localhost."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys
import textwrap

import jax
import numpy as np
import pytest

from broadface_jax import distributed
from broadface_jax.distributed import DistributedArgs, plan
from tests import local_cluster

REPO = pathlib.Path(__file__).resolve().parents[1]


def slurm_env(job_id: int, ntasks: int, nodes: int, procid: int, localid: int,
              nodelist: str, **extra: str) -> dict[str, str]:
    """The variables srun sets inside a job step."""
    env = {
        "SLURM_JOB_ID": str(job_id),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_STEP_NUM_TASKS": str(ntasks),
        "SLURM_NNODES": str(nodes),
        "SLURM_STEP_NUM_NODES": str(nodes),
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_STEP_NODELIST": nodelist,
    }
    env.update(extra)
    return env


# ---------------------------------------------------------------- single process

def test_empty_env_is_single_process():
    p = plan(DistributedArgs(), {})
    assert (p.initialize, p.source) == (False, "single")


def test_num_processes_one_is_single_process():
    p = plan(DistributedArgs(num_processes=1, process_id=0), {})
    assert (p.initialize, p.source) == (False, "single")
    with pytest.raises(ValueError, match="--process_id=1"):
        plan(DistributedArgs(num_processes=1, process_id=1), {})


def test_off_ignores_cluster_env_and_rejects_contradiction():
    env = slurm_env(7, 4, 4, 1, 0, "n[1-4]")
    assert not plan(DistributedArgs(mode="off"), env).initialize
    with pytest.raises(ValueError, match="--distributed=off.*--num_processes=2"):
        plan(DistributedArgs(mode="off", num_processes=2), {})


def test_maybe_initialize_noop_leaves_jax_single_process():
    before = jax.config.jax_cpu_collectives_implementation
    try:
        p = distributed.maybe_initialize(DistributedArgs(cpu_collectives="gloo"), env={})
        assert not p.initialize
        assert jax.config.jax_cpu_collectives_implementation == "gloo"
    finally:
        jax.config.update("jax_cpu_collectives_implementation", before)
    assert not jax.distributed.is_initialized()
    assert jax.process_count() == 1
    assert distributed.is_main_process()
    distributed.sync("single-process barrier is a no-op")


def test_args_from_flags_defaults_when_unparsed():
    args = distributed.args_from_flags()
    assert args == DistributedArgs()


def test_flags_survive_a_second_import(monkeypatch):
    """Loading the module again under another name must not redefine its flags."""
    name = "broadface_jax_distributed_copy"
    spec = importlib.util.spec_from_file_location(name, distributed.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    assert module.FLAGS is distributed.FLAGS
    assert distributed.FLAGS["coordinator_address"].default is None


# ---------------------------------------------------------------- explicit flags

def test_explicit_flags_plan_exact_kwargs():
    rng = np.random.default_rng()
    for _ in range(5):
        n = int(rng.integers(2, 64))
        pid = int(rng.integers(0, n))
        port = int(rng.integers(1024, 65535))
        p = plan(DistributedArgs(coordinator_address=f"10.0.0.1:{port}", num_processes=n,
                                 process_id=pid, local_device_ids=(pid % 8,),
                                 initialization_timeout=42), {})
        assert (p.initialize, p.source) == (True, "flags")
        assert dict(p.init_kwargs) == {
            "coordinator_address": f"10.0.0.1:{port}", "num_processes": n,
            "process_id": pid, "local_device_ids": [pid % 8],
            "cluster_detection_method": "deactivate", "initialization_timeout": 42}


@pytest.mark.parametrize("args, message", [
    (DistributedArgs(num_processes=2, process_id=0), "needs --coordinator_address"),
    (DistributedArgs(num_processes=2, coordinator_address="h:1"), "needs --process_id"),
    (DistributedArgs(coordinator_address="h:1", process_id=0), "without --num_processes"),
    (DistributedArgs(coordinator_address="h:1", num_processes=4, process_id=4),
     r"--process_id=4 is out of range .*0\.\.3"),
    (DistributedArgs(coordinator_address="localhost", num_processes=2, process_id=0),
     "--coordinator_address='localhost': expected host:port"),
    (DistributedArgs(coordinator_address="h:99999", num_processes=2, process_id=0),
     "expected host:port"),
    (DistributedArgs(mode="sometimes"), "--distributed='sometimes'"),
    (DistributedArgs(cpu_collectives="nccl"), "--cpu_collectives='nccl'"),
])
def test_bad_requests_name_the_flag(args, message):
    with pytest.raises(ValueError, match=message):
        plan(args, {})


def test_local_device_ids_flag_parsing():
    assert distributed._parse_device_ids("0, 3", "--local_device_ids") == (0, 3)
    with pytest.raises(ValueError, match="--local_device_ids.*'0,x'"):
        distributed._parse_device_ids(["0", "x"], "--local_device_ids")
    with pytest.raises(ValueError, match=">= 0"):
        distributed._parse_device_ids("-1", "--local_device_ids")


# ---------------------------------------------------------------- SLURM

@pytest.mark.parametrize("nodelist, first", [
    ("node001", "node001"),
    ("node001,host2", "node001"),
    ("node[001-015],host2", "node001"),
    ("node[007,001-005]", "node007"),
    ("gpu[3]", "gpu3"),
    ("n[1-2]-ib,m1", "n1-ib"),
    ("r[1-2]n[01-04]", "r1n01"),
])
def test_first_slurm_host(nodelist, first):
    assert distributed.first_slurm_host(nodelist) == first


def test_slurm_one_process_per_node_sees_all_devices():
    rng = np.random.default_rng()
    for _ in range(5):
        job = int(rng.integers(1, 10**7))
        nodes = int(rng.integers(2, 17))
        pid = int(rng.integers(0, nodes))
        env = slurm_env(job, nodes, nodes, pid, 0, f"gpu[{10:03d}-{10 + nodes - 1:03d}]")
        p = plan(DistributedArgs(), env)
        assert (p.initialize, p.source) == (True, "slurm")
        assert p.init_kwargs["coordinator_address"] == f"gpu010:{job % 4096 + 61440}"
        assert p.init_kwargs["num_processes"] == nodes
        assert p.init_kwargs["process_id"] == pid
        assert p.init_kwargs["local_device_ids"] is None
        assert p.init_kwargs["cluster_detection_method"] == "deactivate"


def test_slurm_one_process_per_gpu_pins_local_device():
    env = slurm_env(99, 16, 2, 11, 3, "a[1-2]")
    assert plan(DistributedArgs(), env).init_kwargs["local_device_ids"] == [3]
    # SLURM already bound one GPU to the task (--gpus-per-task=1): keep it.
    env["CUDA_VISIBLE_DEVICES"] = "3"
    assert plan(DistributedArgs(), env).init_kwargs["local_device_ids"] is None


def test_slurm_values_agree_with_jax_slurm_detection(monkeypatch):
    """Coordinator, count and id as JAX's own SLURM cluster computes them."""
    slurm_cluster = pytest.importorskip("jax._src.clusters.slurm_cluster")
    cluster = slurm_cluster.SlurmCluster
    rng = np.random.default_rng()
    # Only the formats JAX's parser documents: JAX 0.10.2 returns 'gpu3]' for
    # 'gpu[3]' and drops the '-ib' of 'n[1-2]-ib' (scontrol keeps it).
    for nodelist in ("node001", "node001,host2", "node[001-015],host2",
                     "node[007,001-005]"):
        job, n = int(rng.integers(1, 10**7)), int(rng.integers(2, 9))
        pid = int(rng.integers(0, n))
        env = slurm_env(job, n, n, pid, 0, nodelist)
        for key in [k for k in os.environ if k.startswith("SLURM_")] + ["JAX_COORDINATOR_PORT"]:
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert cluster.is_env_present()
        ours = plan(DistributedArgs(), env).init_kwargs
        assert ours["coordinator_address"] == cluster.get_coordinator_address(None, None)
        assert ours["num_processes"] == cluster.get_process_count()
        assert ours["process_id"] == cluster.get_process_id()


def test_slurm_overrides_from_flags_and_env():
    env = slurm_env(5, 4, 4, 2, 0, "n[1-4]")
    p = plan(DistributedArgs(coordinator_address="n9:1234"), env)
    assert p.init_kwargs["coordinator_address"] == "n9:1234"
    assert (p.init_kwargs["num_processes"], p.init_kwargs["process_id"]) == (4, 2)
    env_port = dict(env, JAX_COORDINATOR_PORT="4321")
    assert plan(DistributedArgs(), env_port).init_kwargs["coordinator_address"] == "n1:4321"
    env_addr = dict(env, JAX_COORDINATOR_ADDRESS="head:777")
    assert plan(DistributedArgs(), env_addr).init_kwargs["coordinator_address"] == "head:777"


def test_slurm_single_task_is_single_process():
    assert not plan(DistributedArgs(), slurm_env(5, 1, 1, 0, 0, "n1")).initialize


def test_slurm_allocation_without_srun_is_an_error():
    env = {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "4", "SLURM_NNODES": "4",
           "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_PROCID": "0"}
    with pytest.raises(ValueError, match="SLURM_NTASKS=4 .*srun.*--distributed=off"):
        plan(DistributedArgs(), env)
    assert not plan(DistributedArgs(mode="off"), env).initialize


def test_slurm_malformed_variable_is_named():
    env = slurm_env(5, 4, 4, 0, 0, "n[1-4]", SLURM_PROCID="zero")
    with pytest.raises(ValueError, match="SLURM_PROCID='zero'"):
        plan(DistributedArgs(), env)


# ---------------------------------------------------------------- TPU, Open MPI, --distributed=jax

@pytest.mark.parametrize("env, initialize", [
    ({"TPU_WORKER_HOSTNAMES": "t1v-w-0,t1v-w-1,t1v-w-2,t1v-w-3", "TPU_WORKER_ID": "2"}, True),
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.2:8476,10.0.0.3:8476"}, True),
    ({"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}, False),
    ({"MEGASCALE_NUM_SLICES": "2", "TPU_WORKER_HOSTNAMES": "a"}, True),
    ({"MEGASCALE_NUM_SLICES": "1"}, False),
    ({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "3"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, False),
])
def test_jax_detected_clusters(env, initialize):
    p = plan(DistributedArgs(initialization_timeout=77), env)
    assert p.initialize is initialize
    if initialize:
        # JAX's detection fills in everything: only the timeout is passed.
        assert (p.source, dict(p.init_kwargs)) == ("jax", {"initialization_timeout": 77})


def test_mode_jax_passes_only_what_was_given():
    p = plan(DistributedArgs(mode="jax", process_id=3), {})
    assert (p.initialize, p.source) == (True, "jax")
    assert dict(p.init_kwargs) == {"process_id": 3, "initialization_timeout": 300}


# ---------------------------------------------------------------- real 2-process run

WORKER = textwrap.dedent("""
    import json, sys
    from absl import flags
    from broadface_jax import distributed

    out_path, seed = sys.argv[1], int(sys.argv[2])
    flags.FLAGS(["worker"] + sys.argv[3:])
    decision = distributed.maybe_initialize()

    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    pid = jax.process_index()
    local = np.random.default_rng([seed, pid]).normal(size=(2, 3)).astype(np.float32)
    gathered = multihost_utils.process_allgather(local)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    global_x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    psum = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a.sum(0, keepdims=True), "data"),
                                 mesh=mesh, in_specs=P("data"), out_specs=P()))(global_x)
    distributed.sync("test-done")
    with open(out_path, "w") as f:
        json.dump({"source": decision.source, "process_index": pid,
                   "process_count": jax.process_count(), "is_main": distributed.is_main_process(),
                   "local_devices": jax.local_device_count(), "devices": jax.device_count(),
                   "collectives": jax.config.jax_cpu_collectives_implementation,
                   "gathered": np.asarray(gathered).tolist(),
                   "psum": np.asarray(psum.addressable_data(0)).tolist()}, f)
""")


def test_two_process_gloo_on_localhost(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    seed = int(np.random.default_rng().integers(0, 2**31))
    procs = local_cluster.start(
        [[sys.executable, str(script), str(tmp_path / f"out{pid}.json"), str(seed)]
         for pid in range(2)], local_cluster.child_env(2))
    try:
        local_cluster.wait_ok(procs, timeout=180)
    finally:
        local_cluster.kill(procs)

    locals_ = [np.random.default_rng([seed, pid]).normal(size=(2, 3)).astype(np.float32)
               for pid in range(2)]
    want_gathered = np.stack(locals_).astype(np.float64)
    want_psum = np.concatenate(locals_).astype(np.float64).sum(0, keepdims=True)
    for pid in range(2):
        got = json.loads((tmp_path / f"out{pid}.json").read_text())
        assert got["source"] == "flags"
        assert (got["process_index"], got["process_count"]) == (pid, 2)
        assert got["is_main"] is (pid == 0)
        assert (got["local_devices"], got["devices"]) == (2, 4)
        assert got["collectives"] == "gloo"
        np.testing.assert_allclose(got["gathered"], want_gathered, rtol=0, atol=0)
        np.testing.assert_allclose(got["psum"], want_psum, rtol=1e-6, atol=1e-6)
