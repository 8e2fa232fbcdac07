import json
import os
import subprocess
import sys

import evaluate
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import UNet2DModel
from transformers import AutoImageProcessor, AutoModelForImageClassification

from conftest import parse, write_class_folder
from mic_diffrep import DiffusionFeaturePipeline
from mic_diffrep.probing import ProbeArguments, run_probe as main
from mic_diffrep.reporting import Accuracy, MacroF1, PerClassRecall, classification_report  # the public names
from mic_diffrep.probing import ProbeConfig, msfa_candidates, run_probes, train_heads
from mic_diffrep.features import DiffusionFeatureExtractor, load_features
from mic_diffrep.models.mic_diffrep.unet import create_scheduler, create_unet


def test_metric_modules_work_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    predictions, references = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0]
    report = classification_report(predictions, references, ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(4 / 6)
    # F1 per class: a: P=1/2 R=1/2 -> 0.5; b: P=1 R=1/2 -> 2/3; c: P=2/3 R=1 -> 0.8
    assert report["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    assert report["per_class_recall"] == pytest.approx({"a": 0.5, "b": 0.5, "c": 1.0})
    assert report["confusion_matrix"] == [[1, 0, 1], [1, 1, 0], [0, 0, 2]]
    combined = evaluate.combine([Accuracy(keep_in_memory=True), MacroF1(keep_in_memory=True)])
    assert combined.compute(predictions=predictions, references=references)["accuracy"] == pytest.approx(4 / 6)
    assert np.isnan(PerClassRecall(keep_in_memory=True).compute(predictions=[0], references=[0], num_labels=2)
                    ["per_class_recall"][1])
    # -1 (datasets' missing label) was counted as the last class, and a perfect score came out
    from mic_diffrep.reporting.metrics import ConfusionMatrix

    with pytest.raises(ValueError, match=r"class indices 0 or above, got \[-1\]"):
        Accuracy(keep_in_memory=True).compute(predictions=[0, 1], references=[0, -1])
    for metric in (Accuracy, MacroF1, PerClassRecall, ConfusionMatrix):  # Accuracy took no num_labels
        with pytest.raises(ValueError, match=r"class indices 0 or above, got \[-1\]"):
            metric(keep_in_memory=True).compute(predictions=[0, 1, 2, 2], references=[0, 1, 2, -1])
        with pytest.raises(ValueError, match=r"class indices \[0, 2\), got \[3\]"):
            metric(keep_in_memory=True).compute(predictions=[0, 3], references=[0, 1], num_labels=2)
    # Without examples a score is undefined: macro F1 said 0.0 (a real score) where accuracy said NaN
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # and accuracy's NaN came with numpy's "Mean of empty slice"
        empty = classification_report([], [], ["a", "b"])
    assert np.isnan(empty["accuracy"]) and np.isnan(empty["macro_f1"]) and empty["num_examples"] == 0


def synthetic_features(num, seed):
    """Layer 'good' separates the classes at t=10; layer 'noise' is noise; t=20 is a weaker copy."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num) % 3
    centres = torch.eye(3, 6) * 4
    good = centres[labels] + torch.randn(num, 6, generator=g)
    features = {
        ("good", 10): good, ("good", 20): good * 0.2 + torch.randn(num, 6, generator=g),
        ("noise", 10): torch.randn(num, 5, generator=g), ("noise", 20): torch.randn(num, 5, generator=g),
    }
    return features, labels


def test_sweep_and_msfa_select_on_validation_and_score_test():
    train, train_labels = synthetic_features(150, 0)
    test, test_labels = synthetic_features(60, 1)
    validation = torch.arange(150) % 5 == 0
    results, probes = run_probes(train, train_labels, test, test_labels, ["x", "y", "z"], validation,
                                 ProbeConfig(num_epochs=10, train_batch_size=16, hidden_size=16), ["good", "noise"], [10, 20])
    assert len(results["single_layer"]) == 4
    assert (results["sl_best"]["layer"], results["sl_best"]["timestep"]) == ("good", 10)
    assert results["sl_best"]["test"]["all"]["accuracy"] > 0.9
    assert results["msfa"]["test"]["all"]["accuracy"] > 0.9
    noise = {(r["layer"], r["timestep"]): r["test_accuracy"] for r in results["single_layer"]}[("noise", 10)]
    assert noise < 0.6
    assert results["num_train"] == 120 and results["num_validation"] == 30 and results["num_test"] == 60
    assert {r["timestep"] for r in results["msfa_per_timestep"]} == {10, 20}


def test_validation_given_as_indices_and_bad_masks():
    # ~indices trained on negative indices: num_train came out -1453 and every score was of the wrong images
    train, train_labels = synthetic_features(150, 0)
    test, test_labels = synthetic_features(60, 1)
    config = ProbeConfig(num_epochs=2, train_batch_size=16, hidden_size=8)
    mask = torch.arange(150) % 5 == 0
    by_mask, _ = run_probes(train, train_labels, test, test_labels, ["x", "y", "z"], mask, config, ["good"], [10])
    by_index, _ = run_probes(train, train_labels, test, test_labels, ["x", "y", "z"], torch.nonzero(mask)[:, 0].numpy(),
                             config, ["good"], [10])
    assert by_index == by_mask and by_mask["num_train"] == 120
    with pytest.raises(ValueError, match="pass it as a bool mask"):
        run_probes(train, train_labels, test, test_labels, ["x", "y", "z"], mask.long(), config, ["good"], [10])
    with pytest.raises(ValueError, match="shape"):
        run_probes(train, train_labels, test, test_labels, ["x", "y", "z"], mask[:100], config, ["good"], [10])


def test_training_heads_leaves_the_callers_random_state_alone():
    features, labels = synthetic_features(60, 0)
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    train_heads(features, labels, 3, ProbeConfig(num_epochs=1, train_batch_size=16))
    assert torch.equal(torch.rand(1), expected)


def test_heads_trained_together_equal_heads_trained_alone():
    features, labels = synthetic_features(60, 0)
    config = ProbeConfig(num_epochs=3, train_batch_size=16)
    together = train_heads(features, labels, 3, config)
    alone = train_heads({("good", 10): features[("good", 10)]}, labels, 3, config)
    torch.testing.assert_close(together[("good", 10)].head.classifier.weight, alone[("good", 10)].head.classifier.weight)


def test_random_flip_trains_on_the_mirror_images_half_the_time():
    features, labels = synthetic_features(60, 0)
    config = ProbeConfig(num_epochs=3, train_batch_size=16)
    flipping = ProbeConfig(num_epochs=3, train_batch_size=16, random_flip=True)
    plain = train_heads(features, labels, 3, config)[("good", 10)].head.classifier.weight
    # mirror images with the same features: the same batches, the same heads
    same = train_heads(features, labels, 3, flipping, mirrored=features)[("good", 10)].head.classifier.weight
    torch.testing.assert_close(same, plain)
    # mirror images that carry no class: the heads learn from about half the views
    noise = {key: torch.randn_like(value) for key, value in features.items()}
    mixed = train_heads(features, labels, 3, flipping, mirrored=noise)[("good", 10)]
    assert not torch.allclose(mixed.head.classifier.weight, plain)
    assert 0.6 < (mixed.predict(features[("good", 10)]) == labels).float().mean() <= 1.0
    with pytest.raises(ValueError, match="random_flip"):
        train_heads(features, labels, 3, flipping)
    with pytest.raises(ValueError, match="train_features_mirrored"):
        run_probes(features, labels, features, labels, ["x", "y", "z"], torch.arange(60) % 5 == 0, flipping,
                   ["good", "noise"], [10, 20])


def test_msfa_candidates_are_layer_by_timestep_products():
    sl = {("a", 1): 0.9, ("b", 1): 0.5, ("a", 2): 0.8, ("b", 2): 0.4}
    candidates = msfa_candidates(sl, ["a", "b"], [1, 2])
    assert (("a", "b"), (1,)) in candidates and (("a", "b"), (1, 2)) in candidates
    assert len(candidates) == len(set(candidates))


@pytest.fixture
def probe_setup(tmp_path):
    data = tmp_path / "data"
    write_class_folder(data / "Training", per_class=10, seed=1)
    write_class_folder(data / "Testing", per_class=4, seed=2)
    torch.manual_seed(0)
    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(tmp_path / "pipe")
    return tmp_path


def probe_args(root, *extra, overwrite=True):
    """A probe of `root`'s pipeline into `root / "out"`, replacing an earlier probe there (its caches are reused)."""
    return parse(ProbeArguments, ["--pretrained", str(root / "pipe"), "--data_dir", str(root / "data"), "--output_dir",
                       str(root / "out"), "--timesteps", "5", "50", "--hidden_size", "16", "--num_epochs", "5",
                       "--batch_size", "16", *extra] + (["--overwrite_output_dir"] if overwrite else []))


def test_a_probe_into_an_earlier_probes_folder_is_refused_and_never_mixes_them(probe_setup, monkeypatch):
    """A second probe overwrote the first one's files one by one: a baseline's probe (results only) left the earlier
    diffusion classifier beside its results, and `evaluate` scored that classifier."""
    from mic_diffrep.training import BaselinePretrainingArguments, pretrain_baseline

    out = probe_setup / "out"
    first = main(probe_args(probe_setup, overwrite=False))
    written = {name: (out / name).read_bytes() for name in ("results.json", "config.json", "model.safetensors")}
    # --resolution sets a CLIP model's input size: another one for a diffusion pipeline was silently ignored
    with pytest.raises(ValueError, match="--resolution 32: .*pipe was pretrained at 16 px"):
        main(probe_args(probe_setup, "--resolution", "32"))
    with pytest.raises(ValueError, match="holds an earlier probe's outputs \\(results.json, config.json, "
                                         "model.safetensors\\).*--overwrite_output_dir"):
        main(probe_args(probe_setup, "--seed", "1", overwrite=False))

    def failing(*args, **kwargs):
        raise RuntimeError("probe training failed")

    with monkeypatch.context() as patch:  # a replacing probe that fails leaves the earlier one whole
        patch.setattr("mic_diffrep.probing.probe.run_probes", failing)
        with pytest.raises(RuntimeError):
            main(probe_args(probe_setup, "--seed", "1"))
    assert {name: (out / name).read_bytes() for name in written} == written

    baseline = str(probe_setup / "byol")
    pretrain_baseline(parse(BaselinePretrainingArguments, [
        "--method", "byol", "--train_data_dir", str(probe_setup / "data"), "--output_dir", baseline, "--resolution",
        "16", "--train_batch_size", "8", "--max_train_steps", "1", "--logger", "none"]))
    notes = probe_setup / "notes"  # a folder without an earlier probe: its files are not the probe's to remove
    notes.mkdir()
    (notes / "README.md").write_text("my notes")
    (notes / "unet.py").write_text("# mine")
    main(parse(ProbeArguments, ["--pretrained", baseline, "--data_dir", str(probe_setup / "data"), "--output_dir",
                                str(notes), "--num_epochs", "2", "--hidden_size", "8"]))
    assert (notes / "README.md").read_text() == "my notes" and (notes / "unet.py").is_file()
    replaced = main(parse(ProbeArguments, ["--pretrained", baseline, "--data_dir", str(probe_setup / "data"),
                                           "--output_dir", str(out), "--num_epochs", "2", "--hidden_size", "8",
                                           "--overwrite_output_dir"]))
    assert replaced["method"] == "baseline-byol" and first["method"] == "micdiffrep"
    assert json.loads((out / "results.json").read_text())["method"] == "baseline-byol"
    left = set(os.listdir(out))
    assert not left & {"config.json", "model.safetensors", "preprocessor_config.json", "README.md",
                       "accuracy_vs_timestep.png", "modeling_mic_diffrep.py", "configuration_mic_diffrep.py"}
    assert {"results.json", "results.md", "confusion_matrix.png", "features"} <= left


def count_unet_forwards():
    calls = []
    original = UNet2DModel.forward

    def counting(self, *args, **kwargs):
        calls.append(args[0].shape[0])
        return original(self, *args, **kwargs)

    return calls, counting


def test_linear_probe_one_feature_pass_cache_reuse_and_model_folder(probe_setup, monkeypatch):
    calls, counting = count_unet_forwards()
    monkeypatch.setattr(UNet2DModel, "forward", counting)
    results = main(probe_args(probe_setup))
    # 40 training and 16 test images, batch 16: (3 + 1) batches x 2 timesteps, every layer from the same forward.
    assert calls == [16, 16, 16, 16, 8, 8, 16, 16]
    assert len(results["single_layer"]) == 2 * 5  # one head per (layer, timestep)
    assert "test split of" in results["test_split"]

    calls.clear()
    again = main(probe_args(probe_setup))
    assert calls == []  # features came from the cache
    assert again["msfa"]["test"]["all"]["accuracy"] == results["msfa"]["test"]["all"]["accuracy"]

    calls.clear()
    main(probe_args(probe_setup, "--pooling", "avg"))  # the default is avgmax
    assert len(calls) == 8  # stale cache (other pooling): recomputed

    out = probe_setup / "out"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "results.json",
                 "results.md", "accuracy_vs_timestep.png", "confusion_matrix.png"):
        assert os.path.isfile(out / name), name
    # the local card names folders as the uploaded one does: "Test split: the test split of /tmp/.../data" was a
    # local path in a file that is shared with the folder
    card = (out / "README.md").read_text()
    assert str(probe_setup) not in card and "Test split: the test split of data." in card


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_weights_and_caches_are_readable_as_the_umask_allows(probe_setup):
    """safetensors >= 0.8 writes its files 0600 whatever the umask: the weights of a shared model folder were the one
    file other users (or a serving account) could not read."""
    umask = os.umask(0o022)
    try:
        main(probe_args(probe_setup))
    finally:
        os.umask(umask)
    files = [probe_setup / "out" / "model.safetensors"] + sorted((probe_setup / "out" / "features").glob("*.safetensors"))
    files += sorted((probe_setup / "out" / ".cache").glob("*.safetensors"))
    assert len(files) >= 4  # the model, two feature caches, a decoded-image cache
    assert {oct(os.stat(f).st_mode & 0o777) for f in files} == {oct(0o644)}
    assert oct(os.stat(probe_setup / "out" / "config.json").st_mode & 0o777) == oct(0o644)


def test_feature_cache_serves_fewer_timesteps_and_notices_replaced_files(probe_setup, monkeypatch):
    calls, counting = count_unet_forwards()
    monkeypatch.setattr(UNet2DModel, "forward", counting)
    main(probe_args(probe_setup))  # timesteps 5 and 50
    calls.clear()
    fewer = main(probe_args(probe_setup, "--timesteps", "50"))
    assert calls == [] and {row["timestep"] for row in fewer["single_layer"]} == {50}  # served by the wider cache
    assert load_features(str(probe_setup / "out" / "features" / "train.safetensors")).timesteps == [5, 50]  # kept

    # Another image under the same file name (a file replaced, or other slices of a volume under the same ids)
    first, second = sorted((probe_setup / "data" / "Testing").rglob("*.png"))[:2]
    PIL.Image.open(second).save(first)
    calls.clear()
    main(probe_args(probe_setup))
    assert sum(calls) == 2 * 16  # the test images' features were recomputed, the training images' reused


def test_random_flip_probe_extracts_the_mirrored_training_images_once(probe_setup, monkeypatch):
    calls, counting = count_unet_forwards()
    monkeypatch.setattr(UNet2DModel, "forward", counting)
    results = main(probe_args(probe_setup, "--random_flip"))
    assert sum(calls) == 2 * (40 + 40 + 16)  # the training images, their mirror images and the test images, 2 timesteps
    assert results["probe_config"]["random_flip"] is True
    features = probe_setup / "out" / "features"
    train, mirrored = (load_features(str(features / name)) for name in ("train.safetensors", "train-mirrored.safetensors"))
    assert train.image_ids == mirrored.image_ids
    assert not torch.allclose(train.features[("mid_block", 5)], mirrored.features[("mid_block", 5)])
    calls.clear()
    assert main(probe_args(probe_setup, "--random_flip"))["msfa"] == results["msfa"] and calls == []  # cached


# flips and dropout change the head's training, not its inference
@pytest.mark.parametrize("extra", [[], ["--random_flip"], ["--classifier_dropout", "0.25"]])
def test_exported_model_reproduces_the_probe_test_accuracy(probe_setup, extra):
    results = main(probe_args(probe_setup, *extra))
    model = AutoModelForImageClassification.from_pretrained(probe_setup / "out")
    processor = AutoImageProcessor.from_pretrained(probe_setup / "out")
    correct = total = 0
    for label, name in enumerate(results["label_names"]):
        folder = probe_setup / "data" / "Testing" / name
        images = [PIL.Image.open(folder / f) for f in sorted(os.listdir(folder))]
        predictions = model(**processor(images)).logits.argmax(-1)
        correct += int((predictions == label).sum())
        total += len(images)
    assert correct / total == pytest.approx(results["msfa"]["test"]["all"]["accuracy"])
    assert model.config.id2label[0] == "glioma" and model.config.layers == results["msfa"]["layers"]
    assert model.config.classifier_dropout == (0.25 if "--classifier_dropout" in extra else 0.0)


def test_the_probe_flag_has_the_classifier_configs_name_and_keeps_its_earlier_one(probe_setup):
    assert probe_args(probe_setup, "--classifier_dropout", "0.25").classifier_dropout == 0.25
    with pytest.warns(FutureWarning, match="`dropout` of the probe is deprecated"):  # as scripts wrote it before
        assert probe_args(probe_setup, "--dropout", "0.25").classifier_dropout == 0.25
    with pytest.warns(FutureWarning):  # and Python callers
        assert ProbeArguments(pretrained="p", data_dir="d", output_dir="o", dropout=0.25).classifier_dropout == 0.25


def test_without_a_test_folder_a_duplicate_aware_hold_out_is_carved(tmp_path):
    write_class_folder(tmp_path / "flat", per_class=12, seed=3)
    torch.manual_seed(0)
    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(tmp_path / "pipe")
    results = main(parse(ProbeArguments, ["--pretrained", str(tmp_path / "pipe"), "--data_dir", str(tmp_path / "flat"),
                               "--output_dir", str(tmp_path / "out"), "--timesteps", "5", "--hidden_size", "8",
                               "--num_epochs", "2", "--exclude_leaked_test"]))
    assert "carved" in results["test_split"] and "near-duplicate groups" in results["test_split"]
    assert results["num_train"] + results["num_validation"] + results["num_test"] == 48
    assert results["leakage"]["num_near"] == 0

    # --seed is the probe's training seed only: seeds are scored on the same carved images (it re-drew the test and
    # validation parts too); --split_seed draws other ones
    def carved(*extra):
        name = "-".join(extra) or "default"
        main(parse(ProbeArguments, ["--pretrained", str(tmp_path / "pipe"), "--data_dir", str(tmp_path / "flat"),
                                    "--output_dir", str(tmp_path / name), "--timesteps", "5", "--hidden_size", "8",
                                    "--num_epochs", "1", *extra]))
        return sorted((tmp_path / name / "test_images.txt").read_text().splitlines()[1:])

    assert carved() == carved("--seed", "1") != carved("--split_seed", "1")


def test_the_carved_test_split_can_be_scored_again_from_its_image_list(tmp_path, caplog, monkeypatch):
    """A folder without a test split: the probe carves one, and `evaluate` scored every image of the folder (the
    head's training images too); the model folder's test_images.txt names the carved split. The warning needed the
    probe's --data_dir to resolve from where `evaluate` runs (results.json kept it relative)."""
    from mic_diffrep.inference import evaluate_folder

    flat = str(tmp_path / "flat")
    write_class_folder(flat, per_class=12, seed=3)
    torch.manual_seed(0)
    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(tmp_path / "pipe")
    out = str(tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    results = main(parse(ProbeArguments, ["--pretrained", str(tmp_path / "pipe"), "--data_dir", "flat",
                                          "--output_dir", out, "--timesteps", "5", "--hidden_size", "8",
                                          "--num_epochs", "2"]))
    assert results["data_dir"] == flat
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    image_list = os.path.join(out, "test_images.txt")
    with open(image_list) as f:
        listed = [line.strip() for line in f if not line.startswith("#")]
    assert len(listed) == results["num_test"] and all(not os.path.isabs(path) for path in listed)
    report = evaluate_folder(out, flat, image_list=image_list)
    assert report["num_examples"] == results["num_test"]
    assert report["accuracy"] == pytest.approx(results["msfa"]["test"]["all"]["accuracy"])
    assert report["confusion_matrix"] == results["msfa"]["test"]["all"]["confusion_matrix"]
    written_otherwise = str(tmp_path / "absolute.txt")  # absolute paths and ./ ones name the same images
    with open(written_otherwise, "w") as f:
        f.writelines(f"{os.path.join(flat, path) if k % 2 else './' + path}\n" for k, path in enumerate(listed))
    assert evaluate_folder(out, flat, image_list=written_otherwise)["confusion_matrix"] == report["confusion_matrix"]
    with caplog.at_level("WARNING", logger="mic_diffrep.inference"):
        assert evaluate_folder(out, flat)["num_examples"] == 48
    assert "including those" in caplog.text and "--image_list" in caplog.text
    with open(image_list, "a") as f:
        f.write("glioma/not_there.png\n")
    with pytest.raises(ValueError, match="1 listed file.*not_there.png"):
        evaluate_folder(out, flat, image_list=image_list)


def test_unlabelled_data_is_refused(tmp_path, unlabelled_folder):
    torch.manual_seed(0)
    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(tmp_path / "pipe")
    with pytest.raises(ValueError, match="no labels"):
        main(parse(ProbeArguments, ["--pretrained", str(tmp_path / "pipe"), "--data_dir", unlabelled_folder,
                         "--output_dir", str(tmp_path / "out")]))


def test_results_markdown_names_the_skipped_files():
    from mic_diffrep.reporting.results import results_markdown

    with open(os.path.join(os.path.dirname(__file__), "data", "probe_results.json")) as f:
        results = json.load(f)
    assert "skipped" not in results_markdown(dict(results, skipped_images=[]))
    skipped = [{"path": f"data/bad_{i}.jpg", "error": "OSError: truncated"} for i in range(7)]
    text = results_markdown(dict(results, skipped_images=skipped))
    assert "7 unreadable file(s) skipped" in text and "`data/bad_4.jpg`, ..." in text and "bad_5" not in text


def test_classification_report_names_labels_outside_label_names():
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\).*\[0, 1, 2, 5\]"):  # it was a bare IndexError
        classification_report([0, 1, 5], [0, 1, 2], label_names=["a", "b", "c"])


def test_probe_config_checks_its_settings():
    with pytest.raises(ValueError, match="`train_batch_size` must be an integer"):
        ProbeConfig(train_batch_size=1.5)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        ProbeConfig(weight_decay=-1)


def test_a_given_extractor_keeps_its_precision_and_progress_settings(probe_setup):
    # run_probe cast a bf16 extractor to float32 (mixed_precision unset) and replaced its progress-bar settings
    extractor = DiffusionFeatureExtractor.from_pretrained(str(probe_setup / "pipe"), dtype=torch.bfloat16)
    extractor.pipeline.set_progress_bar_config(leave=False)
    results = main(probe_args(probe_setup), extractor=extractor)
    assert extractor.pipeline.unet.dtype == torch.bfloat16
    assert extractor.pipeline._progress_bar_config.get("leave") is False
    assert results["msfa"]["test"]["all"]["num_examples"] == 16


def test_probing_an_interrupted_pretraining_warns(tmp_path, caplog):
    """`run` does not probe a half-trained model, but probe and extract used one without a word."""
    import json

    from mic_diffrep.features import load_feature_extractor

    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(tmp_path / "pipe")
    with caplog.at_level("WARNING"):
        load_feature_extractor(str(tmp_path / "pipe"))
    assert "interrupted" not in caplog.text
    (tmp_path / "pipe" / "pretraining_summary.json").write_text(json.dumps({"stop_reason": "interrupted",
                                                                            "global_step": 267}))
    with caplog.at_level("WARNING"):
        load_feature_extractor(str(tmp_path / "pipe"))
    assert "interrupted pretraining (stopped at step 267" in caplog.text and "--resume_from_checkpoint" in caplog.text


def test_an_image_list_outside_the_chosen_splits_says_so(kaggle_folder, tmp_path):
    from mic_diffrep.inference import evaluate_folder

    testing = os.path.join(kaggle_folder, "Testing")
    listed = sorted(os.path.relpath(os.path.join(root, name), kaggle_folder)
                    for root, _, names in os.walk(testing) for name in names)
    (tmp_path / "list.txt").write_text("\n".join(listed) + "\n")
    with pytest.raises(ValueError, match=f"{len(listed)} listed file.*not in the split\\(s\\) train of"):
        evaluate_folder(str(tmp_path / "no-model"), kaggle_folder, splits="train",
                        image_list=str(tmp_path / "list.txt"))  # it said: not in the folder


def test_classes_the_scores_say_little_about_are_named():
    """A class of 1 image among 24 (or none in validation or test) went unmentioned behind "accuracy 1.000"."""
    from mic_diffrep.data import DecodedImages
    from mic_diffrep.probing.splits import ProbeSplits, class_warnings

    def images(labels, names=("common", "rare", "lone")):
        return DecodedImages(pixels=torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8),
                             paths=[str(i) for i in range(len(labels))], labels=torch.tensor(labels),
                             label_names=list(names))

    validation = torch.zeros(12, dtype=torch.bool)
    validation[[0, 1, 9]] = True
    warnings = class_warnings(ProbeSplits(images([0] * 8 + [1] * 3 + [2]), images([0, 0, 1]), "x",
                                          validation_mask=validation))
    assert warnings == [
        "Class(es) with fewer than 5 training images: rare (2), lone (1); their scores mean little.",
        "Class(es) without validation images: lone; layers and timesteps are chosen without them.",
        "Class(es) without test images: lone; they have no recall, and the accuracy says nothing of them."]
    validation = torch.zeros(12, dtype=torch.bool)
    validation[[0, 6]] = True
    assert class_warnings(ProbeSplits(images([0] * 6 + [1] * 6, "ab"), images([0, 1], "ab"), "x",
                                      validation_mask=validation)) == []


