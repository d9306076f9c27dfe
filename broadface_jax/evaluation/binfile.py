"""insightface verification ``.bin`` files, read safely and written portably.

Format (insightface ``recognition/_datasets_`` lfw.bin, cfp_fp.bin, agedb_30.bin,
...): a pickle of ``(bins, issame_list)`` where ``bins`` is a list of encoded
images (JPEG or PNG bytes; 2 per pair, pairs interleaved) and ``issame_list``
a list of Python bools. Files were written by Python 2 (``str`` images,
loaded here with ``encoding='bytes'``) or Python 3 (``bytes``).

Reading never runs code from the file: pickles can import modules and call
functions (GLOBAL, STACK_GLOBAL, INST, OBJ, REDUCE, EXT*), which is how a
malicious file runs commands. Two independent guards, both before anything
from the file is built:

1. The opcode stream is scanned with ``pickletools.genops`` (a parser that
   executes nothing); any opcode outside :data:`ALLOWED_OPCODES` (those that
   build bytes, str, int, float, bool, None, list, tuple and dict, plus
   memo and framing) is refused with a :class:`BinFileError` naming the file,
   the opcode, its byte offset and, for GLOBAL-like opcodes, what it asks for.
2. The unpickler (:class:`_BuiltinsOnlyUnpickler`) refuses every global in
   ``find_class`` and every persistent id (in case the scan were bypassed).

One exception, because real files need it: Python 3 pickles ``bytes`` with
protocol 0, 1 or 2 (``pickle.dump(..., protocol=2)``, as many re-saved
``.bin`` files are) as a call, ``_codecs.encode(text, 'latin1')`` (and the
empty ``bytes`` as ``__builtin__.bytes()``). These two globals
(:data:`ADMITTED_GLOBALS`), in the protocol 0-2 ``GLOBAL`` form only, and
``REDUCE`` after one of them, pass the scan. ``find_class`` does not import
them: it returns this module's own :func:`_latin1_encode` / :func:`_empty_bytes`,
which accept exactly the arguments Python writes (a ``str`` and ``'latin1'``;
no arguments) and refuse anything else. Any other global, and a ``REDUCE``
with no admitted global before it, is refused as before.

The loaded object is then checked to have the expected structure.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
from typing import Sequence

import numpy as np

IMAGE_SIZE = (112, 112)


ALLOWED_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4",
    "NONE", "NEWTRUE", "NEWFALSE", "FLOAT", "BINFLOAT",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    "BYTEARRAY8", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
    "EMPTY_LIST", "APPEND", "APPENDS", "LIST",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS",
    "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET",
})


class BinFileError(ValueError):
    """A .bin file is malicious, corrupt, truncated or not in the expected layout."""


def _latin1_encode(*args):
    """Stands in for ``_codecs.encode`` when unpickling: ``str -> bytes``, Latin-1 only.

    Python 3 pickles ``bytes`` at protocol <= 2 as ``_codecs.encode(str(b,
    'latin1'), 'latin1')``; this accepts exactly that call and refuses any
    other arguments (it is not the real ``_codecs.encode``).
    """
    if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
        shown = ", ".join(type(a).__name__ if isinstance(a, str) and len(a) > 20 else repr(a)
                          for a in args)
        raise BinFileError(
            f"refused to unpickle: _codecs.encode({shown}); only _codecs.encode(<str>, 'latin1'), "
            f"how Python 3 pickles bytes at protocol 0-2, is admitted. Nothing from the file was run.")
    return args[0].encode("latin1")


def _empty_bytes(*args):
    """Stands in for ``builtins.bytes`` when unpickling: only ``bytes()`` (how b'' is pickled)."""
    if args:
        raise BinFileError(
            f"refused to unpickle: bytes() called with {len(args)} argument(s); only bytes() "
            f"with none, how Python 3 pickles b'' at protocol 0-2, is admitted. Nothing from "
            f"the file was run.")
    return b""


# The only globals a .bin may name (GLOBAL opcode argument "module name"), and
# what the loader gives for them instead of importing anything.
ADMITTED_GLOBALS = {
    "_codecs encode": _latin1_encode,
    "__builtin__ bytes": _empty_bytes,  # protocol 0-2 with fix_imports (the default)
    "builtins bytes": _empty_bytes,  # protocol 0-2 with fix_imports=False
}


def check_opcodes(data: bytes, source: str) -> None:
    """Refuses a pickle holding any opcode outside :data:`ALLOWED_OPCODES` (runs nothing).

    Exceptions (module docstring): ``GLOBAL`` naming one of
    :data:`ADMITTED_GLOBALS`, and ``REDUCE`` once such a global was seen.
    """
    admitted_seen = False
    try:
        for opcode, arg, pos in pickletools.genops(data):
            if opcode.name == "GLOBAL" and arg in ADMITTED_GLOBALS:
                admitted_seen = True
                continue
            if opcode.name == "REDUCE" and admitted_seen:
                continue
            if opcode.name not in ALLOWED_OPCODES:
                what = f" asking for {arg!r}" if arg is not None else ""
                raise BinFileError(
                    f"{source}: refused to unpickle: opcode {opcode.name}{what} at byte {pos}; "
                    f"a verification .bin holds only bytes, lists and bools, and this opcode "
                    f"can import modules or call functions (admitted: only the globals "
                    f"{', '.join(sorted(ADMITTED_GLOBALS))}, as Python 3 writes bytes at "
                    f"protocol 0-2). Nothing from the file was run.")
    except BinFileError:
        raise
    except Exception as e:  # ValueError from genops on truncated / garbage data
        raise BinFileError(f"{source}: not a readable pickle (truncated or corrupt): {e}") from e


class _BuiltinsOnlyUnpickler(pickle.Unpickler):
    """An unpickler that refuses every persistent id and every global but :data:`ADMITTED_GLOBALS`.

    Those few are answered with this module's own functions; nothing is imported.
    """

    def __init__(self, file: io.BufferedIOBase, source: str):
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str):  # noqa: D102 - see class docstring
        own = ADMITTED_GLOBALS.get(f"{module} {name}")
        if own is not None:
            source = self._source

            def guarded(*args):
                try:
                    return own(*args)
                except BinFileError as e:
                    raise BinFileError(f"{source}: {e}") from None

            return guarded
        raise BinFileError(
            f"{self._source}: refused to unpickle: the file asks for the global "
            f"{module!r}.{name!r}; a verification .bin holds only bytes, lists and bools, "
            f"and loading a global could run code. Nothing from the file was run. If the "
            f"file is trusted, re-save it with broadface_jax.evaluation.binfile.write_bin.")

    def persistent_load(self, pid):  # noqa: D102
        raise BinFileError(f"{self._source}: refused to unpickle: persistent id {pid!r}")


def load_bin_raw(path: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
    """Safely unpickles a .bin; returns (encoded images, issame) without decoding.

    Raises:
      FileNotFoundError: no such file.
      BinFileError: a global / persistent id was requested (nothing is run),
        the pickle is truncated or corrupt, or the structure is not
        ``(list of bytes, list of bools)`` with two images per pair.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"verification .bin file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    check_opcodes(data, path)
    with io.BytesIO(data) as f:
        try:
            obj = _BuiltinsOnlyUnpickler(f, path).load()
        except BinFileError:
            raise
        except EOFError as e:
            raise BinFileError(f"{path}: truncated pickle (unexpected end of file)") from e
        except Exception as e:  # UnpicklingError, ValueError, MemoryError, ... from a corrupt stream
            raise BinFileError(f"{path}: not a readable pickle: {type(e).__name__}: {e}") from e
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise BinFileError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise BinFileError(
            f"{path}: expected bins and issame_list to be lists, got "
            f"{type(bins).__name__} and {type(issame).__name__}")
    for i, b in enumerate(bins):
        if not isinstance(b, (bytes, bytearray)):
            raise BinFileError(f"{path}: image #{i} is a {type(b).__name__}, expected encoded image bytes")
    out_same = []
    for i, s in enumerate(issame):
        if isinstance(s, bool) or (isinstance(s, int) and s in (0, 1)):
            out_same.append(bool(s))
        else:
            raise BinFileError(f"{path}: issame_list[{i}] is {s!r}, expected a bool")
    if len(bins) != 2 * len(out_same):
        raise BinFileError(
            f"{path}: {len(bins)} images for {len(out_same)} pairs; a .bin holds exactly 2 images per pair")
    if not out_same:
        raise BinFileError(f"{path}: no pairs")
    return [bytes(b) for b in bins], out_same


