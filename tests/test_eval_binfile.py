"""insightface .bin files: malicious pickles are refused before anything runs; real layouts load."""

import io
import os
import pickle
import pickletools
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from broadface_jax.evaluation import binfile


def _images(rng, n, size=112):
    # Smooth random images (JPEG-friendly) with per-image structure.
    low = rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.BILINEAR)) for x in low])


def _jpeg(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture()
def legit_bin(tmp_path):
    rng = np.random.default_rng()
    images = _images(rng, 8)
    issame = rng.integers(0, 2, 4).astype(bool)
    path = tmp_path / "legit.bin"
    binfile.write_bin(path, images, issame, image_format="png")
    return path, images, issame


# ------------------------------------------------------------ malicious files
class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: str, evil_module: str) -> dict[str, bytes]:
    cmd = f"touch {marker}"
    out = {}
    for proto in (0, 2, 4, 5):  # GLOBAL (0-3) and STACK_GLOBAL (4+) forms
        out[f"os.system/p{proto}"] = pickle.dumps(([_Reduce(os.system, (cmd,))], [True]), protocol=proto)
    out["subprocess.call"] = pickle.dumps(_Reduce(subprocess.call, (["touch", marker],)), protocol=4)
    out["builtins.eval"] = pickle.dumps(_Reduce(eval, (f"open({marker!r}, 'w').close()",)), protocol=2)
    out["builtins.exec"] = pickle.dumps(_Reduce(exec, (f"open({marker!r}, 'w').close()",)), protocol=4)
    # INST opcode (protocol 0): os.system('touch marker') without REDUCE.
    out["INST"] = b"(S'" + cmd.encode() + b"'\nios\nsystem\n."
    # OBJ opcode (protocol 1): MARK, GLOBAL os.system, arg, OBJ.
    out["OBJ"] = b"(cos\nsystem\nS'" + cmd.encode() + b"'\no."
    # Importing a module alone runs its code: GLOBAL of a module whose import touches the marker.
    out["import-only"] = b"c" + evil_module.encode() + b"\nanything\n."
    # EXT1 (extension registry) and a persistent id.
    out["EXT1"] = b"\x80\x02\x82\x01."
    out["PERSID"] = b"P" + cmd.encode() + b"\n."
    # A legit-looking structure that hides one REDUCE among real images.
    out["hidden-in-list"] = pickle.dumps(([b"\xff\xd8jpeg", _Reduce(os.system, (cmd,))], [False]), protocol=4)
    # The admitted _codecs.encode (protocol 2 bytes) does not open the door to other globals...
    out["codecs-then-os.system/p2"] = pickle.dumps(
        ([b"\xff\xd8jpeg", _Reduce(os.system, (cmd,))], [False]), protocol=2)
    # ... nor to other functions of _codecs / codecs, or to other uses of the admitted ones.
    out["_codecs.decode"] = b"c_codecs\ndecode\n(S'x'\nS'rot13'\ntR."
    out["codecs.encode"] = b"ccodecs\nencode\n(Vx\nVlatin1\ntR."
    out["_codecs.encode/rot13"] = b"c_codecs\nencode\n(Vx\nVrot13\ntR."
    out["_codecs.encode/int"] = b"c_codecs\nencode\n(I7\nVlatin1\ntR."
    out["bytes-with-args"] = b"c__builtin__\nbytes\n(I1000000000\ntR."
    out["_codecs.encode/STACK_GLOBAL"] = b"\x80\x04\x8c\x07_codecs\x8c\x06encode\x93\x8c\x01x\x8c\x06latin1\x86R."
    # REDUCE on a non-admitted callable source (no GLOBAL at all).
    out["bare-REDUCE"] = b"\x80\x02N)R."
    return out


