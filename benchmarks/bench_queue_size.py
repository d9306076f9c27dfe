"""Queue size with and without compensation, and learning speed, on the demo set-up.

The paper's section 4.4 analogues:

* Table 6a: accuracy as the queue grows, with and without the compensation
  of Eq. 7 (the paper: accuracy grows with the queue; without compensation
  a very large queue degrades).
* Fig. 7b: the learning curve (the paper: BroadFace reaches its best sooner
  than the baseline; without compensation a large queue collapses).

For every `queue.size_per_device` in `--queues` x `queue.compensate` in
(True, False) (queue 0 is plain ArcFace, run once) and every seed in
`--seeds`, `configs/demo.py` (synthetic identities, IResNet-18 x0.125, 32x32,
600 steps from scratch) is trained with `train.train_and_evaluate` in a
fresh temporary workdir, with `eval_every_steps = --eval_every` so that the
held-out synthetic verification (600 pairs of identities never trained on,
10 folds, flip-and-sum) is measured during training. The per-step results
are read back from the run's `metrics.jsonl` (keys
`eval/synthetic/accuracy`, `eval/synthetic/accuracy_std`,
`eval/synthetic/val@far=1e-3`; the last record per step wins).

Reported per set-up (means over seeds): final accuracy ± the 10-fold std
(and the std over seeds when there are several), VAL@FAR=1e-3, the accuracy
at each evaluation step, the first step where the run's best accuracy was
reached, and the wall time of the whole call (compilation, training,
evaluations, checkpoints).

    python benchmarks/bench_queue_size.py [--queues 0,512,2048] [--seeds 1]
        [--eval_every 150] [--steps 600] [--json out.json]

Each run takes ~70-150 s on a shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shlex
import shutil
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = pathlib.Path(__file__).resolve().parents[1]
TARGET = "synthetic"
ACC_KEY = f"eval/{TARGET}/accuracy"
STD_KEY = f"eval/{TARGET}/accuracy_std"
VAL_KEY = f"eval/{TARGET}/val@far=1e-3"


def load_demo_config() -> Any:
    """configs/demo.py's default variant."""
    from broadface_jax import cli

    return cli.config_from_file(REPO / "configs" / "demo.py")


def make_config(queue: int, compensate: bool, seed: int, eval_every: int,
                steps: int | None) -> Any:
    """The demo config with this queue, compensation, seed and evaluation cadence."""
    config = load_demo_config()
    config.queue.size_per_device = queue
    config.queue.compensate = compensate
    config.queue.chunk_size = min(512, queue)  # must divide the queue; 0 for no queue
    config.seed = seed
    config.eval_every_steps = eval_every
    config.eval.targets = (TARGET,)
    config.checkpoint_every_steps = 0  # one checkpoint at the end only
    if steps is not None:
        scale = steps / config.total_steps  # keep the schedule's shape
        config.lr_boundaries = tuple(int(round(b * scale)) for b in config.lr_boundaries)
        config.warmup_steps = int(round(config.warmup_steps * scale))
        config.total_steps = steps
    return config


def read_eval_curve(workdir: pathlib.Path) -> dict[int, dict[str, float]]:
    """step -> {accuracy, accuracy_std, val} from metrics.jsonl (last record per step)."""
    curve: dict[int, dict[str, float]] = {}
    path = workdir / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if ACC_KEY in record:
            curve[int(record["step"])] = {"accuracy": record[ACC_KEY],
                                          "accuracy_std": record[STD_KEY],
                                          "val": record[VAL_KEY]}
    if not curve:
        raise RuntimeError(f"{path} has no {ACC_KEY!r} records: did the evaluation run?")
    return curve


