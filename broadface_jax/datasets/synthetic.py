"""Synthetic face-like identities: a data source that needs no files.

Each identity is a fixed random face-like pattern: a skin-coloured ellipse
with hair, eyes, eyebrows, nose and mouth whose geometry and colours are
drawn per identity, plus a low-frequency skin texture. Each sample shows that
pattern under a random pose (rotation, scale, shift), light (brightness,
contrast, a linear gradient), background and pixel noise. Verification on
held-out identities is then learnable (geometry and colours carry identity)
but not trivial (pose, light and noise vary more than some identities differ).

Everything is deterministic: an identity's pattern depends only on its id; a
sample's nuisance factors on `(seed, identity, sample index)`. Rendering is
vectorised NumPy over a batch (no TensorFlow needed).

Identity ids `[0, num_identities)` are for training;
`[num_identities, num_identities + heldout_identities)` are held out for
`verification_pairs`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

# Fixed "world" seed: the identities' looks do not change with config.seed.
_WORLD_SEED = 0x5EED_FACE
_SAMPLE_SALT = 0x5A3B1E
_PAIRS_SALT = 0x9A125
# Canonical face units per image half-width (< 1: the face fills more of the frame).
_FACE_ZOOM = 0.85


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Sizes of a synthetic data set (from config.dataset.synthetic and config.image_size)."""

    image_size: int
    num_identities: int
    heldout_identities: int = 0
    samples_per_identity: int = 1

    @property
    def num_examples(self) -> int:
        return self.num_identities * self.samples_per_identity


def spec_from_config(config: Any) -> SyntheticSpec:
    """Reads `config.image_size` and `config.dataset.synthetic` into a SyntheticSpec."""
    syn = config.dataset.synthetic
    spec = SyntheticSpec(int(config.image_size), int(syn.num_identities),
                         int(syn.heldout_identities), int(syn.samples_per_identity))
    if spec.image_size < 16:
        raise ValueError(f"synthetic data: config.image_size must be >= 16, got {spec.image_size}")
    return spec


# ---------------------------------------------------------------- identities
_ID_FIELDS = (
    "face_ax", "face_ay", "face_cy", "skin", "hair", "hair_line", "eye_x", "eye_y",
    "eye_rx", "eye_ry", "iris", "brow_dy", "brow_rx", "brow_ry", "brow_tilt",
    "nose_y", "nose_rx", "nose_ry", "mouth_y", "mouth_rx", "mouth_ry", "lips",
    "tex_freq", "tex_phase", "tex_amp",
)


@functools.lru_cache(maxsize=65536)
def _identity_row(identity: int) -> tuple[np.ndarray, ...]:
    """The fixed pattern parameters of one identity (cached)."""
    r = np.random.default_rng([_WORLD_SEED, identity])
    u = r.uniform
    skin_base = np.array([0.92, 0.72, 0.58]) * u(0.45, 1.05)
    skin = np.clip(skin_base + r.normal(0, 0.06, 3), 0.05, 1.0)
    hair = np.clip(r.choice([0.08, 0.25, 0.45, 0.7]) * np.array([1.0, 0.8, 0.6])
                   + r.normal(0, 0.05, 3), 0.0, 1.0)
    return (
        np.float32(u(0.55, 0.72)), np.float32(u(0.72, 0.90)), np.float32(u(-0.05, 0.08)),
        skin.astype(np.float32), hair.astype(np.float32), np.float32(u(-0.75, -0.45)),
        np.float32(u(0.22, 0.36)), np.float32(u(-0.22, -0.05)),
        np.float32(u(0.08, 0.14)), np.float32(u(0.035, 0.07)),
        np.clip(r.uniform(0.0, 0.6, 3), 0, 1).astype(np.float32),
        np.float32(u(0.10, 0.18)), np.float32(u(0.09, 0.16)), np.float32(u(0.015, 0.04)),
        np.float32(u(-0.35, 0.35)),
        np.float32(u(0.08, 0.24)), np.float32(u(0.05, 0.10)), np.float32(u(0.10, 0.20)),
        np.float32(u(0.36, 0.52)), np.float32(u(0.14, 0.28)), np.float32(u(0.03, 0.07)),
        np.clip(np.array([0.75, 0.35, 0.38]) * u(0.5, 1.1) + r.normal(0, 0.05, 3), 0, 1).astype(np.float32),
        r.uniform(0.5, 2.5, (3, 2)).astype(np.float32) * r.choice([-1, 1], (3, 2)),
        r.uniform(0, 2 * np.pi, 3).astype(np.float32), np.float32(u(0.04, 0.12)),
    )