def test_malicious_pickles_are_refused_and_nothing_runs(tmp_path, monkeypatch, legit_bin):
    marker = str(tmp_path / "PWNED")
    evil_module = "broadface_evil_payload_mod"
    (tmp_path / f"{evil_module}.py").write_text(f"open({marker!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    binfile.read_bin(legit_bin[0])  # warm up lazy imports so the module snapshot is fair
    warm = tmp_path / "warm_p0.bin"  # ... including the codec protocol 0's UNICODE opcode imports
    warm.write_bytes(pickle.dumps(([b"a", b"b"], [True]), protocol=0))
    binfile.load_bin_raw(warm)
    modules_before = set(sys.modules)
    for name, payload in _payloads(marker, evil_module).items():
        path = tmp_path / f"evil_{name.replace('/', '_')}.bin"
        path.write_bytes(payload)
        with pytest.raises(binfile.BinFileError, match="refused") as err:
            binfile.read_bin(path)
        assert str(path) in str(err.value), name
        assert not os.path.exists(marker), f"payload {name} ran"
    assert evil_module not in sys.modules
    assert set(sys.modules) - modules_before == set()


def test_payloads_are_live_under_plain_pickle(tmp_path):
    """Control: the same payloads DO run under an unrestricted pickle.loads (in a subprocess)."""
    evil_module = "broadface_evil_payload_mod2"
    live = {"os.system/p4", "subprocess.call", "builtins.eval", "INST", "OBJ", "import-only"}
    for name in sorted(live):
        marker = tmp_path / f"RAN_{name.replace('/', '_')}"
        (tmp_path / f"{evil_module}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
        payload = _payloads(str(marker), evil_module)[name]
        code = ("import pickle, sys; sys.path.insert(0, sys.argv[1]); "
                "pickle.loads(open(sys.argv[2], 'rb').read())")
        (tmp_path / "p.bin").write_bytes(payload)
        subprocess.run([sys.executable, "-c", code, str(tmp_path), str(tmp_path / "p.bin")],
                       capture_output=True, timeout=60)
        assert marker.exists(), f"control payload {name} did not run under plain pickle"


def test_second_guard_unpickler_refuses_globals_on_its_own(tmp_path):
    """Even without the opcode scan, find_class refuses: nothing is looked up or run."""
    marker = str(tmp_path / "PWNED2")
    payload = pickle.dumps(_Reduce(os.system, (f"touch {marker}",)), protocol=4)
    with pytest.raises(binfile.BinFileError, match=r"refused.*'(posix|os)'.*'system'"):
        binfile._BuiltinsOnlyUnpickler(io.BytesIO(payload), "x.bin").load()
    with pytest.raises(binfile.BinFileError, match="persistent id"):
        binfile._BuiltinsOnlyUnpickler(io.BytesIO(b"Pabc\n."), "x.bin").load()
    assert not os.path.exists(marker)


# ------------------------------------------------------------ legit files
def test_write_bin_round_trips_exactly_with_png(legit_bin):
    path, images, issame = legit_bin
    got_images, got_same = binfile.read_bin(path)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_same, issame)
    ops = {op.name for op, _, _ in pickletools.genops(path.read_bytes())}
    assert not ops & {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "BUILD", "NEWOBJ"}
    assert pickletools.genops(path.read_bytes()).__next__()[1] == 4  # protocol 4


def test_write_bin_jpeg_and_raw_bytes(tmp_path):
    rng = np.random.default_rng()
    images = _images(rng, 4)
    path = tmp_path / "j.bin"
    binfile.write_bin(path, [images[0], _jpeg(images[1]), images[2], images[3]], [True, False])
    got, same = binfile.read_bin(path)
    assert same.tolist() == [True, False]
    assert np.mean(np.abs(got.astype(int) - images.astype(int))) < 3.0  # JPEG q95 is close
    raw, _ = binfile.load_bin_raw(path)
    assert raw[1] == _jpeg(images[1])  # bytes stored as given


def test_reads_insightface_layout_highest_protocol(tmp_path):
    rng = np.random.default_rng()
    images = _images(rng, 6)
    bins = [_jpeg(x) for x in images]
    issame_list = [True, False, True]
    path = tmp_path / "lfw.bin"
    with open(path, "wb") as f:  # exactly how insightface's packers write
        pickle.dump((bins, issame_list), f, protocol=pickle.HIGHEST_PROTOCOL)
    got, same = binfile.read_bin(path)
    assert got.shape == (6, 112, 112, 3) and got.dtype == np.uint8
    assert same.tolist() == issame_list
    expected = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in bins])
    np.testing.assert_array_equal(got, expected)


