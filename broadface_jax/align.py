"""Face alignment to the standard 112x112 ArcFace template.

Three ways faces reach 112x112 in this project:

* `warp_to_template`: a 5-point similarity transform (Umeyama, least squares,
  no reflection) onto the ArcFace template, as insightface's `norm_crop`.
* `lfw_center_crop`: LFW deep-funneled images are already aligned; the centre
  box (61, 61, 189, 189) resized to 112x112 is a tight face crop.
* `load_cfp_aligned`: CFP ships 30 fiducials per image; `cfp_five_points`
  turns them into the 5 template points (see its docstring for the layout).

Coordinates follow OpenCV's convention (pixel centres at integer
coordinates), the one landmark files and insightface use; the warp itself is
done with PIL.
"""

from __future__ import annotations

import functools
import pathlib

import numpy as np
from PIL import Image

# The insightface / ArcFace 5-point template for 112x112 crops:
# image-left eye, image-right eye, nose tip, image-left and image-right mouth corner.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963],
     [73.5318, 51.5014],
     [56.0252, 71.7366],
     [41.5493, 92.3655],
     [70.7299, 92.2041]], dtype=np.float64)

LFW_CROP_BOX = (61, 61, 189, 189)

# CFP 30-point layout, established by drawing the indices on frontal and
# profile images (both views use the same layout, on the visible half of the
# face; frontal images are always annotated on the image-left half):
#   0-8   jaw contour from the ear down to the chin (8 = chin, on the midline)
#   9     temple;  10-11 eyebrow (outer, inner)
#   12-17 the annotated eye: 12 outer corner, 13-14 upper lid, 15 inner
#         corner, 16-17 lower lid
#   18    nasion (midline between the eyes); 19-20 nose bridge; 21 nose tip
#   22    subnasale; 23 nostril; 24 nose wing
#   25    the annotated mouth corner
#   26-29 lips on the midline: 26 top of the upper lip, 27 upper lip bottom
#         edge, 29 lower lip top edge, 28 bottom of the lower lip
CFP_EYE = tuple(range(12, 18))
CFP_NASION = 18
CFP_NOSE_TIP = 21
CFP_MOUTH_CORNER = 25
CFP_MOUTH_MIDLINE = (27, 29)
CFP_MIDLINE = (8, 18, 19, 20, 21, 22, 26, 27, 28, 29)


