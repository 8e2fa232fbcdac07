import os
import pathlib
import shutil

import pytest
import torch

from conftest import write_class_folder
from mic_diffrep.data import PretrainingDataset, decode_images, find_split_folders, load_image_folder, select_splits


def test_unlabelled_folder_is_one_train_split(unlabelled_folder):
    dataset = load_image_folder(unlabelled_folder)
    assert list(dataset) == ["train"] and dataset["train"].num_rows == 24
    assert "label" not in dataset["train"].column_names


def test_kaggle_layout_becomes_train_and_test(kaggle_folder):
    assert find_split_folders(kaggle_folder) == {"test": "Testing", "train": "Training"}
    dataset = load_image_folder(kaggle_folder)
    assert dataset["train"].num_rows == 24 and dataset["test"].num_rows == 8
    assert dataset["train"].features["label"].names == ["glioma", "meningioma", "notumor", "pituitary"]


def test_class_folders_with_patient_sub_folders_keep_the_class_labels(tmp_path):
    # imagefolder labels a file by its own folder: glioma/patient1/x.png became class "patient1"
    for name in ("glioma", "notumor"):
        for patient in ("patient1", "patient2"):
            write_class_folder(tmp_path / "nested" / "Training" / name, per_class=2, seed=1, classes=[patient])
    dataset = load_image_folder(str(tmp_path / "nested"))["train"]
    assert dataset.features["label"].names == ["glioma", "notumor"] and dataset.num_rows == 8
    for item, label in zip(dataset["image"], dataset["label"]):
        assert os.path.relpath(item["path"], tmp_path / "nested" / "Training").split(os.sep)[0] == \
            dataset.features["label"].names[label]

    # One class with a sub-folder: still labelled by class folders (it had no labels at all)
    write_class_folder(tmp_path / "one", per_class=2, seed=2, classes=["a", "b"])
    write_class_folder(tmp_path / "one" / "b", per_class=2, seed=3, classes=["extra"])
    dataset = load_image_folder(str(tmp_path / "one"))["train"]
    assert dataset.features["label"].names == ["a", "b"] and sorted(dataset["label"]) == [0, 0, 1, 1, 1, 1]


def test_pretrain_splits_never_take_test_unless_asked(kaggle_folder):
    dataset = load_image_folder(kaggle_folder)
    chosen, data = select_splits(dataset, None)
    assert chosen == ["train"] and data.num_rows == 24
    assert all("Testing" not in item["path"] for item in data["image"])
    chosen, data = select_splits(dataset, ["all"])
    assert sorted(chosen) == ["test", "train"] and data.num_rows == 32
    with pytest.raises(ValueError, match="validation"):
        select_splits(dataset, ["validation"])


def test_decode_cache_round_trip(kaggle_folder, tmp_path, caplog):
    dataset = load_image_folder(kaggle_folder)["train"]
    first = decode_images(dataset, 16, cache_dir=str(tmp_path / "cache"))
    assert len(os.listdir(tmp_path / "cache")) == 1
    second = decode_images(dataset, 16, cache_dir=str(tmp_path / "cache"))
    assert torch.equal(first.pixels, second.pixels) and torch.equal(first.labels, second.labels)
    assert first.paths == second.paths and first.label_names == second.label_names
    other = decode_images(dataset, 8, cache_dir=str(tmp_path / "cache"))
    assert other.pixels.shape[-1] == 8  # other settings: another cache entry, not the stale one
    # A damaged cache file (a run killed while the disk was full, a truncated copy) failed every later run with a
    # SafetensorError: it is decoded again and rewritten
    for cache_file in (tmp_path / "cache").iterdir():
        cache_file.write_bytes(cache_file.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="mic_diffrep.data.decoding"):
        again = decode_images(dataset, 16, cache_dir=str(tmp_path / "cache"))
    assert torch.equal(first.pixels, again.pixels) and "cannot be read" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="mic_diffrep.data.decoding"):
        assert torch.equal(decode_images(dataset, 16, cache_dir=str(tmp_path / "cache")).pixels, first.pixels)
    assert "Loaded" in caplog.text  # rewritten


