"""LFW pairs and CFP protocol readers, on the real files and on malformed ones."""

import os

import numpy as np
import pytest

from broadface_jax.evaluation import protocols


def test_lfw_view1_dev_test_real_file(shared_data):
    lfw = shared_data / "lfw"
    pairs = protocols.read_lfw_pairs(lfw / "pairsDevTest.txt", lfw / "images_deepfunneled")
    assert len(pairs) == 1000
    assert pairs.issame[:500].all() and not pairs.issame[500:].any()
    assert pairs.paths_a[0] == "Abdullah_Gul/Abdullah_Gul_0013.jpg"
    assert pairs.paths_b[0] == "Abdullah_Gul/Abdullah_Gul_0014.jpg"
    assert pairs.paths_a[500] == "AJ_Lamas/AJ_Lamas_0001.jpg"
    assert pairs.paths_b[500] == "Zach_Safrin/Zach_Safrin_0001.jpg"
    # Same pairs share the person, different pairs never do.
    person = lambda p: p.split("/")[0]  # noqa: E731
    assert all(person(a) == person(b) for a, b in zip(pairs.paths_a[:500], pairs.paths_b[:500]))
    assert all(person(a) != person(b) for a, b in zip(pairs.paths_a[500:], pairs.paths_b[500:]))
    # Balanced folds: 50 same + 50 different in each of 10.
    for f in range(10):
        m = pairs.folds == f
        assert pairs.issame[m].sum() == 50 and (~pairs.issame[m]).sum() == 50
    uniq, ia, ib = pairs.unique_paths()
    assert all(os.path.isfile(os.path.join(pairs.root, p)) for p in uniq)
    assert [uniq[i] for i in ia] == pairs.paths_a and [uniq[i] for i in ib] == pairs.paths_b


def test_lfw_view2_layout_gives_official_folds(tmp_path):
    lines = ["2\t3"]
    for fold in range(2):
        lines += [f"P{fold}\t{i}\t{i + 1}" for i in (1, 2, 3)]
        lines += [f"A{fold}\t{i}\tB{fold}\t{i + 10}" for i in (1, 2, 3)]
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    pairs = protocols.read_lfw_pairs(tmp_path / "pairs.txt")
    assert pairs.folds.tolist() == [0] * 6 + [1] * 6
    assert pairs.issame.tolist() == ([True] * 3 + [False] * 3) * 2
    assert pairs.paths_b[4] == "B0/B0_0012.jpg"
    assert pairs.root == str(tmp_path)


@pytest.mark.parametrize("content,msg", [
    ("2\nA\t1\t2\nA\t1\t2\nB\t1\tC\t1\n", "announces 4 pair lines, found 3"),
    ("1\nA\t1\tB\t2\nA\t1\t2\n", "expected a same-person line"),
    ("1\nA\t1\t2\t3\t4\nB\t1\tC\t1\n", "expected 3 \\(same\\) or 4"),
    ("1\nA\tx\t2\nB\t1\tC\t1\n", "'x' is not an integer"),
    ("1\nA\t0\t2\nB\t1\tC\t1\n", "must be >= 1"),
    ("ten\n", "header"),
])
def test_lfw_malformed_files_name_file_and_line(tmp_path, content, msg):
    path = tmp_path / "pairsBad.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=msg) as err:
        protocols.read_lfw_pairs(path)
    assert "pairsBad.txt" in str(err.value)


@pytest.mark.parametrize("protocol", ["FP", "FF"])
def test_cfp_protocol_real_files(shared_data, protocol):
    root = shared_data / "cfp" / "cfp-dataset"
    pairs = protocols.read_cfp_pairs(root, protocol)
    assert len(pairs) == 7000
    for f in range(10):
        m = pairs.folds == f
        assert pairs.issame[m].sum() == 350 and (~pairs.issame[m]).sum() == 350
    # Fold order and the first same pair of split 01 ('5,1' for FP, '4,7' for FF): 1-based
    # indices into Pair_list_F, then Pair_list_P (FP) or Pair_list_F (FF); subject 001 has
    # frontal images 1-10 and profile images 1-4.
    assert pairs.folds[0] == 0 and pairs.issame[0]
    i, j = (5, 1) if protocol == "FP" else (4, 7)
    view = "profile" if protocol == "FP" else "frontal"
    assert pairs.paths_a[0] == f"Data/Images/001/frontal/{i:02d}.jpg"
    assert pairs.paths_b[0] == f"Data/Images/001/{view}/{j:02d}.jpg"
    assert all("/frontal/" in p for p in pairs.paths_a)
    assert all(f"/{view}/" in p for p in pairs.paths_b)
    # Same pairs: same subject folder; different pairs: different subjects.
    subj = lambda p: p.split("/")[2]  # noqa: E731
    same = [subj(a) == subj(b) for a, b in zip(pairs.paths_a, pairs.paths_b)]
    np.testing.assert_array_equal(np.array(same), pairs.issame)
    uniq, _, _ = pairs.unique_paths()
    assert all(os.path.isfile(os.path.join(pairs.root, p)) for p in uniq)


def test_cfp_bad_index_and_missing_folder(tmp_path, shared_data):
    proto = tmp_path / "Protocol"
    (proto / "Split" / "FF" / "01").mkdir(parents=True)
    (proto / "Pair_list_F.txt").write_text("1 ../Data/Images/001/frontal/01.jpg\n2 ../Data/Images/001/frontal/02.jpg\n")
    (proto / "Pair_list_P.txt").write_text("1 ../Data/Images/001/profile/01.jpg\n")
    (proto / "Split" / "FF" / "01" / "same.txt").write_text("1,2\n")
    (proto / "Split" / "FF" / "01" / "diff.txt").write_text("1,9\n")
    with pytest.raises(ValueError, match=r"diff.txt:1: index 9 is not in Pair_list_F.txt"):
        protocols.read_cfp_pairs(tmp_path, "FF")
    with pytest.raises(FileNotFoundError, match="Split/FP"):
        protocols.read_cfp_pairs(tmp_path, "FP")
    with pytest.raises(ValueError, match="'FF' or 'FP'"):
        protocols.read_cfp_pairs(tmp_path, "PP")
    with pytest.raises(FileNotFoundError, match="Protocol"):
        protocols.read_cfp_pairs(tmp_path / "nowhere", "FF")