def test_reads_python3_protocol_0_1_2_bins(tmp_path):
    """Python 3 pickles bytes at protocol <= 2 as _codecs.encode(str, 'latin1'): admitted, by the loader's own code."""
    seed = int(np.random.default_rng().integers(1 << 31))
    rng = np.random.default_rng(seed)
    images = _images(rng, 6)
    bins = [_jpeg(x) for x in images]
    issame_list = [bool(s) for s in rng.integers(0, 2, 3)]
    expected = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in bins])
    for proto in (0, 1, 2):
        path = tmp_path / f"p{proto}.bin"
        with open(path, "wb") as f:  # a .bin re-saved by Python 3 with an old protocol
            pickle.dump((bins, issame_list), f, protocol=proto)
        globals_used = {arg for op, arg, _ in pickletools.genops(path.read_bytes()) if op.name == "GLOBAL"}
        assert globals_used == {"_codecs encode"}, (proto, globals_used)
        got, same = binfile.read_bin(path)
        np.testing.assert_array_equal(got, expected, err_msg=f"protocol {proto}, seed {seed}")
        assert same.tolist() == issame_list
        raw, _ = binfile.load_bin_raw(path)
        assert raw == bins  # the bytes, exactly
    # fix_imports=False spells the same globals without the Python 2 names.
    path = tmp_path / "nofix.bin"
    path.write_bytes(pickle.dumps(([bins[0], bins[1]], [True]), protocol=2, fix_imports=False))
    assert binfile.read_bin(path)[0].shape == (2, 112, 112, 3)


def test_admitted_globals_are_the_loaders_own_functions(tmp_path):
    import _codecs

    unpickler = binfile._BuiltinsOnlyUnpickler(io.BytesIO(b""), "x.bin")
    enc = unpickler.find_class("_codecs", "encode")
    assert enc is not _codecs.encode and enc("\xff\x00a", "latin1") == b"\xff\x00a"
    assert unpickler.find_class("__builtin__", "bytes")() == b""
    for args in (("x", "rot13"), ("x",), (b"x", "latin1"), ("x", "latin1", "strict")):
        with pytest.raises(binfile.BinFileError, match=r"x\.bin: refused.*_codecs\.encode"):
            enc(*args)
    with pytest.raises(binfile.BinFileError, match=r"x\.bin: refused.*bytes\(\)"):
        unpickler.find_class("builtins", "bytes")(10**9)
    for module, name in (("_codecs", "decode"), ("codecs", "encode"), ("builtins", "eval"),
                         ("_codecs", "lookup"), ("__builtin__", "bytearray")):
        with pytest.raises(binfile.BinFileError, match="refused"):
            unpickler.find_class(module, name)
    # An empty image (b'' at protocol 2 is __builtin__.bytes()) loads as bytes and fails as an image.
    path = tmp_path / "empty.bin"
    path.write_bytes(pickle.dumps(([b"", _jpeg(_images(np.random.default_rng(0), 1)[0])], [True]), protocol=2))
    assert binfile.load_bin_raw(path)[0][0] == b""
    with pytest.raises(binfile.BinFileError, match="image #0: not a decodable"):
        binfile.read_bin(path)


