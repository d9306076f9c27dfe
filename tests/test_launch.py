"""launch/ scripts: --dry-run prints the exact commands, --help works, bad
arguments fail clearly, the per-GPU launcher really runs and stops its
processes, the SLURM script derives its coordinator, and shellcheck is clean."""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import subprocess
import time

import numpy as np
import pytest

from broadface_jax import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_vm.sh", "gpu_single_node.sh", "slurm_submit.sh", "slurm_multinode.sbatch"]
CONFIG = "configs/default.py"
LSC = "--xla_gpu_enable_latency_hiding_scheduler=true"


def clean_env(**extra: str) -> dict[str, str]:
    """A minimal environment: no XLA_FLAGS / CUDA / SLURM leaking in from the test run."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "LC_ALL": "C"}
    env.update(extra)
    return env


def run(script: str, *args: str, env: dict[str, str] | None = None,
        cwd: pathlib.Path = REPO, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=cwd, text=True,
                          capture_output=True, env=clean_env() if env is None else env,
                          timeout=timeout)


def lines(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


# ---------------------------------------------------------------- common behaviour

@pytest.mark.parametrize("script", SCRIPTS[:3])
def test_help_exits_zero(script):
    for flag in ("--help", "-h"):
        result = run(script, flag)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("Usage: launch/" + script)
        assert "--dry-run" in result.stdout and "--config" in result.stdout


@pytest.mark.parametrize("script, args, message", [
    ("tpu_vm.sh", ["train", "--zone", "z", "--config", CONFIG, "--workdir", "gs://b/r"],
     "--name is required"),
    ("tpu_vm.sh", ["train", "--name", "bf", "--config", CONFIG, "--workdir", "gs://b/r"],
     "--zone is required"),
    ("tpu_vm.sh", ["train", "--name", "bf", "--zone", "z", "--workdir", "gs://b/r"],
     "--config is required for 'train'"),
    ("tpu_vm.sh", ["train", "--name", "bf", "--zone", "z", "--config", "configs/nope.py",
                   "--workdir", "gs://b/r"], "--config 'configs/nope.py': no such file"),
    ("tpu_vm.sh", ["create", "--name", "BF_1", "--zone", "z"], "--name 'BF_1'"),
    ("tpu_vm.sh", ["create", "--name", "bf", "--zone", "z", "--accelerator-type", "v9-8"],
     "no default --version for accelerator type 'v9-8'"),
    ("tpu_vm.sh", ["--name", "bf", "--zone", "z"], "no command given"),
    ("tpu_vm.sh", ["create", "delete", "--name", "bf", "--zone", "z"], "two commands given"),
    ("tpu_vm.sh", ["create", "--name"], "--name needs a value"),
    ("gpu_single_node.sh", ["--workdir", "runs/x"], "--config is required"),
    ("gpu_single_node.sh", ["--config", CONFIG], "--workdir is required"),
    ("gpu_single_node.sh", ["--config", CONFIG, "--workdir", "r", "--gpus", "0,a"],
     "--gpus '0,a'"),
    ("gpu_single_node.sh", ["--config", CONFIG, "--workdir", "r", "--port", "70000"],
     "--port '70000' is not a TCP port"),
    ("gpu_single_node.sh", ["--config", CONFIG, "--workdir", "r", "--mem-fraction", "1.5"],
     "--mem-fraction '1.5'"),
    ("gpu_single_node.sh", ["--config", CONFIG, "--workdir", "r", "--lr=0.1"],
     "unknown argument '--lr=0.1'"),
    ("gpu_single_node.sh", ["--config", CONFIG, "--workdir", "r", "--config.lr"],
     "unknown argument '--config.lr'"),
    ("slurm_submit.sh", ["--config", CONFIG, "--workdir", "r", "--nodes", "0"],
     "--nodes '0': expected a positive integer"),
    ("slurm_submit.sh", ["--config", CONFIG, "--workdir", "r", "--per-gpu",
                         "--cpus-per-node", "4"], "fewer than the 8 tasks per node"),
    ("slurm_submit.sh", ["--config", CONFIG], "--workdir is required"),
])
def test_bad_arguments_fail_clearly(script, args, message):
    result = run(script, *args, "--dry-run")
    assert result.returncode == 2
    assert message in result.stderr
    assert f"Run '{LAUNCH / script} --help' for usage." in result.stderr
    assert result.stdout == ""


def test_tools_missing_is_a_clear_error(tmp_path):
    """Without --dry-run the scripts need gcloud / sbatch and say so."""
    env = clean_env(PATH=f"{tmp_path}:/usr/bin:/bin")
    result = run("tpu_vm.sh", "delete", "--name", "bf", "--zone", "z", env=env)
    if shutil.which("gcloud", path=env["PATH"]) is None:
        assert result.returncode == 2 and "gcloud not found" in result.stderr
    result = run("slurm_submit.sh", "--config", CONFIG, "--workdir", "r",
                 "--script-dir", str(tmp_path / "jobs"), env=env)
    if shutil.which("sbatch", path=env["PATH"]) is None:
        assert result.returncode == 2 and "sbatch not found" in result.stderr
        assert not (tmp_path / "jobs").exists()


def test_scripts_are_executable():
    for script in SCRIPTS:
        assert os.access(LAUNCH / script, os.X_OK), script


def test_shellcheck_clean(tmp_path):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    scripts = [f"launch/{s}" for s in SCRIPTS] + ["launch/_common.sh"]
    result = subprocess.run([shellcheck, "-x", "--shell=bash", *scripts], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # The script slurm_submit.sh generates is clean too.
    generated = tmp_path / "job.sbatch"
    generated.write_text(generated_sbatch(["--per-gpu", "--partition", "gpu", "--port", "1234",
                                           "--python", "/opt/my env/bin/python"]))
    result = subprocess.run([shellcheck, str(generated)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- Cloud TPU VM

TPU = ["--name", "bf-v4", "--zone", "us-central2-b"]


def test_tpu_up_dry_run_exact_commands():
    out = lines(run("tpu_vm.sh", "up", *TPU, "--config", CONFIG, "--workdir",
                    "gs://bucket/broadface/run1", "--config.lr=0.1", "--dry-run",
                    env=clean_env(BROADFACE_RUN_ID="run-7")))
    gc = "gcloud compute tpus tpu-vm"
    where = "--zone=us-central2-b"
    setup = ("set -e; rm -rf ~/broadface_jax; tar -xzf ~/broadface_jax-bf-v4.tar.gz -C ~; "
             "cd ~/broadface_jax; python3 -m pip install -U pip; "
             'python3 -m pip install -U "jax[tpu]"; python3 -m pip install -e .')
    train = ("set -o pipefail; cd ~/broadface_jax && W=$(curl -sf -H \"Metadata-Flavor: Google\" "
             "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
             "agent-worker-number || hostname) && mkdir -p ~/broadface_logs/run1 && "
             "( export BROADFACE_RUN_ID=run-7; n=0; while :; do python3 -m broadface_jax.main "
             "--config=configs/default.py "
             "--workdir=gs://bucket/broadface/run1 --distributed=jax --config.lr=0.1; rc=$?; "
             "[ $rc -eq 75 ] && [ $n -lt 10 ] || break; n=$((n + 1)); "
             'echo "preempted (exit $rc): resuming, restart $n of 10"; done; exit $rc ) 2>&1 '
             "| tee ~/broadface_logs/run1/worker-$W.log | sed -u \"s/^/[worker $W] /\"")
    assert out == [
        f"{gc} create bf-v4 {where} --accelerator-type=v4-32 --version=tpu-ubuntu2204-base",
        "# copy the committed tree (git archive HEAD; uncommitted changes are not copied)",
        f"git -C {REPO} archive --format=tar.gz --prefix=broadface_jax/ "
        "-o /tmp/broadface_jax-bf-v4.tar.gz HEAD",
        f"{gc} scp /tmp/broadface_jax-bf-v4.tar.gz 'bf-v4:~/' {where} --worker=all",
        f"{gc} ssh bf-v4 {where} --worker=all '--command={setup}'",
        f"{gc} ssh bf-v4 {where} --worker=all '--command={train}'",
    ]


@pytest.mark.parametrize("accelerator, version", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-64", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_tpu_create_versions_project_spot(accelerator, version):
    out = lines(run("tpu_vm.sh", "create", *TPU, "--project", "my-proj", "--spot",
                    "--accelerator-type", accelerator, "--dry-run"))
    assert out == [f"gcloud compute tpus tpu-vm create bf-v4 --zone=us-central2-b "
                   f"--project=my-proj --accelerator-type={accelerator} --version={version} --spot"]
    out = lines(run("tpu_vm.sh", "create", *TPU, "--accelerator-type", accelerator,
                    "--version", "my-runtime", "--dry-run"))
    assert out[0].endswith(f"--accelerator-type={accelerator} --version=my-runtime")


def test_tpu_delete_logs_detach():
    assert lines(run("tpu_vm.sh", "delete", *TPU, "--dry-run")) == [
        "gcloud compute tpus tpu-vm delete bf-v4 --zone=us-central2-b --quiet"]
    assert lines(run("tpu_vm.sh", "logs", *TPU, "--run-name", "run7", "--lines", "5",
                     "--dry-run")) == [
        "gcloud compute tpus tpu-vm ssh bf-v4 --zone=us-central2-b --worker=all "
        "'--command=tail -n 5 ~/broadface_logs/run7/worker-*.log'"]
    out = lines(run("tpu_vm.sh", "train", *TPU, "--config", CONFIG, "--workdir", "gs://b/x/",
                    "--detach", "--dry-run"))
    assert len(out) == 1
    assert "&& nohup bash -c export\\ BROADFACE_RUN_ID=launch-" in out[0]
    assert "\\;\\ n=0\\;\\ while" in out[0]
    assert ("> ~/broadface_logs/x/worker-$W.log 2>&1 < /dev/null & echo \"worker $W started\"'"
            in out[0])


def test_tpu_local_workdir_warns():
    result = run("tpu_vm.sh", "train", *TPU, "--config", CONFIG, "--workdir", "runs/x",
                 "--dry-run")
    assert result.returncode == 0
    assert "not a gs:// path" in result.stderr


def test_tpu_overrides_survive_remote_quoting():
    """An override with quotes and parentheses reaches main.py as one argument."""
    tricky = "--config.eval.targets=('lfw_dev', \"cfp_fp\")"
    out = lines(run("tpu_vm.sh", "train", *TPU, "--config", CONFIG, "--workdir", "gs://b/r",
                    tricky, "--dry-run", "--", "--alsologtostderr"))
    command = shlex.split(out[0])[-1]
    assert command.startswith("--command=")
    remote = command[len("--command="):]
    main = remote[remote.index("python3 -m broadface_jax.main"):remote.index("; rc=$?")]
    # Let bash parse the remote command line the way the worker's shell will.
    argv = subprocess.run(["bash", "-c", "printf '%s\\n' " + main[len("python3 "):]],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    assert argv == ["-m", "broadface_jax.main", "--config=configs/default.py",
                    "--workdir=gs://b/r", "--distributed=jax", tricky, "--alsologtostderr"]


# ---------------------------------------------------------------- single-node GPU

def test_gpu_single_process_dry_run():
    out = lines(run("gpu_single_node.sh", "--config", CONFIG, "--workdir", "runs/r100",
                    "--gpus", "0,1,2,3", "--config.lr=0.1", "--dry-run"))
    assert out == ["# re-run while it exits 75 (preempted; it resumes), at most 10 times",
                   f"env XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 XLA_FLAGS={LSC} "
                   "CUDA_VISIBLE_DEVICES=0,1,2,3 python3 -m broadface_jax.main "
                   "--config=configs/default.py --workdir=runs/r100 --config.lr=0.1"]


def test_gpu_keeps_user_xla_flags_and_python():
    env = clean_env(XLA_FLAGS="--xla_dump_to=/tmp/d", PYTHON="/opt/py/bin/python")
    out = lines(run("gpu_single_node.sh", "--config", CONFIG, "--workdir", "r",
                    "--mem-fraction", ".75", "--xla-flags", "--xla_gpu_triton_gemm_any=true",
                    "--dry-run", env=env))
    assert out[1:] == ["env XLA_PYTHON_CLIENT_MEM_FRACTION=.75 'XLA_FLAGS=--xla_dump_to=/tmp/d "
                   f"{LSC} --xla_gpu_triton_gemm_any=true' /opt/py/bin/python -m "
                   "broadface_jax.main --config=configs/default.py --workdir=r"]


def test_gpu_per_gpu_dry_run():
    out = lines(run("gpu_single_node.sh", "--config", CONFIG, "--workdir", "runs/r100/",
                    "--gpus", "2,3", "--per-gpu", "--port", "4321", "--config.lr=0.1",
                    "--dry-run"))
    env = f"env XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 XLA_FLAGS={LSC} CUDA_VISIBLE_DEVICES=2,3"
    main = "python3 -m broadface_jax.main --config=configs/default.py --workdir=runs/r100/"
    dist = "--coordinator_address=localhost:4321 --num_processes=2"
    assert out == [
        "# 2 processes, one per GPU; coordinator localhost:4321",
        "mkdir -p logs/r100",
        f"{env} {main} {dist} --process_id=0 --local_device_ids=0 --config.lr=0.1 "
        "> logs/r100/process_0.log 2>&1 &",
        f"{env} {main} {dist} --process_id=1 --local_device_ids=1 --config.lr=0.1 "
        "> logs/r100/process_1.log 2>&1 &",
        "tail -n +1 -F logs/r100/process_0.log logs/r100/process_1.log &",
        "wait",
    ]


def test_gpu_per_gpu_counts_visible_devices():
    out = lines(run("gpu_single_node.sh", "--config", CONFIG, "--workdir", "r", "--per-gpu",
                    "--dry-run", env=clean_env(CUDA_VISIBLE_DEVICES="4,5,6")))
    assert out[0] == "# 3 processes, one per GPU; coordinator localhost:29500"
    assert sum("--process_id=" in line for line in out) == 3
    assert "CUDA_VISIBLE_DEVICES" not in out[2]  # inherited, not re-exported


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python: records its arguments and environment, then behaves as told.
log="$FAKE_DIR/args_$$.txt"
printf '%s\\n' "$@" > "$log"
printf 'CUDA_VISIBLE_DEVICES=%s\\nXLA_PYTHON_CLIENT_MEM_FRACTION=%s\\n' \\
  "${CUDA_VISIBLE_DEVICES:-}" "$XLA_PYTHON_CLIENT_MEM_FRACTION" >> "$log"
echo "hello from $*"
for arg in "$@"; do
  if [[ $arg == "--process_id=$FAIL_ID" ]]; then sleep 0.5; exit 3; fi
done
exec sleep "$SLEEP"
"""


