"""Export a trained encoder as ONNX for onnxruntime / insightface deployments.

    python -m broadface_jax.export --workdir runs/paper --out runs/paper/model.onnx
    python -m broadface_jax.export --config configs/default.py --from backbone.pth --out r100.onnx

The graph (:func:`broadface_jax.interop.onnxfile.export_onnx`): input ``data``
``f32[batch, 3, H, W]`` — NCHW, RGB, normalised to ``(x - 127.5) / 127.5``
*outside* the graph, what insightface's ``ArcFaceONNX`` feeds (it finds no
Sub/Mul at the start of the graph and so normalises with mean = std = 127.5)
— output ``embedding`` ``f32[batch, D]`` (unnormalised), dynamic batch
dimension named ``batch`` (as insightface's packs name it), opset
11, eval mode, BatchNorm folded into the Conv before it unless ``--nofold_bn``.

Why our own graph writer (``onnx.helper``) and not a JAX exporter: jax2tf in
JAX 0.10 only serialises StableHLO (an ``XlaCallModule`` op; its
``native_serialization=False`` graph mode is gone), which tf2onnx cannot
convert; jax2onnx >= 0.13 pins ``orbax-checkpoint < 0.11.37`` (we run
0.12.x), and jax2onnx 0.12.5 with JAX 0.10 fails on ``nn.max_pool``
(ResNet-50) and writes NHWC shape annotations onnxruntime warns about. The
three encoders are Conv / BatchNorm / PReLU / ReLU / Add / pooling / Gemm
graphs that :mod:`broadface_jax.interop.layout` already lists op by op, so the
export is that list written out, in the layout ``torch.onnx.export`` writes
for arcface_torch; ``--check`` (default) runs it in onnxruntime against our
JAX forward on random inputs.

``--checkpoint`` picks a step (as in ``broadface_jax.evaluate``); ``--from``
exports a weights file without a run (``interop.import_encoder``). The model
is the run's (its ``config.json``) unless ``--config`` is given, which must
then agree with it on ``model.*`` and ``image_size``; ``--from`` needs
``--config``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional, Sequence

from absl import app, flags

from broadface_jax import cli



def check_against_jax(config: Any, params: Any, batch_stats: Any, path: str,
                      batch: int = 2, seed: int = 0) -> float:
    """Max |onnxruntime - JAX| / max |JAX| on ``batch`` random normalised images."""
    import jax
    import numpy as np
    import onnxruntime as ort

    from broadface_jax import models

    size = int(config.image_size)
    x = np.random.default_rng(seed).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)
    model = models.build_encoder(config.model)
    want = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
        {"params": params, "batch_stats": batch_stats}, np.transpose(x, (0, 2, 3, 1))))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {"data": x})[0]
    return float(np.abs(got - want).max() / np.abs(want).max())


def export(config: Any, out: str, *, workdir: Optional[str] = None,
           checkpoint: Optional[str] = None, weights: Optional[str] = None,
           fold_bn: bool = True) -> tuple[Any, Any, str]:
    """Writes the encoder to ``out``; returns ``(params, batch_stats, source)``."""
    from broadface_jax import restore
    from broadface_jax.interop import onnxfile

    if not (weights or workdir or checkpoint):
        raise ValueError("give --workdir (or --checkpoint) of a run, or --from a weights file")
    encoder = restore.restore_encoder(weights or checkpoint or workdir, config)
    params, batch_stats, source = encoder.params, encoder.batch_stats, encoder.source
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    onnxfile.export_onnx(str(config.model.name), params, batch_stats, int(config.image_size),
                         out, fold_bn=fold_bn, producer=f"broadface_jax ({source})")
    return params, batch_stats, source


def _define_flags() -> None:
    """The command-line flags, defined only when run as a program (importing stays flag-free)."""
    global _CONFIG, _WORKDIR, _CHECKPOINT, _FROM, _OUT, _FOLD_BN, _CHECK
    _CONFIG = cli.define_config_flag(
        "Config of the model (model.*, image_size); default: the workdir's config.json.")
    _WORKDIR = flags.DEFINE_string("workdir", None, "The run whose latest checkpoint is exported.")
    _CHECKPOINT = flags.DEFINE_string(
        "checkpoint", None, "Checkpoint to export (workdir, checkpoints folder or step folder).")
    _FROM = flags.DEFINE_string("from", None, "Export a weights file (.pth / .pt / .onnx) instead.")
    _OUT = flags.DEFINE_string("out", None, "Path of the .onnx file to write.")
    _FOLD_BN = flags.DEFINE_bool("fold_bn", True, "Fold each BatchNorm after a Conv into the Conv.")
    _CHECK = flags.DEFINE_bool(
        "check", True, "Compare onnxruntime with the JAX forward on random inputs after writing.")
    flags.mark_flags_as_required(["out"])


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.quiet_third_party_logs()
    config = cli.load_config_for_run(_CHECKPOINT.value or _WORKDIR.value)
    start = time.perf_counter()
    try:
        params, batch_stats, source = export(
            config, _OUT.value, workdir=_WORKDIR.value, checkpoint=_CHECKPOINT.value,
            weights=_FROM.value, fold_bn=_FOLD_BN.value)
    except (FileNotFoundError, ImportError, ValueError) as e:  # CheckpointError too
        print(f"broadface_jax.export: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    size = int(config.image_size)
    print(f"wrote {_OUT.value} ({os.path.getsize(_OUT.value) / 2**20:.1f} MiB) from {source} in "
          f"{time.perf_counter() - start:.1f} s: input 'data' [batch, 3, {size}, {size}] "
          f"(RGB, (x - 127.5) / 127.5), output 'embedding' [batch, "
          f"{config.model.embedding_dim}], BN {'folded' if _FOLD_BN.value else 'kept'}",
          flush=True)
    if _CHECK.value:
        err = check_against_jax(config, params, batch_stats, _OUT.value)
        print(f"onnxruntime vs JAX on 2 random images: max relative difference {err:.2e}",
              flush=True)
        if err > 1e-4:
            print("broadface_jax.export: the exported graph does not match the JAX forward",
                  file=sys.stderr, flush=True)
            sys.exit(1)


def cli_main() -> None:
    """The ``broadface-export`` console script: ``python -m broadface_jax.export``."""
    _define_flags()
    cli.run(main, flags_parser=cli.workdir_config_parser())  # one-line flag errors, exit 2


if __name__ == "__main__":
    cli_main()