def test_run_probes_takes_arrays_and_lists_and_names_what_is_wrong(caplog):
    """From a notebook, numpy labels, list labels and numpy features failed deep in torch ("cross_entropy_loss():
    argument 'target'", "_mean() got an unexpected keyword argument 'dim'"), too few label names as "Target 3 is out
    of bounds", a timestep missing from the features as a bare KeyError, and 30 labels for 40 rows blamed the
    validation mask; `layers`, `timesteps` and `config` had no defaults."""
    import numpy as np

    train, train_labels = synthetic_features(150, 0)
    test, test_labels = synthetic_features(60, 1)
    validation = torch.arange(150) % 5 == 0
    config = ProbeConfig(num_epochs=2, train_batch_size=16, hidden_size=8)
    expected, _ = run_probes(train, train_labels, test, test_labels, ["x", "y", "z"], validation, config,
                             ["good", "noise"], [10, 20])
    as_arrays, _ = run_probes({k: v.numpy() for k, v in train.items()}, train_labels.numpy().astype(np.int32),
                              {k: v.numpy() for k, v in test.items()}, test_labels.tolist(), ["x", "y", "z"],
                              validation.numpy(), config)  # every layer and timestep of the features
    assert as_arrays["msfa"] == expected["msfa"] and as_arrays["single_layer"] == expected["single_layer"]
    # class names as labels (a datasets string column) and the names as a numpy array (`np.unique`): a bare torch
    # TypeError, and an "ambiguous truth value" once every head had trained
    names = np.array(["x", "y", "z"])
    by_name, _ = run_probes(train, names[train_labels.numpy()], test, list(names[test_labels.numpy()]), names,
                            validation, config, ["good", "noise"], [10, 20])
    assert by_name["msfa"] == expected["msfa"] and by_name["label_names"] == ["x", "y", "z"]
    # a class of the test images that no training image has: `mic-diffrep probe` refuses it, run_probes said nothing
    with caplog.at_level("WARNING", logger="mic_diffrep.probing.selection"):
        run_probes(train, train_labels.clamp(max=1), test, test_labels, ["x", "y", "z"], validation, config,
                   ["good"], [10])
    assert "Test images of class(es) ['z'] have no training images" in caplog.text
    for kwargs, message in (
            ({"label_names": ["x", "y", "x"]}, r"`label_names` names \['x'\] more than once"),
            ({"train_labels": ["x"] * 149 + ["w"]}, r"`train_labels` holds class names that `label_names` .* does "
                                                   r"not list: \['w'\]"),
            ({"label_names": ["x", "y"]}, r"`train_labels` holds class 2, but `label_names` names 2 class\(es\)"),
            ({"timesteps": [10, 250]}, r"`train_features` has no features for \[\('good', 250\)"),
            ({"train_labels": train_labels[:140]}, r"`train_features`\[\('good', 10\)\] must be one row per label, "
                                                   r"\(N=140, C\), got shape \(150, 6\)"),
            ({"test_labels": test_labels.float()}, "`test_labels` must be a 1-D sequence of class indices")):
        arguments = dict(train_features=train, train_labels=train_labels, test_features=test,
                         test_labels=test_labels, label_names=["x", "y", "z"], validation_mask=validation,
                         config=config)
        with pytest.raises(ValueError, match=message):
            run_probes(**{**arguments, **kwargs})