def _fake_python(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "fake_python"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return path


def test_gpu_per_gpu_real_run_collects_processes(tmp_path):
    fake = _fake_python(tmp_path)
    env = clean_env(FAKE_DIR=str(tmp_path), FAIL_ID="none", SLEEP="0.2")
    result = run("gpu_single_node.sh", "--config", CONFIG, "--workdir", "runs/x", "--per-gpu",
                 "--gpus", "0,1,2", "--python", str(fake), "--log-dir", str(tmp_path / "logs"),
                 "--config.seed=3", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # e.g. no 'wait: no such job' when processes end together
    records = [p.read_text().splitlines() for p in tmp_path.glob("args_*.txt")]
    assert len(records) == 3
    by_id = {line: r for r in records for line in r if line.startswith("--process_id=")}
    assert sorted(by_id) == [f"--process_id={pid}" for pid in range(3)]
    for pid in range(3):
        assert by_id[f"--process_id={pid}"] == ["-m", "broadface_jax.main", "--config=configs/default.py",
                          "--workdir=runs/x", "--coordinator_address=localhost:29500",
                          "--num_processes=3", f"--process_id={pid}",
                          f"--local_device_ids={pid}", "--config.seed=3",
                          "CUDA_VISIBLE_DEVICES=0,1,2", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90"]
        log = (tmp_path / "logs" / f"process_{pid}.log").read_text()
        assert f"--process_id={pid} " in log


def test_gpu_per_gpu_one_failure_stops_the_others(tmp_path):
    fake = _fake_python(tmp_path)
    env = clean_env(FAKE_DIR=str(tmp_path), FAIL_ID="1", SLEEP="60")
    start = time.monotonic()
    result = run("gpu_single_node.sh", "--config", CONFIG, "--workdir", "runs/x", "--per-gpu",
                 "--gpus", "0,1", "--python", str(fake), "--log-dir", str(tmp_path / "logs"),
                 env=env, timeout=40)
    assert result.returncode == 3  # the failed process's exit status
    assert "a training process failed (exit 3); stopping the others" in result.stderr
    assert time.monotonic() - start < 30  # process 0 (sleeping 60 s) was killed
    survivors = subprocess.run(["pgrep", "-f", "sleep 60$"], capture_output=True, text=True)
    own = [pid for pid in survivors.stdout.split()
           if f"FAKE_DIR={tmp_path}" in _environ_of(pid)]
    assert own == []


def _environ_of(pid: str) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace") \
            .replace("\0", " ")
    except OSError:
        return ""


# ---------------------------------------------------------------- SLURM

def generated_sbatch(args: list[str]) -> str:
    """The script slurm_submit.sh would write, read back from its --dry-run output."""
    out = lines(run("slurm_submit.sh", "--config", CONFIG, "--workdir", "/shared/r",
                    *args, "--dry-run"))
    body = [line[4:] if line.startswith("# | ") else line[3:]
            for line in out if line.startswith("# |")]
    return "\n".join(body) + "\n"


def test_slurm_submit_dry_run():
    out = lines(run("slurm_submit.sh", "--nodes", "4", "--partition", "gpu", "--account", "fr",
                    "--config", CONFIG, "--workdir", "/shared/runs/r100", "--config.lr=0.005",
                    "--dry-run"))
    assert out[0] == "# ---- slurm_jobs/broadface.sbatch (not written: --dry-run)"
    assert out[-2] == "# ---- end of slurm_jobs/broadface.sbatch"
    assert out[-1] == ("sbatch slurm_jobs/broadface.sbatch --config=configs/default.py "
                       "--workdir=/shared/runs/r100 --config.lr=0.005")
    header = [line[4:] for line in out if line.startswith("# | #SBATCH")]
    assert header == ["#SBATCH --job-name=broadface", "#SBATCH --nodes=4",
                      "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                      "#SBATCH --cpus-per-task=32", "#SBATCH --time=24:00:00",
                      "#SBATCH --output=slurm-%x-%j.out", "#SBATCH --requeue",
                      "#SBATCH --signal=TERM@300", "#SBATCH --partition=gpu",
                      "#SBATCH --account=fr"]


def test_slurm_submit_per_gpu_header():
    script = generated_sbatch(["--per-gpu", "--gpus-per-node", "4", "--cpus-per-node", "48",
                               "--port", "5555", "--job-name", "r100", "--time", "2-00:00:00"])
    assert "#SBATCH --ntasks-per-node=4\n#SBATCH --gpus-per-node=4\n" in script
    assert "#SBATCH --cpus-per-task=12\n#SBATCH --time=2-00:00:00\n" in script
    assert "#SBATCH --job-name=r100\n" in script
    assert "export BF_COORDINATOR_PORT=5555\n" in script
    # The body is the template's, from its end-of-header line on.
    template = (LAUNCH / "slurm_multinode.sbatch").read_text()
    marker = template.index("# ---- end of #SBATCH header")
    assert script.endswith(template[marker:])


def _fake_scontrol(tmp_path: pathlib.Path, hosts: list[str]) -> pathlib.Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/usr/bin/env bash\n"
                        "[[ $1 == show && $2 == hostnames ]] || exit 1\n"
                        f"printf '%s\\n' {' '.join(hosts)}\n")
    scontrol.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("use_generated", [False, True])
def test_sbatch_coordinator_and_srun_line(tmp_path, use_generated):
    rng = np.random.default_rng()
    job_id = int(rng.integers(1, 10**7))
    nodes = int(rng.integers(2, 9))
    hosts = [f"gpu{17 + i:03d}" for i in range(nodes)]
    nodelist = f"gpu[017-{17 + nodes - 1:03d}]"
    bin_dir = _fake_scontrol(tmp_path, hosts)
    if use_generated:
        script = tmp_path / "job.sbatch"
        script.write_text(generated_sbatch(["--python", "/opt/my env/bin/python"]))
        python = "/opt/my\\ env/bin/python"
    else:
        script = LAUNCH / "slurm_multinode.sbatch"
        python = "python3"
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID=str(job_id),
                    SLURM_JOB_NODELIST=nodelist, SLURM_JOB_NUM_NODES=str(nodes),
                    SLURM_SUBMIT_DIR=str(tmp_path), BF_DRY_RUN="1")
    result = subprocess.run(["bash", str(script), "--config=configs/default.py",
                             "--workdir=/shared/r", "--config.lr=0.1"], env=env,
                            capture_output=True, text=True, timeout=30)
    out = lines(result)
    port = job_id % 4096 + 61440
    assert out == [
        f"# job {job_id}: {nodes} node(s) [{nodelist}], coordinator gpu017:{port}",
        f"srun --export=ALL --kill-on-bad-exit=1 --label {python} -m broadface_jax.main "
        f"--coordinator_address=gpu017:{port} --config=configs/default.py "
        "--workdir=/shared/r --config.lr=0.1"]
    # The Python side (what each task would compute without the flag) agrees.
    assert distributed.first_slurm_host(nodelist) == "gpu017"
    assert distributed.slurm_coordinator_port({"SLURM_JOB_ID": str(job_id)}) == port


def test_sbatch_port_override_and_errors(tmp_path):
    bin_dir = _fake_scontrol(tmp_path, ["n1", "n2"])
    base = dict(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="n[1-2]",
                BF_DRY_RUN="1")
    sbatch = str(LAUNCH / "slurm_multinode.sbatch")
    args = [sbatch, "--config=c.py", "--workdir=w"]
    result = subprocess.run(["bash", *args], env=clean_env(SLURM_JOB_ID="9",
                            BF_COORDINATOR_PORT="1234", **base), capture_output=True, text=True)
    assert "--coordinator_address=n1:1234" in lines(result)[-1]
    result = subprocess.run(["bash", *args], env=clean_env(**base), capture_output=True,
                            text=True)
    assert result.returncode == 2 and "not inside a SLURM job" in result.stderr
    result = subprocess.run(["bash", sbatch, "--config=c.py"], env=clean_env(SLURM_JOB_ID="9",
                            **base), capture_output=True, text=True)
    assert result.returncode == 2 and "missing --workdir=DIR" in result.stderr


# ---------------------------------------------------------------- requeue on exit 75 (preempted)

COUNTING_PYTHON = """#!/usr/bin/env bash
# Stands in for python: run number N (counted in $FAKE_DIR/runs) exits with the
# N-th of $CODES (the last one from then on), as a trainer stopped by SIGTERM exits 75.
# Each line records the run's BROADFACE_RUN_ID.
echo "run ${BROADFACE_RUN_ID:-unset}" >> "$FAKE_DIR/runs"
n=$(wc -l < "$FAKE_DIR/runs")
IFS=, read -r -a codes <<< "$CODES"
((n <= ${#codes[@]})) || n=${#codes[@]}
exit "${codes[$((n - 1))]}"
"""


def _counting_python(tmp_path: pathlib.Path, name: str = "fake_python") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(COUNTING_PYTHON)
    path.chmod(0o755)
    return path


def _runs(tmp_path: pathlib.Path) -> int:
    path = tmp_path / "runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _run_ids(tmp_path: pathlib.Path) -> set[str]:
    """The BROADFACE_RUN_IDs the runs saw: one id, set, for every re-run of a launch."""
    return {line.split(" ", 1)[1] for line in (tmp_path / "runs").read_text().splitlines()}


@pytest.mark.parametrize("codes, args, status, runs", [
    ("75,75,0", [], 0, 3),               # preempted twice, resumed twice, finished
    ("75", ["--max-restarts", "2"], 75, 3),  # gives up after 2 restarts, says 75
    ("1,0", [], 1, 1),                   # a failure is not re-run
    ("130,0", [], 130, 1),               # nor Ctrl-C
])
def test_gpu_single_process_reruns_a_preempted_run(tmp_path, codes, args, status, runs):
    fake = _counting_python(tmp_path)
    result = run("gpu_single_node.sh", "--config", CONFIG, "--workdir", "runs/x",
                 "--python", str(fake), *args, env=clean_env(FAKE_DIR=str(tmp_path), CODES=codes))
    assert result.returncode == status, result.stderr
    assert _runs(tmp_path) == runs
    ids = _run_ids(tmp_path)
    assert len(ids) == 1 and ids != {"unset"}, ids  # a rollback request is not repeated
    restarts = [line for line in result.stderr.splitlines() if "preempted (exit 75)" in line]
    assert len(restarts) == runs - 1
    if runs > 1:
        assert restarts[-1].endswith(f"restart {runs - 1} of {2 if args else 10}")


def test_max_restarts_must_be_a_number():
    result = run("gpu_single_node.sh", "--config", CONFIG, "--workdir", "r", "--max-restarts",
                 "many")
    assert result.returncode == 2 and "--max-restarts 'many'" in result.stderr


def test_gpu_per_gpu_restarts_every_process_after_a_preemption(tmp_path):
    fake = _counting_python(tmp_path)
    # Round 1: the first process to end exits 75, the other one too (a coordinated stop).
    env = clean_env(FAKE_DIR=str(tmp_path), CODES="75,75,0,0")
    result = run("gpu_single_node.sh", "--config", CONFIG, "--workdir", "runs/x", "--per-gpu",
                 "--gpus", "0,1", "--python", str(fake), "--log-dir", str(tmp_path / "logs"),
                 env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert _runs(tmp_path) == 4  # 2 processes x 2 rounds
    assert "a training process was preempted (exit 75)" in result.stderr
    assert "restarting all processes to resume, restart 1 of 10" in result.stderr


def test_tpu_worker_loop_reruns_a_preempted_run(tmp_path):
    """The loop each TPU worker runs, executed here with a stand-in python3."""
    out = lines(run("tpu_vm.sh", "train", *TPU, "--config", CONFIG, "--workdir", "gs://b/r",
                    "--max-restarts", "3", "--dry-run"))
    remote = shlex.split(out[0])[-1][len("--command="):]
    loop = remote[remote.index("( export BROADFACE_RUN_ID="):remote.index(" 2>&1 | tee")]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _counting_python(bin_dir, "python3")
    for codes, status, runs in (("75,0", 0, 2), ("75", 75, 4), ("2", 2, 1)):
        (tmp_path / "runs").unlink(missing_ok=True)
        result = subprocess.run(["bash", "-c", loop], capture_output=True, text=True, timeout=30,
                                env=clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}",
                                              FAKE_DIR=str(tmp_path), CODES=codes))
        assert (result.returncode, _runs(tmp_path)) == (status, runs), result.stdout
        assert result.stdout.count("preempted (exit 75): resuming") == runs - 1
        ids = _run_ids(tmp_path)
        assert len(ids) == 1 and ids != {"unset"}, ids


