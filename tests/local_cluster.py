"""JAX processes on localhost over gloo, for the multi-process tests.

Each test starts its children with :func:`start` (the coordinator flags of
``broadface_jax.distributed`` appended to each command) and collects them
with :func:`wait_ok`; :func:`kill` (in a ``finally``) leaves no child behind.
"""

from __future__ import annotations

import os
import socket
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(local_devices: int, **extra: str) -> dict[str, str]:
    """This process's environment with ``local_devices`` fake CPU devices per child."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}",
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", **extra)
    return env


def start(commands: list[list[str]], env: dict[str, str], init_timeout: int = 90
          ) -> list[subprocess.Popen]:
    """Starts process ``i`` of ``len(commands)`` running ``commands[i]`` + the cluster flags."""
    port = free_port()
    procs: list[subprocess.Popen] = []
    try:
        for pid, command in enumerate(commands):
            procs.append(subprocess.Popen(
                [*command, f"--coordinator_address=127.0.0.1:{port}",
                 f"--num_processes={len(commands)}", f"--process_id={pid}",
                 "--cpu_collectives=gloo", f"--distributed_init_timeout={init_timeout}"],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    except BaseException:
        kill(procs)
        raise
    return procs


def wait_ok(procs: list[subprocess.Popen], timeout: float, tail: int = 3000) -> list[str]:
    """Each child's output; fails naming the first child that exited non-zero."""
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for pid, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {pid} failed:\n{text[-tail:]}"
    return outputs


def kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
