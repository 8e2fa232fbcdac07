import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_class_folder
from mic_diffrep.commands import RUN_DEFAULTS, SAMPLE_DATA_DIR, build_parser, main
from mic_diffrep.data import read_image_list


def test_every_subcommand_documents_every_flag():
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    assert set(subcommands) == {"run", "pretrain", "extract", "probe", "evaluate", "predict", "generate",
                                "check-leakage", "demo"}
    for name, subparser in subcommands.items():
        for action in subparser._actions:
            if action.dest != "help":
                assert action.help, f"mic-diffrep {name} {action.option_strings or action.dest} has no help"


def test_bundled_sample_is_there():
    for split, count in (("Training", 30), ("Testing", 10)):
        for name in ("glioma", "meningioma", "notumor", "pituitary"):
            assert len(os.listdir(os.path.join(SAMPLE_DATA_DIR, split, name))) == count


def test_run_predict_evaluate_end_to_end(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "resolution: 16\nmodel_config_name_or_path: tiny\npretrain_epochs: 1\nnum_images: 4\nnum_inference_steps: 2\n"
        "timesteps: [5, 100]\nprobe_epochs: 2\nhidden_size: 8\nmixed_precision: 'no'\n")
    out = tmp_path / "run"
    main(["run", "--config", str(config), "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert "MicDiffRep-MS test accuracy" in printed
    for path in ("report.md", "report.json", "pretrain/model_index.json", "model/config.json",
                 "model/model.safetensors", "model/README.md", "model/accuracy_vs_timestep.png",
                 "model/confusion_matrix.png"):
        assert os.path.isfile(out / path), path
    # the training images decoded once, for pretraining and probe alike (they were cached twice), the test images once
    assert len(os.listdir(out / ".cache")) == 2 and not (out / "pretrain" / ".cache").exists() \
        and not (out / "model" / ".cache").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["resolution"] == 16 and report["config"]["data_dir"] == SAMPLE_DATA_DIR
    # a diverged loss is null in the JSON files (not NaN, which is no JSON): the report still renders
    from mic_diffrep.reporting.results import run_report_markdown

    report["pretraining"]["final_loss"] = None
    assert "final loss n/a." in run_report_markdown(report)
    assert report["probe"]["num_test"] == 40 and os.path.isfile(report["files"]["sample_grid"])

    image = os.path.join(SAMPLE_DATA_DIR, "Testing", "glioma", sorted(os.listdir(
        os.path.join(SAMPLE_DATA_DIR, "Testing", "glioma")))[0])
    main(["predict", "--model", str(out / "model"), image, "--json"])
    predictions = json.loads(capsys.readouterr().out)
    assert predictions[0]["file"] == image and abs(sum(predictions[0]["probabilities"].values()) - 1) < 1e-4

    capsys.readouterr()
    main(["evaluate", "--model", str(out / "model"), "--data_dir", SAMPLE_DATA_DIR, "--json",
          "--output", str(tmp_path / "new" / "eval.json")])  # the output's folder is made before the work
    evaluation = json.loads((tmp_path / "new" / "eval.json").read_text())
    printed = json.loads(capsys.readouterr().out.split("\nWrote ")[0], parse_constant=pytest.fail)  # strict JSON
    assert printed == evaluation and evaluation["skipped_images"] == []
    assert evaluation["splits"] == ["test"] and evaluation["num_examples"] == 40
    assert evaluation["accuracy"] == pytest.approx(report["probe"]["msfa"]["test"]["all"]["accuracy"])
    assert os.path.isfile(tmp_path / "new" / "eval_confusion_matrix.png")

    # A class without test images has no recall: null in the JSON, not NaN.
    two_classes = tmp_path / "two_classes"
    for name in ("glioma", "notumor"):
        shutil.copytree(os.path.join(SAMPLE_DATA_DIR, "Testing", name), two_classes / name)
    main(["evaluate", "--model", str(out / "model"), "--data_dir", str(two_classes), "--json"])
    recall = json.loads(capsys.readouterr().out, parse_constant=pytest.fail)["per_class_recall"]
    assert recall["meningioma"] is None and recall["glioma"] is not None

    # Run again: the earlier probe's results and model are not replaced without --overwrite_output_dir ...
    with pytest.raises(SystemExit) as error:
        main(["run", "--config", str(config), "--output_dir", str(out)])
    assert error.value.code == 2 and "model holds an earlier probe's outputs" in capsys.readouterr().err
    # ... and after a failure or Ctrl-C in the probe stage (no results written yet), the finished pretraining is
    # reused, not redone
    for name in ("results.json", "config.json", "model.safetensors"):
        (out / "model" / name).unlink()
    import mic_diffrep.commands.run as run_module

    pretrain = run_module.pretrain
    run_module.pretrain = lambda args: pytest.fail("pretrained again with the same data and settings")
    try:
        main(["run", "--config", str(config), "--output_dir", str(out)])
    finally:
        run_module.pretrain = pretrain
    assert "reusing the finished run" in capsys.readouterr().out
    again = json.loads((out / "report.json").read_text())
    assert again["probe"]["msfa"]["test"]["all"] == report["probe"]["msfa"]["test"]["all"]
    # Other settings: the finished pretraining was replaced without a word; now only with --overwrite_output_dir
    with pytest.raises(SystemExit) as error:
        main(["run", "--config", str(config), "--output_dir", str(out), "--seed", "1"])
    assert error.value.code == 2 and "--overwrite_output_dir" in capsys.readouterr().err
    main(["run", "--config", str(config), "--output_dir", str(out), "--seed", "1", "--overwrite_output_dir"])
    assert "Pretraining into" in capsys.readouterr().out


def test_run_push_to_hub_uploads_the_pipeline_and_the_classifier_that_names_it_as_base_model(tmp_path, capsys):
    """`mic-diffrep run` had no --push_to_hub: its pipeline and classifier were uploaded one by one, and the
    classifier's card did not link to the pipeline it was made from."""
    from unittest import mock

    created, uploaded = [], {}

    def create_repo(repo_id, **kwargs):
        created.append(repo_id)
        return mock.Mock(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def upload_folder(repo_id, folder_path, **kwargs):
        assert len(created) >= 2, "a repository was created only after the work"
        uploaded.setdefault(repo_id, []).append((Path(folder_path) / "README.md").read_text())

    tiny = ["run", "--output_dir", str(tmp_path / "brain-mri"), "--resolution", "16", "--model_config_name_or_path",
            "tiny", "--pretrain_epochs", "1", "--num_images", "2", "--num_inference_steps", "2", "--timesteps", "10",
            "--probe_epochs", "1", "--hidden_size", "8", "--mixed_precision", "no", "--push_to_hub",
            "--hub_token", "hf_secret"]
    with mock.patch("huggingface_hub.HfApi.create_repo", side_effect=create_repo), \
            mock.patch("huggingface_hub.HfApi.upload_folder", side_effect=upload_folder):
        main(tiny)
    assert created[:2] == ["brain-mri-pretrain", "brain-mri"]  # the output folder's name, as pretrain and probe
    assert set(uploaded) == {"me/brain-mri-pretrain", "me/brain-mri"}
    assert "library_name: diffusers" in uploaded["me/brain-mri-pretrain"][0]
    card = uploaded["me/brain-mri"][0]
    assert "base_model: me/brain-mri-pretrain" in card and "https://huggingface.co/me/brain-mri-pretrain" in card
    report = json.loads((tmp_path / "brain-mri" / "report.json").read_text())
    assert report["hub"] == {"model": "me/brain-mri", "pipeline": "me/brain-mri-pretrain"}
    assert "hf_secret" not in (tmp_path / "brain-mri" / "report.json").read_text()
    assert "https://huggingface.co/me/brain-mri" in (tmp_path / "brain-mri" / "report.md").read_text()
    assert json.loads((tmp_path / "brain-mri" / "pretrain" / "pretraining_summary.json").read_text())[
        "hub_repo_id"] == "me/brain-mri-pretrain"
    assert "Hub: https://huggingface.co/me/brain-mri" in capsys.readouterr().out

    # A finished pretraining that is reused is uploaded too, to the repository of --hub_model_id
    uploaded.clear()
    with mock.patch("huggingface_hub.HfApi.create_repo", side_effect=create_repo), \
            mock.patch("huggingface_hub.HfApi.upload_folder", side_effect=upload_folder):
        main(tiny + ["--overwrite_output_dir", "--hub_model_id", "lab/mri"])
    assert "reusing the finished run" in capsys.readouterr().out
    assert set(uploaded) == {"lab/mri-pretrain", "lab/mri"} and "base_model: lab/mri-pretrain" in uploaded["lab/mri"][0]


def test_run_pretrains_again_when_its_images_changed(tmp_path, capsys):
    """A finished pretraining was reused after images were removed from (or replaced in) the data folder: the
    report paired a model of the old images with a probe of the new ones."""
    data = tmp_path / "data"
    shutil.copytree(SAMPLE_DATA_DIR, data)
    tiny = ["run", "--data_dir", str(data), "--output_dir", str(tmp_path / "run"), "--resolution", "16",
            "--model_config_name_or_path", "tiny", "--pretrain_epochs", "1", "--num_images", "2",
            "--num_inference_steps", "2", "--timesteps", "10", "--probe_epochs", "1", "--hidden_size", "8",
            "--mixed_precision", "no"]
    main(tiny)
    main(tiny + ["--overwrite_output_dir"])
    assert "reusing the finished run" in capsys.readouterr().out  # the same images
    for name in ("glioma", "meningioma", "notumor", "pituitary"):
        for image in sorted((data / "Training" / name).iterdir())[:10]:
            image.unlink()
    main(tiny + ["--overwrite_output_dir"])
    assert "Pretraining into" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "report.json").read_text())["pretraining"]["num_images"] == 80


def test_run_leaves_the_test_images_it_carves_out_of_pretraining(tmp_path, capsys, monkeypatch):
    """On a folder without a test split, `run` pretrained on every image, then carved its test images from them: the
    test images were pretraining images. And a validation part too small to carve from what the test carve left
    failed only after pretraining."""
    data = os.path.join(SAMPLE_DATA_DIR, "Training")  # class folders, no split folders: the test split is carved
    out = tmp_path / "run"
    tiny = ["run", "--data_dir", data, "--output_dir", str(out), "--resolution", "16", "--model_config_name_or_path",
            "tiny", "--pretrain_epochs", "1", "--num_images", "2", "--num_inference_steps", "2", "--timesteps", "10",
            "--probe_epochs", "1", "--hidden_size", "8", "--mixed_precision", "no"]
    main(tiny)
    report = json.loads((out / "report.json").read_text())
    held_out = read_image_list(str(out / "held_out_images.txt"))
    assert sorted(held_out) == sorted(read_image_list(str(out / "model" / "test_images.txt")))
    assert report["probe"]["num_test"] == len(held_out) > 0 and report["probe"]["test_images_seen_in_pretraining"] == 0
    probe = report["probe"]
    assert report["pretraining"]["num_images"] == 120 - len(held_out) == probe["num_train"] + probe["num_validation"]
    assert report["pretraining"]["exclude_image_list"] == str(out / "held_out_images.txt")
    assert "less the test images listed in `held_out_images.txt`" in (out / "report.md").read_text()
    # the pipeline's card names the list, which is not in the folder and not uploaded: it says so
    card = (out / "pretrain" / "README.md").read_text()
    assert "`held_out_images.txt`, a local file: image lists are not uploaded" in card
    assert len(list((out / ".cache").glob("decoded-*"))) == 1  # decoded once, for the carve, pretraining and probe
    main(tiny + ["--overwrite_output_dir"])
    assert "reusing the finished run" in capsys.readouterr().out  # the same held-out images
    main(tiny + ["--overwrite_output_dir", "--test_split", "0.3"])  # other test images: pretrained anew
    assert "Pretraining into" in capsys.readouterr().out
    held_out = read_image_list(str(out / "held_out_images.txt"))
    assert json.loads((out / "report.json").read_text())["pretraining"]["num_images"] == 120 - len(held_out) < 120 - 26

    # 3 images a class, 4 copies each: 24 files, but 6 groups of near-duplicates; the test split takes 2 groups, and
    # 10% of the 4 left is no group: said before pretraining (by files alone, 10% of 24 could be carved)
    few = write_class_folder(tmp_path / "few", per_class=3, seed=0, classes=("a", "b"))
    for image in list(Path(few).glob("*/*.png")):
        for copy in range(3):
            shutil.copy(image, image.with_name(f"{image.stem}_copy{copy}.png"))
    assert os.stat(out / "held_out_images.txt").st_mode & 0o044  # readable as the run's other files, not 0600
    # resuming with other test images than the checkpoint's pretraining left out: refused, the list kept
    listed = (out / "held_out_images.txt").read_text()
    with pytest.raises(SystemExit) as error:
        main(tiny + ["--overwrite_output_dir", "--resume_from_checkpoint", "latest", "--test_split", "0.25"])
    assert error.value.code == 2 and "the test images carved now differ" in capsys.readouterr().err
    assert (out / "held_out_images.txt").read_text() == listed
    # other settings over a finished pretraining: refused before any image is decoded (and nothing written)
    monkeypatch.setattr("mic_diffrep.probing.splits.decode_images", lambda *a, **k: pytest.fail("decoded first"))
    with pytest.raises(SystemExit) as error:
        main(tiny + ["--pretrain_epochs", "2"])
    assert error.value.code == 2 and "--overwrite_output_dir" in capsys.readouterr().err
    monkeypatch.undo()
    # a run that carves nothing (a test folder of its own) removes the earlier run's list, which it does not name
    main(tiny + ["--overwrite_output_dir", "--test_data_dir", os.path.join(SAMPLE_DATA_DIR, "Testing")])
    assert not (out / "held_out_images.txt").exists()

    monkeypatch.setattr("mic_diffrep.commands.run.pretrain", lambda args: pytest.fail("pretrained before the check"))
    with pytest.raises(SystemExit) as error:
        main(["run", "--data_dir", few, "--output_dir", str(tmp_path / "few_run")] + tiny[5:]
             + ["--validation_split", "0.1"])
    assert error.value.code == 2 and "Cannot carve --validation_split 0.1 from 16 images" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:  # too large a part: a smaller one is the remedy
        main(["run", "--data_dir", few, "--output_dir", str(tmp_path / "few_run")] + tiny[5:]
             + ["--validation_split", "0.9"])
    assert "a smaller --validation_split" in capsys.readouterr().err


def test_check_leakage_cli(tmp_path, capsys):
    main(["check-leakage", "--train", os.path.join(SAMPLE_DATA_DIR, "Training"),
          "--test", os.path.join(SAMPLE_DATA_DIR, "Testing"), "--output", str(tmp_path / "leak.json")])
    report = json.loads((tmp_path / "leak.json").read_text())
    assert report["num_test"] == 40 and report["num_near"] == 0  # the sample was built without duplicates


def test_check_leakage_takes_the_flag_names_of_the_other_commands_and_its_old_ones_with_a_warning(capsys):
    """`check-leakage --threshold` / `--num_workers` were `probe --duplicate_threshold` / `--dataloader_num_workers`
    elsewhere: one idea, two names."""
    parser = build_parser()
    base = ["check-leakage", "--within", "DIR"]
    namespace = parser.parse_args(base + ["--duplicate_threshold", "0.9", "--dataloader_num_workers", "2"])
    assert (namespace.duplicate_threshold, namespace.dataloader_num_workers) == (0.9, 2)
    with pytest.warns(FutureWarning) as warned:
        namespace = parser.parse_args(base + ["--threshold", "0.8", "--num_workers", "1"])
    assert (namespace.duplicate_threshold, namespace.dataloader_num_workers) == (0.8, 1)
    assert [str(w.message) for w in warned] == [
        "--threshold is deprecated and will be removed: use --duplicate_threshold.",
        "--num_workers is deprecated and will be removed: use --dataloader_num_workers."]
    with pytest.raises(SystemExit):
        parser.parse_args(["check-leakage", "--help"])
    help_text = capsys.readouterr().out
    assert "--duplicate_threshold" in help_text and "--threshold" not in help_text.replace("_threshold", "")
    assert "--dataloader_num_workers" in help_text and " --num_workers" not in help_text


def test_run_names_its_sample_grid_settings_as_generate_does_and_takes_the_old_names_with_a_warning(tmp_path):
    """`run --num_samples / --sampling_steps` were `generate --num_images / --num_inference_steps`."""
    from mic_diffrep.commands.run import pretraining_arguments, run_config

    parser = build_parser()
    namespace = parser.parse_args(["run", "--num_images", "4", "--num_inference_steps", "7"])
    args = pretraining_arguments(run_config(namespace))
    assert (args.eval_batch_size, args.ddpm_num_inference_steps) == (4, 7)
    with pytest.warns(FutureWarning, match="--num_samples is deprecated and will be removed: use --num_images"):
        assert parser.parse_args(["run", "--num_samples", "3"]).num_images == 3
    old = tmp_path / "old.yaml"
    old.write_text("num_samples: 5\nsampling_steps: 9\n")
    with pytest.warns(FutureWarning) as warned:
        args = pretraining_arguments(run_config(parser.parse_args(["run", "--config", str(old)])))
    assert [str(w.message).split(": ", 1)[1] for w in warned] == [
        "`num_samples` is deprecated and will be removed: rename it `num_images`.",
        "`sampling_steps` is deprecated and will be removed: rename it `num_inference_steps`."]
    assert (args.eval_batch_size, args.ddpm_num_inference_steps) == (5, 9)
    old.write_text("num_samples: 5\nnum_images: 6\n")
    with pytest.raises(ValueError, match="`num_samples` is the old name of `num_images`; give `num_images` only"):
        run_config(parser.parse_args(["run", "--config", str(old)]))


def test_unknown_flags_are_named_by_their_subcommand_and_dashed_flags_work_everywhere(capsys):
    """`predict --bogus` printed the top-level usage ("mic-diffrep: error"); `run --probe-epochs` was refused while
    `pretrain --train-data-dir` (a settings dataclass) was taken."""
    with pytest.raises(SystemExit) as error:
        main(["predict", "--model", "m", "a.jpg", "--bogus"])
    err = capsys.readouterr().err
    assert error.value.code == 2 and "mic-diffrep predict: error: unrecognized arguments: --bogus" in err
    assert "usage: mic-diffrep predict" in err
    namespace = build_parser().parse_args(["run", "--probe-epochs", "3", "--hidden-size", "8"])
    assert (namespace.probe_epochs, namespace.hidden_size) == (3, 8)
    # Flags of diffusers' train_unconditional.py spelled otherwise here say what to give instead
    with pytest.raises(SystemExit):
        main(["pretrain", "--train_data_dir", "x", "--center_crop", "--random_flip"])
    assert ("--center_crop -> --resize_mode center_crop; --random_flip -> nothing (random flips are on by default"
            in capsys.readouterr().err)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = subprocess.run([sys.executable, os.path.join(repo, "training", "pretrain.py"), "--train_data_dir", "x",
                             "--dataset_name", "me/mri"], capture_output=True, text=True)
    assert script.returncode == 2 and "--dataset_name -> --train_data_dir (a local image folder" in script.stderr
    # each command's hint names its own flags: probe and evaluate take --data_dir; run has no --no_random_flip and
    # evaluate no --resize_mode (the hints named flags these commands do not have)
    for command in (["probe", "--pretrained", "p"], ["evaluate", "--model", "m"], ["run"]):
        with pytest.raises(SystemExit):
            main(command + ["--data_dir", "x", "--dataset_name", "me/mri"])
        assert "--dataset_name -> --data_dir (a local image folder" in capsys.readouterr().err, command
    with pytest.raises(SystemExit):
        main(["run", "--data_dir", "x", "--random_flip"])
    assert "here:" not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", "m", "--data_dir", "x", "--center_crop"])
    assert "here:" not in capsys.readouterr().err


def test_bad_config_is_named(tmp_path, capsys):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"resolutionn": 64}))
    with pytest.raises(SystemExit) as error:
        main(["run", "--config", str(config)])
    assert error.value.code == 2 and "resolutionn" in capsys.readouterr().err
    assert set(RUN_DEFAULTS) >= {"data_dir", "resolution", "timesteps"}