@pytest.mark.parametrize("restart_count, requeued", [("0", True), ("9", True), ("10", False)])
def test_sbatch_requeues_a_preempted_job(tmp_path, restart_count, requeued):
    bin_dir = _fake_scontrol(tmp_path, ["n1", "n2"])
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/usr/bin/env bash\n"
                        f"if [[ $1 == requeue ]]; then echo \"$2\" >> {tmp_path}/requeued; exit 0; fi\n"
                        + scontrol.read_text().split("\n", 1)[1])
    srun = bin_dir / "srun"
    srun.write_text("#!/usr/bin/env bash\nexit 75\n")  # every task stopped by SIGTERM
    srun.chmod(0o755)
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="77",
                    SLURM_JOB_NODELIST="n[1-2]", SLURM_SUBMIT_DIR=str(tmp_path),
                    SLURM_RESTART_COUNT=restart_count)
    result = subprocess.run(["bash", str(LAUNCH / "slurm_multinode.sbatch"), "--config=c.py",
                             "--workdir=w"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 75
    got = (tmp_path / "requeued").read_text().split() if (tmp_path / "requeued").exists() else []
    assert got == (["77"] if requeued else [])
    if requeued:
        assert f"restart {int(restart_count) + 1} of 10" in result.stdout
    else:
        assert "not requeued" in result.stderr
    # A finished or failed job is never requeued.
    srun.write_text("#!/usr/bin/env bash\nexit 1\n")
    result = subprocess.run(["bash", str(LAUNCH / "slurm_multinode.sbatch"), "--config=c.py",
                             "--workdir=w"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert (tmp_path / "requeued").read_text().split() == got if got else \
        not (tmp_path / "requeued").exists()
