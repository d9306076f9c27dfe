"""Multi-process start-up: decide whether and how to call `jax.distributed.initialize`.

JAX runs one Python process per host (or per GPU); every process must call
`jax.distributed.initialize` before anything touches a device. `main.py` calls
`maybe_initialize()` first thing, which

* uses the explicit flags `--coordinator_address`, `--num_processes`,
  `--process_id` (and `--local_device_ids`) when given;
* fills in whatever the flags leave out from a SLURM job step
  (`SLURM_NTASKS > 1`, `SLURM_PROCID`, `SLURM_STEP_NODELIST`, ...);
* hands over to JAX's own cluster detection (no arguments) on Cloud TPU
  workers (`TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES` with several
  hosts, multislice `MEGASCALE_NUM_SLICES > 1`) and under Open MPI
  (`OMPI_COMM_WORLD_SIZE > 1`), or always with `--distributed=jax` (what
  `launch/tpu_vm.sh` passes: a TPU VM finds its workers through the metadata
  server, not the environment);
* does nothing for a single process (`--distributed=off` forces that).

The decision is a pure function, `plan(args, env)`, so it can be tested on
fake environments; `maybe_initialize` only applies it.

Why not always call `jax.distributed.initialize()` and let JAX decide: JAX's
SLURM detection restricts every process to the GPU numbered `SLURM_LOCALID`
(right for one process per GPU, wrong for one process per node, where that
process must see all the node's GPUs), and a multi-task SLURM allocation
entered without `srun` makes every process wait for partners that never come.
`plan` handles both.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags, logging

FLAGS = flags.FLAGS

MODES = ("auto", "jax", "off")
CPU_COLLECTIVES = ("gloo", "mpi")


def _define_flags() -> None:
    """Defines this module's absl flags once, even if the module is imported twice.

    A second import (e.g. the file run as `__main__` and imported by name, or an
    `importlib.reload`) would otherwise raise `DuplicateFlagError`.
    """
    if "coordinator_address" not in FLAGS:
        flags.DEFINE_string(
            "coordinator_address", None,
            "host:port of process 0's coordination service (multi-process runs).")
    if "num_processes" not in FLAGS:
        flags.DEFINE_integer(
            "num_processes", None, "Total number of JAX processes.", lower_bound=1)
    if "process_id" not in FLAGS:
        flags.DEFINE_integer(
            "process_id", None, "Index of this process in [0, num_processes).",
            lower_bound=0)
    if "local_device_ids" not in FLAGS:
        flags.DEFINE_list(
            "local_device_ids", None,
            "Local accelerator indices this process drives (e.g. '3' for one "
            "process per GPU); default: all local devices.")
    if "cpu_collectives" not in FLAGS:
        flags.DEFINE_enum(
            "cpu_collectives", None, list(CPU_COLLECTIVES),
            "Cross-process collectives on CPU (sets "
            "jax_cpu_collectives_implementation); use gloo for CPU multi-process.")
    if "distributed" not in FLAGS:
        flags.DEFINE_enum(
            "distributed", "auto", list(MODES),
            "auto: initialise from the flags above or a detected SLURM / Cloud TPU "
            "/ Open MPI multi-process environment, no-op for one process; jax: "
            "always call jax.distributed.initialize and let JAX detect the rest "
            "(Cloud TPU VM pod slices); off: never initialise.")
    if "distributed_init_timeout" not in FLAGS:
        flags.DEFINE_integer(
            "distributed_init_timeout", 300,
            "Seconds to wait for all processes to join.", lower_bound=1)


_define_flags()


@dataclasses.dataclass(frozen=True)
class DistributedArgs:
    """What the user asked for (the flags), independent of absl."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    cpu_collectives: str | None = None
    mode: str = "auto"
    initialization_timeout: int = 300


@dataclasses.dataclass(frozen=True)
class Plan:
    """The decision: whether to call `jax.distributed.initialize`, and with what.

    `source` says where the values came from: 'single' (one process), 'off'
    (`--distributed=off`), 'flags', 'slurm' (flags and/or SLURM), or 'jax'
    (JAX's own cluster detection). `init_kwargs` are passed to
    `jax.distributed.initialize` as they are.
    """

    initialize: bool
    source: str
    reason: str
    init_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    cpu_collectives: str | None = None


def _flag_value(name: str) -> Any:
    """A flag's parsed value, or its default when flags have not been parsed."""
    flag = FLAGS[name]
    return flag.value if FLAGS.is_parsed() else flag.default


def args_from_flags() -> DistributedArgs:
    """Reads this module's flags into a `DistributedArgs`."""
    ids = _flag_value("local_device_ids")
    return DistributedArgs(
        coordinator_address=_flag_value("coordinator_address"),
        num_processes=_flag_value("num_processes"),
        process_id=_flag_value("process_id"),
        local_device_ids=_parse_device_ids(ids, "--local_device_ids") if ids else None,
        cpu_collectives=_flag_value("cpu_collectives"),
        mode=_flag_value("distributed"),
        initialization_timeout=_flag_value("distributed_init_timeout"),
    )


