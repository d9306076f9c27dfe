"""The one embedding path: shares, padding and masking, the gather, flip-sum and XNorm.

``embed_source`` is run here for each process of a simulated 3-process set-up
in turn (``process_index`` / ``process_count`` given, the all-gather replaced
by one that hands back what every simulated process contributed): every
process must call the embed function the same number of times with the same
batch shape (lockstep: the real encoder path is collective), read only its
contiguous share, and end with exactly the one-process features, labels and
XNorm, which are checked against float64 NumPy. The real 2-process run is
tests/test_eval_multiprocess.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from broadface_jax.evaluation import embedding


class _Linear:
    def __init__(self, rng, shape, dim=5):
        self.proj = rng.normal(size=(int(np.prod(shape)), dim))
        self.shapes = []

    def __call__(self, x):
        self.shapes.append(x.shape)
        return (x.reshape(len(x), -1).astype(np.float64) / 255.0 @ self.proj).astype(np.float32)

    def ref(self, x):
        return x.reshape(len(x), -1).astype(np.float64) / 255.0 @ self.proj


class _Recording(embedding.ArraySource):
    def batches(self, start, stop, batch_size):
        self.read = (start, stop)
        return super().batches(start, stop, batch_size)


class _Replay:
    """An all-gather that returns, for its k-th call, what every process contributed to its k-th."""

    def __init__(self, contributed):
        self.contributed, self.k = contributed, 0

    def __call__(self, x, process_count):
        out = np.stack([self.contributed[q][self.k] for q in range(process_count)])
        self.k += 1
        return out


@pytest.mark.parametrize("n, batch_size", [(23, 6), (2, 6), (9, 3)])
def test_simulated_processes_get_the_one_process_result(monkeypatch, n, batch_size):
    rng = np.random.default_rng()
    images = rng.integers(0, 256, (n, 4, 6, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, n)
    embed = _Linear(rng, (4, 6, 3))
    pc = 3

    contributed: dict[int, list] = {}
    calls = {}
    for pi in range(pc):  # pass 1: what each process contributes to each gather
        got: list = []

        def record(x, p, got=got):
            got.append(x)
            return np.stack([x] * p)

        monkeypatch.setattr(embedding, "_allgather", record)
        src = _Recording(images, labels)
        embed.shapes = []
        embedding.embed_source(embed, src, batch_size, flip=True, process_index=pi, process_count=pc)
        contributed[pi] = got
        calls[pi] = list(embed.shapes)
        assert src.read == embedding.share_bounds(n, pi, pc)  # only its share is read
    assert calls[0] == calls[1] == calls[2]  # lockstep: same number of calls, same shapes
    local = -(-batch_size // pc)
    largest = max(b - a for a, b in (embedding.share_bounds(n, p, pc) for p in range(pc)))
    # Full local batches, then the largest share's remainder (flip: each shape twice).
    want = [local] * (largest // local) + ([largest % local] if largest % local else [])
    assert calls[0] == [(rows, 4, 6, 3) for rows in want for _ in range(2)]

    results = []
    for pi in range(pc):  # pass 2: the gather returns every process's contribution
        monkeypatch.setattr(embedding, "_allgather", _Replay(contributed))
        results.append(embedding.embed_source(embed, embedding.ArraySource(images, labels), batch_size,
                                              flip=True, process_index=pi, process_count=pc))
    plain, flipped = embed.ref(images), embed.ref(np.ascontiguousarray(images[:, :, ::-1]))
    xnorm = np.mean(np.r_[np.linalg.norm(plain, axis=1), np.linalg.norm(flipped, axis=1)])
    for r in results:
        np.testing.assert_allclose(r.features, plain + flipped, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(r.labels, labels)
        assert r.xnorm == pytest.approx(xnorm, rel=1e-6)


def test_file_source_and_errors():
    rng = np.random.default_rng()
    images = rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    embed = _Linear(rng, (4, 4, 3))
    src = embedding.FileSource(7, lambda i: images[i], (4, 4, 3))
    out = embedding.embed_source(embed, src, 3, flip=False)
    np.testing.assert_allclose(out.features, embed.ref(images), rtol=1e-5, atol=1e-5)
    # 7 = 3 + 3 + 1: the last call is not padded to the batch (the encoder path pads it to 8).
    assert out.labels is None and embed.shapes[-3:] == [(3, 4, 4, 3)] * 2 + [(1, 4, 4, 3)]

    bad = embedding.FileSource(7, lambda i: images[i, :3], (4, 4, 3), what="frame")
    with pytest.raises(ValueError, match=r"frame 0: loaded shape \(3, 4, 3\), expected \(4, 4, 3\)"):
        embedding.embed_source(embed, bad, 3)

    class Short(embedding.ArraySource):
        def batches(self, start, stop, batch_size):
            yield self.images[start:start + 1]

    with pytest.raises(ValueError, match=r"the source yielded 1 images for rows 0..6 \(expected 7\)"):
        embedding.embed_source(embed, Short(images), 3)
    with pytest.raises(ValueError, match=r"non-finite embeddings for test images 0..2"):
        embedding.embed_source(lambda x: np.full((len(x), 2), np.nan), embedding.ArraySource(images), 3,
                               what="test images")