def decode_image(data: bytes, image_size: tuple[int, int] = IMAGE_SIZE, source: str = "") -> np.ndarray:
    """Encoded bytes -> u8[H, W, 3] RGB at ``image_size`` (H, W), resized bilinearly if needed."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            if img.size != (image_size[1], image_size[0]):
                img = img.resize((image_size[1], image_size[0]), Image.BILINEAR)
            return np.asarray(img, np.uint8)
    except Exception as e:  # PIL raises many types for corrupt data
        raise BinFileError(f"{source}: not a decodable image: {type(e).__name__}: {e}") from e


def read_bin(path: str | os.PathLike,
             image_size: tuple[int, int] = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Reads an insightface .bin: (images u8[2P, H, W, 3], issame bool[P]).

    Images of pair i are rows 2i and 2i+1. Images whose size is not
    ``image_size`` are resized (insightface resizes the short side; the
    published files are all 112x112 already).
    """
    path = os.fspath(path)
    bins, issame = load_bin_raw(path)
    images = np.empty((len(bins), image_size[0], image_size[1], 3), np.uint8)
    for i, data in enumerate(bins):
        images[i] = decode_image(data, image_size, source=f"{path}: image #{i}")
    return images, np.asarray(issame, bool)


def encode_image(image: np.ndarray, image_format: str = "jpeg", quality: int = 95) -> bytes:
    """u8[H, W, 3] -> JPEG or PNG bytes."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a u8[H, W, 3] image, got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    fmt = image_format.lower()
    if fmt in ("jpeg", "jpg"):
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    elif fmt == "png":
        Image.fromarray(image).save(buf, format="PNG")
    else:
        raise ValueError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
    return buf.getvalue()


def write_bin(path: str | os.PathLike, images: np.ndarray | Sequence[np.ndarray | bytes],
              issame: Sequence[bool] | np.ndarray, image_format: str = "jpeg",
              quality: int = 95) -> None:
    """Writes a .bin insightface and this module can read.

    Args:
      path: output file (written atomically).
      images: 2 per pair, interleaved: u8[2P, H, W, 3] or a sequence of
        u8[H, W, 3] arrays (encoded as ``image_format``) or already encoded
        image bytes (stored as they are).
      issame: P booleans.
      image_format: 'jpeg' (as insightface's files, lossy) or 'png' (lossless).

    The pickle uses protocol 4 and only builtins (a tuple of a list of bytes
    and a list of bools), so it holds no global at all.
    """
    issame_list = [bool(s) for s in np.asarray(issame).reshape(-1).tolist()]
    bins = []
    for i, img in enumerate(images):
        if isinstance(img, (bytes, bytearray)):
            bins.append(bytes(img))
        else:
            try:
                bins.append(encode_image(np.asarray(img), image_format, quality))
            except ValueError as e:
                raise ValueError(f"image #{i}: {e}") from e
    if len(bins) != 2 * len(issame_list) or not bins:
        raise ValueError(f"{len(bins)} images for {len(issame_list)} pairs: need 2 per pair, at least one pair")
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        pickle.dump((bins, issame_list), f, protocol=4)
    os.replace(tmp, path)
