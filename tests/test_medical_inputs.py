"""DICOM and NIfTI files wherever images are accepted: folders, decoding, the pipeline, the image processor, the
command line and pretraining. Small synthetic files are written here with pydicom and nibabel."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import parse, synthetic_slice
from mic_diffrep import (DiffusionFeaturePipeline, MicDiffRepConfig, MicDiffRepForImageClassification,
                         MicDiffRepImageProcessor)
from mic_diffrep.commands import main as cli
from mic_diffrep.data import (BadImageError, DecodedImages, ImagePreprocessing, SliceSelection, decode_images,
                              image_to_pixels, load_image_folder, read_medical_slices, window_intensities)
from mic_diffrep.data.decoding import source_file
from mic_diffrep.data.medical import patient_keys
from mic_diffrep.features import ExtractionArguments
from mic_diffrep.inference import image_files
from mic_diffrep.models.mic_diffrep.preprocessing import as_image_list
from mic_diffrep.models.mic_diffrep.unet import UNET_PRESETS, create_scheduler, create_unet
from mic_diffrep.probing import ProbeArguments
from mic_diffrep.probing.splits import _merge_groups, _split_groups, patient_folder
from mic_diffrep.training import PretrainingArguments, pretrain


pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

from medical_files import write_dicom, write_nifti  # noqa: E402


def brain_volume(seed: int, size: int = 20, depth: int = 6) -> np.ndarray:
    """A `(size, size, depth)` NIfTI volume (RAS voxel order): empty first and last axial slices, a synthetic brain
    slice in between."""
    rng = np.random.default_rng(seed)
    volume = np.zeros((size, size, depth), dtype=np.float32)
    for z in range(1, depth - 1):
        volume[:, :, z] = synthetic_slice(z % 4, rng, size).T.astype(np.float32) * 4.0
    return volume


def frames_of(seed: int, count: int, size: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([synthetic_slice(k % 4, rng, size).astype(np.uint16) * 16 for k in range(count)])


def tiny_config() -> MicDiffRepConfig:
    return MicDiffRepConfig(unet_config=dict(UNET_PRESETS["tiny"], sample_size=16), timesteps=[5], hidden_size=8,
                            num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})


def tiny_model_folder(path) -> str:
    """A two-class model folder ("a", "b") of a random tiny UNet at 16 px, with its image processor."""
    torch.manual_seed(0)
    MicDiffRepForImageClassification(tiny_config()).save_pretrained(path)
    MicDiffRepImageProcessor(resolution=16).save_pretrained(path)
    return str(path)


@pytest.fixture
def mixed_folder(tmp_path):
    """Two classes mixing a PNG, single-frame DICOMs (one with a window), a 3-frame DICOM and a NIfTI volume (4
    non-empty axial slices of 6), one class with its DICOM series in a sub-folder.

    a: a.png (1), single.dcm (1, windowed), multi.dcm (3 frames)   -> 5 images
    b: b.png (1), series/one.dcm (1), vol.nii.gz (4 of 6 slices)  -> 6 images
    """
    root = tmp_path / "mixed"
    rng = np.random.default_rng(0)
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir(parents=True)
    PIL.Image.fromarray(synthetic_slice(0, rng)).save(root / "a" / "a.png")
    PIL.Image.fromarray(synthetic_slice(1, rng)).save(root / "b" / "b.png")
    write_dicom(root / "a" / "single.dcm", frames_of(1, 1)[0], WindowCenter=2000, WindowWidth=2000)
    write_dicom(root / "a" / "multi.dcm", frames_of(2, 3))
    write_dicom(root / "b" / "series" / "one.dcm", frames_of(3, 1)[0])
    write_nifti(root / "b" / "vol.nii.gz", brain_volume(4))
    return str(root)


def test_mixed_folder_loads_with_labels(mixed_folder):
    splits = load_image_folder(mixed_folder)
    assert list(splits) == ["train"]
    train = splits["train"]
    assert train.features["label"].names == ["a", "b"]
    rows = {os.path.relpath(item["path"], mixed_folder): label for item, label in zip(train["image"], train["label"])}
    assert rows == {"a/a.png": 0, "a/multi.dcm": 0, "a/single.dcm": 0, "b/b.png": 1, "b/series/one.dcm": 1,
                    "b/vol.nii.gz": 1}
    assert all(item["bytes"] is None and os.path.isabs(item["path"]) for item in train["image"])


def test_split_folders_and_loose_medical_files(tmp_path):
    root = tmp_path / "kaggle"
    write_dicom(root / "Training" / "x" / "1.dcm", frames_of(0, 1)[0])
    write_nifti(root / "Training" / "y" / "2.nii", brain_volume(1))
    write_dicom(root / "Testing" / "y" / "3.dcm", frames_of(2, 1)[0])
    splits = load_image_folder(str(root))
    assert sorted(splits) == ["test", "train"]
    assert splits["train"].features["label"].names == splits["test"].features["label"].names == ["x", "y"]
    assert splits["test"]["label"] == [1]

    loose = tmp_path / "loose"
    write_dicom(loose / "1.dcm", frames_of(0, 1)[0])
    write_nifti(loose / "2.nii.gz", brain_volume(1))
    dataset = load_image_folder(str(loose))
    assert list(dataset) == ["train"] and dataset["train"].num_rows == 2
    assert "label" not in dataset["train"].column_names

    with pytest.raises(ValueError, match=r"Split folder\(s\) \['Testing'\]"):
        (tmp_path / "half" / "Testing").mkdir(parents=True)
        write_dicom(tmp_path / "half" / "Training" / "x" / "1.dcm", frames_of(0, 1)[0])
        load_image_folder(str(tmp_path / "half"))
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match=r"No images found.*\.dcm.*\.nii\.gz"):
        load_image_folder(str(tmp_path / "none"))


def test_decode_expands_slices_with_ids_labels_and_windows(mixed_folder, tmp_path):
    train = load_image_folder(mixed_folder)["train"]
    cache = str(tmp_path / "cache")
    decoded = decode_images(train, 16, cache_dir=cache, show_progress=False)
    ids = [os.path.relpath(path, mixed_folder) for path in decoded.paths]
    assert ids == ["a/a.png", "a/multi.dcm#slice=0", "a/multi.dcm#slice=1", "a/multi.dcm#slice=2", "a/single.dcm",
                   "b/b.png", "b/series/one.dcm", "b/vol.nii.gz#slice=1", "b/vol.nii.gz#slice=2",
                   "b/vol.nii.gz#slice=3", "b/vol.nii.gz#slice=4"]
    assert decoded.pixels.shape == (11, 1, 16, 16) and decoded.pixels.dtype == torch.uint8
    assert decoded.labels.tolist() == [0] * 5 + [1] * 6 and decoded.label_names == ["a", "b"]
    assert source_file(decoded.paths[1]) == os.path.join(mixed_folder, "a", "multi.dcm")
    assert source_file(decoded.paths[0]) == decoded.paths[0]

    def resized(grey_uint8):  # what the preprocessing does after windowing
        return image_to_pixels(grey_uint8, 16, intensity_window="none")

    # The DICOM with a window uses it: (2000 - 1000, 2000 + 1000) -> 0..255, not the percentile rule.
    (windowed,) = read_medical_slices(os.path.join(mixed_folder, "a", "single.dcm"))
    assert windowed.window == (1000.0, 3000.0)
    assert torch.equal(decoded.pixels[4], resized(window_intensities(windowed.pixels, window=(1000.0, 3000.0))))
    assert not torch.equal(decoded.pixels[4], resized(window_intensities(windowed.pixels, "percentile")))
    # Slices without a window use the percentile rule on their physical values.
    frames = read_medical_slices(os.path.join(mixed_folder, "a", "multi.dcm"))
    for k, item in enumerate(frames):
        assert item.window is None
        assert torch.equal(decoded.pixels[1 + k], resized(window_intensities(item.pixels, "percentile")))
        assert torch.equal(decoded.pixels[1 + k], ImagePreprocessing(16)(item))
    # The cache round-trips the ids; another slice selection is another cache entry.
    again = decode_images(train, 16, cache_dir=cache, show_progress=False)
    assert again.paths == decoded.paths and torch.equal(again.pixels, decoded.pixels)
    everything = decode_images(train, 16, cache_dir=cache, show_progress=False,
                               slices=SliceSelection(skip_empty_slices=False))
    assert len(everything) == 13 and len(os.listdir(cache)) == 2
    assert everything.paths[7].endswith("vol.nii.gz#slice=0")


def test_slice_selection_changes_slice_counts(mixed_folder):
    volume = os.path.join(mixed_folder, "b", "vol.nii.gz")
    count = lambda **kw: len(decode_images([volume], 16, show_progress=False, slices=SliceSelection(**kw)))  # noqa
    assert count() == 4
    assert count(skip_empty_slices=False) == 6
    assert count(slice_range=(0, 3)) == 2  # slices 1, 2 (0 is empty)
    assert count(slice_range=(0, 3), skip_empty_slices=False) == 3
    assert count(slice_axis=0) == 20  # sagittal: every x column holds some brain
    ids = decode_images([volume], 16, show_progress=False, slices=SliceSelection(slice_range=(-3, -1))).paths
    assert ids == [f"{volume}#slice=3", f"{volume}#slice=4"]
    with pytest.raises(ValueError, match="slice_axis"):
        SliceSelection(slice_axis=3)
    with pytest.raises(ValueError, match="START STOP"):
        SliceSelection(slice_range=(1, 2, 3))


def test_bad_dicom_named_or_skipped(mixed_folder, tmp_path):
    bad = os.path.join(mixed_folder, "a", "broken.dcm")
    with open(bad, "wb") as f:
        f.write(b"not a DICOM file at all")
    empty = write_nifti(os.path.join(mixed_folder, "b", "empty.nii"), np.zeros((4, 4, 3), dtype=np.float32))
    train = load_image_folder(mixed_folder)["train"]
    cache = str(tmp_path / "cache")
    with pytest.raises(BadImageError, match=r"broken\.dcm.*--skip_bad_images"):
        decode_images(train, 16, cache_dir=cache, show_progress=False)
    assert len(os.listdir(cache)) == 1  # the whole decode, its unreadable files listed: the rerun below reads it
    decoded = decode_images(train, 16, skip_bad_images=True, cache_dir=cache, show_progress=False)
    assert sorted(item["path"] for item in decoded.skipped) == [bad, empty]  # zero slices left: a bad file
    assert "no slice left" in next(item["error"] for item in decoded.skipped if item["path"] == empty)
    assert len(decoded) == 11 and not any("broken" in path or "empty" in path for path in decoded.paths)


def test_pipeline_and_processor_take_nifti_paths(mixed_folder):
    volume = os.path.join(mixed_folder, "b", "vol.nii.gz")
    multi = os.path.join(mixed_folder, "a", "multi.dcm")
    png = os.path.join(mixed_folder, "a", "a.png")
    assert len(as_image_list(volume)) == 4 and len(as_image_list([png, volume, multi])) == 8

    torch.manual_seed(0)
    pipe = DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler())
    pipe.set_progress_bar_config(disable=True)
    out = pipe.extract_features([volume, png], timesteps=[5], layers=["mid_block"])
    assert out.features[("mid_block", 5)].shape[0] == 5  # 4 slices + 1 image
    decoded = decode_images([volume, png], pipe.preprocessing, show_progress=False)
    assert torch.equal(pipe.prepare_pixels([volume, png]), decoded.pixels)
    assert out.image_ids == decoded.paths and "vol.nii.gz#slice=" in out.image_ids[0]  # rows back to files
    assert pipe.extract_features(decoded.pixels[:1], timesteps=[5], layers=["mid_block"],
                                 preprocessed=True).image_ids == [None]
    sagittal = SliceSelection(slice_axis=0, slice_range=(5, 8))
    out = pipe.extract_features([volume], timesteps=[5], layers=["mid_block"], slices=sagittal)
    assert out.image_ids == [f"{volume}#slice={k}" for k in (5, 6, 7)]
    assert torch.equal(pipe.prepare_pixels([volume], slices=sagittal),
                       decode_images([volume], pipe.preprocessing, show_progress=False, slices=sagittal).pixels)

    processor = MicDiffRepImageProcessor(resolution=16)
    pixel_values = processor(volume, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (4, 1, 16, 16)
    decoded = decode_images([volume], 16, show_progress=False)
    assert torch.allclose(pixel_values, decoded.pixels.float() / 127.5 - 1, atol=1e-6)
    assert processor([multi, png], return_tensors="pt")["pixel_values"].shape == (4, 1, 16, 16)
    # do_resize=False takes the file window too.
    (single,) = read_medical_slices(os.path.join(mixed_folder, "a", "single.dcm"))
    unresized = processor(os.path.join(mixed_folder, "a", "single.dcm"), do_resize=False, resolution=20,
                          do_normalize=False, do_rescale=False)["pixel_values"]
    assert torch.equal(unresized[0, 0].to(torch.uint8),
                       torch.from_numpy(window_intensities(single.pixels, window=single.window)))


def test_check_leakage_and_predict_commands(mixed_folder, tmp_path, capsys):
    cli(["check-leakage", "--within", mixed_folder, "--resolution", "16", "--output", str(tmp_path / "leak.json")])
    printed = capsys.readouterr().out
    assert "of 11 images" in printed
    report = json.loads((tmp_path / "leak.json").read_text())
    assert report["num_images"] == 11
    cli(["check-leakage", "--within", mixed_folder, "--resolution", "16", "--keep_empty_slices",
         "--slice_range", "0", "5"])
    assert "of 12 images" in capsys.readouterr().out  # vol.nii.gz: slices 0..4 instead of 1..4

    model_dir = tiny_model_folder(tmp_path / "model")
    assert len(image_files([mixed_folder])) == 6
    cli(["predict", "--model", model_dir, mixed_folder, "--json"])
    predictions = json.loads(capsys.readouterr().out)
    assert len(predictions) == 11
    files = [os.path.relpath(p["file"], mixed_folder) for p in predictions]
    assert "a/multi.dcm#slice=2" in files and "b/vol.nii.gz#slice=4" in files and "a/single.dcm" in files
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in predictions)
    volume = os.path.join(mixed_folder, "b", "vol.nii.gz")
    cli(["predict", "--model", model_dir, volume, "--json", "--slice_range", "2", "4"])
    assert [p["file"] for p in json.loads(capsys.readouterr().out)] == [f"{volume}#slice=2", f"{volume}#slice=3"]
    cli(["evaluate", "--model", model_dir, "--data_dir", mixed_folder, "--json"])
    assert json.loads(capsys.readouterr().out)["num_examples"] == 11


def test_medical_image_classification_pipeline_takes_dicom_and_nifti(mixed_folder, tmp_path, capsys):
    from transformers import pipeline

    model_dir = tiny_model_folder(tmp_path / "model")
    single, volume = os.path.join(mixed_folder, "a", "single.dcm"), os.path.join(mixed_folder, "b", "vol.nii.gz")
    predicted = {p["file"]: p["probabilities"] for p in cli(["predict", "--model", model_dir, single, volume])}
    capsys.readouterr()

    classify = pipeline("medical-image-classification", model=model_dir)
    scores = classify(single, top_k=2)  # one slice: one list of scores, as the image-classification pipeline gives
    assert {p["label"]: p["score"] for p in scores} == pytest.approx(predicted[single], abs=1e-5)
    slices = classify(volume, top_k=2)  # a volume: one list per non-empty slice, in predict's order
    assert len(slices) == 4
    for k, scores in zip(range(1, 5), slices):
        assert {p["label"]: p["score"] for p in scores} == pytest.approx(predicted[f"{volume}#slice={k}"], abs=1e-5)
        assert [p["slice"] for p in scores] == [k, k]  # slice 0 is empty: positions are not slice indices
    assert all("slice" not in p for p in classify(single, top_k=2))  # one image: nothing to match
    with pytest.raises(ValueError, match="vol.nii.gz: a file of 4 slices needs batch_size=1"):
        classify([single, volume], batch_size=2)
    assert len(classify(volume, batch_size=2)) == 4  # one input: nothing to mix up
    # A file of slices gives a list per slice even when one is kept, so the output's shape follows the input's kind
    one = pipeline("medical-image-classification", model=model_dir,
                   image_processor=MicDiffRepImageProcessor(resolution=16, slice_range=[2, 3]))
    kept = one(volume, top_k=2)
    assert len(kept) == 1 and isinstance(kept[0], list) and kept[0][0]["slice"] == 2


def test_medical_pipeline_scores_every_image_of_a_batch_input(tmp_path):
    # A datasets.Dataset, a 4-D tensor or a 4-D array reached `preprocess` as one input: every image was scored,
    # then only the first one's scores were returned.
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature
    from transformers import pipeline

    model_dir = tiny_model_folder(tmp_path / "model")
    rng = np.random.default_rng(0)
    grey = [synthetic_slice(k % 2, rng, size=16) for k in range(4)]
    files = []
    for k, image in enumerate(grey):
        files.append(str(tmp_path / f"{k}.png"))
        PIL.Image.fromarray(image).save(files[-1])
    classify = pipeline("medical-image-classification", model=model_dir)
    expected = [{p["label"]: p["score"] for p in classify(f, top_k=2)} for f in files]
    dataset = Dataset.from_dict({"image": files}, features=Features({"image": ImageFeature()}))
    batches = {"dataset": classify(dataset, top_k=2), "dataset, batch_size 3": classify(dataset, top_k=2, batch_size=3),
               "tensor": classify(torch.from_numpy(np.stack(grey))[:, None], top_k=2),
               "array": classify(np.stack(grey)[..., None], top_k=2)}
    for name, scores in batches.items():
        assert len(scores) == 4, name
        for one, want in zip(scores, expected):
            assert {p["label"]: p["score"] for p in one} == pytest.approx(want, abs=1e-5), name
            assert all("slice" not in p for p in one), name  # a batch's images are not slices of a file
    with pytest.raises(ValueError, match="a batch of 4 images needs batch_size=1"):
        classify([np.stack(grey)[..., None], grey[0]], batch_size=2)
    with pytest.raises(ValueError, match="needs an `image` column"):
        classify(dataset.rename_column("image", "scan"))
    with pytest.raises(ValueError, match="holds no images"):  # transformers' IndexError before
        classify(dataset.select([]))


def test_a_model_reads_volumes_with_the_slices_it_was_probed_on(mixed_folder, tmp_path, capsys):
    # A model probed on sagittal slices was scored on axial ones by predict, evaluate and the pipelines.
    from mic_diffrep.probing.export import write_model_folder

    volume = os.path.join(mixed_folder, "b", "vol.nii.gz")
    args = parse(ProbeArguments, ["--pretrained", "P", "--data_dir", mixed_folder, "--output_dir", str(tmp_path / "m"),
                                  "--slice_axis", "0", "--slice_range", "5", "8"])

    class Extractor:  # the part of a feature extractor that write_model_folder uses
        preprocessing = ImagePreprocessing(16)

        def classifier(self, *args):
            return MicDiffRepForImageClassification(tiny_config())

    results = json.load(open(os.path.join(os.path.dirname(__file__), "data", "probe_results.json")))
    probe = type("Probe", (), {"head": None, "mean": None, "std": None})
    assert write_model_folder(Extractor(), probe, results, ["a", "b"], args)
    processor = MicDiffRepImageProcessor.from_pretrained(tmp_path / "m")
    assert processor.slice_settings == {"slice_axis": 0, "slice_range": [5, 8], "keep_empty_slices": False}
    assert processor(volume)["pixel_values"].shape[0] == 3

    sagittal = [f"{volume}#slice={k}" for k in (5, 6, 7)]
    assert [p["file"] for p in cli(["predict", "--model", str(tmp_path / "m"), volume])] == sagittal
    axial = cli(["predict", "--model", str(tmp_path / "m"), volume, "--slice_axis", "2", "--slice_range", "0", "6"])
    assert [p["file"] for p in axial] == [f"{volume}#slice={k}" for k in (1, 2, 3, 4)]
    axial = cli(["predict", "--model", str(tmp_path / "m"), volume, "--slice_axis", "2"])  # the sagittal range goes
    assert [p["file"] for p in axial] == [f"{volume}#slice={k}" for k in (1, 2, 3, 4)]
    assert cli(["evaluate", "--model", str(tmp_path / "m"), "--data_dir", mixed_folder, "--json"])[
        "num_examples"] == 5 + 2 + 3  # folder a; b.png and one.dcm; 3 sagittal slices of vol.nii.gz
    capsys.readouterr()

    # The image processor and the medical pipeline take one call's slice options as predict does: another axis
    # dropped the range only in predict (the processor kept the sagittal range on the axial axis: 2 slices), and
    # the pipeline refused them (TypeError: unexpected keyword argument 'slice_range')
    assert processor(volume, slice_axis=2)["pixel_values"].shape[0] == 4
    assert processor(volume, slice_range=(None, None))["pixel_values"].shape[0] == len(
        cli(["predict", "--model", str(tmp_path / "m"), volume, "--slice_range", "0", "1000"]))
    capsys.readouterr()
    from transformers import pipeline

    classify = pipeline("medical-image-classification", model=str(tmp_path / "m"))
    assert len(classify(volume)) == 3
    assert len(classify(volume, slice_axis=2)) == 4 and len(classify(volume, slice_axis=2, slice_range=(2, 4))) == 2


def test_pretraining_on_dicom_and_nifti_only(tmp_path):
    root = tmp_path / "scans"
    write_dicom(root / "multi.dcm", frames_of(0, 4))
    write_nifti(root / "vol.nii.gz", brain_volume(1))
    args = parse(PretrainingArguments, [
        "--train_data_dir", str(root), "--output_dir", str(tmp_path / "out"), "--resolution", "16",
        "--model_config_name_or_path", "tiny", "--train_batch_size", "4", "--logger", "none",
        "--save_images_epochs", "100", "--ddpm_num_inference_steps", "2", "--eval_batch_size", "2",
        "--max_train_steps", "2", "--keep_empty_slices"])
    assert args.slices == SliceSelection(skip_empty_slices=False)
    summary = pretrain(args)
    assert summary["num_images"] == 4 + 6 and summary["global_step"] == 2
    assert os.path.isfile(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")


def test_dicom_files_without_an_extension_are_images(tmp_path, capsys):
    # PACS exports name files IM0000 or by UID; the class of such files disappeared without a word.
    root = tmp_path / "noext"
    write_dicom(root / "a" / "IM0000", frames_of(1, 1)[0])
    write_dicom(root / "a" / "1.2.840.113619.2.55.3", frames_of(2, 1)[0])
    write_dicom(root / "b" / "IM0000.DCM", frames_of(3, 1)[0])
    (root / "a" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")  # an index, not an image
    (root / "b" / "notes").write_text("not an image")
    dataset = load_image_folder(str(root))["train"]
    assert dataset.features["label"].names == ["a", "b"] and dataset.num_rows == 3
    decoded = decode_images(dataset, 16, show_progress=False)
    assert decoded.pixels.shape == (3, 1, 16, 16) and decoded.labels.tolist() == [0, 0, 1]
    torch.testing.assert_close(MicDiffRepImageProcessor(resolution=16)(str(root / "a" / "IM0000"))["pixel_values"],
                               decode_images([str(root / "a" / "IM0000")], 16, show_progress=False).pixels.float()
                               / 127.5 - 1)


def test_run_says_before_pretraining_when_no_test_split_can_be_carved(tmp_path, capsys):
    # Two volumes per class and no Testing/ folder: 4 groups, none of which can be 20% of the images.
    for label, seeds in (("a", (1, 2)), ("b", (3, 4))):
        for seed in seeds:
            write_nifti(tmp_path / "vols" / label / f"vol{seed}.nii.gz", brain_volume(seed))
    with pytest.raises(SystemExit) as error:
        cli(["run", "--data_dir", str(tmp_path / "vols"), "--output_dir", str(tmp_path / "out"), "--resolution", "16"])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.value.code == 2 and "Cannot carve --test_split 0.2 from 4 images in 4 group(s)" in message
    assert "a Testing/ folder beside Training/" in message and "test_fraction" not in message
    assert not (tmp_path / "out").exists()  # nothing pretrained

    # With a Testing/ folder, the validation part carved from Training/ needs enough volumes too
    for label, seeds in (("a", (1, 2)), ("b", (3, 4))):
        for split, seed in zip(("Training", "Testing"), seeds):
            write_nifti(tmp_path / "split" / split / label / f"vol{seed}.nii.gz", brain_volume(seed))
    with pytest.raises(SystemExit):
        cli(["run", "--data_dir", str(tmp_path / "split"), "--output_dir", str(tmp_path / "out2"), "--resolution",
             "16"])
    message = capsys.readouterr().err  # a Testing/ folder is there: it was suggested, and does not help
    assert "Cannot carve --validation_split" in message and "a Testing/ folder" not in message
    assert not (tmp_path / "out2").exists()


def test_slice_flags_on_every_settings_class():
    for cls, required in ((PretrainingArguments, ["--train_data_dir", "D"]),
                          (ExtractionArguments, ["--pretrained", "P", "--data_dir", "D", "--output", "O"]),
                          (ProbeArguments, ["--pretrained", "P", "--data_dir", "D"])):
        assert parse(cls, required).slices == SliceSelection()
        args = parse(cls, [*required, "--slice_axis", "1", "--slice_range", "2", "-1", "--keep_empty_slices"])
        assert args.slices == SliceSelection(slice_axis=1, slice_range=(2, -1), skip_empty_slices=False)
        with pytest.raises(ValueError, match="START STOP"):
            parse(cls, [*required, "--slice_range", "2"])
        with pytest.raises(ValueError, match="slice_axis"):
            parse(cls, [*required, "--slice_axis", "5"])
        with pytest.raises(ValueError, match="`slice_range` 5 2 keeps no slice"):  # was blamed on each file
            parse(cls, [*required, "--slice_range", "5", "2"])
    assert SliceSelection(slice_range=(-2, 5)).slice_range == (-2, 5)  # depends on the volume: allowed
    with pytest.raises(ValueError, match="keeps no slice"):
        SliceSelection(slice_range=(-3, 0))


def test_carved_splits_keep_the_slices_of_a_file_together():
    groups = np.array([0, 1, 2, 3, 1])  # images 1 and 4 are near-duplicates
    files = [["a.png"], ["v.nii#0"], ["v.nii#0"], ["b.png"], ["c.png"]]  # images 1 and 2 are slices of one file
    assert _merge_groups(groups, files).tolist() == [0, 1, 1, 2, 1]
    assert _merge_groups(np.array([0, 1, 0]), [["x"], ["y"], ["z"]]).tolist() == [0, 1, 0]
    # keys of two kinds: "p" joins images 0 and 3, "s" images 3 and 4
    assert _merge_groups(np.arange(5), [["a", "p"], ["b"], ["c"], ["d", "p", "s"], ["e", "s"]]).tolist() == [
        0, 1, 2, 0, 0]


def test_carved_splits_keep_a_patient_folder_together():
    rng = np.random.default_rng(0)
    paths = [f"/d/{c}/patient{p}/IM{k}.dcm" for c in ("a", "b") for p in range(3) for k in range(4)]
    labels = torch.tensor([0] * 12 + [1] * 12)
    decoded = DecodedImages(torch.from_numpy(rng.integers(0, 256, (24, 1, 16, 16), dtype=np.uint8)), paths, labels,
                            ["a", "b"])
    groups = _split_groups(decoded, 0.99)
    assert len(set(groups.tolist())) == 6  # one group per patient (the random images are no near-duplicates)
    assert all(groups[i] == groups[4 * (i // 4)] for i in range(24))
    assert patient_folder("/d/a/vol.nii.gz#slice=2", "a") == "/d/a/vol.nii.gz"  # a file right in its class folder


def test_carved_splits_keep_the_dicom_files_of_a_patient_together(tmp_path):
    """Single-frame DICOM files loose in their class folders (one file a slice, as scanners write them) were split by
    file: every patient had slices on both sides of a carved test split."""
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for label, name in enumerate(("glioma", "notumor")):
        for patient in range(4):
            series = f"1.2.826.0.1.{label}.{patient}"
            for k in range(5):
                paths.append(write_dicom(tmp_path / name / f"{series}.{k}", rng.integers(0, 4000, (16, 16)),
                                         PatientID=f"PID-{name}-{patient}", SeriesInstanceUID=series))
                labels.append(label)
    (tmp_path / "glioma" / "sub-09_T1w.nii.gz").write_bytes(b"")  # a BIDS name: its subject is its patient
    assert patient_keys(paths[0]) == ["dicom-PatientID:PID-glioma-0", "dicom-SeriesInstanceUID:1.2.826.0.1.0.0"]
    assert patient_keys(tmp_path / "glioma" / "sub-09_T1w.nii.gz") == ["bids:sub-09"]
    decoded = DecodedImages(torch.from_numpy(rng.integers(0, 256, (40, 1, 16, 16), dtype=np.uint8)), paths,
                            torch.tensor(labels), ["glioma", "notumor"])
    groups = _split_groups(decoded, 0.99)
    assert len(set(groups.tolist())) == 8 and all(groups[i] == groups[5 * (i // 5)] for i in range(40))
    # a PatientID that anonymisation made the same in every class folder joins nothing (it joined all into one group)
    anonymised = [write_dicom(tmp_path / "anon" / name / f"{k}.dcm", rng.integers(0, 4000, (16, 16)),
                              PatientID="ANONYMOUS", SeriesInstanceUID=f"1.2.{label}.{k}")
                  for label, name in enumerate(("glioma", "notumor")) for k in range(5)]
    decoded = DecodedImages(torch.from_numpy(rng.integers(0, 256, (10, 1, 16, 16), dtype=np.uint8)), anonymised,
                            torch.tensor([0] * 5 + [1] * 5), ["glioma", "notumor"])
    assert len(set(_split_groups(decoded, 0.99).tolist())) == 10
    # subjects numbered per class: sub-01 of glioma and sub-01 of notumor are two patients, each kept whole
    bids = []
    for name in ("glioma", "notumor"):
        for subject, run in [(1, 0), (1, 1), (2, 0), (3, 0), (4, 0), (5, 0)]:
            bids.append(tmp_path / "bids" / name / f"sub-{subject:02d}_run-{run}_T1w.png")
            bids[-1].parent.mkdir(parents=True, exist_ok=True)
            bids[-1].write_bytes(b"")
    decoded = DecodedImages(torch.from_numpy(rng.integers(0, 256, (12, 1, 16, 16), dtype=np.uint8)),
                            [str(path) for path in bids], torch.tensor([0] * 6 + [1] * 6), ["glioma", "notumor"])
    groups = _split_groups(decoded, 0.99).tolist()
    assert groups[0] == groups[1] and groups[6] == groups[7] and groups[0] != groups[6] and len(set(groups)) == 10
    # a PatientID left empty by anonymisation joins nothing; the series still does
    blank = write_dicom(tmp_path / "x" / "blank", rng.integers(0, 4000, (16, 16)), PatientID="",
                        SeriesInstanceUID="1.2.3")
    assert patient_keys(blank) == ["dicom-SeriesInstanceUID:1.2.3"]


def test_nan_background_and_one_slice_paths(tmp_path):
    volume = brain_volume(0, depth=3)
    volume[volume == 0] = np.nan  # a masked volume: NaN outside the brain
    path = write_nifti(tmp_path / "masked.nii.gz", volume)
    decoded = decode_images([path], 16, show_progress=False)
    assert len(decoded) == 1 and decoded.paths == [f"{path}#slice=1"]
    assert decoded.pixels.max() == 255  # windowed on the finite values
    flat = write_nifti(tmp_path / "flat.nii", brain_volume(0, depth=3)[:, :, 1])  # a 2-D file: plain path
    assert decode_images([flat], 16, show_progress=False).paths == [flat]
    assert torch.equal(image_to_pixels(flat, 16), decode_images([flat], 16, show_progress=False).pixels[0])


def test_extract_and_probe_slice_volumes_as_pretraining_did_unless_told_otherwise(tmp_path):
    """`pretrain --slice_axis 0 --slice_range 4 12` then `probe` without slice flags read axial slices (axis 2,
    every one) and exported a classifier slicing them so: the pipeline folder did not record its slices."""
    for label, seeds in (("a", (1, 2, 3)), ("b", (4, 5, 6))):
        for seed in seeds:  # no slice empty, none a near-duplicate of another
            volume = np.random.default_rng(seed).random((16, 16, 6)).astype(np.float32) * 100 + 1
            write_nifti(tmp_path / "vols" / label / f"vol{seed}.nii.gz", volume)
    pretrained = tmp_path / "pretrained"
    pretrain(parse(PretrainingArguments, [
        "--train_data_dir", str(tmp_path / "vols"), "--output_dir", str(pretrained), "--resolution", "16",
        "--model_config_name_or_path", "tiny", "--train_batch_size", "4", "--logger", "none", "--max_train_steps",
        "1", "--save_images_epochs", "100", "--slice_axis", "0", "--slice_range", "4", "12"]))
    pipe = DiffusionFeaturePipeline.from_pretrained(pretrained)
    assert pipe.slices == SliceSelection(slice_axis=0, slice_range=(4, 12))
    volume = str(tmp_path / "vols" / "a" / "vol1.nii.gz")
    assert len(pipe.extract_features([volume], timesteps=[5]).image_ids) == 8  # sagittal slices 4..11

    def extracted(*flags):
        output = tmp_path / f"features{len(flags)}.safetensors"
        cli(["extract", "--pretrained", str(pretrained), "--data_dir", str(tmp_path / "vols"), "--output",
             str(output), "--timesteps", "5", *flags])
        return json.loads(__import__("safetensors").safe_open(str(output), "pt").metadata()["image_ids"])

    assert len(extracted()) == 6 * 8
    assert len(extracted("--slice_axis", "2")) == 6 * 6  # another axis: the pretraining's range left out
    cli(["probe", "--pretrained", str(pretrained), "--data_dir", str(tmp_path / "vols"), "--output_dir",
         str(tmp_path / "model"), "--timesteps", "5", "--num_epochs", "1", "--hidden_size", "8", "--test_split",
         "0.34", "--validation_split", "0.5"])
    processor = MicDiffRepImageProcessor.from_pretrained(tmp_path / "model")
    assert processor.slice_settings == {"slice_axis": 0, "slice_range": [4, 12], "keep_empty_slices": False}


def test_a_pretrainings_empty_slices_can_be_turned_off_in_extract(tmp_path):
    """A model pretrained with `--keep_empty_slices` kept them in `extract` and `probe` for good: the flag was a plain
    bool, which could only turn the setting on."""
    for label, seed in (("a", 1), ("b", 2)):
        write_nifti(tmp_path / "vols" / label / f"vol{seed}.nii.gz", brain_volume(seed))
    pretrained = tmp_path / "pretrained"
    pretrain(parse(PretrainingArguments, [
        "--train_data_dir", str(tmp_path / "vols"), "--output_dir", str(pretrained), "--resolution", "16",
        "--model_config_name_or_path", "tiny", "--train_batch_size", "4", "--logger", "none", "--max_train_steps",
        "1", "--save_images_epochs", "100", "--keep_empty_slices"]))

    def extracted(*flags):
        output = tmp_path / f"features{len(flags)}.safetensors"
        cli(["extract", "--pretrained", str(pretrained), "--data_dir", str(tmp_path / "vols"), "--output",
             str(output), "--timesteps", "5", *flags])
        return json.loads(__import__("safetensors").safe_open(str(output), "pt").metadata()["image_ids"])

    every_slice, non_empty = extracted(), extracted("--keep_empty_slices", "false")
    assert len(every_slice) == 2 * 6 and 0 < len(non_empty) < len(every_slice)  # brain_volume has empty slices
    assert extracted("--keep_empty_slices") == every_slice
    args = parse(ProbeArguments, ["--pretrained", "P", "--data_dir", "D", "--keep_empty_slices", "false"])
    assert args.keep_empty_slices is False and parse(ProbeArguments, ["--pretrained", "P", "--data_dir", "D"]
                                                      ).keep_empty_slices is None  # unset: the model's


def test_slices_of_another_type_are_named(tmp_path):
    """`extract_features(paths, slices=(2, 4))` raised "AttributeError: 'tuple' object has no attribute 'read'"."""
    path = write_nifti(tmp_path / "vol.nii.gz", brain_volume(1))
    with pytest.raises(TypeError, match=r"`slices` must be a `mic_diffrep.data.SliceSelection` .* got \(2, 4\)"):
        DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).extract_features([path], slices=(2, 4))


def test_extracting_features_of_volumes_holds_one_volume_at_a_time(tmp_path, monkeypatch):
    """`pipe.extract_features(volume_paths)` read every slice of every volume at full resolution (float64) before
    preprocessing any: 700 MB for 1,200 slices of 256 x 256, about 26 GB for 50,000."""
    from mic_diffrep.models.mic_diffrep import preprocessing

    paths = [write_nifti(tmp_path / f"vol{seed}.nii.gz", brain_volume(seed)) for seed in (1, 2)]
    pipe = DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler())
    pipe.set_progress_bar_config(disable=True)
    expected = pipe.extract_features(paths, timesteps=[5], layers=["mid_block"])
    events = []
    read, preprocess = preprocessing.read_medical_file, type(pipe.preprocessing).__call__
    monkeypatch.setattr(preprocessing, "read_medical_file", lambda *args: events.append("read") or read(*args))
    monkeypatch.setattr(type(pipe.preprocessing), "__call__",
                        lambda self, image: events.append("slice") or preprocess(self, image))
    out = pipe.extract_features(paths, timesteps=[5], layers=["mid_block"])
    first_volume = len(expected.image_ids) - sum(1 for i in expected.image_ids if i.startswith(paths[1]))
    assert events == ["read"] + ["slice"] * first_volume + ["read"] + ["slice"] * (len(out.image_ids) - first_volume)
    assert out.image_ids == expected.image_ids
    torch.testing.assert_close(out.features[("mid_block", 5)], expected.features[("mid_block", 5)])


def test_dicom_and_nifti_files_held_as_bytes_in_a_dataset_are_read_as_those_files(mixed_folder, tmp_path,
                                                                                  monkeypatch):
    """A `datasets` record of a NIfTI / DICOM file's bytes (a `save_to_disk` or Hub dataset) was read from the local
    file its name gave, an unrelated one, without a word; without such a file its bytes went to PIL and failed."""
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    volume, multi = os.path.join(mixed_folder, "b", "vol.nii.gz"), os.path.join(mixed_folder, "a", "multi.dcm")
    records = [{"bytes": open(path, "rb").read(), "path": name}
               for path, name in ((volume, "vol.nii.gz"), (multi, None))]  # a DICOM without a name: its preamble
    dataset = Dataset.from_dict({"image": records}, features=Features({"image": ImageFeature(decode=False)}))
    # another vol.nii.gz where the record's relative name points
    write_nifti(str(tmp_path / "vol.nii.gz"), brain_volume(seed=9))
    monkeypatch.chdir(tmp_path)

    expected = decode_images([volume, multi], 16)
    decoded = decode_images(dataset, 16)
    assert decoded.paths == ["vol.nii.gz#slice=1", "vol.nii.gz#slice=2", "vol.nii.gz#slice=3", "vol.nii.gz#slice=4",
                             "<bytes #1>#slice=0", "<bytes #1>#slice=1", "<bytes #1>#slice=2"]
    torch.testing.assert_close(decoded.pixels, expected.pixels, rtol=0, atol=0)

    torch.manual_seed(0)
    pipe = DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler())
    from_records = pipe.extract_features(dataset, timesteps=[5], layers=["mid_block"])
    from_files = pipe.extract_features([volume, multi], timesteps=[5], layers=["mid_block"])
    torch.testing.assert_close(from_records.features[("mid_block", 5)], from_files.features[("mid_block", 5)])
    assert from_records.image_ids[0] == "vol.nii.gz#slice=1" and len(from_records.image_ids) == 7
    assert from_records.image_ids[4] == "<bytes #1>#slice=0"  # as decode_images names an unnamed record's slices
    # a record that cannot be read is named, not the temporary file it was read from
    cut = Dataset.from_dict({"image": [{"bytes": records[0]["bytes"][:200], "path": "cut.nii.gz"}]},
                            features=Features({"image": ImageFeature(decode=False)}))
    with pytest.raises(Exception, match=r"cut\.nii\.gz") as error:
        pipe.extract_features(cut, timesteps=[5], layers=["mid_block"])
    assert "mic-diffrep-" not in str(error.value)
