"""Models in and out at full size: an r100 ``backbone.pth`` imported, exported as ONNX, and run.

1. **Make** (needs ``pip install torch==2.13.0``, the CPU build): a full-size
   arcface_torch IResNet-100 (512-d, 112x112; the module names and layout of
   ``backbones/iresnet.py``, from ``tests/fixtures/interop/make_fixtures.py``)
   with random weights, BatchNorm statistics and PReLU slopes, saved with
   ``torch.save(model.state_dict())`` and exported as arcface_torch's
   ``torch2onnx.py`` does (legacy exporter, opset 11), and PyTorch's eval-mode
   output on 2 random images.
2. **Import**: ``interop.import_encoder`` of the ``.pth`` and of the ``.onnx``,
   each in a fresh child process (torch is not imported there): wall time, and
   peak memory as the child's maximum RSS over its RSS before the call, plus
   tracemalloc's peak of Python / NumPy allocations during the call. Parity:
   our eval-mode forward against PyTorch's on the same 2 images.
3. **Export**: ``interop.onnxfile.export_onnx`` of the imported encoder (BN
   folded): wall time, file size, onnxruntime against our JAX forward.
4. **Inference**, in this one process, on the same random batch: images/s of
   the exported ONNX in onnxruntime (CPUExecutionProvider, default threads)
   next to our jitted JAX eval-mode forward (and PyTorch eager, for
   reference), median of ``--repeats`` rounds after one warm-up call each; a
   round calls each once, so the shared machine's load falls on all alike.

    python benchmarks/bench_interop.py [--model iresnet100] [--batch 8] [--repeats 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 2 ** 20
#: arcface_torch's stage sizes per IResNet depth.
STAGES = {"iresnet18": (2, 2, 2, 2), "iresnet34": (3, 4, 6, 3), "iresnet50": (3, 4, 14, 3),
          "iresnet100": (3, 13, 30, 3), "iresnet200": (6, 26, 60, 6)}

# Runs in a fresh process: import_encoder of one file, its time and memory, then the forward.
_CHILD = r"""
import json, os, sys, time, tracemalloc
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import numpy as np, jax, ml_collections
sys.path.insert(0, sys.argv[1])
from broadface_jax import interop, models
spec = json.loads(sys.argv[2])
config = ml_collections.ConfigDict(spec["config"])
def status_mib(field):  # VmRSS: now; VmHWM: this process's peak (getrusage's ru_maxrss
    with open("/proc/self/status") as f:  # would carry the parent's peak over the exec)
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
interop.abstract_variables(config)  # JAX's backend and the model's shapes: not the file's cost
before = status_mib("VmRSS")
tracemalloc.start()
start = time.perf_counter()
params, batch_stats = interop.import_encoder(spec["path"], config)
seconds = time.perf_counter() - start
_, traced_peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
peak = status_mib("VmHWM")
x = np.load(spec["x"])
model = models.build_encoder(config.model)
y = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
    {"params": params, "batch_stats": batch_stats}, np.transpose(x, (0, 2, 3, 1))), np.float64)
np.save(spec["out"], y)
print(json.dumps({"seconds": seconds, "rss_before_mib": before, "peak_rss_mib": peak,
                  "traced_peak_mib": traced_peak / 2 ** 20}))
