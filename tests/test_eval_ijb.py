"""IJB 1:1: metadata readers, media/template pooling and pair scoring vs brute-force loops."""

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from broadface_jax.evaluation import ijb


def _write_metadata(tmp_path, rng, n_images=600, n_templates=60, dim=32):
    """Random IJB-like metadata: templates of 1-20 images from 1-4 media, identity structure."""
    template_ids = np.sort(rng.choice(np.arange(1, 5000), n_templates, replace=False))
    template_identity = rng.integers(0, 15, n_templates)
    img_template = template_ids[rng.integers(0, n_templates, n_images)]
    img_media = rng.integers(0, 4, n_images) + 100 * (img_template % 7)  # media ids shared across templates
    names = [f"img/{i}.jpg" for i in range(n_images)]
    with open(tmp_path / "ijbc_face_tid_mid.txt", "w") as f:
        for n, t, m in zip(names, img_template, img_media):
            f.write(f"{n} {t} {m}\n")
    scores = rng.uniform(0.3, 1.0, n_images).astype(np.float32)
    lmk = rng.uniform(0, 112, (n_images, 10)).astype(np.float32)
    with open(tmp_path / "ijbc_name_5pts_score.txt", "w") as f:
        for n, l, s in zip(names, lmk, scores):
            f.write(n + " " + " ".join(f"{v:.4f}" for v in l) + f" {s:.6f}\n")
    present = np.unique(img_template)
    t1 = rng.choice(present, 2000)
    t2 = rng.choice(present, 2000)
    ident = dict(zip(template_ids, template_identity))
    labels = np.array([int(ident[a] == ident[b]) for a, b in zip(t1, t2)])
    with open(tmp_path / "ijbc_template_pair_label.txt", "w") as f:
        for a, b, lab in zip(t1, t2, labels):
            f.write(f"{a} {b} {lab}\n")
    centers = rng.normal(size=(15, dim))
    feats = centers[np.array([ident[t] for t in img_template])] + 1.5 * rng.normal(size=(n_images, dim))
    return feats.astype(np.float32), scores


def _ref_template_features(feats, templates, medias):
    """insightface image2template_feature, float64 loops."""
    uniq = np.unique(templates)
    out = np.zeros((len(uniq), feats.shape[1]))
    for k, t in enumerate(uniq):
        ind_t = np.where(templates == t)[0]
        media_means = []
        for m in np.unique(medias[ind_t]):
            rows = ind_t[medias[ind_t] == m]
            media_means.append(np.mean(feats[rows].astype(np.float64), axis=0))
        out[k] = np.sum(media_means, axis=0)
    return out / np.linalg.norm(out, axis=1, keepdims=True), uniq


def _ref_scores_with_face_scores(feats, face_scores, templates, medias, t1, t2):
    ref_feats, uniq = _ref_template_features(feats.astype(np.float64) * face_scores[:, None], templates, medias)
    pos = {t: i for i, t in enumerate(uniq)}
    return np.array([ref_feats[pos[a]] @ ref_feats[pos[b]] for a, b in zip(t1, t2)])


def test_readers_and_pooling_and_scores_match_reference(tmp_path):
    rng = np.random.default_rng()
    feats, true_scores = _write_metadata(tmp_path, rng)
    names, templates, medias = ijb.read_template_media(tmp_path / "ijbc_face_tid_mid.txt")
    t1, t2, labels = ijb.read_template_pairs(tmp_path / "ijbc_template_pair_label.txt")
    names2, lmk, face_scores = ijb.read_landmarks_scores(tmp_path / "ijbc_name_5pts_score.txt")
    assert names == names2 and len(names) == 600
    assert lmk.shape == (600, 5, 2)
    np.testing.assert_allclose(face_scores, true_scores, atol=1e-6)

    for normalize, use_scores in [(False, True), (True, False), (False, False)]:
        x = feats.astype(np.float64)
        if normalize:
            x = x / np.linalg.norm(x, axis=1, keepdims=True)
        if use_scores:
            x = x * face_scores[:, None]
        ref_feats, ref_uniq = _ref_template_features(x, templates, medias)
        got_feats, got_uniq = ijb.image_to_template_features(
            feats, templates, medias, face_scores if use_scores else None, normalize_images=normalize)
        np.testing.assert_array_equal(got_uniq, ref_uniq)
        np.testing.assert_allclose(got_feats, ref_feats, atol=2e-6)

        pos = {t: i for i, t in enumerate(ref_uniq)}
        ref_scores = np.array([ref_feats[pos[a]] @ ref_feats[pos[b]] for a, b in zip(t1, t2)])
        got_scores = ijb.template_pair_scores(got_feats, got_uniq, t1, t2, batch_size=37)
        np.testing.assert_allclose(got_scores, ref_scores, atol=2e-6)

    metrics = ijb.evaluate_ijb(feats, templates, medias, t1, t2, labels, face_scores, batch_size=101,
                               fars=(1e-3, 1e-2, 1e-1))
    fpr, tpr, _ = roc_curve(labels, _ref_scores_with_face_scores(feats, face_scores, templates, medias, t1, t2),
                            drop_intermediate=False)
    for far, key in [(1e-3, "tar@far=1e-3"), (1e-2, "tar@far=1e-2"), (1e-1, "tar@far=1e-1")]:
        assert metrics[key] == pytest.approx(tpr[fpr <= far].max(), abs=2.0 / labels.sum())
    assert 0.2 < metrics["tar@far=1e-1"] <= 1.0


