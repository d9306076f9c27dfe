"""The one embedding path of evaluation: images -> features, shared across processes.

Two pieces, used by every evaluator, by ``broadface_jax.evaluate``,
``broadface_jax.embed`` and the trainer:

* :func:`make_uint8_embed_fn` turns an encoder into an *embed function*
  ``embed_fn(u8[n, H, W, 3]) -> f32[n, D]`` (unnormalised embeddings of this
  process's images). It normalises as in training, resizes to
  ``config.image_size`` when needed and runs the encoder on chunks of
  ``config.eval.batch_size`` images, the last (or only) chunk zero-padded to
  the next of a few sizes (:func:`padded_size`: powers of two from 8 up to
  the batch size; the padding rows are dropped), so the encoder compiles a
  few shapes at most and a handful of images costs a handful, not a whole
  batch. With several processes it is *collective*: every process calls it
  in lockstep with the same ``n``; the processes' images form one
  global batch (each process fills the rows its devices hold), the encoder
  runs sharded over every device (``train_step.make_embed_fn``) and each
  process gets its own rows back.
* :func:`embed_source` embeds all images of an :class:`ImageSource` (an
  in-memory array, image files read and aligned per batch, a TFDS split):
  each process reads and embeds only its contiguous share
  (``share_bounds``: rows ``[n*p//P, n*(p+1)//P)`` of process p of P, as
  ``tfds.split_for_jax_process`` splits), in batches of
  ``ceil(batch_size / P)`` images (the last call of each process padded to
  the largest share's last batch); a process whose share has run out feeds
  zero images (masked: their rows are dropped), so that every process makes
  the same calls with the same shapes, as big_vision's evaluators pad and
  mask. At the
  end the features (and labels the source yields with its images) are
  gathered with ``multihost_utils.process_allgather``: every process holds
  the features of all ``n`` images, in source order, exactly as one process
  would have computed them (the encoder is applied per row in evaluation
  mode, so which batch a row falls in does not change its embedding).

Flip-and-sum (``e(x) + e(x[:, :, ::-1])``, insightface's "Accuracy-Flip")
and XNorm (the mean L2 norm of every embedding computed: plain and flipped)
are computed here, once for all evaluators.

A plain NumPy callable is an embed function too (tests use tiny
deterministic ones); it is simply not collective.

Progress: inside ``with reporting(progress):`` every :func:`embed_source`
call reports the images it will embed and each batch embedded (process 0
only) to ``progress`` (:class:`BarProgress`: a tqdm bar on stderr, as
``evaluate`` and ``embed`` show; :class:`LogProgress`: absl log lines, as
training's evaluation shows). ``evaluation.run_targets(..., progress=...)``
opens one per target.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import Any, Callable, Iterator, Protocol

import numpy as np
from absl import logging

EmbedFn = Callable[[np.ndarray], np.ndarray]


# ------------------------------------------------------------------ sources
class ImageSource(Protocol):
    """Images to embed, read in order, a contiguous range at a time.

    ``batches(start, stop, batch_size)`` yields ``u8[b, H, W, 3]`` (or
    ``(u8[b, H, W, 3], int64[b] labels)``) for rows ``start..stop-1`` in
    order, ``b = batch_size`` except for the last batch. ``image_shape`` is
    ``(H, W, 3)`` (a process with nothing left to read feeds zeros of it).
    """

    image_shape: tuple[int, int, int]

    def __len__(self) -> int:
        ...

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[Any]:
        ...


@dataclasses.dataclass
class ArraySource:
    """Images already in memory: ``u8[N, H, W, 3]`` (and optional labels int64[N])."""

    images: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        _check_images(self.images)
        if self.labels is not None:
            self.labels = np.asarray(self.labels, np.int64)
            if self.labels.shape != (self.images.shape[0],):
                raise ValueError(f"labels {self.labels.shape} must give one label per image "
                                 f"({self.images.shape[0]})")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[Any]:
        for a in range(start, stop, batch_size):
            b = min(a + batch_size, stop)
            images = np.asarray(self.images[a:b])
            yield images if self.labels is None else (images, self.labels[a:b])


@dataclasses.dataclass
class FileSource:
    """Images read (and aligned) one by one: ``load(i) -> u8[H, W, 3]`` for item i of N.

    Only one batch of images is held at a time (469k IJB-C faces would not
    fit in memory). ``load`` must return ``image_shape`` images.
    """

    num_images: int
    load: Callable[[int], np.ndarray]
    image_shape: tuple[int, int, int]
    what: str = "image"

    def __len__(self) -> int:
        return int(self.num_images)

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[Any]:
        for a in range(start, stop, batch_size):
            b = min(a + batch_size, stop)
            out = np.empty((b - a,) + tuple(self.image_shape), np.uint8)
            for i in range(a, b):
                image = np.asarray(self.load(i))
                if image.shape != tuple(self.image_shape):
                    raise ValueError(f"{self.what} {i}: loaded shape {image.shape}, expected "
                                     f"{tuple(self.image_shape)}")
                out[i - a] = image
            yield out


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise TypeError(
            f"images must be a uint8 numpy array u8[N, H, W, 3], got "
            f"{type(images).__name__} of dtype {getattr(images, 'dtype', None)}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape [N, H, W, 3], got {images.shape}")
    if images.shape[0] == 0:
        raise ValueError("images is empty: nothing to embed")


# ------------------------------------------------------------------ processes
def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        return jax.process_index(), jax.process_count()
    return int(process_index), int(process_count)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def share_bounds(n: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of process ``process_index`` of ``process_count`` (contiguous, sizes differ by <= 1)."""
    return n * process_index // process_count, n * (process_index + 1) // process_count