"""


def _config(model: str, dim: int) -> dict:
    return {"image_size": 112,
            "model": {"name": model, "embedding_dim": dim, "width": 1.0, "dropout": 0.0,
                      "dtype": "float32", "batch_norm": "global"}}


def make_files(model: str, folder: pathlib.Path, seed: int) -> dict:
    """Full-size arcface_torch model with random weights -> .pth, .onnx and its outputs."""
    import torch

    sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "interop"))
    import make_fixtures as mf  # the arcface_torch module layout (tests' fixture maker)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = mf.IResNet(STAGES[model], num_features=512, width=1.0)
    mf.randomise(net, gen)
    net.eval()
    x = torch.rand((2, 3, 112, 112), generator=gen) * 2 - 1
    with torch.no_grad():
        y = net(x).double().numpy()
    pth, onnx_path = folder / f"{model}.pth", folder / f"{model}.onnx"
    start = time.perf_counter()
    torch.save(net.state_dict(), pth)
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    mf.export_onnx(net, x[:1], str(onnx_path))
    torch_export_s = time.perf_counter() - start
    np.save(folder / "x.npy", x.numpy())
    np.save(folder / "y_torch.npy", y)
    return {"pth": pth, "onnx": onnx_path, "torch_save_s": save_s,
            "torch_onnx_export_s": torch_export_s, "net": net,
            "params": sum(p.numel() for p in net.parameters())}


def import_in_child(path: pathlib.Path, model: str, folder: pathlib.Path) -> dict:
    out = folder / f"y_{path.suffix[1:]}.npy"
    spec = {"path": str(path), "config": _config(model, 512), "x": str(folder / "x.npy"),
            "out": str(out)}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), json.dumps(spec)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"import of {path} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    y, want = np.load(out), np.load(folder / "y_torch.npy")
    result["rel_err_vs_torch"] = float(np.abs(y - want).max() / np.abs(want).max())
    return result


def _median_times(fns: dict, repeats: int) -> dict:
    """Median seconds per call of each function, timed in interleaved rounds.

    One call of every function per round, so that a change in the machine's
    load (shared CPUs) falls on all of them alike rather than on whichever
    happened to be timed then.
    """
    for fn in fns.values():
        fn()  # warm-up (compilation / session set-up)
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="iresnet100", choices=sorted(STAGES))
    parser.add_argument("--batch", type=int, default=8, help="images per inference call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=20261201)
    parser.add_argument("--dir", default="", help="where to write the files (default: a temp dir)")
    args = parser.parse_args(argv)

    import jax
    import ml_collections
    import onnxruntime as ort
    import torch

    from broadface_jax import interop, models
    from broadface_jax.interop import onnxfile

    folder = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="bench_interop_"))
    folder.mkdir(parents=True, exist_ok=True)
    made = make_files(args.model, folder, args.seed)
    rows = [("PyTorch parameters", f"{made['params'] / 1e6:.2f} M"),
            ("backbone.pth size", f"{made['pth'].stat().st_size / MiB:.1f} MiB"),
            ("torch.save / torch.onnx.export (made the inputs)",
             f"{made['torch_save_s']:.1f} s / {made['torch_onnx_export_s']:.1f} s")]

    imports = {}
    for kind in ("pth", "onnx"):
        r = import_in_child(made[kind], args.model, folder)
        imports[kind] = r
        rows += [(f"import_encoder(.{kind}): time", f"{r['seconds']:.2f} s"),
                 (f"import_encoder(.{kind}): peak RSS over start",
                  f"{r['peak_rss_mib'] - r['rss_before_mib']:.0f} MiB "
                  f"(tracemalloc peak {r['traced_peak_mib']:.0f} MiB)"),
                 (f"import_encoder(.{kind}): forward vs PyTorch (max rel.)",
                  f"{r['rel_err_vs_torch']:.1e}")]

    config = ml_collections.ConfigDict(_config(args.model, 512))
    params, batch_stats = interop.import_encoder(str(made["pth"]), config)
    exported = folder / f"{args.model}_broadface_jax.onnx"
    start = time.perf_counter()
    onnxfile.export_onnx(args.model, params, batch_stats, 112, exported, fold_bn=True)
    export_s = time.perf_counter() - start

    rng = np.random.default_rng(args.seed)
    x = rng.uniform(-1, 1, (args.batch, 3, 112, 112)).astype(np.float32)
    model = models.build_encoder(config.model)
    variables = {"params": params, "batch_stats": batch_stats}
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    x_nhwc = jax.device_put(np.transpose(x, (0, 2, 3, 1)))
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    got = session.run(None, {"data": x})[0]
    want = np.asarray(forward(variables, x_nhwc))
    rows += [("export_onnx (BN folded): time", f"{export_s:.2f} s"),
             ("exported .onnx size", f"{exported.stat().st_size / MiB:.1f} MiB"),
             (f"onnxruntime vs JAX on {args.batch} random images (max rel.)",
              f"{np.abs(got - want).max() / np.abs(want).max():.1e}")]

    net = made["net"]
    xt = torch.from_numpy(x)

    def torch_forward():
        with torch.no_grad():
            return net(xt)

    timings = _median_times({
        "onnxruntime (exported .onnx)": lambda: session.run(None, {"data": x}),
        "JAX jit, eval mode": lambda: jax.block_until_ready(forward(variables, x_nhwc)),
        "PyTorch eager, eval mode": torch_forward,
    }, args.repeats)
    base = timings["JAX jit, eval mode"]
    for name, seconds in timings.items():
        rows.append((f"inference {name}",
                     f"{args.batch / seconds:.2f} images/s ({seconds / base:.2f}x JAX's time)"))

    print(f"| {args.model}, 112x112, 512-d | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print()
    print(f"files in {folder}; jax {jax.__version__}, onnxruntime {ort.__version__}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print("command: python benchmarks/bench_interop.py " + " ".join(argv or sys.argv[1:]))


if __name__ == "__main__":
    main()