def _parse_device_ids(values: Sequence[str | int] | str, what: str) -> tuple[int, ...]:
    """'0,2' or ['0', '2'] -> (0, 2), with an error naming `what` on junk."""
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    try:
        ids = tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated device indices, got "
                         f"{','.join(map(str, values))!r}") from None
    if any(i < 0 for i in ids):
        raise ValueError(f"{what}: device indices must be >= 0, got {ids}")
    return ids


def _env_int(env: Mapping[str, str], name: str) -> int:
    """An integer environment variable, with an error naming it when malformed."""
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _check_address(address: str, what: str) -> None:
    """Rejects coordinator addresses without a host and a numeric port."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what}={address!r}: expected host:port, e.g. node001:1234")


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a SLURM node list ('gpu[003-005,9],cpu1' -> 'gpu003').

    This is what `scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1`
    prints (the SLURM launch script uses that), computed without `scontrol`.
    Zero padding is kept as written in the range.
    """
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist.strip())
    if not match or not (match.group(1) or match.group(2)):
        raise ValueError(f"SLURM node list {nodelist!r}: cannot find a host name")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    first = re.split(r"[,-]", ranges, maxsplit=1)[0].strip()
    if not first:
        raise ValueError(f"SLURM node list {nodelist!r}: empty range")
    # Text after ']' up to the next host ('n[1-2]-ib', 'r[1-2]n[01-04]') is part
    # of the same host name.
    rest = nodelist.strip()[match.end():]
    if rest and not rest.startswith(","):
        return f"{prefix}{first}{first_slurm_host(rest)}"
    return f"{prefix}{first}"


def slurm_coordinator_port(env: Mapping[str, str]) -> int:
    """The port JAX derives for a SLURM job: `JAX_COORDINATOR_PORT`, else
    `SLURM_JOB_ID % 4096 + 61440` (so every task of the job agrees on it)."""
    if "JAX_COORDINATOR_PORT" in env:
        return _env_int(env, "JAX_COORDINATOR_PORT")
    return _env_int(env, "SLURM_JOB_ID") % 4096 + 61440