@pytest.mark.parametrize("argv, named", [
    (["run", "--config", "pretrain_epochs: two"], "`pretrain_epochs` must be an integer"),
    (["run", "--config", "sample_scheduler: dpm"], "`sample_scheduler` must be one of 'ddim', 'ddpm'"),
    (["run", "--config", "pooling: max"], "`pooling` must be one of"),
    (["run", "--config", "timesteps: [10, 25"], "cannot be read"),
    (["run", "--timesteps", "10", "1000"], "`timesteps` [1000]"),
    (["run", "--probe_epochs", "0"], "--probe_epochs must be at least 1"),
    (["run", "--hidden_size", "-1"], "--hidden_size must be at least 0 (0: a single linear layer)"),
    (["pretrain", "--train_data_dir", "UNLABELLED", "--lr_warmup_steps", "-5"], "`lr_warmup_steps` must be at least 0"),
    (["run", "--seed", "-1"], "`seed` must be in [0, 2**32)"),
    (["run", "--config", "lr_scheduler: cosinee"], "settings.yaml: `lr_scheduler` must be one of"),
    (["run", "--config", "slice_range: [5, 2]"], "settings.yaml: `slice_range` 5 2 keeps no slice"),
    (["run", "--config", "timesteps: [2000]"], "settings.yaml: `timesteps` [2000]"),
    (["run", "--config", "resolution: 100000"], "settings.yaml: `resolution` 100000 is above 2048 px"),
    (["pretrain", "--train_data_dir", "UNLABELLED", "--resolution", "100000"], "`resolution` 100000 is above"),
    (["probe", "--pretrained", "MISSING", "--data_dir", "UNLABELLED", "--output_dir", "MISSING", "--seed", "-1"],
     "`seed` must be in [0, 2**32)"),
    (["probe", "--pretrained", "MISSING", "--data_dir", "UNLABELLED", "--output_dir", "MISSING",
      "--duplicate_threshold", "3"], "`duplicate_threshold` must be a cosine similarity in [-1, 1]"),
    (["run", "--data_dir", "UNLABELLED"], "has no labels"),
    (["pretrain", "--train_data_dir", "UNLABELLED", "--lr_scheduler", "cosinee"], "`lr_scheduler` must be one of"),
    (["pretrain", "--train_data_dir", "UNLABELLED", "--model_config_name_or_path", "huge"],
     "`model_config_name_or_path` 'huge'"),
    (["pretrain", "--train_data_dir", "UNLABELLED", "--time_budget_minutes", "-1"], "`time_budget_minutes` must be"),
    (["pretrain", "--train_data_dir", "UNLABELLED", "--checkpoints_total_limit", "0"],
     "`checkpoints_total_limit` must be at least 1"),
    (["pretrain", "--train_data_dir", "UNLABELLED", "--resume_from_checkpoint", "MISSING"],
     "is not a checkpoint folder"),
    (["predict", "--model", "MISSING", "UNLABELLED", "--batch_size", "0"], "`batch_size` must be at least 1"),
    (["evaluate", "--model", "MISSING", "--data_dir", "UNLABELLED"], "has no labels"),
    (["generate", "--pretrained", "MISSING", "--num_images", "0"], "--num_images must be at least 1"),
    (["check-leakage", "--within", "UNLABELLED", "--output", "MISSING.csv"], "give the JSON report's name"),
    (["check-leakage", "--within", "UNLABELLED", "--output", "A_FOLDER"], "is a folder; give a file name"),
    (["check-leakage", "--within", "A_FILE"], "is a file; give the folder"),
    (["check-leakage", "--within", "UNLABELLED", "--test", "A_FOLDER"], "--test goes with --train"),
    (["check-leakage", "--train", "TMP", "--test", "A_FOLDER"], "share images"),  # every image matched itself
    (["check-leakage", "--train", "A_FOLDER", "--test", "TMP"], "share images"),
    (["probe", "--pretrained", "A_FILE", "--data_dir", "UNLABELLED", "--output_dir", "MISSING"],
     "a_file.png' is a file; give the folder a pretraining wrote"),
    (["demo", "--model", "MISSING", "--port", "99999"], "--port must be in 0..65535"),
    (["demo", "--model", "MISSING", "--host", "no-such-host.invalid"], "--host no-such-host.invalid cannot be"),
    (["demo", "--model", "MISSING", "--host", "192.0.2.1"], "--host 192.0.2.1 is not an address of this machine"),
])
def test_bad_settings_fail_before_any_work_and_name_the_setting(argv, named, unlabelled_folder, tmp_path, capsys):
    """Checked before pretraining or any decoding: a mistake costs no compute and leaves no output folder."""
    out = tmp_path / "out"
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file.png").write_bytes(b"")
    tokens = {"MISSING": str(out / "MISSING"), "MISSING.csv": str(out / "report.csv"), "UNLABELLED": unlabelled_folder,
              "A_FOLDER": str(tmp_path / "a_folder"), "A_FILE": str(tmp_path / "a_file.png"), "TMP": str(tmp_path)}
    argv = [tokens.get(arg, arg) for arg in argv]
    if argv[1] == "--config":
        config = tmp_path / "settings.yaml"
        config.write_text(argv[2] + "\n")
        argv[2] = str(config)
    command = argv[0]
    argv += {"run": ["--output_dir", str(out)], "pretrain": ["--output_dir", str(out)]}.get(command, [])
    with pytest.raises(SystemExit) as error:
        main(argv)
    message = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bars
    assert error.value.code == 2 and message.startswith(f"mic-diffrep {command}: error: ") and named in message
    assert not out.exists()


