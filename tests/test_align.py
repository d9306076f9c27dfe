"""Tests for broadface_jax.align: similarity fit, warp convention, LFW crop, CFP points."""

import glob
import pathlib

import numpy as np
import pytest

from broadface_jax import align


def _lstsq_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Reference: linear least squares over (a, b, tx, ty), M = [[a, -b, tx], [b, a, ty]]."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, -y, 1, 0]); rhs.append(u)
        rows.append([y, x, 0, 1]); rhs.append(v)
    a, b, tx, ty = np.linalg.lstsq(np.array(rows, np.float64), np.array(rhs, np.float64), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


@pytest.mark.parametrize("trial", range(5))
def test_similarity_matches_least_squares_reference(trial):
    rng = np.random.default_rng(1000 + trial)
    n = rng.integers(3, 12)
    src = rng.uniform(-50, 150, (n, 2))
    dst = rng.uniform(-50, 150, (n, 2))  # unrelated points: a real least-squares problem
    np.testing.assert_allclose(align.similarity_transform(src, dst), _lstsq_similarity(src, dst),
                               rtol=1e-9, atol=1e-8)


def test_similarity_recovers_exact_transform_and_never_reflects():
    rng = np.random.default_rng(7)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, t = rng.uniform(-np.pi, np.pi), rng.uniform(0.3, 3.0), rng.uniform(-20, 20, 2)
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    m = align.similarity_transform(src, src @ rot.T + t)
    np.testing.assert_allclose(m[:, :2], rot, atol=1e-10)
    np.testing.assert_allclose(m[:, 2], t, atol=1e-9)
    # A mirrored target: the best proper similarity, same as the reference, det > 0.
    mirrored = src * np.array([-1.0, 1.0])
    m = align.similarity_transform(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0
    np.testing.assert_allclose(m, _lstsq_similarity(src, mirrored), atol=1e-9)


def test_similarity_rejects_bad_points():
    with pytest.raises(ValueError, match="shape"):
        align.similarity_transform(np.zeros((5, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="identical"):
        align.similarity_transform(np.ones((5, 2)), np.zeros((5, 2)))


def _bilinear_reference(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """float64 cv2-convention warp: output (x, y) samples input at M^-1 (x, y) (integer centres)."""
    full = np.vstack([matrix, [0, 0, 1]])
    inv = np.linalg.inv(full)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    h, w = image.shape[:2]
    img = image.astype(np.float64)

    def at(yy, xx):
        return img[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]

    out = (at(y0, x0) * (1 - fx) * (1 - fy) + at(y0, x0 + 1) * fx * (1 - fy)
           + at(y0 + 1, x0) * (1 - fx) * fy + at(y0 + 1, x0 + 1) * fx * fy)
    inside = (sx >= 0) & (sy >= 0) & (sx <= w - 1) & (sy <= h - 1)
    return out, inside


def test_warp_affine_matches_float64_bilinear_reference():
    rng = np.random.default_rng(3)
    # A smooth random image, so that bilinear rounding differences stay small.
    coarse = rng.uniform(0, 255, (12, 14, 3))
    from PIL import Image
    image = np.stack([np.asarray(Image.fromarray(coarse[..., c].astype(np.float32)).resize(
        (140, 120), Image.Resampling.BICUBIC)) for c in range(3)], -1)
    image = np.clip(image, 0, 255).astype(np.uint8)
    angle, scale = rng.uniform(-0.4, 0.4), rng.uniform(0.7, 1.3)
    m = np.array([[scale * np.cos(angle), -scale * np.sin(angle), rng.uniform(-10, 10)],
                  [scale * np.sin(angle), scale * np.cos(angle), rng.uniform(-10, 10)]])
    got = align.warp_affine(image, m, 96).astype(np.float64)
    ref, inside = _bilinear_reference(image, m, 96)
    # Skip a 1-pixel rim of the valid area (edge handling differs there).
    from scipy.ndimage import binary_erosion
    interior = binary_erosion(inside, iterations=2)
    assert interior.sum() > 4000
    diff = np.abs(got - ref)[interior]
    assert diff.max() <= 1.5, diff.max()
    assert diff.mean() < 0.6


def test_warp_to_template_puts_marked_points_on_the_template():
    """Dots drawn at a random similarity image of the template land on the template."""
    rng = np.random.default_rng(11)
    angle, scale, t = rng.uniform(-0.5, 0.5), rng.uniform(1.2, 2.0), rng.uniform(20, 40, 2)
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = align.ARCFACE_TEMPLATE @ rot.T + t
    ys, xs = np.mgrid[0:260, 0:260].astype(np.float64)
    image = np.zeros((260, 260, 3))
    for x, y in points:
        image[..., 0] += 255 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * (1.5 * scale) ** 2))
    image = np.clip(image, 0, 255).astype(np.uint8)
    out = align.warp_to_template(image, points, 112)[..., 0].astype(np.float64)
    oy, ox = np.mgrid[0:112, 0:112].astype(np.float64)
    for tx, ty in align.ARCFACE_TEMPLATE:
        near = (ox - tx) ** 2 + (oy - ty) ** 2 < 6 ** 2
        w = out * near
        cx, cy = (w * ox).sum() / w.sum(), (w * oy).sum() / w.sum()
        assert abs(cx - tx) < 0.35 and abs(cy - ty) < 0.35, (cx, cy, tx, ty)


def test_lfw_center_crop_of_a_ramp():
    ramp = np.tile(np.arange(250, dtype=np.float64)[None, :], (250, 1))
    image = np.stack([ramp, ramp.T, 255 - ramp], -1).astype(np.uint8)
    out = align.lfw_center_crop(image).astype(np.float64)
    assert out.shape == (112, 112, 3)
    # Output pixel j covers input 61 + (j + .5) * 128 / 112 - .5 (a linear map).
    expect = 61 + (np.arange(112) + 0.5) * 128 / 112 - 0.5
    np.testing.assert_allclose(out[56, 3:-3, 0], expect[3:-3], atol=1.0)
    np.testing.assert_allclose(out[3:-3, 56, 1], expect[3:-3], atol=1.0)
    with pytest.raises(ValueError, match="250x250"):
        align.lfw_center_crop(np.zeros((112, 112, 3), np.uint8))


def test_cfp_points_layout_on_real_fiducials(shared_data):
    """The derived points have face geometry: eyes above nose above mouth, eyes apart."""
    root = shared_data / "cfp" / "cfp-dataset" / "Data" / "Fiducials"
    for view in ("frontal", "profile"):
        files = sorted(glob.glob(str(root / "*" / view / "*.txt")))[::97]
        for f in files:
            five = align.cfp_five_points(align.read_cfp_fiducials(f), view)
            eyes_y, nose_y, mouth_y = five[:2, 1].mean(), five[2, 1], five[3:, 1].mean()
            assert eyes_y < nose_y < mouth_y, f
            assert five[0, 0] < five[1, 0] and five[3, 0] < five[4, 0], f


@pytest.mark.parametrize("view,tol", [("frontal", 6.0), ("profile", 15.0)])
def test_cfp_alignment_puts_annotated_eye_near_template(shared_data, view, tol):
    cfp = shared_data / "cfp"
    ids = ["001", "042", "137", "250", "388", "500"]
    for pid in ids:
        rel = f"Data/Images/{pid}/{view}/01.jpg"
        image_path, fid_path, v = align.cfp_paths(cfp, "../" + rel)
        assert v == view
        pts = align.read_cfp_fiducials(fid_path)
        five = align.cfp_five_points(pts, view)
        m = align.similarity_transform(five, align.ARCFACE_TEMPLATE)
        eye = pts[list(align.CFP_EYE)].mean(0)
        k = 0 if np.allclose(five[0], eye) else 1
        assert np.allclose(five[k], eye)
        assert np.linalg.norm(m @ np.r_[eye, 1.0] - align.ARCFACE_TEMPLATE[k]) < tol
        aligned = align.load_cfp_aligned(cfp, rel)
        assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
        np.testing.assert_array_equal(aligned, align.warp_to_template(align.read_rgb(image_path), five))
        assert align.load_cfp_aligned(cfp, rel) is aligned  # cached
        assert not aligned.flags.writeable


def test_cfp_bad_inputs(tmp_path, shared_data):
    with pytest.raises(FileNotFoundError, match="Data/Images"):
        align.load_cfp_aligned(tmp_path, "Data/Images/001/frontal/01.jpg")
    with pytest.raises(ValueError, match="not a CFP image path"):
        align.cfp_paths(shared_data / "cfp", "Data/Images/001/side/01.jpg")
    bad = tmp_path / "fid.txt"
    bad.write_text("1,2\n3,4\n")
    with pytest.raises(ValueError, match=str(bad)):
        align.read_cfp_fiducials(bad)
    with pytest.raises(ValueError, match="view"):
        align.cfp_five_points(np.zeros((30, 2)) + np.arange(30)[:, None], "side")
    with pytest.raises(FileNotFoundError, match="99.jpg"):
        align.read_rgb(pathlib.Path(shared_data / "cfp/cfp-dataset/Data/Images/001/frontal/99.jpg"))
