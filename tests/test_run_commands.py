"""The commands a user runs after training, as a new user meets them (issues 22 and 17).

On a workdir made by ``convert`` (the interop fixture's IResNet-18, which
writes ``config.json`` as training does) the commands run as programs,
without ``--config``: ``embed`` (checked against the encoder applied here,
flip-summed; it prints at most 2 lines besides its progress bars),
``evaluate`` (a progress bar redrawn at every batch, a line per target) and
``export`` (the ONNX batch dimension named ``batch``). A ``--config`` whose
model differs from the workdir's is one line per field and exit status 2.
Below them: the padding of the last batch to a power of two, the progress
reports of ``embed_source``, the image_size hint of a checkpoint that does
not fit, the console scripts and the rule that no command imports another.
The trained-workdir case (``main`` then the three commands) is the slow test
at the end.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from broadface_jax import checkpointing, convert, restore, sharding, train_step
from broadface_jax.evaluation import embedding
from tests.test_train import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "interop"
BACKBONE = str(FIXTURES / "r18s.pth")
PACKAGE = REPO / "broadface_jax"
#: The command modules: each a program; none imports another (main drives train's loop).
COMMANDS = ("main", "train", "evaluate", "export", "convert", "embed", "prepare")
_BAR = re.compile(r"^\s*$|\d+%\|.*\||img/s\]|^\s*\w[\w:. /-]*: \d+img \[")


def smoke_config():
    c = load_config("demo", "smoke")
    c.eval.targets = ()
    return c


def _env() -> dict:
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the command itself must keep TF quiet
    return env


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=_env(), text=True,
                          capture_output=True, timeout=timeout)


def _lines_besides_bars(proc: subprocess.CompletedProcess) -> list[str]:
    text = (proc.stdout + "\n" + proc.stderr).replace("\r", "\n")
    return [line for line in text.split("\n") if not _BAR.search(line)]


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("run_commands") / "imported"
    convert.convert(smoke_config(), BACKBONE, str(out))
    return out


def _faces(folder: pathlib.Path, n: int, size: int, rng) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    faces = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    for i, face in enumerate(faces):
        Image.fromarray(face).save(folder / f"{i:03d}.png")
    return faces


def _flip_sum_reference(config, workdir, faces) -> np.ndarray:
    mesh = sharding.make_mesh(config.mesh)
    enc = restore.restore_encoder(str(workdir), config, sharding=sharding.replicated(mesh))
    fn = train_step.make_embed_fn(config, mesh)
    x = (faces.astype(np.float32) / 255.0 - 0.5) / 0.5
    return (np.asarray(fn(enc.params, enc.batch_stats, x), np.float64)
            + np.asarray(fn(enc.params, enc.batch_stats, np.ascontiguousarray(x[:, :, ::-1])),
                         np.float64))


def test_embed_without_config_on_a_converted_workdir_in_two_lines(imported, tmp_path):
    config = smoke_config()
    recorded = json.loads((imported / "config.json").read_text())
    assert recorded["model.name"] == "iresnet18" and recorded["image_size"] == 16

    rng = np.random.default_rng()
    faces = _faces(tmp_path / "faces", 20, 16, rng)
    proc = _run("broadface_jax.embed", f"--workdir={imported}", f"--images={tmp_path / 'faces'}",
                f"--out={tmp_path / 'x.npz'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _lines_besides_bars(proc)
    assert len(lines) <= 2, lines  # "wrote x.npz: 20 embeddings ..." and nothing else
    assert lines and lines[0].startswith(f"wrote {tmp_path / 'x.npz'}: 20 embeddings of size 16")
    got = np.load(tmp_path / "x.npz")["features"]
    want = _flip_sum_reference(config, imported, faces)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_export_without_config_names_the_batch_dimension(imported, tmp_path):
    proc = _run("broadface_jax.export", f"--workdir={imported}", f"--out={tmp_path / 'm.onnx'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    import onnx

    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    for value in (graph.input[0], graph.output[0]):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert "max relative difference" in proc.stdout and "input 'data' [batch, 3, 16, 16]" in proc.stdout


def test_evaluate_without_config_shows_progress_at_every_batch(imported):
    proc = _run("broadface_jax.evaluate", f"--workdir={imported}", "--targets=synthetic",
                "--config.eval.batch_size=64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"\| synthetic +\| 0\.\d{4}", proc.stdout)
    # A bar redrawn at every batch (never silent while embedding), then one line with the time.
    counts = {int(m.group(1)) for m in re.finditer(r"synthetic: +\d+%\|[^|]*\| (\d+)/(\d+)",
                                                    proc.stderr)}
    total = int(re.search(r"synthetic: +\d+%\|[^|]*\| \d+/(\d+)", proc.stderr).group(1))
    calls = 2 * -(-(total // 2) // 64)  # plain and mirrored, batches of 64
    assert len(counts - {0}) >= calls and max(counts) == total
    assert re.search(rf"synthetic: {total:,} images embedded in \d+\.\d s", proc.stderr)
    assert (imported / "eval" / "results_0.json").is_file()


def test_a_given_config_must_describe_the_workdirs_model(imported, tmp_path):
    before = sorted(p.name for p in imported.iterdir())
    proc = _run("broadface_jax.evaluate", f"--workdir={imported}", "--targets=synthetic",
                "--config=configs/demo.py:smoke", "--config.model.width=1.0",
                "--config.eval.batch_size=32")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "model.width: workdir 0.125, given 1.0" in proc.stderr
    assert "Traceback" not in proc.stderr and "checkpoint has shape" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 2  # what is wrong, then the one field
    proc = _run("broadface_jax.embed", f"--workdir={imported}", f"--images={tmp_path}",
                f"--out={tmp_path / 'x.npz'}", "--config.image_size=32")
    assert proc.returncode == 2 and "image_size: workdir 16, given 32" in proc.stderr
    assert sorted(p.name for p in imported.iterdir()) == before  # nothing written
    assert not (tmp_path / "x.npz").exists()


def test_padded_size_and_a_few_images_cost_a_few():
    assert [embedding.padded_size(n, 256) for n in (1, 8, 9, 20, 100, 129, 256)] == \
        [8, 8, 16, 32, 128, 256, 256]
    assert embedding.padded_size(3, 6) == 6 and embedding.padded_size(5, 256, 8) == 8
    assert embedding.padded_size(20, 256, 3) == 33  # a multiple of the local device count

    import flax.linen as nn

    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            return nn.Dense(4)(x.reshape((x.shape[0], -1)))

    config = smoke_config()
    config.eval.batch_size = 256
    mesh = sharding.make_mesh(config.mesh)
    model = Linear()
    import jax

    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32), train=False)
    shapes = []
    real = train_step.make_embed_fn

    def recording(*args, **kwargs):
        fn = real(*args, **kwargs)

        def wrapped(params, batch_stats, x):
            shapes.append(np.shape(x)[0])
            return fn(params, batch_stats, x)
        return wrapped

    train_step.make_embed_fn, saved = recording, train_step.make_embed_fn
    try:
        embed_fn = embedding.make_uint8_embed_fn(config, mesh, model)(variables["params"], {})
    finally:
        train_step.make_embed_fn = saved
    rng = np.random.default_rng()
    images = rng.integers(0, 256, (300, 16, 16, 3), dtype=np.uint8)
    kernel = np.asarray(variables["params"]["Dense_0"]["kernel"], np.float64)
    bias = np.asarray(variables["params"]["Dense_0"]["bias"], np.float64)
    for n, want_shapes in ((20, [32]), (3, [8]), (300, [256, 64])):
        shapes.clear()
        got = embed_fn(images[:n])
        assert shapes == want_shapes, (n, shapes)
        x = (images[:n].astype(np.float64) / 255.0 - 0.5) / 0.5
        np.testing.assert_allclose(got, x.reshape(n, -1) @ kernel + bias, rtol=1e-4, atol=1e-4)


class _Recorder:
    def __init__(self):
        self.events = []

    def add(self, total):
        self.events.append(("add", total))

    def update(self, count):
        self.events.append(("update", count))

    def close(self):
        self.events.append(("close",))


def test_embed_source_reports_every_batch(caplog):
    rng = np.random.default_rng()
    images = rng.integers(0, 256, (23, 4, 4, 3), dtype=np.uint8)
    rec = _Recorder()
    with embedding.reporting(rec):
        embedding.embed_source(lambda x: x.reshape(len(x), -1)[:, :3].astype(np.float32),
                               embedding.ArraySource(images), 10, flip=True)
    assert rec.events == [("add", 46)] + [("update", c) for c in (10, 10, 10, 10, 3, 3)] + [("close",)]
    assert not embedding._REPORTERS
    # Outside a reporting block nothing is reported.
    embedding.embed_source(lambda x: x.reshape(len(x), -1)[:, :3].astype(np.float32),
                           embedding.ArraySource(images), 10, flip=False)
    assert len(rec.events) == 8
    log = embedding.LogProgress("lfw", every_s=0.0)
    with caplog.at_level("INFO"):
        with embedding.reporting(log):
            embedding.embed_source(lambda x: np.ones((len(x), 2), np.float32),
                                   embedding.ArraySource(images), 10, flip=False)
    text = caplog.text
    assert "evaluation lfw: 10/23 images embedded" in text
    assert re.search(r"evaluation lfw: 23 images embedded in \d+\.\d s", text)


def test_wrong_image_size_hints_at_image_size_not_width(imported):
    config = smoke_config()
    config.image_size = 32
    with pytest.raises(checkpointing.CheckpointError) as err:
        restore.restore_encoder(str(imported), config)
    assert "check image_size" in str(err.value) and "model.width" not in str(err.value)
    config = smoke_config()
    config.model.width = 0.25
    with pytest.raises(checkpointing.CheckpointError, match=r"check that model\.\* and image_size"):
        restore.restore_encoder(str(imported), config)
    # The same for a weights file: the layers match, the FC's input does not.
    from broadface_jax import interop

    config = smoke_config()
    config.image_size = 32
    with pytest.raises(interop.ImportMismatch) as err:
        restore.restore_encoder(BACKBONE, config)
    assert "check image_size" in str(err.value) and "model.width" not in str(err.value)


def test_console_scripts_are_the_python_m_commands():
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == "setup")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords
              if k.arg in ("entry_points", "install_requires")}
    assert any(r.startswith("tqdm") for r in kwargs["install_requires"])
    scripts = dict(line.replace(" ", "").split("=") for line in
                   kwargs["entry_points"]["console_scripts"])
    want = {"broadface-train": "main", "broadface-evaluate": "evaluate", "broadface-embed": "embed",
            "broadface-export": "export", "broadface-convert": "convert",
            "broadface-prepare": "prepare"}
    assert {k: v.split(":")[0] for k, v in scripts.items()} == {
        k: f"broadface_jax.{v}" for k, v in want.items()}
    for target in scripts.values():
        module, func = target.split(":")
        source = (REPO / (module.replace(".", "/") + ".py")).read_text()
        # `python -m` runs exactly what the script runs.
        assert re.search(rf'if __name__ == "__main__":\n    {func}\(\)\n*$', source), module
        assert f"def {func}() -> None:" in source


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "broadface_jax":
                names |= {a.name for a in node.names}
            elif node.module.startswith("broadface_jax."):
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("broadface_jax.")}
    return names


def test_no_command_imports_a_command():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        name = ".".join(rel.parts)
        allowed = {"train"} if name == "main" else set()
        bad = (_imports(path) & set(COMMANDS)) - allowed - {name}
        assert not bad, f"broadface_jax/{rel}.py imports the command module(s) {sorted(bad)}"


def test_clear_cache(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "lfw_dev-0123.npz").write_bytes(b"x" * 2048)
    (cache / "notes.txt").write_text("kept")
    env = dict(_env(), BROADFACE_EVAL_CACHE=str(cache))
    proc = subprocess.run([sys.executable, "-m", "broadface_jax.evaluate", "--clear_cache"],
                          cwd=REPO, env=env, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"evaluation cache {cache}: removed 1 files" in proc.stdout
    assert sorted(p.name for p in cache.iterdir()) == ["notes.txt"]


@pytest.mark.slow  # a training run and three commands, each a process (1-6 min on 2 busy cores)
def test_commands_run_on_a_trained_workdir_without_config(tmp_path):
    run = tmp_path / "run"
    proc = _run("broadface_jax.main", "--config=configs/demo.py:smoke", f"--workdir={run}",
                "--config.eval.targets=('synthetic',)", "--config.total_steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CheckpointManagerOptions" not in proc.stderr  # training keeps its logs, not the dump
    # Training's evaluation reports each target in the log (images, time).
    assert re.search(r"evaluation synthetic: \d+ images embedded in \d+\.\d s", proc.stderr)
    rng = np.random.default_rng()
    faces = _faces(tmp_path / "faces", 5, 16, rng)
    proc = _run("broadface_jax.embed", f"--workdir={run}", f"--images={tmp_path / 'faces'}",
                f"--out={tmp_path / 'x.npz'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = smoke_config()
    want = _flip_sum_reference(config, run, faces)
    np.testing.assert_allclose(np.load(tmp_path / "x.npz")["features"], want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())
    proc = _run("broadface_jax.export", f"--workdir={run}", f"--out={tmp_path / 'm.onnx'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run("broadface_jax.evaluate", f"--workdir={run}", "--targets=synthetic")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Verification at step 1" in proc.stdout


def test_convert_never_replaces_a_recorded_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model.name": "iresnet50"}\n')
    with pytest.raises(FileExistsError, match=r"already holds a run's config .*config\.json"):
        convert.convert(smoke_config(), BACKBONE, str(tmp_path))
    assert (tmp_path / "config.json").read_text() == '{"model.name": "iresnet50"}\n'
    assert not (tmp_path / "checkpoints").exists()