def test_a_config_file_reads_as_a_user_writes_it(tmp_path):
    from mic_diffrep.commands.run import load_config
    from mic_diffrep.training import PretrainingArguments

    config = tmp_path / "recipe.yaml"
    config.write_text("learning_rate: 1e-3\nsnr_gamma: 5\npooling: avg\n")  # YAML reads `1e-3` as a string
    assert load_config(str(config)) == {"learning_rate": 1e-3, "snr_gamma": 5, "pooling": "avg"}
    config.write_text("mixed_precision: no\n")  # YAML reads `no` as False
    assert load_config(str(config)) == {"mixed_precision": "no"}
    # Paths may be pathlib.Path objects, as everywhere in Python.
    assert PretrainingArguments(train_data_dir=tmp_path, output_dir=tmp_path / "out").train_data_dir == tmp_path


def test_run_recipe_defaults_are_the_pretraining_and_feature_defaults():
    from mic_diffrep.commands.run import RECIPE_KEYS, RUN_PRESETS, pretraining_arguments, probe_arguments
    from mic_diffrep.features import FeatureArguments
    from mic_diffrep.training import PretrainingArguments

    defaults = PretrainingArguments(train_data_dir="DATA_DIR")
    pretraining = pretraining_arguments(dict(RUN_DEFAULTS))
    for key in RECIPE_KEYS:
        assert getattr(pretraining, key) == getattr(defaults, key) == RUN_DEFAULTS[key], key
    assert probe_arguments(dict(RUN_DEFAULTS)).timesteps == FeatureArguments().timesteps
    # The chosen recipe departs from the paper; the preset keeps the paper's values.
    assert (defaults.learning_rate, defaults.lr_scheduler, defaults.timestep_power) == (1e-3, "cosine", 3.0)
    assert defaults.model_config_name_or_path == pretraining.model_config_name_or_path == "small"
    paper = pretraining_arguments({**RUN_DEFAULTS, **RUN_PRESETS["paper"]})
    assert (paper.learning_rate, paper.lr_scheduler, paper.lr_warmup_steps, paper.timestep_power,
            paper.resolution, paper.num_epochs, paper.model_config_name_or_path) == (
        1e-4, "linear", 0, 1.0, 112, 200, "base")
    assert set(RECIPE_KEYS) <= set(RUN_PRESETS["paper"])  # every recipe key has the paper's value
    assert (paper.snr_gamma, paper.signal_weighting, paper.self_conditioning) == (None, False, False)
    assert paper.ddpm_beta_schedule == "linear"
    assert probe_arguments({**RUN_DEFAULTS, **RUN_PRESETS["paper"]}).flip_average is False


