"""PyTorch ``.pth`` / ``.pt`` files read without torch and without running pickled code.

Format (``torch.save`` since PyTorch 1.6, the only one arcface_torch and
torchvision write): a zip archive ``<name>/data.pkl`` + ``<name>/data/<key>``
(+ ``byteorder``, ``version``). ``data.pkl`` is a pickle (protocol 2) of the
saved object (a state dict, or a dict holding several); each tensor in it is a
call ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``
whose ``storage`` is a *persistent id* ``('storage', torch.FloatStorage,
key, location, numel)`` naming the raw little-endian bytes ``data/<key>``.

Reading runs nothing from the file. :class:`_TensorUnpickler` answers
``find_class`` only for the globals ``torch.load(weights_only=True)`` needs for
tensors and state dicts (:data:`ADMITTED_GLOBALS`), and answers each with this
module's *own* stand-in (a NumPy array builder, a storage-type marker,
``collections.OrderedDict``): no module is imported, torch included. Every
other global (``os.system``, ``builtins.eval``, a model class, ...) is refused
with a :class:`TorchFileError` naming the file and the global, before the
call that would use it is made. Tensors come back as NumPy arrays
(bfloat16 through ``ml_dtypes``), every offset/size/stride checked against
its storage.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import zipfile
from typing import Any

import numpy as np


class TorchFileError(ValueError):
    """A PyTorch file cannot be read safely (not a torch zip, refused global, corrupt)."""


def _bfloat16() -> np.dtype:
    import ml_dtypes  # noqa: PLC0415 (a jax dependency; only for bfloat16 files)

    return np.dtype(ml_dtypes.bfloat16)


#: ``torch.<X>Storage`` -> NumPy dtype (a callable for bfloat16, resolved lazily).
STORAGE_DTYPES: dict[str, Any] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": _bfloat16,
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _StorageType:
    """Stands for ``torch.<X>Storage`` in the pickle: only its dtype is kept."""

    def __init__(self, name: str):
        dtype = STORAGE_DTYPES[name]
        self.name = name
        self.dtype = dtype() if callable(dtype) else dtype


class _Storage:
    """One ``data/<key>`` record as a flat NumPy array."""

    def __init__(self, array: np.ndarray, key: str):
        self.array = array
        self.key = key


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode(str, 'latin1')``: how protocol 2 pickles ``bytes``; nothing else."""
    if not isinstance(text, str) or encoding != "latin1":
        raise TorchFileError(f"refused _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


class _TensorUnpickler(pickle.Unpickler):
    """Admits only tensor rebuilds, storage types and OrderedDict; refuses every other global."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, source: str,
                 byteorder: str):
        super().__init__(io.BytesIO(data))
        self._zip = archive
        self._prefix = prefix
        self._source = source
        self._byteorder = byteorder
        self._storages: dict[str, _Storage] = {}

    # -- the stand-ins the admitted globals resolve to

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any,
                        requires_grad: Any = False, backward_hooks: Any = None,
                        metadata: Any = None) -> np.ndarray:
        del requires_grad, backward_hooks, metadata
        if not isinstance(storage, _Storage):
            raise TorchFileError(f"{self._source}: a tensor is rebuilt from {type(storage).__name__}, "
                                 "not from a storage record")
        if not (isinstance(offset, int) and all(isinstance(v, int) and v >= 0
                                                for v in (*size, *stride))
                and len(size) == len(stride) and offset >= 0):
            raise TorchFileError(f"{self._source}: tensor on storage {storage.key!r} has invalid "
                                 f"offset/size/stride {offset!r}/{size!r}/{stride!r}")
        flat = storage.array
        if math.prod(size) == 0:
            return np.zeros(tuple(size), flat.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= flat.size:
            raise TorchFileError(
                f"{self._source}: tensor of size {tuple(size)} (offset {offset}, stride "
                f"{tuple(stride)}) reads past the end of storage {storage.key!r} "
                f"({flat.size} elements): the file is corrupt")
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=tuple(size), strides=tuple(s * item for s in stride),
            writeable=False)
        return np.array(view, copy=True, order="C")  # ascontiguousarray would make 0-d 1-d

    @staticmethod
    def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                           state: Any = None) -> Any:
        del requires_grad, backward_hooks, state
        return data

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 (see the class docstring)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter",
                                                 "_rebuild_parameter_with_state"):
            return self._rebuild_parameter
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        raise TorchFileError(
            f"{self._source}: refused to unpickle: the file asks for the global "
            f"{module}.{name}; a weights file holds only tensors, dicts, lists and numbers "
            f"(what torch.load(weights_only=True) admits), and loading any other global "
            f"could run code. Nothing from the file was run. If the file is trusted, re-save "
            f"its state dict: torch.save(model.state_dict(), path).")

    def persistent_load(self, pid: Any) -> _Storage:  # noqa: D102
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise TorchFileError(f"{self._source}: refused persistent id {pid!r} (expected "
                                 "('storage', <torch storage type>, key, location, numel))")
        _, storage_type, key, _location, numel = pid
        if key in self._storages:
            return self._storages[key]
        member = f"{self._prefix}data/{key}"
        try:
            raw = self._zip.read(member)
        except KeyError:
            raise TorchFileError(f"{self._source}: storage record {member!r} is missing "
                                 "(truncated or corrupt file)") from None
        dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
        if not isinstance(numel, int) or numel * dtype.itemsize > len(raw):
            raise TorchFileError(
                f"{self._source}: storage {key!r} should hold {numel!r} x {storage_type.name} "
                f"but has {len(raw)} bytes (truncated or corrupt file)")
        array = np.frombuffer(raw, dtype=dtype, count=numel)
        if not dtype.isnative:
            array = array.astype(dtype.newbyteorder("="))
        storage = _Storage(array, key)
        self._storages[key] = storage
        return storage


def _pickle_prefix(names: list[str], source: str) -> str:
    """The ``<name>/`` folder of ``data.pkl`` (torch picks any archive name)."""
    found = [n[: -len("data.pkl")] for n in names
             if n.endswith("data.pkl") and n.count("/") <= 1]
    if any(n.endswith("constants.pkl") for n in names) or any("/code/" in n for n in names):
        raise TorchFileError(
            f"{source}: this is a TorchScript archive (torch.jit.save), not a state dict; "
            "save the weights with torch.save(model.state_dict(), path)")
    if len(found) != 1:
        raise TorchFileError(f"{source}: not a torch.save archive (expected one data.pkl, "
                             f"found {len(found)} among {len(names)} records)")
    return found[0]


def read_torch_file(path: str | os.PathLike) -> Any:
    """Reads a ``torch.save`` file -> the saved object with NumPy arrays for tensors.

    Raises:
      FileNotFoundError: no such file.
      TorchFileError: not a torch zip archive (legacy pre-1.6 format,
        TorchScript, truncated, corrupt), or the pickle asks for a global
        outside the admitted set (the message names it; nothing was run).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PyTorch weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x80\x02":
        raise TorchFileError(
            f"{path}: legacy (pre-1.6, non-zip) torch.save format; re-save it with a "
            "recent torch: torch.save(torch.load(path, weights_only=True), new_path)")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise TorchFileError(f"{path}: not a readable torch.save zip archive (truncated or "
                             f"corrupt?): {e}") from e
    with archive:
        names = archive.namelist()
        prefix = _pickle_prefix(names, path)
        try:
            data = archive.read(prefix + "data.pkl")
            byteorder = (archive.read(prefix + "byteorder").decode().strip()
                         if prefix + "byteorder" in names else "little")
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise TorchFileError(f"{path}: cannot read data.pkl (truncated or corrupt): {e}") from e
        if byteorder not in ("little", "big"):
            raise TorchFileError(f"{path}: unknown byteorder record {byteorder!r}")
        try:
            return _TensorUnpickler(data, archive, prefix, path, byteorder).load()
        except TorchFileError:
            raise
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise TorchFileError(f"{path}: truncated or corrupt archive: {e}") from e
        except Exception as e:  # UnpicklingError, ValueError, TypeError from a corrupt stream
            raise TorchFileError(f"{path}: not a readable torch pickle: "
                                 f"{type(e).__name__}: {e}") from e