def test_long_probe_training_shows_its_progress(monkeypatch, capsys):
    """Training the heads took minutes for tens of thousands of images (four trainings per probe), with nothing
    shown between "extracting" and the results."""
    import time

    from mic_diffrep.probing import heads

    features, labels = synthetic_features(64, 0)
    cross_entropy = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy",
                        lambda *args, **kwargs: time.sleep(0.05) or cross_entropy(*args, **kwargs))  # a slow machine
    monkeypatch.setattr(heads, "progress_interval", lambda: 0.1)  # as in a terminal
    train_heads(features, labels, 3, ProbeConfig(num_epochs=4, train_batch_size=8))  # 32 steps x 4 heads
    assert "Training 4 probe head(s)" in capsys.readouterr().err


def test_the_probe_holds_a_few_times_its_features_in_memory_not_a_dozen():
    """`run_probes` held about 12.6x the features at its peak (every MSFA candidate's inputs over every training image,
    their fit-part copies, and standardised copies of each): 35 GiB for 200,000 images with the default read-out."""
    code = """
import resource, torch
from mic_diffrep.probing import ProbeConfig, run_probes
g = torch.Generator().manual_seed(0)
n, timesteps, layers = 4000, [10, 25, 50, 100, 250], [f"l{i}" for i in range(8)]
train = {(l, t): torch.randn(n, 104, generator=g) for l in layers for t in timesteps}
test = {(l, t): torch.randn(200, 104, generator=g) for l in layers for t in timesteps}
labels, test_labels = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 4, (200,), generator=g)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run_probes(train, labels, test, test_labels, list("abcd"), torch.arange(n) % 5 == 0, ProbeConfig(num_epochs=1))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / (n * 104 * 40 * 4 / 1024))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split()[-1]) < 9  # 6.1x measured (12.6x before)


def test_a_patients_slices_stay_together_under_a_class_folder_named_on_a_mac():
    """Class names are NFC, a Mac's folder names decomposed (NFD): the patient folder under such a class folder was
    not found, and a patient's slices could land on both sides of a carved split."""
    import unicodedata

    from mic_diffrep.probing.splits import patient_folder

    name = unicodedata.normalize("NFC", "méningiome")
    path = f"/data/{unicodedata.normalize('NFD', name)}/p1/0.png"
    assert patient_folder(path, name) == f"/data/{unicodedata.normalize('NFD', name)}/p1"


def test_a_replacing_probe_stopped_while_writing_leaves_the_earlier_probe_whole(probe_setup, monkeypatch):
    """`--overwrite_output_dir` removed the earlier probe, then wrote the new one file by file: stopped while
    writing its model card, the folder held the new config and weights, no card, and nothing of the earlier probe."""
    main(probe_args(probe_setup))
    out = probe_setup / "out"
    earlier = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mic_diffrep.probing.export.write_model_card", stopped)
    with pytest.raises(KeyboardInterrupt):
        main(probe_args(probe_setup, "--timesteps", "50"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == earlier
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-probe-")]  # no staging folder left
    monkeypatch.undo()
    assert main(probe_args(probe_setup, "--timesteps", "50"))["msfa"]["timesteps"] == [50]
    assert json.loads((out / "config.json").read_text())["timesteps"] == [50] and (out / "README.md").is_file()