def _allgather(x: np.ndarray, process_count: int) -> np.ndarray:
    """``x`` of every process stacked: ``[P, *x.shape]`` (identity for one process)."""
    if process_count == 1:
        return x[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=False))


# ------------------------------------------------------------------ progress
class Progress(Protocol):
    """Where :func:`embed_source` reports: ``add(n)`` more images to embed, ``update(k)`` embedded."""

    def add(self, total: int) -> None:
        ...

    def update(self, count: int) -> None:
        ...

    def close(self) -> None:
        ...


_REPORTERS: list[Progress] = []


@contextlib.contextmanager
def reporting(progress: Progress) -> Iterator[Progress]:
    """Reports every :func:`embed_source` call inside the block to ``progress``; closes it after."""
    _REPORTERS.append(progress)
    try:
        yield progress
    finally:
        _REPORTERS.remove(progress)
        progress.close()


class BarProgress:
    """A tqdm bar on stderr (images embedded, rate, ETA), redrawn at every batch.

    ``close`` ends it with one line ``<name>: <n> images embedded in <t> s``
    (the time since the bar was made: a whole target's, data loading
    included) unless ``done_line=False``.
    """

    def __init__(self, name: str, done_line: bool = True):
        from tqdm import tqdm  # noqa: PLC0415

        self.name, self.done_line, self.start = name, done_line, time.perf_counter()
        self.bar = tqdm(total=0, desc=name, unit="img", file=sys.stderr, mininterval=0,
                        miniters=1, leave=not done_line, dynamic_ncols=True)

    def add(self, total: int) -> None:
        self.bar.total += int(total)
        self.bar.refresh()

    def update(self, count: int) -> None:
        self.bar.update(int(count))

    def close(self) -> None:
        n = self.bar.n
        self.bar.close()
        if self.done_line:
            print(f"{self.name}: {n:,} images embedded in {time.perf_counter() - self.start:.1f} s",
                  file=sys.stderr, flush=True)