def test_reader_errors_name_file_and_line(tmp_path):
    p = tmp_path / "ijbc_face_tid_mid.txt"
    p.write_text("a.jpg 1 2\nb.jpg 3\n")
    with pytest.raises(ValueError, match=r"ijbc_face_tid_mid.txt:2: expected 3 fields"):
        ijb.read_template_media(p)
    p.write_text("a.jpg 1 x\n")
    with pytest.raises(ValueError, match="media id 'x'"):
        ijb.read_template_media(p)
    q = tmp_path / "pairs.txt"
    q.write_text("1 2 1\n3 4 2\n")
    with pytest.raises(ValueError, match="label 2"):
        ijb.read_template_pairs(q)
    q.write_text("1 2 1\n3 4\n")
    with pytest.raises(ValueError, match="pairs.txt"):
        ijb.read_template_pairs(q)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        ijb.read_template_pairs(tmp_path / "nope.txt")
    feats = np.random.default_rng().normal(size=(3, 4)).astype(np.float32)
    tf, uniq = ijb.image_to_template_features(feats, np.array([5, 5, 9]), np.array([1, 2, 1]))
    with pytest.raises(ValueError, match="template id 7"):
        ijb.template_pair_scores(tf, uniq, np.array([5]), np.array([7]))


def test_run_ijb_from_folder_layout(tmp_path):
    """meta/ + loose_crop/ -> align by 5 points -> flip-sum -> D1 pooling -> TAR, vs a direct path."""
    from PIL import Image

    from broadface_jax import align
    from broadface_jax.evaluation import tar_far

    rng = np.random.default_rng()
    n_img, n_ids = 48, 4
    identity = rng.integers(0, n_ids, n_img)
    templates = 10 + identity * 3 + rng.integers(0, 3, n_img)  # 3 templates per identity
    medias = rng.integers(0, 3, n_img)
    (tmp_path / "meta").mkdir()
    (tmp_path / "loose_crop").mkdir()
    faces = rng.integers(0, 256, (n_ids, 12, 10, 3)).astype(np.uint8)  # one 'face' per identity
    names, lmks, scores = [], [], rng.uniform(0.5, 1.0, n_img)
    for i in range(n_img):
        h, w = rng.integers(90, 140, 2)
        img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        x0, y0 = rng.integers(5, 20, 2)
        scale = rng.uniform(5.0, 6.0)
        face = np.asarray(Image.fromarray(faces[identity[i]]).resize((int(10 * scale), int(12 * scale))))
        img[y0:y0 + face.shape[0], x0:x0 + face.shape[1]] = face
        pts = (align.ARCFACE_TEMPLATE / 112.0 * [face.shape[1], face.shape[0]]) + [x0, y0]
        names.append(f"{i}.png")
        lmks.append(pts)
        Image.fromarray(img).save(tmp_path / "loose_crop" / names[-1])
    with open(tmp_path / "meta" / "ijbc_face_tid_mid.txt", "w") as f:
        f.writelines(f"{n} {t} {m}\n" for n, t, m in zip(names, templates, medias))
    with open(tmp_path / "meta" / "ijbc_name_5pts_score.txt", "w") as f:
        f.writelines(n + " " + " ".join(f"{v:.3f}" for v in p.ravel()) + f" {s:.4f}\n"
                     for n, p, s in zip(names, lmks, scores))
    uniq_t = np.unique(templates)
    t1, t2 = np.meshgrid(uniq_t, uniq_t)
    keep = t1 < t2
    t1, t2 = t1[keep], t2[keep]
    labels = ((t1 - 10) // 3 == (t2 - 10) // 3).astype(int)
    with open(tmp_path / "meta" / "ijbc_template_pair_label.txt", "w") as f:
        f.writelines(f"{a} {b} {c}\n" for a, b, c in zip(t1, t2, labels))

    proj = rng.normal(size=(14 * 14 * 3, 16))

    def embed(x):
        pooled = x.astype(np.float64).reshape(len(x), 14, 8, 14, 8, 3).mean(axis=(2, 4)) / 255.0 - 0.5
        return (pooled.reshape(len(x), -1) @ proj).astype(np.float32)

    fars = (1e-2, 1e-1)
    got = ijb.run_ijb(embed, tmp_path, "IJBC", batch_size=5, fars=fars)
    # Direct path: align every image here, flip-sum, weight by the file's score, insightface pooling.
    lmk_read = np.array([[float(f"{v:.3f}") for v in p.ravel()] for p in lmks])  # as written to the file
    aligned = np.stack([align.warp_to_template(np.asarray(Image.open(tmp_path / "loose_crop" / n).convert("RGB")),
                                               lmk_read[i].reshape(5, 2)) for i, n in enumerate(names)])
    feats = embed(aligned) + embed(np.ascontiguousarray(aligned[:, :, ::-1]))
    score_read = np.array([float(f"{s:.4f}") for s in scores], np.float32)
    ref_feats, ref_uniq = _ref_template_features(feats.astype(np.float64) * score_read[:, None], templates, medias)
    pos = {t: i for i, t in enumerate(ref_uniq)}
    ref_scores = np.array([ref_feats[pos[a]] @ ref_feats[pos[b]] for a, b in zip(t1, t2)])
    ref = tar_far.tar_at_far(ref_scores, labels, fars)
    assert got == {f"tar@far={tar_far.format_far(f)}": ref[f] for f in fars}
    assert got["tar@far=1e-1"] > 0.5  # the planted identity faces are found