def identity_params(ids: np.ndarray) -> dict[str, np.ndarray]:
    """Stacked pattern parameters for identities `ids` -> {field: array[N, ...]}."""
    rows = [_identity_row(int(i)) for i in np.asarray(ids).ravel()]
    return {k: np.stack([row[j] for row in rows]) for j, k in enumerate(_ID_FIELDS)}


# ------------------------------------------------------------------ samples
def sample_params(seed: int, ids: np.ndarray, sample_idx: np.ndarray) -> dict[str, np.ndarray]:
    """Nuisance factors of each sample, deterministic per (seed, identity, sample index)."""
    rows = []
    for i, s in zip(np.asarray(ids).ravel(), np.asarray(sample_idx).ravel()):
        r = np.random.default_rng([_SAMPLE_SALT, int(seed) & 0xFFFFFFFF, int(i), int(s)])
        rows.append(np.concatenate([
            r.uniform(-0.26, 0.26, 1),       # rotation (rad, ~ +-15 deg)
            r.uniform(0.88, 1.12, 1),        # scale
            r.uniform(-0.08, 0.08, 2),       # shift x, y
            r.uniform(-0.15, 0.15, 1),       # brightness
            r.uniform(0.75, 1.25, 1),        # contrast
            r.uniform(0, 2 * np.pi, 1),      # light gradient direction
            r.uniform(0.0, 0.25, 1),         # light gradient strength
            r.uniform(0.1, 0.9, 3),          # background colour
            r.uniform(0.02, 0.07, 1),        # noise sigma
            r.integers(0, 2**31, 1),         # noise seed
        ]))
    p = np.stack(rows)
    return {
        "rot": p[:, 0], "scale": p[:, 1], "shift": p[:, 2:4], "bright": p[:, 4],
        "contrast": p[:, 5], "grad_dir": p[:, 6], "grad": p[:, 7], "bg": p[:, 8:11],
        "noise": p[:, 11], "noise_seed": p[:, 12].astype(np.int64),
    }


def _blob(u: np.ndarray, v: np.ndarray, cx, cy, rx, ry) -> np.ndarray:
    """A soft elliptic blob in [0, 1]: (1 - d^2)_+ ^ 2, cheap (no transcendental)."""
    d = ((u - cx[:, None, None]) / rx[:, None, None]) ** 2 + ((v - cy[:, None, None]) / ry[:, None, None]) ** 2
    w = np.maximum(1.0 - d, 0.0)
    return w * w


def _affine_cos(ax, ay, c, x, y) -> np.ndarray:
    """cos(ax * x + ay * y + c) on the grid, separably (no 2-D transcendental)."""
    a = ax[:, None] * x[None, :] + c[:, None]   # (N, W)
    b = ay[:, None] * y[None, :]                # (N, H)
    return np.cos(b)[:, :, None] * np.cos(a)[:, None, :] - np.sin(b)[:, :, None] * np.sin(a)[:, None, :]


@functools.lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    """A fixed bank of luminance noise fields f32[64, size, size] (generated once per size)."""
    bank = np.random.default_rng([_WORLD_SEED, size]).standard_normal((64, size, size), dtype=np.float32)
    bank.setflags(write=False)
    return bank


def _window(cx, cy, radius, geo, size: int) -> tuple[int, int, int, int]:
    """Pixel rows/cols [r0, r1) x [c0, c1) that cover a canonical disc in every image of the batch."""
    cos, sin, k, tx, ty = geo
    x = tx + (cos * cx - sin * cy) / k
    y = ty + (sin * cx + cos * cy) / k
    r = radius / k

    def to_px(z):
        return (z + 1.0) * (size / 2.0) - 0.5

    c0, c1 = int(np.floor(to_px((x - r).min()))), int(np.ceil(to_px((x + r).max()))) + 1
    r0, r1 = int(np.floor(to_px((y - r).min()))), int(np.ceil(to_px((y + r).max()))) + 1
    return max(r0, 0), min(max(r1, 0), size), max(c0, 0), min(max(c1, 0), size)