def test_ten_pair_bin_evaluates_on_balanced_folds(tmp_path, monkeypatch, caplog):
    """A valid 10-pair .bin (KFold(10): one pair per fold) runs as a target, VAL@FAR included."""
    from broadface_jax import evaluation
    from broadface_jax.evaluation import verification

    seed = int(np.random.default_rng().integers(1 << 31))
    rng = np.random.default_rng(seed)
    issame = rng.permutation(np.arange(10) < 5)
    images = _images(rng, 20, size=32)
    images[1::2][issame] = images[0::2][issame]  # same pairs: the same image
    path = tmp_path / "ten.bin"
    binfile.write_bin(path, images, issame, image_format="png")
    monkeypatch.setenv("BROADFACE_EVAL_CACHE", str(tmp_path / "cache"))
    config = _eval_config(image_size=32)

    def embed(x):  # a fixed random projection of the mean-pooled image
        x = np.asarray(x, np.float64).reshape(x.shape[0], 8, 4, 8, 4, 3).mean(axis=(2, 4)) - 127.5
        x = x.reshape(x.shape[0], -1)
        return (x @ np.random.default_rng(1).normal(size=(x.shape[1], 16))).astype(np.float32)

    with caplog.at_level("WARNING"):
        metrics = evaluation.run_targets([f"bin:{path}"], embed, config)[f"bin:{path}"]
    assert str(path) in caplog.text and "using 5 balanced folds" in caplog.text
    feats = [(embed(images[i::2]) + embed(np.ascontiguousarray(images[i::2, :, ::-1]))).astype(np.float64)
             for i in (0, 1)]  # flip-and-sum in float32, as the evaluator
    ref = verification.evaluate_embeddings(*feats, issame, folds=verification.balanced_fold_ids(issame, 5))
    assert metrics["accuracy"] == pytest.approx(ref.accuracy, abs=1e-12), seed
    assert metrics["val@far=1e-3"] == pytest.approx(ref.val, abs=1e-12), seed
    assert metrics["accuracy"] == 1.0  # identical images are the closest pairs


def _eval_config(image_size):
    from broadface_jax import cli

    c = cli.config_from_file("configs/default.py")
    c.eval.data_root, c.eval.bin_dir, c.eval.batch_size, c.image_size = "", "", 8, image_size
    return c


def _py2_pickle(bins, issame):
    """Protocol-2 stream as Python 2 writes a tuple (list of str, list of bool): BINSTRING opcodes."""
    out = [b"\x80\x02]q\x00("]
    for b in bins:
        out.append(b"T" + struct.pack("<I", len(b)) + b if len(b) > 255 else b"U" + bytes([len(b)]) + b)
    out.append(b"e]q\x01(")
    out += [b"\x88" if s else b"\x89" for s in issame]
    out.append(b"e\x86q\x02.")
    return b"".join(out)


def test_reads_python2_written_bin(tmp_path):
    rng = np.random.default_rng()
    images = _images(rng, 4)
    bins = [_jpeg(x) for x in images]
    path = tmp_path / "py2.bin"
    path.write_bytes(_py2_pickle(bins, [False, True]))
    with pytest.raises(UnicodeDecodeError):  # why encoding='bytes' is needed
        pickle.loads(path.read_bytes())
    got, same = binfile.read_bin(path)
    assert same.tolist() == [False, True]
    assert got.shape == (4, 112, 112, 3)


def test_non_112_images_are_resized(tmp_path):
    rng = np.random.default_rng()
    images = _images(rng, 2, size=96)
    path = tmp_path / "small.bin"
    binfile.write_bin(path, images, [True], image_format="png")
    got, _ = binfile.read_bin(path)
    expected = np.asarray(Image.fromarray(images[0]).resize((112, 112), Image.BILINEAR))
    np.testing.assert_array_equal(got[0], expected)


# ------------------------------------------------------------ corrupt files
def test_corrupt_files_give_clear_errors(tmp_path, legit_bin):
    data = legit_bin[0].read_bytes()
    cases = {
        "truncated": (data[: len(data) // 2], "truncated|not a readable pickle"),
        "garbage": (b"\x00\x01garbage", "not a readable pickle"),
        "dict": (pickle.dumps({"a": 1}, protocol=4), "expected a pickled"),
        "count": (pickle.dumps(([b"a", b"b", b"c"], [True]), protocol=4), "3 images for 1 pairs"),
        "label": (pickle.dumps(([b"a", b"b"], ["yes"]), protocol=4), r"issame_list\[0\]"),
        "str-image": (pickle.dumps((["a", "b"], [True]), protocol=4), "image #0 is a str"),
        "bad-image": (pickle.dumps(([b"notanimage", b"x"], [True]), protocol=4), "image #0: not a decodable"),
    }
    for name, (payload, msg) in cases.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(payload)
        with pytest.raises(binfile.BinFileError, match=msg) as err:
            binfile.read_bin(path)
        assert str(path) in str(err.value), name
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        binfile.read_bin(tmp_path / "missing.bin")