def test_a_file_replaced_with_the_same_size_and_time_is_decoded_anew(tmp_path):
    """The decode cache was keyed by each file's size and modification time: an image replaced in place by one of the
    same size, its time kept (`cp -p`, `rsync -a`, a corrected release unpacked), was read stale from the cache."""
    import numpy as np
    import PIL.Image

    from mic_diffrep.data import images_fingerprint

    path = tmp_path / "a.bmp"  # uncompressed: every 16 x 16 grey image has the same size
    PIL.Image.fromarray(np.tile(np.arange(16, dtype=np.uint8) * 16, (16, 1))).save(path)
    first = decode_images([str(path)], 16, cache_dir=str(tmp_path / "cache"), show_progress=False)
    assert first.fingerprint == images_fingerprint([str(path)], 16)
    stat = os.stat(path)
    PIL.Image.fromarray(255 - np.asarray(PIL.Image.open(path))).save(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    again = decode_images([str(path)], 16, cache_dir=str(tmp_path / "cache"), show_progress=False)
    assert not torch.equal(first.pixels, again.pixels) and again.fingerprint != first.fingerprint
    assert torch.equal(again.pixels, decode_images([str(path)], 16, show_progress=False).pixels)


def test_a_file_name_with_a_line_break_is_refused_by_name(kaggle_folder):
    """`glioma/new\\nline.png` was written across two lines of the probe's test_images.txt, which `evaluate
    --image_list` then could not find."""
    glioma = os.path.join(kaggle_folder, "Testing", "glioma")
    shutil.copy(os.path.join(glioma, sorted(os.listdir(glioma))[0]), os.path.join(glioma, "new\nline.png"))
    with pytest.raises(ValueError, match=r"new\\nline.png': a file or folder name with a line break .* rename it"):
        load_image_folder(kaggle_folder)


def test_mirrored_images_keep_their_ids_and_labels(kaggle_folder):
    decoded = decode_images(load_image_folder(kaggle_folder)["train"], 16)
    mirrored = decoded.mirrored()
    assert torch.equal(mirrored.pixels, decoded.pixels.flip(-1)) and not torch.equal(mirrored.pixels, decoded.pixels)
    assert mirrored.paths == decoded.paths and torch.equal(mirrored.labels, decoded.labels)


def test_pretraining_dataset_order_is_seeded_per_epoch():
    pixels = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    dataset = PretrainingDataset(pixels, seed=3)
    dataset.shuffle_for_epoch(1)
    epoch1 = [dataset[i]["index"].item() for i in range(10)]
    dataset.shuffle_for_epoch(2)
    assert [dataset[i]["index"].item() for i in range(10)] != epoch1
    dataset.shuffle_for_epoch(1)
    assert [dataset[i]["index"].item() for i in range(10)] == epoch1
    assert sorted(epoch1) == list(range(10))


def test_empty_folder_error_names_it(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_image_folder(str(tmp_path))


def test_datasets_image_columns_decoded_or_not_are_read_alike(kaggle_folder, tmp_path):
    from datasets import load_dataset

    from mic_diffrep import DiffusionFeaturePipeline, MicDiffRepImageProcessor, create_scheduler, create_unet

    ours = load_image_folder(kaggle_folder)["train"].select(range(5))  # image column not decoded: path dicts
    theirs = load_dataset("imagefolder", data_dir=os.path.join(kaggle_folder, "Training"),  # its cache: not the user's
                          cache_dir=str(tmp_path / "datasets-cache"))["train"].select(range(5))
    a, b = decode_images(ours, 16, show_progress=False), decode_images(theirs, 16, show_progress=False)
    assert torch.equal(a.pixels, b.pixels) and a.paths == b.paths and a.label_names == b.label_names

    processor = MicDiffRepImageProcessor(resolution=16)
    expected = processor([item["path"] for item in ours["image"]])["pixel_values"]
    assert torch.equal(processor(ours[:5]["image"])["pixel_values"], expected)
    assert torch.equal(processor(theirs[:5]["image"])["pixel_values"], expected)  # decoded PIL images

    pipe = DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler())
    pipe.set_progress_bar_config(disable=True)
    for dataset in (ours, theirs):
        out = pipe.extract_features(dataset, timesteps=[5], layers=["mid_block"])
        assert out.image_ids == a.paths and out.features[("mid_block", 5)].shape[0] == 5


def test_split_words_in_file_names_do_not_split_a_folder(tmp_path):
    # imagefolder, given a data_dir, guesses splits from file names: one file named dupe_in_train.jpg became the
    # folder's only image, and scan_test_7.jpg an unlabelled "test" split.
    write_class_folder(tmp_path / "folder", per_class=4, seed=0, classes=["glioma", "notumor"])
    os.rename(tmp_path / "folder" / "glioma" / "glioma_0_0.png", tmp_path / "folder" / "glioma" / "dupe_in_train.png")
    os.rename(tmp_path / "folder" / "notumor" / "notumor_0_0.png", tmp_path / "folder" / "notumor" / "scan_test_7.png")
    dataset = load_image_folder(str(tmp_path / "folder"))
    assert list(dataset) == ["train"] and dataset["train"].num_rows == 8
    assert dataset["train"].features["label"].names == ["glioma", "notumor"]


def test_a_wrapper_folder_is_read_through_and_deep_trees_say_how_they_are_labelled(tmp_path, caplog):
    write_class_folder(tmp_path / "download" / "brain-mri", per_class=2, seed=0, classes=["glioma", "notumor"])
    dataset = load_image_folder(str(tmp_path / "download"))["train"]  # it had no labels at all
    assert dataset.features["label"].names == ["glioma", "notumor"] and dataset.num_rows == 4

    for site in ("siteA", "siteB"):
        write_class_folder(tmp_path / "sites" / site, per_class=2, seed=1, classes=["glioma", "notumor"])
    with caplog.at_level("WARNING"):
        dataset = load_image_folder(str(tmp_path / "sites"))["train"]
    assert dataset.features["label"].names == ["siteA", "siteB"]  # the documented rule: the folder under the root
    assert "give one of them as the data folder" in caplog.text  # and it says so


def test_hub_style_records_are_read_from_their_bytes(kaggle_folder, tmp_path, monkeypatch):
    # A dataset from the Hub holds the original file name (no such file here) and the image's bytes.
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    from mic_diffrep import MicDiffRepImageProcessor

    local = load_image_folder(kaggle_folder)["train"].select(range(3))
    records = [{"path": os.path.basename(item["path"]), "bytes": open(item["path"], "rb").read()}
               for item in local["image"]]
    hub = Dataset.from_dict({"image": records}, features=Features({"image": ImageFeature()}))
    expected = decode_images(local, 16, show_progress=False).pixels
    assert torch.equal(decode_images(hub, 16, show_progress=False, cache_dir=str(tmp_path / "c")).pixels, expected)
    processed = MicDiffRepImageProcessor(resolution=16)(hub)["pixel_values"]
    torch.testing.assert_close(processed, expected.float() / 127.5 - 1, atol=1e-6, rtol=0)

    # Two datasets whose records share names but not bytes do not share the decoded-image cache ...
    other = load_image_folder(kaggle_folder)["train"].select(range(3, 6))
    expected_other = decode_images(other, 16, show_progress=False).pixels
    renamed = [{"path": record["path"], "bytes": open(item["path"], "rb").read()}
               for record, item in zip(records, other["image"])]
    hub_other = Dataset.from_dict({"image": renamed}, features=Features({"image": ImageFeature()}))
    assert torch.equal(decode_images(hub_other, 16, show_progress=False, cache_dir=str(tmp_path / "c")).pixels,
                       expected_other)
    # ... and a local file that happens to bear a record's name is not read in place of its bytes (datasets decodes
    # the bytes too).
    monkeypatch.chdir(tmp_path)
    for record, item in zip(records, other["image"]):
        shutil.copy(item["path"], tmp_path / record["path"])
    assert torch.equal(decode_images(hub, 16, show_progress=False).pixels, expected)
    processed = MicDiffRepImageProcessor(resolution=16)(hub)["pixel_values"]
    torch.testing.assert_close(processed, expected.float() / 127.5 - 1, atol=1e-6, rtol=0)


def test_a_dataset_with_plain_integer_labels_decodes(kaggle_folder):
    """`decode_images` assumed a ClassLabel: "'Value' object has no attribute 'names'"."""
    import pathlib

    import datasets

    files = sorted(str(p) for p in pathlib.Path(kaggle_folder, "Testing").rglob("*.png"))[:2]
    dataset = datasets.Dataset.from_dict({"image": files, "label": [0, 1]}).cast_column("image", datasets.Image())
    decoded = decode_images(dataset, 16, show_progress=False)
    assert decoded.labels.tolist() == [0, 1] and decoded.label_names == ["0", "1"]
    assert torch.equal(decode_images(files[0], 16, show_progress=False).pixels, decoded.pixels[:1])  # one path


def test_class_folders_that_are_links_are_read(tmp_path):
    """Class folders made as symbolic links (a split built from links) gave "No images found": neither the walk nor
    `imagefolder` follows links to folders. A link to a folder above it is read once, not forever."""
    write_class_folder(tmp_path / "real", per_class=3, seed=0, size=20, classes=("a", "b"))
    (tmp_path / "linked").mkdir()
    for name in ("a", "b"):
        os.symlink(tmp_path / "real" / name, tmp_path / "linked" / name)
    os.symlink(tmp_path / "linked", tmp_path / "real" / "a" / "loop")
    dataset = load_image_folder(str(tmp_path / "linked"))["train"]
    assert dataset.features["label"].names == ["a", "b"] and dataset.num_rows == 6
    assert sorted(os.path.basename(item["path"]) for item in dataset["image"]) == sorted(
        name for name in os.listdir(tmp_path / "real" / "a") + os.listdir(tmp_path / "real" / "b")
        if name.endswith(".png"))  # each once, the loop link's folder not again
    # two class folders linking to one folder: both classes read (one vanished), a loop through two links ends
    (tmp_path / "same").mkdir()
    for name in ("a", "b"):
        os.symlink(tmp_path / "real" / "a", tmp_path / "same" / name)
    os.symlink(tmp_path / "real" / "b", tmp_path / "real" / "a" / "to_b")
    os.symlink(tmp_path / "real" / "a", tmp_path / "real" / "b" / "to_a")
    dataset = load_image_folder(str(tmp_path / "same"))["train"]
    assert dataset.features["label"].names == ["a", "b"] and sorted(dataset["label"]).count(0) == sorted(
        dataset["label"]).count(1) > 0


def test_images_beside_split_folders_are_named_not_left_out(tmp_path):
    """`normal/` and `abnormal/` beside a `test/` folder were left out without a word: the probe trained on the few
    test images and reported accuracy 1.000 on two of them."""
    write_class_folder(tmp_path / "data", per_class=4, seed=0, size=20, classes=("normal", "abnormal"))
    write_class_folder(tmp_path / "data" / "test", per_class=2, seed=1, size=20, classes=("normal", "abnormal"))
    (tmp_path / "data" / "README.md").write_text("not an image")  # the rest of a dataset's files do not count
    with pytest.raises(ValueError, match=r"has split folders \(test\) and images beside them \(abnormal, normal\), "
                                         r"which would be left out"):
        load_image_folder(str(tmp_path / "data"))


def test_a_loose_image_beside_class_folders_is_named_when_labels_are_needed(tmp_path):
    """One stray image at the root leaves the folder unlabelled (as `imagefolder` reads it); the probe then said
    only "has no labels", though the class folders were there."""
    from mic_diffrep.data import check_labelled

    write_class_folder(tmp_path / "data", per_class=3, seed=0, size=20, classes=("a", "b"))
    shutil.copy(tmp_path / "data" / "a" / "a_0_0.png", tmp_path / "data" / "overview.png")
    dataset = load_image_folder(str(tmp_path / "data"))["train"]
    with pytest.raises(ValueError, match="Image files sit loose beside the class folders.* move .*overview.png into "
                                         "a class folder"):
        check_labelled(dataset, "data")
    with pytest.raises(ValueError, match=r"has no labels: .*notumor/\*.jpg\).$"):  # loose images only: no hint
        check_labelled(load_image_folder(str(tmp_path / "data" / "a"))["train"], "a")


def test_hidden_folders_in_split_folders_are_not_missing_classes(tmp_path, caplog):
    """`train/.ipynb_checkpoints/` was warned about, three times, as a class missing from the test split."""
    write_class_folder(tmp_path / "data" / "train", per_class=2, seed=0, size=20, classes=("a", "b"))
    write_class_folder(tmp_path / "data" / "test", per_class=1, seed=1, size=20, classes=("a", "b"))
    (tmp_path / "data" / "train" / ".ipynb_checkpoints").mkdir()
    with caplog.at_level("WARNING"):
        dataset = load_image_folder(str(tmp_path / "data"))
    assert dataset["train"].features["label"].names == ["a", "b"] and "missing from" not in caplog.text


def test_class_names_from_a_mac_match_and_numbered_classes_say_their_order(tmp_path, caplog):
    """A test folder copied from a Mac (folder names decomposed, NFD) had classes "the model does not know" that
    look the same as its own; numbered class folders 0, 1, 10, 2 made label 2 class "10" without a word."""
    import unicodedata

    name = "mälignant 腫瘍"
    write_class_folder(tmp_path / "data" / "Training", per_class=2, seed=0, size=20, classes=("benign", name))
    write_class_folder(tmp_path / "data" / "Testing", per_class=1, seed=1, size=20,
                       classes=("benign", unicodedata.normalize("NFD", name)))
    splits = load_image_folder(str(tmp_path / "data"))
    assert splits["test"].features["label"].names == splits["train"].features["label"].names == ["benign", name]

    write_class_folder(tmp_path / "graded", per_class=1, seed=0, size=20, classes=("0", "1", "10", "2"))
    with caplog.at_level("WARNING"):
        names = load_image_folder(str(tmp_path / "graded"))["train"].features["label"].names
    assert names == ["0", "1", "10", "2"]  # as datasets and torchvision order them
    assert "label 2 is class '10', not '2'. Leading zeros (00, 01, 02, 10)" in caplog.text


def test_reading_a_folder_writes_nothing_to_the_datasets_cache(kaggle_folder, tmp_path, monkeypatch):
    """Every folder read through `imagefolder` left an Arrow cache and a lock file in the `datasets` cache (7,573 of
    them on the machine this was found on), never removed."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    splits = load_image_folder(kaggle_folder)
    assert set(splits) == {"train", "test"} and splits["train"].features["label"].names[0] == "glioma"
    assert not (tmp_path / "datasets-cache").exists() or not any((tmp_path / "datasets-cache").rglob("*"))


def test_reading_every_file_for_the_decode_cache_shows_progress_when_it_takes_a_while(kaggle_folder, tmp_path,
                                                                                        monkeypatch, capsys):
    """The decode cache's key reads every byte of every file (100 GB for 200,000 DICOM files) before anything else,
    with no progress shown."""
    import time

    from mic_diffrep.data import decoding

    digest = decoding._file_digest
    monkeypatch.setattr(decoding, "_file_digest", lambda path: time.sleep(0.1) or digest(path))  # a slow disk
    monkeypatch.setattr(decoding, "progress_interval", lambda: 0.1)  # as in a terminal
    paths = [str(path) for path in sorted(pathlib.Path(kaggle_folder).rglob("*.png"))]  # 32 files: over 3 s
    decode_images(paths, 16, cache_dir=str(tmp_path / "cache"))
    assert "Checking the decode cache" in capsys.readouterr().err
    monkeypatch.setattr(decoding, "_file_digest", digest)
    decode_images(paths[:3], 16, cache_dir=str(tmp_path / "cache"))  # quick: no bar
    assert "Checking the decode cache" not in capsys.readouterr().err


def test_every_image_format_imagefolder_read_is_read(tmp_path):
    """.jfif, .jpe, .tga, ... files (web-scraped datasets have them), which `imagefolder` read, were left out without
    a word once folders were scanned."""
    import PIL.Image

    write_class_folder(tmp_path / "data", per_class=1, seed=0, size=20, classes=("a", "b"))
    for name, fmt in (("x.jfif", "JPEG"), ("y.tga", "TGA"), ("z.jpe", "JPEG")):
        PIL.Image.new("L", (20, 20), 100).save(tmp_path / "data" / "a" / name, format=fmt)
    dataset = load_image_folder(str(tmp_path / "data"))["train"]
    assert sorted(os.path.basename(item["path"]) for item in dataset["image"]) == [
        "a_0_0.png", "b_0_0.png", "x.jfif", "y.tga", "z.jpe"]
    assert decode_images(dataset, 16).pixels.shape[0] == 5


def test_colour_images_are_said_to_be_read_as_grey(tmp_path, caplog):
    """A folder of colour images (a dermoscopy or histology set) was read as grey without a word; grey slices saved as
    RGB JPEGs (as many of the brain MRI set are) are not colour images."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    PIL.Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "grey_as_rgb.jpg", quality=75)
    PIL.Image.fromarray(grey).save(tmp_path / "grey.png")
    colour = np.stack([grey, 255 - grey, grey // 2], axis=-1)
    PIL.Image.fromarray(colour).save(tmp_path / "skin.png")
    files = [str(tmp_path / name) for name in ("grey_as_rgb.jpg", "grey.png")]
    with caplog.at_level("WARNING", logger="mic_diffrep.data.decoding"):
        decode_images(files, 16, show_progress=False)
    assert "colour" not in caplog.text
    with caplog.at_level("WARNING", logger="mic_diffrep.data.decoding"):
        decode_images(files + [str(tmp_path / "skin.png")], 16, show_progress=False)
    assert f"1 of 3 images are in colour (their channels differ; e.g. {tmp_path / 'skin.png'})" in caplog.text


def test_files_left_out_and_deep_class_trees_are_said_once(tmp_path, caplog):
    """Files that are not images (a DICOM file without extension or preamble, a note) were left out without a word,
    so a class of such files vanished; the class/patient warning was said on every read of the folder (three times
    in a run)."""
    write_class_folder(tmp_path / "data" / "a" / "patient1", per_class=2, seed=0, classes=["x"])
    write_class_folder(tmp_path / "data" / "b" / "patient2", per_class=2, seed=1, classes=["y"])
    (tmp_path / "data" / "b" / "IM0001").write_bytes(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100")  # DICOM, no preamble
    (tmp_path / "data" / "notes.txt").write_text("scanner settings")
    with caplog.at_level("WARNING", logger="mic_diffrep.data.folders"):
        for _ in range(3):
            load_image_folder(str(tmp_path / "data"))
    assert caplog.text.count("Images sit below their class folders") == 1
    assert caplog.text.count(f"2 file(s) in {tmp_path / 'data'} are not images read here and are left out (e.g. "
                             f"{tmp_path / 'data' / 'b' / 'IM0001'})") == 1


def test_a_datasets_dataset_is_saved_as_the_image_folder_every_command_reads(tmp_path, caplog):
    """A `datasets` user's data (a save_to_disk folder, Parquet files, an imagefolder labelled by metadata.csv) had
    no way in: the commands warned its files were "not images" and found no images."""
    import numpy as np
    import PIL.Image
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value, load_from_disk

    from mic_diffrep.commands import main as cli
    from mic_diffrep.data import save_image_folder

    write_class_folder(tmp_path / "classes", per_class=3, seed=0)
    folder = load_image_folder(str(tmp_path / "classes"))["train"]  # path records, a ClassLabel
    records = [{"path": item["path"], "bytes": open(item["path"], "rb").read()} for item in folder["image"]]
    diagnosis = [folder.features["label"].int2str(label) for label in folder["label"]]  # a string column
    embedded = Dataset.from_dict({"scan": records, "diagnosis": diagnosis},
                                 features=Features({"scan": Image(), "diagnosis": Value("string")}))
    DatasetDict(train=embedded.select(range(0, 12, 2)), val=embedded.select(range(1, 12, 2))).save_to_disk(
        str(tmp_path / "saved"))

    with pytest.raises(ValueError, match=r"is a `datasets` save_to_disk folder, not an image folder: load it with "
                                         r"`datasets` .*save_image_folder"):
        load_image_folder(str(tmp_path / "saved"))
    with pytest.raises(SystemExit):
        cli(["predict", "--model", "m", str(tmp_path / "saved")])

    saved = load_from_disk(str(tmp_path / "saved"))
    out = save_image_folder(saved, str(tmp_path / "out"), image_column="scan", label_column="diagnosis")
    splits = load_image_folder(out)
    assert sorted(splits) == ["train", "validation"] and splits["train"].features["label"].names == sorted(
        set(diagnosis))
    by_name = {os.path.basename(item["path"]): (item["path"], label)
               for split in splits.values() for item, label in zip(split["image"], split["label"])}
    for record, name in zip(records, diagnosis):  # every file as it was stored, in its class folder
        path, label = by_name[os.path.basename(record["path"])]
        assert open(path, "rb").read() == record["bytes"]
        assert splits["train"].features["label"].int2str(label) == name

    # in-memory images: 16-bit arrays stay 16-bit; a ClassLabel names the folders; nothing is overwritten
    arrays = [np.full((8, 8), 1000 * (k + 1), dtype=np.uint16) for k in range(2)]
    memory = Dataset.from_dict({"image": arrays, "label": [0, 1]},
                               features=Features({"image": Image(), "label": ClassLabel(names=["a", "b"])}))
    save_image_folder(memory, str(tmp_path / "memory"))  # a Dataset: the train split
    written = tmp_path / "memory" / "train" / "b"
    assert np.asarray(PIL.Image.open(written / os.listdir(written)[0])).max() == 2000
    for kwargs, error in (({"image_column": "img"}, r"no image column 'img': its columns are \['image', 'label'\]"),
                          ({"label_column": "diagnosis"}, r"no label column 'diagnosis'")):
        with pytest.raises(ValueError, match=error):
            save_image_folder(memory, str(tmp_path / "other"), **kwargs)
    with pytest.raises(FileExistsError, match="not an empty folder"):
        save_image_folder(memory, str(tmp_path / "memory"))
    with pytest.raises(ValueError, match=r"Split 'holdout' is none of the splits"):
        save_image_folder(DatasetDict(holdout=memory), str(tmp_path / "other"))

    # an imagefolder's metadata.csv: its label column is not read, and the warning says how to use it
    (tmp_path / "classes" / "metadata.csv").write_text("file_name,grade\n")
    with caplog.at_level("WARNING", logger="mic_diffrep.data.folders"):
        load_image_folder(str(tmp_path / "classes"))
    assert "metadata.csv is an imagefolder metadata file, whose columns are not read" in caplog.text
    assert "save_image_folder" in caplog.text
    (tmp_path / "classes" / "state.json").write_text("{}")  # another tool's file beside the classes: still images
    assert len(load_image_folder(str(tmp_path / "classes"))["train"]) == 12
    embedded.to_parquet(str(tmp_path / "data.parquet"))
    with pytest.raises(ValueError, match="is a Parquet / Arrow file, not an image folder"):
        load_image_folder(str(tmp_path / "data.parquet"))


def test_decode_images_and_the_pipeline_take_common_dataset_shapes_or_name_the_column(tmp_path):
    """A dataset with its images under another name, string labels or a column of paths crashed in decode_images
    (KeyError 'image', "can only concatenate str", "'str' object has no attribute 'get'"); an IterableDataset made
    by `from_generator` (no features) failed in the pipeline on `None` column names."""
    import PIL.Image
    from datasets import Dataset, IterableDataset

    from mic_diffrep import DiffusionFeaturePipeline
    from mic_diffrep.models.mic_diffrep.unet import create_scheduler, create_unet

    write_class_folder(tmp_path / "classes", per_class=2, seed=0)
    paths = sorted(str(p) for p in (tmp_path / "classes").rglob("*.png"))
    by_path = decode_images(paths, 16)
    as_strings = decode_images(Dataset.from_dict({"image": paths, "label": [0, 1] * (len(paths) // 2)}), 16)
    torch.testing.assert_close(as_strings.pixels, by_path.pixels, rtol=0, atol=0)
    assert as_strings.paths == by_path.paths
    with pytest.raises(ValueError, match=r"needs an `image` column, got \['img'\]: `dataset.rename_column"):
        decode_images(Dataset.from_dict({"img": paths}), 16)
    with pytest.raises(ValueError, match=r"The `label` column holds str values \('glioma'\).*class_encode_column"):
        decode_images(Dataset.from_dict({"image": paths, "label": ["glioma"] * len(paths)}), 16)

    torch.manual_seed(0)
    pipe = DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler())
    streamed = IterableDataset.from_generator(lambda: ({"image": PIL.Image.open(p)} for p in paths))
    features = pipe.extract_features(streamed, timesteps=[5], layers=["mid_block"])
    expected = pipe.extract_features(paths, timesteps=[5], layers=["mid_block"])
    torch.testing.assert_close(features.features[("mid_block", 5)], expected.features[("mid_block", 5)])


def test_save_image_folder_writes_every_image_where_it_is_read_back_or_refuses_the_row(tmp_path):
    """A renamed image replaced another, hidden names were written and then skipped on reading, classes named `__x`
    or like splits (`train`) read back as something else, and files that are no images were copied."""
    import io

    import numpy as np
    import PIL.Image
    from datasets import Dataset, Features, Image, Value

    from mic_diffrep.data import save_image_folder

    def png(value):
        buffer = io.BytesIO()
        PIL.Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    names = ["a.png", "a-000002.png", "a.png", ".hidden.png", "..", "b\nc.png", "case.12", "sub-01.ses_1"]
    records = [{"bytes": png(10 * (k + 1)), "path": name} for k, name in enumerate(names)]
    features = Features({"image": Image(), "label": Value("string")})
    save_image_folder(Dataset.from_dict({"image": records, "label": ["x"] * len(names)}, features=features),
                      str(tmp_path / "out"))
    read = load_image_folder(str(tmp_path / "out"))["train"]
    values = sorted(int(np.asarray(PIL.Image.open(item["path"])).max()) for item in read["image"])
    assert values == [10, 20, 30, 40, 50, 60, 70, 80]  # every row, none replaced, none hidden or of another kind
    # classes named like splits read back as classes (a Dataset is the train split), and so do the images of one
    for labels in (["train", "test"], ["x"]):
        folder = tmp_path / "-".join(labels)
        save_image_folder(Dataset.from_dict({"image": records[:2], "label": (labels * 2)[:2]}, features=features),
                          str(folder))
        read = load_image_folder(str(folder))
        assert list(read) == ["train"] and len(read["train"]) == 2
        if len(labels) > 1:
            assert read["train"].features["label"].names == ["test", "train"]
    for labels, error in ((["__x"], "Row 0's class '__x' would be a hidden folder"),
                          (["b\nc"], "Row 0's class .* holds a path separator or a control character"),
                          (["x" * 300], "Row 0's class .* too long"), (["a:b"], "Row 0's class 'a:b' holds a character"),
                          (["nul"], "Row 0's class 'nul' is a name Windows reserves"),
                          (["Glioma", "glioma"], "Row 1's class 'glioma' and the class 'Glioma' differ only in case")):
        with pytest.raises(ValueError, match=error):
            save_image_folder(Dataset.from_dict({"image": records[:len(labels)], "label": labels}, features=features),
                              str(tmp_path / "refused"))
        assert not (tmp_path / "refused").exists()
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"Row 1's image .*notes.txt' is not an image file"):
        save_image_folder(Dataset.from_dict({"image": [str(tmp_path / "x" / "train" / "x" / "a.png"),
                                                       str(tmp_path / "notes.txt")]}), str(tmp_path / "refused"),
                          label_column=None)
    assert not (tmp_path / "refused").exists()  # the image written before the bad row is gone with its folder