class LogProgress:
    """absl log lines: one every ``every_s`` seconds of embedding and one when done."""

    def __init__(self, name: str, every_s: float = 30.0):
        self.name, self.every_s = name, float(every_s)
        self.total = self.done = 0
        self.start = self.last = time.perf_counter()

    def add(self, total: int) -> None:
        self.total += int(total)

    def update(self, count: int) -> None:
        self.done += int(count)
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            logging.info("evaluation %s: %d/%d images embedded (%.1f img/s, ETA %.0f s)",
                         self.name, self.done, self.total, rate, eta)

    def close(self) -> None:
        logging.info("evaluation %s: %d images embedded in %.1f s", self.name, self.done,
                     time.perf_counter() - self.start)


# ------------------------------------------------------------------ embedding
@dataclasses.dataclass(frozen=True)
class Embeddings:
    """Features of every image of a source (in source order) and what came with them."""

    features: np.ndarray  # f32[N, D], flip-summed when asked, not normalised
    xnorm: float  # mean L2 norm of every embedding computed (plain and flipped)
    labels: np.ndarray | None = None  # int64[N] when the source yields labels


def _call(embed_fn: EmbedFn, batch: np.ndarray, where: str) -> np.ndarray:
    out = np.asarray(embed_fn(batch))
    if out.ndim != 2 or out.shape[0] != batch.shape[0]:
        raise ValueError(f"embed_fn must return f32[N, D] for N={batch.shape[0]} images, "
                         f"got shape {out.shape} ({where})")
    return out.astype(np.float32, copy=False)