def _slurm_values(env: Mapping[str, str]) -> dict[str, Any] | None:
    """Distributed values from a SLURM job step, or None outside a multi-task job.

    One process per node (tasks == nodes) sees all of its node's devices; several
    tasks per node means one process per device, so task `SLURM_LOCALID` drives
    device `SLURM_LOCALID` (unless SLURM already narrowed CUDA_VISIBLE_DEVICES to
    a single GPU for it, e.g. with --gpus-per-task=1).
    """
    if "SLURM_JOB_ID" not in env:
        return None
    count_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    if count_var not in env:
        return None
    num_processes = _env_int(env, count_var)
    if num_processes <= 1:
        return None
    if "SLURM_STEP_NODELIST" not in env or "SLURM_PROCID" not in env:
        raise ValueError(
            f"{count_var}={num_processes} but this process is not inside a SLURM job "
            "step (SLURM_STEP_NODELIST / SLURM_PROCID unset), so its partners were "
            "never started: launch it with srun (see launch/slurm_multinode.sbatch), "
            "or pass --distributed=off to run a single process")
    values: dict[str, Any] = {
        "num_processes": num_processes,
        "process_id": _env_int(env, "SLURM_PROCID"),
    }
    if env.get("JAX_COORDINATOR_ADDRESS"):
        values["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    else:
        host = first_slurm_host(env["SLURM_STEP_NODELIST"])
        values["coordinator_address"] = f"{host}:{slurm_coordinator_port(env)}"
    nodes_var = "SLURM_STEP_NUM_NODES" if "SLURM_STEP_NUM_NODES" in env else "SLURM_NNODES"
    num_nodes = _env_int(env, nodes_var) if nodes_var in env else num_processes
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if num_processes > num_nodes and "SLURM_LOCALID" in env and len(visible) != 1:
        values["local_device_ids"] = (_env_int(env, "SLURM_LOCALID"),)
    return values


def _host_count(value: str) -> int:
    return len([h for h in value.split(",") if h.strip()])


def _jax_cluster_reason(env: Mapping[str, str]) -> str | None:
    """Why JAX's own detection should run (Cloud TPU / Open MPI), or None."""
    for var in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        if var in env and _host_count(env[var]) > 1:
            return f"Cloud TPU worker with {var} listing {_host_count(env[var])} hosts"
    if env.get("MEGASCALE_NUM_SLICES", "1").strip() not in ("", "0", "1"):
        return f"Cloud TPU multislice (MEGASCALE_NUM_SLICES={env['MEGASCALE_NUM_SLICES']})"
    if "OMPI_COMM_WORLD_SIZE" in env and _env_int(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return f"Open MPI job with OMPI_COMM_WORLD_SIZE={env['OMPI_COMM_WORLD_SIZE']}"
    return None


def plan(args: DistributedArgs, env: Mapping[str, str]) -> Plan:
    """Decides how this process joins a multi-process run (pure: no JAX calls).

    Raises ValueError, naming the flag or environment variable at fault, for an
    incomplete or inconsistent request.
    """
    if args.mode not in MODES:
        raise ValueError(f"--distributed={args.mode!r}: expected one of {MODES}")
    if args.cpu_collectives not in (None, *CPU_COLLECTIVES):
        raise ValueError(f"--cpu_collectives={args.cpu_collectives!r}: expected one "
                         f"of {CPU_COLLECTIVES}")
    explicit = {
        "coordinator_address": args.coordinator_address,
        "num_processes": args.num_processes,
        "process_id": args.process_id,
        "local_device_ids": args.local_device_ids,
    }
    explicit = {k: v for k, v in explicit.items() if v is not None}
    common = dict(cpu_collectives=args.cpu_collectives)
    timeout = {"initialization_timeout": args.initialization_timeout}

    if args.mode == "off":
        if args.num_processes is not None and args.num_processes > 1:
            raise ValueError(f"--distributed=off contradicts --num_processes="
                             f"{args.num_processes}: drop one of them")
        return Plan(False, "off", "--distributed=off", **common)
    if args.mode == "jax":
        kwargs = {**explicit, **timeout}
        return Plan(True, "jax", "--distributed=jax: JAX detects what the flags "
                    "leave unset (Cloud TPU metadata, SLURM, Open MPI)", kwargs, **common)

    slurm = _slurm_values(env)
    if slurm is None and not explicit:
        reason = _jax_cluster_reason(env)
        if reason is not None:
            return Plan(True, "jax", reason, dict(timeout), **common)
        return Plan(False, "single", "no multi-process flags or environment", **common)

    values = {**(slurm or {}), **explicit}
    source = "slurm" if slurm is not None else "flags"
    num_processes = values.get("num_processes")
    if num_processes is None:
        given = ", ".join(f"--{k}" for k in explicit)
        raise ValueError(f"{given} given without --num_processes (and no SLURM job "
                         "step to take it from): pass --num_processes")
    process_id = values.get("process_id")
    if num_processes == 1:
        if process_id not in (None, 0):
            raise ValueError(f"--process_id={process_id} is out of range for "
                             "--num_processes=1")
        return Plan(False, "single", "--num_processes=1", **common)
    missing = [f"--{k}" for k in ("coordinator_address", "process_id") if k not in values]
    if missing:
        raise ValueError(f"--num_processes={num_processes} also needs "
                         f"{' and '.join(missing)}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} is out of range for "
                         f"--num_processes={num_processes} (expected 0..{num_processes - 1})")
    _check_address(values["coordinator_address"], "--coordinator_address")
    kwargs = {
        "coordinator_address": values["coordinator_address"],
        "num_processes": num_processes,
        "process_id": process_id,
        "local_device_ids": list(values["local_device_ids"])
        if values.get("local_device_ids") is not None else None,
        # Everything is decided here; JAX's own detection would override the
        # local devices of one-process-per-node SLURM jobs.
        "cluster_detection_method": "deactivate",
        **timeout,
    }
    reason = (f"process {process_id} of {num_processes}, coordinator "
              f"{values['coordinator_address']}")
    return Plan(True, source, reason, kwargs, **common)


def maybe_initialize(args: DistributedArgs | None = None,
                     env: Mapping[str, str] | None = None) -> Plan:
    """Initialises multi-process JAX when this is a multi-process launch.

    Call before anything touches a JAX device. `args` default to this module's
    flags and `env` to `os.environ`. Calling it again after a successful
    initialisation does nothing. Returns the `Plan` it applied.
    """
    import jax

    args = args_from_flags() if args is None else args
    decision = plan(args, os.environ if env is None else env)
    if decision.cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", decision.cpu_collectives)
    if not decision.initialize:
        logging.info("Single-process JAX (%s).", decision.reason)
        return decision
    if jax.distributed.is_initialized():
        logging.info("jax.distributed already initialised; leaving it as it is.")
        return decision
    logging.info("jax.distributed.initialize via %s: %s", decision.source, decision.reason)
    jax.distributed.initialize(**decision.init_kwargs)
    logging.info("Process %d of %d, %d local / %d global devices.", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return decision


def is_main_process() -> bool:
    """True on process 0, the one that writes summaries and prints tables."""
    import jax

    return jax.process_index() == 0


def sync(name: str) -> None:
    """Blocks until every process reaches the barrier `name` (no-op for one process)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
