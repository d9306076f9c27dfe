"""The one embedding path of evaluation: images -> features, shared across processes.

Two pieces, used by every evaluator, by ``broadface_jax.evaluate``,
``broadface_jax.embed`` and the trainer:

* :func:`make_uint8_embed_fn` turns an encoder into an *embed function*
  ``embed_fn(u8[n, H, W, 3]) -> f32[n, D]`` (unnormalised embeddings of this
  process's images). It normalises as in training, resizes to
  ``config.image_size`` when needed and runs the encoder on batches of one
  fixed size (zero-padded; the padding rows are dropped), so the encoder
  compiles once. With several processes it is *collective*: every process
  calls it in lockstep with the same ``n``; the processes' images form one
  global batch (each process fills the rows its devices hold), the encoder
  runs sharded over every device (``train_step.make_embed_fn``) and each
  process gets its own rows back.
* :func:`embed_source` embeds all images of an :class:`ImageSource` (an
  in-memory array, image files read and aligned per batch, a TFDS split):
  each process reads and embeds only its contiguous share
  (``share_bounds``: rows ``[n*p//P, n*(p+1)//P)`` of process p of P, as
  ``tfds.split_for_jax_process`` splits), in batches of
  ``ceil(batch_size / P)`` images; a process whose share has run out feeds
  zero images (masked: their rows are dropped), so that every process makes
  the same number of calls, as big_vision's evaluators pad and mask. At the
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
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Protocol

import numpy as np

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
    (``config.eval.batch_size``); each process passes ``ceil(batch_size / P)``.
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
    image_shape = tuple(source.image_shape)
    it = iter(source.batches(start, stop, local_batch))
    feats: np.ndarray | None = None
    labels = np.zeros(stop - start, np.int64)
    has_labels = False
    norm_sum, row = 0.0, 0
    for step in range(steps):
        item = next(it, None) if row < stop - start else None
        lab = None
        if isinstance(item, tuple):
            item, lab = item
            has_labels = True
        if item is None:
            count, batch = 0, np.zeros((local_batch,) + image_shape, np.uint8)
        else:
            batch = np.asarray(item)
            count = batch.shape[0]
            if batch.dtype != np.uint8 or batch.shape[1:] != image_shape or not 0 < count <= local_batch:
                raise ValueError(f"{what}: the source yielded {batch.dtype} {batch.shape} for rows "
                                 f"{start + row}.., expected u8[<= {local_batch}, {image_shape}]")
            if count < local_batch:  # padded; the padding rows are masked below
                batch = np.concatenate([batch, np.zeros((local_batch - count,) + image_shape, np.uint8)])
        where = f"{what} {start + row}..{start + row + count - 1}"
        plain = _call(embed_fn, batch, where)[:count]
        norm_sum += float(np.sum(np.linalg.norm(plain.astype(np.float64), axis=1)))
        if flip:
            flipped = _call(embed_fn, np.ascontiguousarray(batch[:, :, ::-1, :]), where)[:count]
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
    sizes = [b - a for a, b in (share_bounds(n, p, pc) for p in range(pc))]
    features = np.concatenate([all_feats[p, :sizes[p]] for p in range(pc)])
    gathered_labels = np.concatenate([all_labels[p, :sizes[p]] for p in range(pc)])
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


def make_uint8_embed_fn(config: Any, mesh: Any, model: Any = None
                        ) -> Callable[[Any, Any], EmbedFn]:
    """``bind(encoder_params, batch_stats) -> embed_fn`` (module docstring) for ``config``'s encoder.

    ``embed_fn(u8[n, H, W, 3]) -> f32[n, D]``: resized to ``config.image_size``
    when the faces have another size (linear, antialiased), normalised as in
    training (``config.dataset.normalize``: face ``(x/255 - 0.5)/0.5`` or
    ImageNet mean/std), run in chunks of one fixed size per process
    (``ceil(config.eval.batch_size / P)`` rounded up to a multiple of the
    local device count; the last chunk zero-padded) so the encoder compiles
    once. With P > 1 processes every process must call it with the same
    ``n`` (:func:`embed_source` does): the processes' chunks form one global
    batch of ``P x chunk`` rows (``train_step.make_embed_fn``, sharded over
    every device); each process fills only the rows its own devices hold
    and reads back those rows' embeddings, so no image crosses processes
    (when a 'model' axis spans processes, rows are replicated across them:
    then the chunks are all-gathered first).
    """
    import jax

    from broadface_jax import input_pipeline, train_step

    embed = train_step.make_embed_fn(config, mesh, model=model)  # looked up per call: tests patch it
    batch = int(config.eval.batch_size)
    if batch < 1:
        raise ValueError(f"config.eval.batch_size={batch} must be >= 1")
    pc, pi = jax.process_count(), jax.process_index()
    local_devices = max(1, mesh.size // pc)
    local_batch = _ceil_div(_ceil_div(batch, pc), local_devices) * local_devices
    size = int(config.image_size)
    rows = _process_rows(mesh, pc * local_batch, (size, size, 3), pc) if pc > 1 else None

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
                if n < local_batch:
                    chunk = np.concatenate(
                        [chunk, np.zeros((local_batch - n,) + chunk.shape[1:], chunk.dtype)])
                if pc > 1 and rows is None:  # gather: process 0's images, then process 1's, ...
                    chunk = _allgather(np.ascontiguousarray(chunk), pc).reshape(
                        (pc * local_batch,) + chunk.shape[1:])
                x = input_pipeline.normalize_images(chunk.astype(np.float32), config)
                if x.shape[1:3] != (size, size):
                    x = np.asarray(resize(x))
                if pc == 1:
                    outs.append(np.asarray(embed(params, batch_stats, x))[:n])
                elif rows is None:
                    out = np.asarray(embed(params, batch_stats, x))
                    outs.append(out[pi * local_batch:pi * local_batch + n])
                else:  # this process fills only the rows its devices hold (untouched zero pages elsewhere)
                    full = np.zeros((pc * local_batch,) + x.shape[1:], np.float32)
                    full[rows] = x
                    outs.append(np.asarray(embed(params, batch_stats, full))[rows][:n])
            if not outs:
                return np.zeros((0, int(config.model.embedding_dim)), np.float32)
            return np.concatenate(outs).astype(np.float32)

        return embed_fn

    return bind