def embed_source(embed_fn: EmbedFn, source: ImageSource, batch_size: int, flip: bool = True, *,
                 what: str = "images", process_index: int | None = None,
                 process_count: int | None = None) -> Embeddings:
    """Embeds every image of ``source``, each process its share (module docstring).

    ``batch_size`` is the global number of images per call of ``embed_fn``
    (``config.eval.batch_size``); each process passes ``ceil(batch_size / P)``
    (fewer at the last call: the largest share's remainder, on every process).
    NaN / inf embeddings are an error naming the rows (``what`` names the data).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(source)
    if n <= 0:
        raise ValueError(f"{what}: nothing to embed (0 images)")
    pi, pc = _processes(process_index, process_count)
    start, stop = share_bounds(n, pi, pc)
    local_batch = _ceil_div(batch_size, pc)
    steps = _ceil_div(_ceil_div(n, pc), local_batch)  # the largest share's batch count, on every process
    shares = [b - a for a, b in (share_bounds(n, p, pc) for p in range(pc))]
    image_shape = tuple(source.image_shape)
    it = iter(source.batches(start, stop, local_batch))
    reporter = _REPORTERS[-1] if _REPORTERS and pi == 0 else None
    if reporter is not None:
        reporter.add((stop - start) * (2 if flip else 1))
    feats: np.ndarray | None = None
    labels = np.zeros(stop - start, np.int64)
    has_labels = False
    norm_sum, row = 0.0, 0
    for step in range(steps):
        # Every process passes this many rows (the largest share's count at this step), so the
        # calls stay in lockstep with one shape; only the last step has fewer than local_batch.
        rows = max(min(max(share - step * local_batch, 0), local_batch) for share in shares)
        item = next(it, None) if row < stop - start else None
        lab = None
        if isinstance(item, tuple):
            item, lab = item
            has_labels = True
        if item is None:
            count, batch = 0, np.zeros((rows,) + image_shape, np.uint8)
        else:
            batch = np.asarray(item)
            count = batch.shape[0]
            if batch.dtype != np.uint8 or batch.shape[1:] != image_shape or not 0 < count <= rows:
                raise ValueError(f"{what}: the source yielded {batch.dtype} {batch.shape} for rows "
                                 f"{start + row}.., expected u8[<= {rows}, {image_shape}]")
            if count < rows:  # padded; the padding rows are masked below
                batch = np.concatenate([batch, np.zeros((rows - count,) + image_shape, np.uint8)])
        where = f"{what} {start + row}..{start + row + count - 1}"
        plain = _call(embed_fn, batch, where)[:count]
        if reporter is not None:
            reporter.update(count)
        norm_sum += float(np.sum(np.linalg.norm(plain.astype(np.float64), axis=1)))
        if flip:
            flipped = _call(embed_fn, np.ascontiguousarray(batch[:, :, ::-1, :]), where)[:count]
            if reporter is not None:
                reporter.update(count)
            norm_sum += float(np.sum(np.linalg.norm(flipped.astype(np.float64), axis=1)))
            plain = plain + flipped
        if not np.all(np.isfinite(plain)):
            raise ValueError(f"embed_fn returned non-finite embeddings for {where} "
                             f"(NaN or inf: is the model diverged?)")
        if feats is None:
            feats = np.zeros((stop - start, plain.shape[1]), np.float32)
        feats[row:row + count] = plain
        if lab is not None:
            labels[row:row + count] = np.asarray(lab, np.int64)
        row += count
    if row != stop - start or next(it, None) is not None:
        raise ValueError(f"{what}: the source yielded {row} images for rows {start}..{stop - 1} "
                         f"(expected {stop - start})")
    assert feats is not None  # steps >= 1
    if pc == 1:
        return Embeddings(feats, norm_sum / (2 * n if flip else n), labels if has_labels else None)
    # Gather: pad every share to the largest, stack, keep each process's rows.
    rows = _ceil_div(n, pc)
    pad = rows - feats.shape[0]
    all_feats = _allgather(np.concatenate([feats, np.zeros((pad, feats.shape[1]), np.float32)]), pc)
    all_labels = _allgather(np.concatenate([labels, np.zeros(pad, np.int64)]), pc)
    sums = _allgather(np.array([norm_sum, float(has_labels)], np.float64), pc)
    features = np.concatenate([all_feats[p, :shares[p]] for p in range(pc)])
    gathered_labels = np.concatenate([all_labels[p, :shares[p]] for p in range(pc)])
    xnorm = float(sums[:, 0].sum()) / (2 * n if flip else n)
    return Embeddings(features, xnorm, gathered_labels if sums[:, 1].max() > 0 else None)


def embed_images(embed_fn: EmbedFn, images: np.ndarray, batch_size: int,
                 flip: bool = True) -> tuple[np.ndarray, float]:
    """(features f32[N, D], xnorm) of in-memory ``images``: :func:`embed_source` on an :class:`ArraySource`."""
    out = embed_source(embed_fn, ArraySource(images), batch_size, flip)
    return out.features, out.xnorm


# ------------------------------------------------------------------ the encoder
def _process_rows(mesh: Any, num_rows: int, image_shape: tuple, process_count: int) -> np.ndarray | None:
    """Rows of a ``[num_rows, *image_shape]`` batch held by this process's devices, in order.

    None when they are not a disjoint ``num_rows / process_count`` share (a
    'model' axis spanning processes replicates rows across them).
    """
    from broadface_jax import sharding

    index_map = sharding.batch_sharding(mesh).addressable_devices_indices_map((num_rows,) + image_shape)
    spans = sorted({(idx[0].start or 0, num_rows if idx[0].stop is None else idx[0].stop)
                    for idx in index_map.values()})
    rows = np.concatenate([np.arange(a, b) for a, b in spans])
    if rows.size != num_rows // process_count or np.unique(rows).size != rows.size:
        return None
    return rows


#: The smallest padded chunk: fewer images are padded to this many rows.
MIN_PADDED = 8


def padded_size(n: int, batch: int, multiple: int = 1) -> int:
    """Rows a chunk of ``n`` images is padded to: the next power of two from :data:`MIN_PADDED`,
    at most ``batch``, rounded up to a multiple of ``multiple`` (the local device count)."""
    size = MIN_PADDED
    while size < n:
        size *= 2
    size = max(min(size, batch), n)
    return _ceil_div(size, multiple) * multiple


def make_uint8_embed_fn(config: Any, mesh: Any, model: Any = None
                        ) -> Callable[[Any, Any], EmbedFn]:
    """``bind(encoder_params, batch_stats) -> embed_fn`` (module docstring) for ``config``'s encoder.

    ``embed_fn(u8[n, H, W, 3]) -> f32[n, D]``: resized to ``config.image_size``
    when the faces have another size (linear, antialiased), normalised as in
    training (``config.dataset.normalize``: face ``(x/255 - 0.5)/0.5`` or
    ImageNet mean/std), run in chunks per process of
    ``ceil(config.eval.batch_size / P)`` rounded up to a multiple of the
    local device count, the last chunk zero-padded to :func:`padded_size`
    (a power of two from 8), so the encoder compiles a few shapes at most. With P > 1 processes every process must call it with the same
    ``n`` (:func:`embed_source` does): the processes' chunks form one global
    batch of ``P x chunk`` rows (``train_step.make_embed_fn``, sharded over
    every device); each process fills only the rows its own devices hold
    and reads back those rows' embeddings, so no image crosses processes
    (when a 'model' axis spans processes, rows are replicated across them:
    then the chunks are all-gathered first).
    """
    import jax

    from broadface_jax import config_check, input_pipeline, train_step

    config_check.check(config, only=("eval.batch_size",))  # the rule lives there
    embed = train_step.make_embed_fn(config, mesh, model=model)  # looked up per call: tests patch it
    batch = int(config.eval.batch_size)
    pc, pi = jax.process_count(), jax.process_index()
    local_devices = max(1, mesh.size // pc)
    local_batch = _ceil_div(_ceil_div(batch, pc), local_devices) * local_devices
    size = int(config.image_size)
    row_maps: dict[int, np.ndarray | None] = {}

    def process_rows(padded: int) -> np.ndarray | None:
        if padded not in row_maps:
            row_maps[padded] = _process_rows(mesh, pc * padded, (size, size, 3), pc)
        return row_maps[padded]

    @jax.jit
    def resize(x: jax.Array) -> jax.Array:
        return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]),
                                method="linear", antialias=True)

    def bind(params: Any, batch_stats: Any) -> EmbedFn:
        def embed_fn(images: np.ndarray) -> np.ndarray:
            images = np.asarray(images)
            if images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"embed_fn expects uint8 images [N, H, W, 3], got "
                                 f"shape {images.shape}")
            outs = []
            for start in range(0, images.shape[0], local_batch):
                chunk = images[start:start + local_batch]
                n = chunk.shape[0]
                padded = padded_size(n, local_batch, local_devices)
                if n < padded:
                    chunk = np.concatenate(
                        [chunk, np.zeros((padded - n,) + chunk.shape[1:], chunk.dtype)])
                rows = process_rows(padded) if pc > 1 else None
                if pc > 1 and rows is None:  # gather: process 0's images, then process 1's, ...
                    chunk = _allgather(np.ascontiguousarray(chunk), pc).reshape(
                        (pc * padded,) + chunk.shape[1:])
                x = input_pipeline.normalize_images(chunk.astype(np.float32), config)
                if x.shape[1:3] != (size, size):
                    x = np.asarray(resize(x))
                if pc == 1:
                    outs.append(np.asarray(embed(params, batch_stats, x))[:n])
                elif rows is None:
                    out = np.asarray(embed(params, batch_stats, x))
                    outs.append(out[pi * padded:pi * padded + n])
                else:  # this process fills only the rows its devices hold (untouched zero pages elsewhere)
                    full = np.zeros((pc * padded,) + x.shape[1:], np.float32)
                    full[rows] = x
                    outs.append(np.asarray(embed(params, batch_stats, full))[rows][:n])
            if not outs:
                return np.zeros((0, int(config.model.embedding_dim)), np.float32)
            return np.concatenate(outs).astype(np.float32)

        return embed_fn

    return bind