def render(ids: np.ndarray, sample_idx: np.ndarray, seed: int, size: int) -> np.ndarray:
    """Renders sample `sample_idx[k]` of identity `ids[k]` -> u8[N, size, size, 3].

    Layers (mouth, nose, brows, eyes, hair, skin with texture, background)
    are soft single-channel alphas composited front to back. Small features
    are only evaluated inside a window that covers them in every image of the
    batch (outside it their alpha is exactly 0).
    """
    ids = np.asarray(ids, np.int64).ravel()
    sample_idx = np.asarray(sample_idx, np.int64).ravel()
    n = len(ids)
    if n == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    q = identity_params(ids)
    s = sample_params(seed, ids, sample_idx)
    f32 = np.float32

    # Pixel centres in [-1, 1]; canonical face coords (u, v) = R^-1 (x - t) / scale.
    lin = (np.arange(size, dtype=f32) + 0.5) * (2.0 / size) - 1.0
    cos, sin = np.cos(s["rot"]).astype(f32), np.sin(s["rot"]).astype(f32)
    k = (_FACE_ZOOM / s["scale"]).astype(f32)
    tx, ty = s["shift"][:, 0].astype(f32), s["shift"][:, 1].astype(f32)
    geo = (cos, sin, k, tx, ty)
    # u = k (cos (x - tx) + sin (y - ty)), v = k (cos (y - ty) - sin (x - tx))
    ux, uy, vx, vy = k * cos, k * sin, -k * sin, k * cos
    uc, vc = -(ux * tx + uy * ty), -(vx * tx + vy * ty)
    xs, ys = lin[None, None, :], lin[None, :, None]
    u = ux[:, None, None] * xs + (uy[:, None, None] * ys + uc[:, None, None])
    v = vx[:, None, None] * xs + (vy[:, None, None] * ys + vc[:, None, None])

    zeros = np.zeros(n, f32)
    fv = v - q["face_cy"][:, None, None]
    r_face = (u / q["face_ax"][:, None, None]) ** 2 + (fv / q["face_ay"][:, None, None]) ** 2
    hair = np.clip((1.12 - r_face) * 8.0, 0, 1) * np.clip((q["hair_line"][:, None, None] - fv) * 10.0 + 1.0, 0, 1)
    face = np.clip((1.0 - r_face) * 12.0, 0, 1)
    # Low-frequency skin texture (its argument is affine in the pixel grid).
    tex = np.zeros_like(u)
    for j in range(3):
        fx, fy = np.pi * q["tex_freq"][:, j, 0], np.pi * q["tex_freq"][:, j, 1]
        tex += _affine_cos(fx * ux + fy * vx, fx * uy + fy * vy, fx * uc + fy * vc + q["tex_phase"][:, j],
                           lin, lin)
    tex *= (q["tex_amp"] / 3.0)[:, None, None]

    # Small features, top layer first: (alpha on its window, window, colour (N, 3)).
    layers = []

    def blob_layer(cx, cy, rx, ry, colour, gain=1.0, tilt=None):
        radius = np.maximum(rx, ry) if tilt is None else np.hypot(rx, ry + np.abs(tilt) * rx)
        r0, r1, c0, c1 = _window(cx, cy, radius, geo, size)
        if r0 >= r1 or c0 >= c1:
            return
        uw, vw = u[:, r0:r1, c0:c1], v[:, r0:r1, c0:c1]
        if tilt is not None:  # an eyebrow: a blob sheared along v
            bu = uw - cx[:, None, None]
            alpha = _blob(bu, vw + tilt[:, None, None] * bu, zeros, cy, rx, ry)
        else:
            alpha = _blob(uw, vw, cx, cy, rx, ry)
        if gain != 1.0:
            alpha = np.minimum(alpha * gain, 1.0)
        layers.append((alpha, (r0, r1, c0, c1), colour))

    white = np.full((n, 3), 0.95, f32)
    black = np.zeros((n, 3), f32)
    blob_layer(zeros, q["mouth_y"], q["mouth_rx"], q["mouth_ry"], q["lips"])
    blob_layer(zeros, q["nose_y"] + q["nose_ry"] * 0.8, q["nose_rx"] * 0.9, q["nose_ry"] * 0.25,
               black + 0.12, gain=0.6)
    blob_layer(zeros, q["nose_y"], q["nose_rx"], q["nose_ry"], black, gain=0.35)
    for side in (-1.0, 1.0):
        ex = side * q["eye_x"]
        blob_layer(ex, q["eye_y"] - q["brow_dy"], q["brow_rx"], q["brow_ry"], q["hair"] * 0.9,
                   gain=1.5, tilt=side * q["brow_tilt"])
        blob_layer(ex, q["eye_y"], q["eye_ry"] * 1.1, q["eye_ry"] * 1.1, q["iris"])
        blob_layer(ex, q["eye_y"], q["eye_rx"], q["eye_ry"], white)

    img = np.zeros((n, size, size, 3), f32)
    remaining = np.ones_like(u)
    for alpha, (r0, r1, c0, c1), colour in layers:
        rem = remaining[:, r0:r1, c0:c1]
        img[:, r0:r1, c0:c1] += (alpha * rem)[..., None] * colour[:, None, None, :]
        rem *= 1.0 - alpha
    img += (hair * remaining)[..., None] * q["hair"][:, None, None, :]
    remaining *= 1.0 - hair
    # The skin: colour skin * (1 + tex) under the face alpha.
    img += (face * remaining * (1.0 + tex))[..., None] * q["skin"][:, None, None, :]
    remaining *= 1.0 - face
    img += remaining[..., None] * s["bg"].astype(f32)[:, None, None, :]

    # Light: contrast around the mean, brightness, a linear gradient; noise.
    gd = s["grad_dir"].astype(f32)
    gx, gy = np.cos(gd) * s["grad"].astype(f32), np.sin(gd) * s["grad"].astype(f32)
    contrast = s["contrast"].astype(f32)
    mean = img.mean(axis=(1, 2, 3))
    offset = (mean * (1.0 - contrast) + s["bright"].astype(f32))[:, None, None] \
        + gx[:, None, None] * xs + gy[:, None, None] * ys
    # Pixel noise (luminance): a field of the fixed bank, picked, signed and
    # possibly transposed per sample.
    bank = _noise_bank(size)
    for j in range(n):
        code = int(s["noise_seed"][j])
        field = bank[code % 64]
        if (code >> 6) & 1:
            field = field.T
        sigma = f32(s["noise"][j]) * (f32(-1.0) if (code >> 7) & 1 else f32(1.0))
        offset[j] += field * sigma
    img *= contrast[:, None, None, None]
    img += offset[..., None]
    img *= 255.0
    img += 0.5
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