def test_run_recipe_flags_override_the_defaults():
    from mic_diffrep.commands.run import pretraining_arguments, probe_arguments, run_config

    namespace = build_parser().parse_args(["run", "--timestep_power", "1", "--intensity_jitter",
                                           "--unet_dropout", "0.1",
                                           "--lr_scheduler", "linear", "--num_noise_samples", "2",
                                           "--flip_average"])
    config = run_config(namespace)
    arguments = pretraining_arguments(config)
    assert probe_arguments(config).flip_average is True
    assert run_config(build_parser().parse_args(["run", "--no_flip_average"]))["flip_average"] is False
    assert (arguments.timestep_power, arguments.intensity_jitter, arguments.lr_scheduler) == (1.0, True, "linear")
    assert arguments.unet_dropout == 0.1
    assert config["num_noise_samples"] == 2 and config["learning_rate"] == RUN_DEFAULTS["learning_rate"]


def test_run_takes_the_data_flags_of_pretrain_and_probe(tmp_path):
    # The bad-image error tells a user to pass --skip_bad_images; a NIfTI user of run needs the slice flags.
    from mic_diffrep.commands.run import pretraining_arguments, probe_arguments, run_config

    config = run_config(build_parser().parse_args(["run", "--skip_bad_images", "--slice_axis", "0", "--slice_range",
                                                   "2", "-2", "--keep_empty_slices"]))
    for arguments in (pretraining_arguments(config), probe_arguments(config)):
        assert arguments.skip_bad_images is True and arguments.keep_empty_slices is True
        assert (arguments.slices.slice_axis, tuple(arguments.slices.slice_range)) == (0, (2, -2))
    (tmp_path / "slices.yaml").write_text("slice_axis: 1\nskip_bad_images: true\n")
    config = run_config(build_parser().parse_args(["run", "--config", str(tmp_path / "slices.yaml")]))
    assert probe_arguments(config).slices.slice_axis == 1 and pretraining_arguments(config).skip_bad_images is True
    assert pretraining_arguments(dict(RUN_DEFAULTS)).slices == probe_arguments(dict(RUN_DEFAULTS)).slices


