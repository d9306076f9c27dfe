"""Held-out accuracy with class sampling: rate 0.1 vs 1.0, queue on and off, 2 seeds.

``configs/demo.py`` (synthetic identities, IResNet-18 x 0.125 at 32x32, batch
64, ArcFace s 32 m 0.3) scaled to ``--classes`` training identities (5,000 by
default, ``--samples`` images each), ``--steps`` steps with the demo's
schedule scaled (warm-up 1/12, lr steps at 2/3 and 13/15 of the run). Arms:
``classifier.sample_rate`` in ``--rates`` x ``queue.size_per_device`` in
``--queues`` x ``--seeds``. At the end of each run the trainer evaluates
verification on ``--heldout`` synthetic identities training never saw
(``eval/synthetic/*`` in the run's metrics.jsonl).

Resumable: each finished run writes ``<out>/runs/<name>.json`` and is skipped
next time; an interrupted run resumes from its last checkpoint in
``<workroot>/<name>``. ``<out>/summary.json`` and ``summary.md`` are rewritten
after every run from every finished run of the same size (any seed);
``--report_only`` rewrites them without training.

    nohup nice -n 10 python benchmarks/sampling_accuracy.py \\
        --out docs/analyses/sampling --workroot /tmp/sampling_runs &
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shlex
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(REPO))


def make_config(args, rate: float, queue: int, seed: int):
    from broadface_jax import cli

    c = cli.config_from_file(REPO / "configs" / "demo.py")
    c.dataset.synthetic.num_identities = args.classes
    c.dataset.synthetic.heldout_identities = args.heldout
    c.dataset.synthetic.samples_per_identity = args.samples
    c.num_classes = args.classes
    c.seed = seed
    c.classifier.sample_rate = rate
    c.queue.size_per_device = queue
    c.queue.chunk_size = queue
    steps = args.steps
    c.total_steps = steps
    c.warmup_steps = max(1, round(steps / 12))
    c.lr_boundaries = (round(steps * 2 / 3), round(steps * 13 / 15))
    c.log_every_steps = max(1, steps // 20)
    c.checkpoint_every_steps = max(1, steps // 4)
    c.keep_checkpoints = 1
    c.eval_every_steps = 0
    return c


def read_metrics(workdir: pathlib.Path) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    path = workdir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                out.setdefault(int(rec.pop("step")), {}).update(rec)
    return out


def run_one(args, rate: float, queue: int, seed: int) -> dict:
    from broadface_jax import train

    name = f"rate{rate:g}_queue{queue}_seed{seed}"
    record_path = args.out / "runs" / f"{name}.json"
    if record_path.is_file():
        return json.loads(record_path.read_text(encoding="utf-8"))
    config = make_config(args, rate, queue, seed)
    workdir = args.workroot / name
    workdir.mkdir(parents=True, exist_ok=True)
    times_path = workdir / "wall.json"
    wall = json.loads(times_path.read_text()) if times_path.is_file() else 0.0
    print(f"[{time.strftime('%H:%M:%S')}] {name}: training {config.total_steps} steps",
          flush=True)
    t0 = time.time()
    with contextlib.redirect_stdout(sys.stderr):
        train.train_and_evaluate(config, str(workdir))
    wall += time.time() - t0
    times_path.write_text(json.dumps(wall))
    metrics = read_metrics(workdir)
    last = max(metrics)
    final = {k[len("eval/synthetic/"):]: v for k, v in metrics[last].items()
             if k.startswith("eval/synthetic/")}
    train_steps = [m for s, m in sorted(metrics.items()) if "loss_classifier" in m]

    def mean_of(key):
        vals = [m[key] for m in train_steps if key in m]
        return statistics.fmean(vals) if vals else None

    record = dict(
        name=name, rate=rate, queue=queue, seed=seed, steps=int(config.total_steps),
        classes=args.classes, samples_per_identity=args.samples, heldout=args.heldout,
        final_step=last, final=final,
        loss_classifier_last=train_steps[-1].get("loss_classifier") if train_steps else None,
        mean_sample_rows_per_shard=mean_of("sample_rows_per_shard"),
        mean_sample_positives_batch=mean_of("sample_positives_batch"),
        mean_sample_positives_queue=mean_of("sample_positives_queue"),
        mean_sample_queue_dropped=mean_of("sample_queue_dropped"),
        mean_queue_used=mean_of("queue_used"),
        wall_s=round(wall, 1))
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"[{time.strftime('%H:%M:%S')}] {name}: done in {wall:.0f} s; "
          + ", ".join(f"{k} {v:.4f}" for k, v in sorted(final.items())), flush=True)
    return record


def finished_runs(args) -> list[dict]:
    """Every finished run in <out>/runs of this size (classes, images, steps), any seed."""
    records = []
    for path in sorted((args.out / "runs").glob("*.json")):
        r = json.loads(path.read_text())
        if (r["classes"], r["samples_per_identity"], r["steps"]) == (
                args.classes, args.samples, args.steps):
            records.append(r)
    return sorted(records, key=lambda r: r["seed"])


def summarise(args, records: list[dict]) -> None:
    arms: dict[tuple, list[dict]] = {}
    for r in records:
        arms.setdefault((r["rate"], r["queue"]), []).append(r)
    rows = []
    for (rate, queue), rs in sorted(arms.items(), key=lambda kv: (kv[0][1], -kv[0][0])):
        accs = [r["final"].get("accuracy") for r in rs]
        accs = [a for a in accs if a is not None]
        rows.append(dict(
            rate=rate, queue=queue, seeds=[r["seed"] for r in rs], accuracy=accs,
            accuracy_mean=statistics.fmean(accs) if accs else None,
            dropped_mean=statistics.fmean([r["mean_sample_queue_dropped"] or 0.0 for r in rs]),
            wall_s=[r["wall_s"] for r in rs]))
    summary = dict(command=args.command, classes=args.classes, steps=args.steps,
                   samples_per_identity=args.samples, heldout=args.heldout, arms=rows)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"`{args.command}`", "",
             f"{args.classes} classes x {args.samples} images, {args.steps} steps, "
             f"verification on {args.heldout} held-out identities", "",
             "| rate | queue | seeds | accuracy per seed | mean | queue rows dropped / step | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        accs = ", ".join(f"{100 * a:.2f}%" for a in r["accuracy"])
        mean = f"{100 * r['accuracy_mean']:.2f}%" if r["accuracy_mean"] is not None else "-"
        lines.append(f"| {r['rate']:g} | {r['queue']} | {r['seeds']} | {accs} | {mean} | "
                     f"{r['dropped_mean']:.1f} | {', '.join(f'{w:.0f}' for w in r['wall_s'])} |")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=pathlib.Path, default=REPO / "docs" / "analyses" / "sampling")
    p.add_argument("--workroot", type=pathlib.Path, default=pathlib.Path("/tmp/sampling_runs"))
    p.add_argument("--classes", type=int, default=5000)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--heldout", type=int, default=200)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--rates", default="1.0,0.1")
    p.add_argument("--queues", default="512,0")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--report_only", action="store_true",
                   help="rewrite summary.json / summary.md from the finished runs; train nothing")
    args = p.parse_args(argv)
    # the command that trains what the summary lists (--report_only only rewrites it)
    args.command = "python benchmarks/sampling_accuracy.py " + shlex.join(
        a for a in (argv or sys.argv[1:]) if a != "--report_only")
    args.out.mkdir(parents=True, exist_ok=True)
    summarise(args, finished_runs(args))
    for seed in ([] if args.report_only else (int(x) for x in args.seeds.split(","))):
        for queue in (int(x) for x in args.queues.split(",")):
            for rate in (float(x) for x in args.rates.split(",")):
                run_one(args, rate, queue, seed)
                summarise(args, finished_runs(args))  # every seed run so far, not only this call's
    print((args.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