# ------------------------------------------------------------------ data set
def training_examples(spec: SyntheticSpec, example_indices: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training example e = sample (e % S) of identity (e // S) -> (u8 images, i32 labels)."""
    e = np.asarray(example_indices, np.int64).ravel()
    if spec.num_identities <= 0 or spec.samples_per_identity <= 0:
        raise ValueError(
            f"synthetic data needs config.dataset.synthetic.num_identities > 0 and "
            f"samples_per_identity > 0, got {spec.num_identities} and {spec.samples_per_identity}")
    if e.size and (e.min() < 0 or e.max() >= spec.num_examples):
        raise ValueError(f"synthetic example index out of range [0, {spec.num_examples}): "
                         f"{e.min()}..{e.max()}")
    ids = e // spec.samples_per_identity
    return render(ids, e % spec.samples_per_identity, seed, spec.image_size), ids.astype(np.int32)


def verification_pair_ids(config: Any, num_pairs: int, seed: int
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Which held-out samples `verification_pairs` shows.

    Returns (ids_a, ids_b, samples u64[2, N], issame, render seed).
    """
    spec = spec_from_config(config)
    if spec.heldout_identities < 2:
        raise ValueError(f"synthetic verification needs config.dataset.synthetic.heldout_identities "
                         f">= 2, got {spec.heldout_identities}")
    if num_pairs < 2:
        raise ValueError(f"num_pairs must be >= 2, got {num_pairs}")
    r = np.random.default_rng([_PAIRS_SALT, int(seed) & 0xFFFFFFFF])
    lo, k = spec.num_identities, spec.heldout_identities
    n_same = num_pairs // 2
    n_diff = num_pairs - n_same
    same_id = lo + r.integers(0, k, n_same)
    d1 = r.integers(0, k, n_diff)
    d2 = (d1 + r.integers(1, k, n_diff)) % k  # always a different identity
    ids_a = np.concatenate([same_id, lo + d1])
    ids_b = np.concatenate([same_id, lo + d2])
    samples = r.choice(2**31 - 1, size=2 * num_pairs, replace=False).reshape(2, num_pairs)
    issame = np.concatenate([np.ones(n_same, bool), np.zeros(n_diff, bool)])
    order = r.permutation(num_pairs)
    return ids_a[order], ids_b[order], samples, issame[order], int(r.integers(0, 2**31))


def verification_pairs(config: Any, num_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Verification pairs on held-out identities -> (images_a, images_b, issame).

    `config` is the full config (`image_size`, `dataset.synthetic`). Held-out
    ids are `[num_identities, num_identities + heldout_identities)`, never
    seen in training. `num_pairs // 2` pairs show the same identity (two
    different samples), the rest two different identities, in shuffled
    order. Deterministic given `seed`.
    """
    spec = spec_from_config(config)
    ids_a, ids_b, samples, issame, render_seed = verification_pair_ids(config, num_pairs, seed)
    images_a = render(ids_a, samples[0], render_seed, spec.image_size)
    images_b = render(ids_b, samples[1], render_seed, spec.image_size)
    return images_a, images_b, issame