def run_one(queue: int, compensate: bool, seed: int, eval_every: int,
            steps: int | None, tmp_root: str) -> dict[str, Any]:
    """Trains one set-up in a fresh workdir; returns its evaluation curve and wall time."""
    from broadface_jax import train

    config = make_config(queue, compensate, seed, eval_every, steps)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"q{queue}_c{int(compensate)}_s{seed}_",
                                            dir=tmp_root))
    try:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # the trainer's own tables
            final = train.train_and_evaluate(config, workdir)
        wall = time.perf_counter() - t0
        curve = read_eval_curve(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    last = max(curve)
    if abs(final[ACC_KEY] - curve[last]["accuracy"]) > 1e-9:
        raise RuntimeError(f"final accuracy {final[ACC_KEY]} returned by train_and_evaluate "
                           f"differs from metrics.jsonl at step {last}: {curve[last]}")
    return {"queue": queue, "compensate": compensate, "seed": seed, "wall_s": wall,
            "curve": {str(k): v for k, v in sorted(curve.items())}}


def setups(queues: list[int]) -> list[tuple[int, bool]]:
    """(queue, compensate) pairs; compensation is irrelevant without a queue."""
    out = []
    for q in queues:
        out.extend([(q, True)] if q == 0 else [(q, True), (q, False)])
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: list[float]) -> float:
    m = _mean(xs)
    return (sum((x - m) ** 2 for x in xs) / len(xs)) ** 0.5


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Seed means of one set-up's runs."""
    steps = sorted(int(s) for s in runs[0]["curve"])
    acc_at = {s: _mean([r["curve"][str(s)]["accuracy"] for r in runs]) for s in steps}
    last = steps[-1]
    finals = [r["curve"][str(last)]["accuracy"] for r in runs]
    best = max(acc_at.values())
    return {
        "acc": _mean(finals),
        "fold_std": _mean([r["curve"][str(last)]["accuracy_std"] for r in runs]),
        "seed_std": _std(finals),
        "val": _mean([r["curve"][str(last)]["val"] for r in runs]),
        "acc_at": acc_at,
        "best_step": min(s for s in steps if acc_at[s] == best),
        "wall": _mean([r["wall_s"] for r in runs]),
    }


def format_table(rows: list[tuple[int, bool, dict[str, Any]]], nseeds: int) -> str:
    steps = sorted(rows[0][2]["acc_at"])
    head = ["queue/device", "compensation", "final acc ± fold std"]
    if nseeds > 1:
        head.append("std over seeds")
    head += ["VAL@FAR=1e-3"] + [f"acc @{s}" for s in steps] + ["best at step", "wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for queue, compensate, s in rows:
        cells = [str(queue), "n/a (ArcFace)" if queue == 0 else ("on" if compensate else "off"),
                 f"{100 * s['acc']:.2f}% ± {100 * s['fold_std']:.2f}"]
        if nseeds > 1:
            cells.append(f"{100 * s['seed_std']:.2f}")
        cells += [f"{s['val']:.3f}"] + [f"{100 * s['acc_at'][k]:.2f}%" for k in steps]
        cells += [str(s["best_step"]), f"{s['wall']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queues", default="0,512,2048",
                   help="comma-separated queue.size_per_device values (0 = ArcFace)")
    p.add_argument("--seeds", type=int, default=1,
                   help="repeat each set-up with config.seed = 0 .. seeds-1 and report means")
    p.add_argument("--eval_every", type=int, default=150,
                   help="config.eval_every_steps (the learning curve's points)")
    p.add_argument("--steps", type=int, default=None,
                   help="config.total_steps (default: the demo's 600); the lr schedule "
                        "is scaled with it")
    p.add_argument("--tmp", default=None, help="parent folder of the per-run workdirs")
    p.add_argument("--json", default=None, help="also write every run's curve here")
    args = p.parse_args(argv)
    try:
        args.queues = [int(q) for q in args.queues.split(",") if q.strip()]
    except ValueError:
        p.error(f"--queues={args.queues!r} must be comma-separated integers")
    if not args.queues or any(q < 0 for q in args.queues):
        p.error(f"--queues={args.queues!r} must list queue sizes >= 0")
    for q in args.queues:
        if q > 512 and q % 512:
            p.error(f"--queues: {q} is not a multiple of the chunk size 512")
    if args.seeds < 1:
        p.error(f"--seeds={args.seeds} must be >= 1")
    if args.eval_every < 1:
        p.error(f"--eval_every={args.eval_every} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # the trainer's progress lines: too many
    import jax

    tmp_root = args.tmp or tempfile.mkdtemp(prefix="bench_queue_size_")
    os.makedirs(tmp_root, exist_ok=True)
    runs, rows = [], []
    for queue, compensate in setups(args.queues):
        group = []
        for seed in range(args.seeds):
            r = run_one(queue, compensate, seed, args.eval_every, args.steps, tmp_root)
            last = r["curve"][max(r["curve"], key=int)]
            print(f"queue {queue} compensate {compensate} seed {seed}: "
                  f"acc {100 * last['accuracy']:.2f}% ({r['wall_s']:.0f} s)",
                  file=sys.stderr, flush=True)
            group.append(r)
        runs.extend(group)
        rows.append((queue, compensate, summarise(group)))
    if not args.tmp:
        shutil.rmtree(tmp_root, ignore_errors=True)

    cmd = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    print(f"\nCommand: {cmd}")
    print(f"{jax.device_count()} {jax.devices()[0].platform} device(s); "
          f"seeds 0..{args.seeds - 1}; held-out synthetic verification, 600 pairs, 10 folds\n")
    print(format_table(rows, args.seeds))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(runs, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