def test_run_takes_the_preprocessing_flags_of_pretrain(tmp_path):
    """Centre-cropping wide images (or keeping raw intensities) needed `pretrain`: `run` had no --resize_mode or
    --intensity_window."""
    from mic_diffrep.commands.run import pretraining_arguments, run_config

    config = run_config(build_parser().parse_args(["run", "--resize_mode", "center_crop", "--intensity_window",
                                                   "none"]))
    preprocessing = pretraining_arguments(config).preprocessing
    assert (preprocessing.resize_mode, preprocessing.intensity_window) == ("center_crop", "none")
    (tmp_path / "bad.yaml").write_text("resize_mode: stretch\n")
    with pytest.raises(ValueError, match="resize_mode"):
        run_config(build_parser().parse_args(["run", "--config", str(tmp_path / "bad.yaml")]))


def test_run_takes_the_probes_split_flags_its_errors_name(tmp_path, capsys):
    """A probe error after pretraining told `run` users to give --test_split, --validation_split, --test_data_dir or
    --duplicate_threshold, flags `run` refused ("unrecognized arguments")."""
    import numpy as np
    import PIL.Image

    from mic_diffrep.commands.run import check_run, pretraining_arguments, probe_arguments, run_config

    config = run_config(build_parser().parse_args([
        "run", "--test_split", "0.3", "--validation_split", "0.25", "--duplicate_threshold", "0.999",
        "--test_data_dir", "site2"]))
    arguments = probe_arguments(config)
    assert (arguments.test_split, arguments.validation_split, arguments.duplicate_threshold,
            arguments.test_data_dir) == (0.3, 0.25, 0.999, "site2")
    with pytest.raises(SystemExit):
        main(["run", "--validation_split", "1.5", "--output_dir", str(tmp_path / "never")])
    assert "`validation_split` must be in (0, 1) (a fraction of the images), got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()

    # --test_data_dir is checked before pretraining, one class folder read as that class (as the probe reads it)
    write_class_folder(tmp_path / "train", per_class=6, seed=0, size=20, classes=("a", "b"))
    write_class_folder(tmp_path / "site2", per_class=2, seed=1, size=20, classes=("b",))
    write_class_folder(tmp_path / "site3", per_class=2, seed=1, size=20, classes=("b", "c"))
    config = run_config(build_parser().parse_args(["run", "--data_dir", str(tmp_path / "train"), "--resolution", "16",
                                                   "--test_data_dir", str(tmp_path / "site2")]))
    capsys.readouterr()
    check_run(config, pretraining_arguments(config), probe_arguments(config))
    assert "Decoding images" in capsys.readouterr().err  # the test images are read before pretraining: shown
    config["test_data_dir"] = str(tmp_path / "site3")
    with pytest.raises(ValueError, match=r"\['c'\]"):
        check_run(config, pretraining_arguments(config), probe_arguments(config))

    # train/ beside val/ and no test/: the test images are carved from train/ alone, checked so before pretraining
    for name in ("a", "b"):  # one patient folder per class: nothing to carve from train/ (val/ has plenty)
        write_class_folder(tmp_path / "tv" / "train" / name, per_class=3, seed=5, size=20, classes=("patient1",))
    write_class_folder(tmp_path / "tv" / "val", per_class=4, seed=6, size=20, classes=("a", "b"))
    config = run_config(build_parser().parse_args(["run", "--data_dir", str(tmp_path / "tv"), "--resolution", "16"]))
    with pytest.raises(ValueError, match=r"Cannot carve --test_split 0.2 from 6 images in 2 group\(s\)"):
        check_run(config, pretraining_arguments(config), probe_arguments(config))

    # Images alike enough to chain into one near-duplicate group: the probe's error says how to see and split them
    alike = tmp_path / "alike"
    base = np.random.default_rng(0).integers(0, 255, (20, 20)).astype(np.uint8)
    for name in ("a", "b"):
        (alike / name).mkdir(parents=True)
        for i in range(6):
            PIL.Image.fromarray(np.clip(base.astype(int) + i, 0, 255).astype(np.uint8)).save(alike / name / f"{i}.png")
    from mic_diffrep import DiffusionFeaturePipeline, create_scheduler, create_unet

    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(tmp_path / "pipe")
    with pytest.raises(SystemExit):
        main(["probe", "--pretrained", str(tmp_path / "pipe"), "--data_dir", str(alike), "--output_dir",
              str(tmp_path / "model"), "--timesteps", "5"])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "in 1 group(s)" in message and "check-leakage --within" in message and "--duplicate_threshold" in message


