"""Tests for `mic_diffrep.leakage` on small synthetic images (no dataset needed)."""

import csv
import io
import json

import numpy as np
import PIL.Image
import pytest
import torch

from mic_diffrep.data import DecodedImages
from mic_diffrep.leakage import (
    DEFAULT_THRESHOLD,
    check_leakage,
    duplicate_groups,
    exact_keys,
    find_near_duplicates,
    fingerprint_images,
    group_stratified_split,
    mirror_fingerprints,
    within_duplicates,
)
from mic_diffrep.commands import main as cli
from mic_diffrep.data import image_to_pixels


SIZE = 96  # source images are 96 px and decoded at 64 px, as `decode_images` would


def make_image(rng: np.random.Generator) -> PIL.Image.Image:
    """A grey image of six random filled ellipses on a black background (unrelated images score below 0.9)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    image = np.zeros((SIZE, SIZE))
    for _ in range(6):
        cy, cx = rng.uniform(0.2, 0.8, 2)
        ay, ax = rng.uniform(0.06, 0.25, 2)
        image[((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1] = rng.uniform(60, 220)
    return PIL.Image.fromarray(image.astype(np.uint8))


def jpeg(image: PIL.Image.Image, quality: int = 70) -> PIL.Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return PIL.Image.open(io.BytesIO(buffer.getvalue()))


VARIANTS = {
    "exact": lambda im: im.copy(),
    "brighter": lambda im: im.point(lambda v: min(255, v + 25)),
    "lower_contrast": lambda im: im.point(lambda v: int(v * 0.8)),
    "jpeg": lambda im: jpeg(im, 60),
    "shifted_jpeg": lambda im: jpeg(im.transform(im.size, PIL.Image.Transform.AFFINE, (1, 0, -4, 0, 1, 3)), 75),
    "rescaled": lambda im: PIL.Image.fromarray(np.pad(np.asarray(im.resize((92, 92), PIL.Image.BICUBIC)), 2)),
    "mirrored": lambda im: im.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT),
    "rgb_upscaled": lambda im: im.convert("RGB").resize((128, 128), PIL.Image.Resampling.BILINEAR),
}


def decode(images, resolution: int = 64) -> torch.Tensor:
    # Raw intensities (no percentile window), so that brightness changes reach the fingerprints, which must ignore them.
    return torch.stack([image_to_pixels(image, resolution, intensity_window="none") for image in images])


def decoded(images, labels=None, label_names=None, prefix="img") -> DecodedImages:
    return DecodedImages(
        pixels=decode(images),
        paths=[f"{prefix}_{i}.png" for i in range(len(images))],
        labels=None if labels is None else torch.tensor(labels),
        label_names=label_names,
    )


@pytest.fixture(scope="module")
def base_images():
    return [make_image(np.random.default_rng(seed)) for seed in range(12)]


@pytest.fixture(scope="module")
def base_fp(base_images):
    return fingerprint_images(decode(base_images))


# --- fingerprints -----------------------------------------------------------------------------------------------


def test_fingerprints_are_centred_unit_vectors(base_images):
    pixels = decode(base_images)
    fp = fingerprint_images(pixels)
    assert fp.shape == (12, 256) and fp.dtype == torch.float32
    torch.testing.assert_close(fp.norm(dim=1), torch.ones(12))
    torch.testing.assert_close(fp.mean(dim=1), torch.zeros(12), atol=1e-6, rtol=0)
    # (N, H, W) input, float input and small batches give the same fingerprints
    torch.testing.assert_close(fingerprint_images(pixels[:, 0]), fp)
    torch.testing.assert_close(fingerprint_images(pixels.float() / 255.0, batch_size=5), fp, atol=1e-5, rtol=0)
    assert fingerprint_images(pixels, size=32).shape == (12, 1024)


def test_fingerprints_barely_depend_on_decode_resolution(base_images, base_fp):
    for resolution in (48, 128):
        other = fingerprint_images(decode(base_images, resolution))
        assert (other * base_fp).sum(dim=1).min() > 0.98


def test_mirror_fingerprints_equal_fingerprints_of_flipped_images(base_images, base_fp):
    flipped = fingerprint_images(decode(base_images).flip(-1))
    torch.testing.assert_close(mirror_fingerprints(base_fp), flipped, atol=1e-5, rtol=0)


def test_constant_image_has_zero_fingerprint():
    pixels = torch.full((2, 1, 64, 64), 90, dtype=torch.uint8)
    assert fingerprint_images(pixels).abs().max() == 0


def test_exact_keys(base_images):
    pixels = decode(base_images[:3] + [base_images[0]])
    keys = exact_keys(pixels)
    assert keys[0] == keys[3] and len(set(keys)) == 3
    bumped = pixels.clone()
    bumped[0, 0, 10, 10] += 1
    assert exact_keys(bumped)[0] != keys[0]


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: fingerprint_images([[0.0] * 8] * 8), "pixels"),
        (lambda: fingerprint_images(torch.zeros(2, 3, 8, 8)), "pixels"),
        (lambda: fingerprint_images(torch.zeros(2, 1, 8, 8), size=10), "size"),
        (lambda: fingerprint_images(torch.zeros(2, 1, 8, 8), batch_size=0), "batch_size"),
        (lambda: find_near_duplicates(torch.zeros(4)), "query_fp"),
        (lambda: find_near_duplicates(torch.zeros(2, 4), torch.zeros(2, 9)), "reference_fp"),
        (lambda: find_near_duplicates(torch.zeros(2, 4), threshold=1.5), "threshold"),
        (lambda: find_near_duplicates(torch.zeros(2, 4), block_size=0), "block_size"),
        (lambda: find_near_duplicates(torch.zeros(2, 5)), "fingerprints"),  # not square: cannot be mirrored
        (lambda: duplicate_groups(torch.zeros(2, 4), keys=["a"]), "keys"),
    ],
)
def test_invalid_arguments_name_the_argument(call, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        call()


# --- near-duplicate search --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_modified_copies_are_found(base_images, base_fp, variant):
    copies = fingerprint_images(decode([VARIANTS[variant](image) for image in base_images]))
    query_idx, ref_idx, similarity = find_near_duplicates(copies, base_fp)
    assert query_idx.tolist() == list(range(12))
    assert ref_idx.tolist() == list(range(12))
    assert (similarity >= DEFAULT_THRESHOLD).all()


def test_unrelated_images_are_not_found(base_fp):
    others = fingerprint_images(decode([make_image(np.random.default_rng(100 + seed)) for seed in range(12)]))
    query_idx, _, _ = find_near_duplicates(others, base_fp)
    assert len(query_idx) == 0
    _, _, similarity = find_near_duplicates(others, base_fp, threshold=None)
    assert len(similarity) == 12 and similarity.max() < 0.93


def test_mirrored_copies_need_mirror(base_images, base_fp):
    mirrored = fingerprint_images(decode([VARIANTS["mirrored"](image) for image in base_images]))
    assert len(find_near_duplicates(mirrored, base_fp, mirror=True)[0]) == 12
    assert len(find_near_duplicates(mirrored, base_fp, mirror=False)[0]) == 0


def test_search_within_one_set_skips_self_matches(base_images, base_fp):
    assert len(find_near_duplicates(base_fp)[0]) == 0  # twelve unrelated images
    fp = fingerprint_images(decode(base_images + [VARIANTS["jpeg"](base_images[3])]))
    query_idx, ref_idx, similarity = find_near_duplicates(fp)
    assert query_idx.tolist() == [3, 12] and ref_idx.tolist() == [12, 3]
    assert np.all(similarity > 0.99)
    query_idx, ref_idx, _ = find_near_duplicates(fp, threshold=None)
    assert query_idx.tolist() == list(range(13)) and not np.any(ref_idx == query_idx)
    assert len(find_near_duplicates(fp[:1], threshold=None)[0]) == 0  # a single image has nothing to match


def brute_force(query, reference, mirror, within):
    sims = query @ reference.T
    if mirror:
        sims = torch.maximum(sims, mirror_fingerprints(query) @ reference.T)
    if within:
        sims.fill_diagonal_(-float("inf"))
    return sims.max(dim=1)


@pytest.mark.parametrize("mirror", [True, False])
def test_blocked_search_matches_brute_force(mirror):
    generator = torch.Generator().manual_seed(0)
    fp = torch.nn.functional.normalize(torch.randn(50, 16, generator=generator), dim=1)
    fp[40:45] = torch.nn.functional.normalize(fp[:5] + 0.05 * torch.randn(5, 16, generator=generator), dim=1)
    reference = torch.nn.functional.normalize(torch.randn(23, 16, generator=generator), dim=1)
    for ref, within in ((None, True), (reference, False)):
        expected_sim, expected_idx = brute_force(fp, fp if within else ref, mirror, within)
        for block_size in (7, 64):
            query_idx, ref_idx, similarity = find_near_duplicates(fp, ref, None, block_size=block_size, mirror=mirror)
            assert query_idx.tolist() == list(range(50))
            assert ref_idx.tolist() == expected_idx.tolist()
            np.testing.assert_allclose(similarity, expected_sim.numpy(), atol=1e-6)
        query_idx, _, _ = find_near_duplicates(fp, ref, 0.5, block_size=7, mirror=mirror)
        assert query_idx.tolist() == torch.nonzero(expected_sim >= 0.5).flatten().tolist()


# --- groups -----------------------------------------------------------------------------------------------------


def components(fp, threshold, mirror):
    """Connected components by depth-first search over the dense similarity matrix, numbered by first member."""
    sims = fp @ fp.T
    if mirror:
        sims = torch.maximum(sims, mirror_fingerprints(fp) @ fp.T)
    linked = (sims >= threshold).numpy()
    groups = -np.ones(len(fp), dtype=np.int64)
    for start in range(len(fp)):
        if groups[start] >= 0:
            continue
        stack, groups[start] = [start], groups.max() + 1
        while stack:
            for neighbour in np.flatnonzero(linked[stack.pop()]):
                if groups[neighbour] < 0:
                    groups[neighbour] = groups[start]
                    stack.append(neighbour)
    return groups


def test_groups_are_transitive():
    # Unit vectors at 0, 11 and 22 degrees: neighbours have cosine 0.982, the two ends only 0.927.
    angles = np.deg2rad([0.0, 11.0, 22.0, 90.0])
    fp = torch.tensor(np.stack([np.cos(angles), np.sin(angles), np.zeros(4)], axis=1), dtype=torch.float32)
    assert float(fp[0] @ fp[2]) < DEFAULT_THRESHOLD
    for block_size in (1, 2, 4096):
        groups = duplicate_groups(fp, block_size=block_size, mirror=False)
        assert groups.tolist() == [0, 0, 0, 1]
    order = [3, 2, 0, 1]  # group ids follow the order of first appearance
    assert duplicate_groups(fp[order], mirror=False).tolist() == [0, 1, 1, 1]


@pytest.mark.parametrize("mirror", [True, False])
def test_groups_match_dense_connected_components(mirror):
    generator = torch.Generator().manual_seed(1)
    fp = torch.nn.functional.normalize(torch.randn(60, 16, generator=generator), dim=1)
    for start in range(0, 30, 3):  # chains of three noisy copies
        fp[start + 1] = torch.nn.functional.normalize(fp[start] + 0.1 * torch.randn(16, generator=generator), dim=0)
        fp[start + 2] = torch.nn.functional.normalize(fp[start + 1] + 0.1 * torch.randn(16, generator=generator), dim=0)
    for threshold in (0.6, 0.9, 0.99):
        expected = components(fp, threshold, mirror)
        for block_size in (7, 64):
            groups = duplicate_groups(fp, threshold, block_size=block_size, mirror=mirror)
            assert groups.tolist() == expected.tolist()


def test_groups_of_real_copies(base_images, base_fp):
    images = base_images + [VARIANTS["shifted_jpeg"](base_images[2]), VARIANTS["mirrored"](base_images[2])]
    pixels = decode(images)
    groups = duplicate_groups(fingerprint_images(pixels))
    assert groups[2] == groups[12] == groups[13]
    assert len(set(groups.tolist())) == 12
    # Constant images have zero fingerprints: only their exact keys group them.
    blank = torch.zeros(3, 1, 64, 64, dtype=torch.uint8)
    blank[2] = 7
    assert duplicate_groups(fingerprint_images(blank)).tolist() == [0, 1, 2]
    assert duplicate_groups(fingerprint_images(blank), keys=exact_keys(blank)).tolist() == [0, 0, 1]


# --- split ------------------------------------------------------------------------------------------------------


def random_groups(num_groups=150, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 8, num_groups)
    groups = np.repeat(np.arange(num_groups), sizes)
    labels = np.repeat(rng.integers(0, 4, num_groups), sizes)
    mixed = rng.random(len(labels)) < 0.05  # a few groups hold more than one label
    labels[mixed] = rng.integers(0, 4, mixed.sum())
    permutation = rng.permutation(len(groups))
    return labels[permutation], groups[permutation] * 7 + 3  # shuffled, with ids that are not 0..G-1


@pytest.mark.parametrize("with_labels", [True, False])
def test_group_split_keeps_groups_whole_and_stratifies(with_labels):
    labels, groups = random_groups()
    train, test = group_stratified_split(labels if with_labels else None, groups, test_fraction=0.25, seed=3)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(groups)))
    assert not set(groups[train]) & set(groups[test])
    assert abs(len(test) / len(groups) - 0.25) < 0.02
    if with_labels:
        for label in range(4):
            fraction = np.mean(labels[test] == label) / np.mean(labels == label) * len(test) / len(groups)
            assert abs(fraction - 0.25) < 0.05, (label, fraction)


def test_group_split_is_deterministic():
    labels, groups = random_groups()
    first = group_stratified_split(labels, groups, seed=5)
    again = group_stratified_split(list(labels), torch.tensor(groups), seed=5)
    other = group_stratified_split(labels, groups, seed=6)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[1], other[1])
    assert first[0].dtype == np.int64
    names = np.array(["glioma", "meningioma", "notumor", "pituitary"])[labels]  # string labels work too
    assert all(np.array_equal(a, b) for a, b in zip(first, group_stratified_split(names, groups, seed=5)))


def test_group_split_rejects_bad_input():
    labels, groups = random_groups()
    for fraction in (0, 1, 1.5):
        with pytest.raises(ValueError, match="`test_fraction`"):
            group_stratified_split(labels, groups, test_fraction=fraction)
    with pytest.raises(ValueError, match="`labels`"):
        group_stratified_split(labels[:-1], groups)
    with pytest.raises(ValueError, match="`groups`"):
        group_stratified_split(None, [])
    with pytest.raises(ValueError, match="one side would be empty"):
        group_stratified_split(None, np.zeros(10, dtype=np.int64))


# --- reports ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_and_test(base_images):
    names = ["a", "b", "c"]
    train = decoded(base_images[:8], labels=[0, 1, 2, 0, 1, 2, 0, 1], label_names=names, prefix="train")
    test_images = [
        base_images[0].copy(),  # exact copy, same label
        VARIANTS["brighter"](base_images[1]),  # near copy with another label
        VARIANTS["shifted_jpeg"](base_images[2]),  # near copy, same label
        VARIANTS["mirrored"](base_images[3]),  # mirrored copy, same label
        base_images[9],
        base_images[10],  # unrelated
    ]
    test = decoded(test_images, labels=[0, 2, 2, 0, 1, 2], label_names=names, prefix="test")
    return train, test


def test_check_leakage_counts(train_and_test, tmp_path):
    train, test = train_and_test
    report = check_leakage(train, test)
    assert (report.num_train, report.num_test) == (8, 6)
    assert (report.num_exact, report.num_near, report.num_mirrored) == (1, 4, 1)
    assert (report.num_same_label, report.num_different_label) == (3, 1)
    assert report.leaked_test_indices == [0, 1, 2, 3]
    assert [p["train_path"] for p in report.pairs] == ["train_0.png", "train_1.png", "train_2.png", "train_3.png"]
    assert [p["exact"] for p in report.pairs] == [True, False, False, False]
    assert [p["mirrored"] for p in report.pairs] == [False, False, False, True]
    assert report.pairs[1]["test_label"] == "c" and report.pairs[1]["train_label"] == "b"
    assert all(p["similarity"] >= DEFAULT_THRESHOLD for p in report.pairs)
    assert report.leaked_fraction == pytest.approx(4 / 6)

    report.save(tmp_path / "leak.json")
    saved = json.loads((tmp_path / "leak.json").read_text())
    assert saved["num_near"] == 4 and saved["leaked_fraction"] == pytest.approx(4 / 6) and len(saved["pairs"]) == 4
    report.save_csv(tmp_path / "leak.csv")
    with open(tmp_path / "leak.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["test_path"] for row in rows] == ["test_0.png", "test_1.png", "test_2.png", "test_3.png"]
    assert rows[0]["exact"] == "True" and rows[1]["train_label"] == "b"

    strict = check_leakage(train, test, mirror=False)
    assert strict.num_near == 3 and strict.leaked_test_indices == [0, 1, 2]


def test_check_leakage_without_labels(train_and_test):
    train, test = train_and_test
    report = check_leakage(train.subset(range(8)), DecodedImages(test.pixels, test.paths))
    assert report.num_near == 4 and report.num_same_label is None and report.num_different_label is None
    assert report.pairs[0]["test_label"] is None


def test_check_leakage_rejects_mismatched_inputs(train_and_test, base_images):
    train, test = train_and_test
    with pytest.raises(ValueError, match="`test`"):
        check_leakage(train, DecodedImages(decode(base_images[:2], 32), ["x", "y"]))
    with pytest.raises(ValueError, match="`train`"):
        check_leakage(train.pixels, test)
    with pytest.raises(ValueError, match="`threshold`"):
        check_leakage(train, test, threshold=2.0)


def test_within_duplicates_report(base_images, tmp_path):
    images = base_images[:6] + [
        base_images[0].copy(),
        VARIANTS["jpeg"](base_images[0]),
        VARIANTS["mirrored"](base_images[4]),
    ]
    labelled = decoded(images, labels=[0, 1, 0, 1, 0, 1, 0, 0, 1], label_names=["x", "y"])
    report = within_duplicates(labelled)
    assert (report.num_images, report.num_groups, report.num_duplicate_groups) == (9, 6, 2)
    assert (report.num_images_in_groups, report.num_exact_duplicates, report.num_mixed_label_groups) == (5, 1, 1)
    assert report.group_ids[0] == report.group_ids[6] == report.group_ids[7]
    assert report.group_ids[4] == report.group_ids[8]
    assert report.groups[0]["paths"] == ["img_0.png", "img_6.png", "img_7.png"]
    assert report.groups[1]["labels"] == ["x", "y"]

    report.save(tmp_path / "groups.json")
    assert json.loads((tmp_path / "groups.json").read_text())["num_duplicate_groups"] == 2
    report.save_csv(tmp_path / "groups.csv")
    with open(tmp_path / "groups.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and rows[0] == {"group": "0", "size": "3", "path": "img_0.png", "label": "x"}
    assert b"\r" not in (tmp_path / "groups.csv").read_bytes()  # Unix line ends, like every other file written

    unlabelled = within_duplicates(DecodedImages(labelled.pixels, labelled.paths))
    assert unlabelled.num_mixed_label_groups is None and unlabelled.groups[0]["labels"] is None
    unlabelled.save_csv(tmp_path / "unlabelled.csv")
    train, test = group_stratified_split(None, report.group_ids, test_fraction=0.3)
    assert not set(np.asarray(report.group_ids)[train]) & set(np.asarray(report.group_ids)[test])


def test_command_line(base_images, tmp_path, capsys):
    train, test = tmp_path / "train", tmp_path / "test"
    for folder, images in ((train, base_images[:4]), (test, [VARIANTS["jpeg"](base_images[1]), base_images[8]])):
        for label in ("a", "b"):
            (folder / label).mkdir(parents=True)
        for i, image in enumerate(images):
            image.save(folder / "ab"[i % 2] / f"{i}.png")

    report = cli(["check-leakage", "--within", str(train), "--output", str(tmp_path / "out" / "within.json")])
    assert report.num_duplicate_groups == 0 and report.num_groups == 4
    assert (tmp_path / "out" / "within.json").is_file() and (tmp_path / "out" / "within.csv").is_file()
    assert "0 of 4 images are in 0 duplicate group(s)" in capsys.readouterr().out

    report = cli(["check-leakage", "--train", str(train), "--test", str(test), "--output", str(tmp_path / "out" / "leak.json")])
    assert (report.num_near, report.num_same_label, report.leaked_test_indices) == (1, 0, [0])
    assert json.loads((tmp_path / "out" / "leak.json").read_text())["num_different_label"] == 1
    assert "1 of 2 test images (50.0%) have a near-duplicate" in capsys.readouterr().out

    with pytest.raises(SystemExit):
        cli(["check-leakage", "--train", str(train)])
    assert "--train and --test go together" in capsys.readouterr().err


def test_group_stratified_split_takes_numpy_fractions():
    train, test = group_stratified_split([0, 1] * 10, list(range(20)), np.float32(0.2))
    assert len(test) == 4 and len(train) == 16  # "must be in (0, 1), got np.float32(0.2)" before


def test_fingerprints_and_exact_keys_take_arrays():
    """`fingerprint_images(array)` was refused ("must be a torch.Tensor"), where the rest of the leakage tools take
    arrays."""
    from mic_diffrep.leakage import exact_keys, fingerprint_images

    pixels = np.random.default_rng(0).integers(0, 256, (5, 1, 20, 20), dtype=np.uint8)
    torch.testing.assert_close(fingerprint_images(pixels), fingerprint_images(torch.from_numpy(pixels)))
    assert exact_keys(pixels) == exact_keys(torch.from_numpy(pixels))
    with pytest.raises(ValueError, match="must be a tensor or array of shape"):
        fingerprint_images([[1, 2], [3, 4]])


def test_a_long_near_duplicate_search_shows_its_progress(monkeypatch, capsys):
    """Grouping 100,000 images took minutes, three times per probe, with nothing shown."""
    import time

    from mic_diffrep.leakage import duplicate_groups, fingerprint_images, groups, search

    fingerprints = fingerprint_images(torch.rand(40, 1, 16, 16))
    block = groups._similarity_block
    monkeypatch.setattr(groups, "_similarity_block", lambda *args: time.sleep(0.3) or block(*args))  # slow blocks
    monkeypatch.setattr(search, "progress_interval", lambda: 0.1)  # as in a terminal
    assert len(duplicate_groups(fingerprints, block_size=8)) == 40  # 15 blocks
    assert "Grouping near-duplicates" in capsys.readouterr().err
    monkeypatch.setattr(groups, "_similarity_block", block)
    duplicate_groups(fingerprints, block_size=8)  # quick: no bar
    assert "Grouping near-duplicates" not in capsys.readouterr().err