def similarity_transform(src_pts: np.ndarray, dst_pts: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) src -> dst.

    Umeyama (1991) without reflection. Returns the 2x3 matrix `M` with
    `dst ~= M @ [x, y, 1]`.
    """
    src = np.asarray(src_pts, dtype=np.float64)
    dst = np.asarray(dst_pts, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or len(src) < 2:
        raise ValueError(
            f"similarity_transform needs two (N>=2, 2) point arrays of the same shape, "
            f"got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    var_s = (s_c ** 2).sum() / len(src)
    if var_s <= 0:
        raise ValueError("similarity_transform: source points are all identical")
    cov = d_c.T @ s_c / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rot = u @ np.diag(sign) @ vt
    scale = (sig * sign).sum() / var_s
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def _as_rgb_u8(image_u8: np.ndarray, what: str) -> np.ndarray:
    image = np.asarray(image_u8)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{what}: expected a uint8 HxWx3 RGB image, got "
                         f"{image.dtype} {image.shape}")
    return image


def warp_affine(image_u8: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Warps `image_u8` by the 2x3 `matrix` (source -> output coordinates).

    Bilinear; outside pixels are black, as `cv2.warpAffine` with its defaults.
    """
    image = _as_rgb_u8(image_u8, "warp_affine")
    full = np.vstack([np.asarray(matrix, np.float64), [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(full)[:2]
    # PIL samples output pixel (x, y) at input (a, b, c) . (x + .5, y + .5, 1)
    # with pixel centres at +.5; shift from the integer-centre convention.
    lin = inv[:, :2]
    shift = inv[:, 2] - lin @ np.array([0.5, 0.5]) + 0.5
    coeffs = (lin[0, 0], lin[0, 1], shift[0], lin[1, 0], lin[1, 1], shift[1])
    out = Image.fromarray(image).transform(
        (size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    return np.asarray(out)


def warp_to_template(image_u8: np.ndarray, five_points: np.ndarray, size: int = 112) -> np.ndarray:
    """Aligns a face to the ArcFace template by its 5 points -> u8[size, size, 3].

    `five_points` are in template order (image-left eye, image-right eye, nose
    tip, image-left mouth corner, image-right mouth corner), pixel
    coordinates of `image_u8`. The template scales with `size / 112`.
    """
    points = np.asarray(five_points, dtype=np.float64)
    if points.shape != (5, 2) or not np.all(np.isfinite(points)):
        raise ValueError(f"warp_to_template: five_points must be finite (5, 2), got {points.shape}")
    matrix = similarity_transform(points, ARCFACE_TEMPLATE * (size / 112.0))
    return warp_affine(image_u8, matrix, size)


def lfw_center_crop(image_u8: np.ndarray, size: int = 112) -> np.ndarray:
    """LFW deep-funneled 250x250 -> the centre box (61, 61, 189, 189) resized to size x size."""
    image = _as_rgb_u8(image_u8, "lfw_center_crop")
    if image.shape[:2] != (250, 250):
        raise ValueError(f"lfw_center_crop expects a 250x250 deep-funneled LFW image, "
                         f"got {image.shape[1]}x{image.shape[0]}")
    crop = Image.fromarray(image).crop(LFW_CROP_BOX)
    return np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR))


def _reflect_across_line(points: np.ndarray, line_pts: np.ndarray) -> np.ndarray:
    """Reflects `points` across the total-least-squares line through `line_pts`."""
    centre = line_pts.mean(0)
    _, _, vt = np.linalg.svd(line_pts - centre)
    direction = vt[0]
    rel = points - centre
    along = rel @ direction
    return centre + 2.0 * along[:, None] * direction[None, :] - rel


def cfp_five_points(fiducials_30: np.ndarray, view: str = "frontal") -> np.ndarray:
    """CFP's 30 fiducials -> the 5 template points, in template order.

    CFP annotates only one half of the face (layout above `CFP_EYE`).
    * frontal: eye centre = mean of the 6 eye points, nose tip = 21, mouth
      corner = 25; the other eye and mouth corner are the mirror images of
      these across the facial midline (a line fitted to points 8, 18-22,
      26-29).
    * profile: the far eye and far mouth corner are hidden. As a 5-point
      face detector does on profiles, they are put where they vanish behind
      the silhouette: the far eye at the nasion (18), the far mouth corner at
      the mouth's midline (mean of 27 and 29). Works for both facing directions.
    Points are then ordered by x into (left eye, right eye) and (left mouth
    corner, right mouth corner) in image coordinates.
    """
    pts = np.asarray(fiducials_30, dtype=np.float64)
    if pts.shape != (30, 2) or not np.all(np.isfinite(pts)):
        raise ValueError(f"cfp_five_points needs 30 finite (x, y) points, got {pts.shape}")
    eye = pts[list(CFP_EYE)].mean(0)
    nose = pts[CFP_NOSE_TIP]
    mouth = pts[CFP_MOUTH_CORNER]
    if view == "frontal":
        eye2, mouth2 = _reflect_across_line(np.stack([eye, mouth]), pts[list(CFP_MIDLINE)])
    elif view == "profile":
        eye2 = pts[CFP_NASION]
        mouth2 = pts[list(CFP_MOUTH_MIDLINE)].mean(0)
    else:
        raise ValueError(f"cfp_five_points: view must be 'frontal' or 'profile', got {view!r}")
    eyes = sorted([eye, eye2], key=lambda p: p[0])
    mouths = sorted([mouth, mouth2], key=lambda p: p[0])
    return np.stack([eyes[0], eyes[1], nose, mouths[0], mouths[1]])


def cfp_dataset_root(cfp_root: str | pathlib.Path) -> pathlib.Path:
    """The `cfp-dataset` folder, given it or its parent."""
    root = pathlib.Path(cfp_root)
    if (root / "cfp-dataset").is_dir():
        root = root / "cfp-dataset"
    if not (root / "Data" / "Images").is_dir():
        raise FileNotFoundError(
            f"CFP root {cfp_root} has no Data/Images folder (expected the cfp-dataset "
            f"folder or its parent)")
    return root


def cfp_paths(cfp_root: str | pathlib.Path, image_rel_path: str) -> tuple[pathlib.Path, pathlib.Path, str]:
    """(image path, fiducials path, view) of a CFP image.

    `image_rel_path` may be relative to the cfp-dataset folder
    (`Data/Images/001/frontal/01.jpg`) or written as in the protocol files
    (`../Data/Images/001/frontal/01.jpg`).
    """
    root = cfp_dataset_root(cfp_root)
    rel = pathlib.PurePosixPath(image_rel_path.strip().replace("\\", "/"))
    parts = [p for p in rel.parts if p not in ("..", ".")]
    if "Data" in parts:
        parts = parts[parts.index("Data"):]
    if len(parts) != 5 or parts[:2] != ["Data", "Images"] or parts[3] not in ("frontal", "profile"):
        raise ValueError(f"not a CFP image path (Data/Images/<id>/<frontal|profile>/<nn>.jpg): "
                         f"{image_rel_path!r}")
    image = root.joinpath(*parts)
    fid = root.joinpath("Data", "Fiducials", parts[2], parts[3], pathlib.Path(parts[4]).stem + ".txt")
    return image, fid, parts[3]


def read_cfp_fiducials(path: str | pathlib.Path) -> np.ndarray:
    """Reads a CFP fiducials file (30 lines of `x,y`) -> f64[30, 2]."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CFP fiducials file not found: {path}")
    try:
        pts = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise ValueError(f"CFP fiducials file {path} is not 30 lines of 'x,y': {e}") from e
    if pts.shape != (30, 2):
        raise ValueError(f"CFP fiducials file {path} has shape {pts.shape}, expected (30, 2)")
    return pts


def read_rgb(path: str | pathlib.Path) -> np.ndarray:
    """Reads an image file as u8[H, W, 3] RGB; a clear error names a bad file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot decode image {path}: {e}") from e


def align_cfp_image(cfp_root: str | pathlib.Path, image_rel_path: str, size: int = 112) -> np.ndarray:
    """A CFP image aligned to the ArcFace template -> u8[size, size, 3] (not cached)."""
    image, fid, view = cfp_paths(cfp_root, image_rel_path)
    five = cfp_five_points(read_cfp_fiducials(fid), view)
    return warp_to_template(read_rgb(image), five, size)


@functools.lru_cache(maxsize=8192)
def _load_cfp_aligned_cached(root: str, image_rel_path: str, size: int) -> np.ndarray:
    out = align_cfp_image(root, image_rel_path, size)
    out.setflags(write=False)
    return out


def load_cfp_aligned(cfp_root: str | pathlib.Path, image_rel_path: str, size: int = 112) -> np.ndarray:
    """A CFP image aligned to the ArcFace template -> u8[size, size, 3].

    Cached per (root, path, size); the returned array is read-only.
    """
    image, _, _ = cfp_paths(cfp_root, image_rel_path)
    return _load_cfp_aligned_cached(str(cfp_dataset_root(cfp_root)),
                                    image.relative_to(cfp_dataset_root(cfp_root)).as_posix(), size)