def test_baselines_train_with_their_own_optimiser_defaults_unless_given():
    from mic_diffrep.training import BaselinePretrainingArguments

    mae = BaselinePretrainingArguments(method="mae", train_data_dir="data")
    byol = BaselinePretrainingArguments(method="byol", train_data_dir="data")
    assert (mae.learning_rate, mae.lr_warmup_steps, mae.adam_beta2) == (1.5e-4, 200, 0.95)
    assert (byol.learning_rate, byol.lr_warmup_steps, byol.adam_beta2) == (1e-3, 0, 0.999)
    given = BaselinePretrainingArguments(method="mae", train_data_dir="data", learning_rate=1e-3, adam_beta2=0.999)
    assert (given.learning_rate, given.lr_warmup_steps, given.adam_beta2) == (1e-3, 200, 0.999)
    with pytest.raises(ValueError, match="method"):
        BaselinePretrainingArguments(method="simclr", train_data_dir="data")


def test_installed_executable_exits_zero_on_success(tmp_path):
    # The console-script wrapper calls sys.exit() on what its entry point returns: a returned summary would exit 1.
    executable = shutil.which("mic-diffrep", path=os.path.dirname(sys.executable))
    if executable is None:
        pytest.skip("mic-diffrep is not installed beside this Python (pip install -e .)")
    done = subprocess.run([executable, "check-leakage", "--within", os.path.join(SAMPLE_DATA_DIR, "Training"),
                           "--output", str(tmp_path / "within.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "within.json").is_file()


def test_check_leakage_lists_the_files_it_skipped(unlabelled_folder, tmp_path, capsys):
    bad = os.path.join(unlabelled_folder, "broken.png")
    with open(bad, "wb") as f:
        f.write(b"not an image")
    main(["check-leakage", "--within", unlabelled_folder, "--skip_bad_images", "--output", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert [item["path"] for item in report["skipped_images"]] == [bad] and report["num_images"] == 24


def test_run_switches_turn_off_and_an_interrupted_run_resumes(tmp_path, monkeypatch, capsys):
    from mic_diffrep.commands import run as run_module

    (tmp_path / "on.yaml").write_text("use_ema: true\nintensity_jitter: true\n")
    config = run_module.run_config(build_parser().parse_args(["run", "--config", str(tmp_path / "on.yaml"),
                                                              "--no_use_ema"]))
    assert config["use_ema"] is False and config["intensity_jitter"] is True  # flags override the file, both ways
    # a linear head, which probe takes, was refused by run ("must be at least 1")
    assert run_module.run_config(build_parser().parse_args(["run", "--hidden_size", "0"]))["hidden_size"] == 0

    seen = []

    def interrupted_pretraining(args):
        seen.append(args)
        return {"stop_reason": "interrupted"}

    monkeypatch.setattr(run_module, "pretrain", interrupted_pretraining)
    monkeypatch.setattr(run_module, "run_probe", lambda args: pytest.fail("probed a half-trained model"))
    with pytest.raises(SystemExit) as error:
        main(["run", "--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", "latest"])
    assert error.value.code == 130 and "--resume_from_checkpoint latest" in capsys.readouterr().err
    assert seen[0].resume_from_checkpoint == "latest"
    assert (seen[0].checkpointing_steps, seen[0].checkpoints_total_limit) == (run_module.RUN_CHECKPOINTING_STEPS, 1)


def test_run_refuses_to_pretrain_anew_over_an_interrupted_runs_checkpoint(tmp_path, monkeypatch, capsys):
    """Run again without --resume_from_checkpoint after Ctrl-C, `run` pretrained from step 0 and its checkpoint limit
    of 1 deleted the interrupted run's checkpoint."""
    from mic_diffrep.commands import run as run_module

    checkpoint = tmp_path / "out" / "pretrain" / "checkpoint-1000"
    checkpoint.mkdir(parents=True)
    (checkpoint / "training_state.json").write_text(json.dumps({"global_step": 1000, "epoch": 5, "batches_done": 3}))
    monkeypatch.setattr(run_module, "pretrain", lambda args: pytest.fail("pretrained over the checkpoint"))
    monkeypatch.setattr(run_module, "check_run", lambda *args: pytest.fail("read the test images first"))
    with pytest.raises(SystemExit) as error:
        main(["run", "--output_dir", str(tmp_path / "out")])
    message = capsys.readouterr().err
    assert error.value.code == 2 and "checkpoint-1000" in message and "--overwrite_output_dir" in message
    assert checkpoint.is_dir()

    seen = []
    monkeypatch.setattr(run_module, "check_run", lambda *args: None)
    monkeypatch.setattr(run_module, "pretrain", lambda args: seen.append(args) or {"stop_reason": "interrupted"})
    with pytest.raises(SystemExit):
        main(["run", "--output_dir", str(tmp_path / "out"), "--overwrite_output_dir"])
    assert seen[0].overwrite_output_dir and seen[0].resume_from_checkpoint is None


def test_run_checks_the_test_split_before_pretraining(kaggle_folder, tmp_path, capsys, monkeypatch):
    """A test class without training images or an unreadable test image failed the probe, after pretraining."""
    monkeypatch.setattr("mic_diffrep.commands.run.pretrain", lambda args: pytest.fail("pretrained before the check"))
    data = tmp_path / "data"
    shutil.copytree(kaggle_folder, data)
    glioma = data / "Testing" / "glioma"
    glioma.rename(data / "Testing" / "cats")
    argv = ["run", "--data_dir", str(data), "--resolution", "16", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as error:
        main(argv)
    assert error.value.code == 2 and "class(es) ['cats'] have no training images" in capsys.readouterr().err
    (data / "Testing" / "cats").rename(glioma)
    (glioma / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG")
    with pytest.raises(SystemExit) as error:
        main(argv)
    assert error.value.code == 2 and "truncated.jpg" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_extract_with_a_bad_pretrained_folder_leaves_no_output_folder(tmp_path, unlabelled_folder, capsys):
    (tmp_path / "a_file.json").write_text("{}")
    with pytest.raises(SystemExit):
        main(["extract", "--pretrained", str(tmp_path / "a_file.json"), "--data_dir", unlabelled_folder,
              "--output", str(tmp_path / "x" / "y" / "f.safetensors")])
    assert "is a file" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_run_on_two_cpu_processes_pretrains_probes_and_reports_once(tmp_path):
    """Under torchrun, `run` failed in its probe ("Default process group has not been initialized": pretraining's
    `end_training` had destroyed it), and every process wrote the report and printed the summary. On a folder without
    a test split: both processes carve it, and write the held-out list, before pretraining."""
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mic_diffrep",
         "run", "--data_dir", os.path.join(SAMPLE_DATA_DIR, "Training"),
         "--resolution", "16", "--model_config_name_or_path", "tiny", "--pretrain_epochs", "1",
         "--pretrain_batch_size", "8", "--num_inference_steps", "2", "--num_images", "2", "--timesteps", "10",
         "--probe_epochs", "2", "--hidden_size", "8", "--mixed_precision", "no", "--output_dir", str(out)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("MicDiffRep-MS test accuracy") == 1 and done.stdout.count("[1/2] Pretraining") == 1
    report = json.loads((out / "report.json").read_text())
    held_out = read_image_list(str(out / "held_out_images.txt"))
    assert sorted(held_out) == sorted(read_image_list(str(out / "model" / "test_images.txt")))
    assert report["pretraining"]["num_processes"] == 2 and report["probe"]["num_test"] == len(held_out)
    assert report["pretraining"]["num_images"] == 120 - len(held_out) and not list(out.glob(".held_out*.tmp"))
    # the commands recorded start two processes again (they read as a one-process run)
    assert report["command"].startswith("torchrun --nproc_per_node 2 --no-python mic-diffrep run --data_dir")
    pretraining = json.loads((out / "pretrain" / "pretraining_summary.json").read_text())
    assert pretraining["command"].startswith("torchrun --nproc_per_node 2 -m mic_diffrep run --data_dir")
