"""What a user meets on the command line: one-line errors, defaults in --help, clean output folders, folders of
images for predict, and a readable evaluate."""

import json
import logging
import pathlib
import os
import re
import shutil
import subprocess
import sys
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch

import mic_diffrep
from conftest import parse, write_class_folder
from mic_diffrep import (DiffusionFeaturePipeline, MicDiffRepConfig, MicDiffRepForImageClassification,
                         MicDiffRepImageProcessor, create_scheduler, create_unet, save_image_grid)
from mic_diffrep.commands import main as cli
from mic_diffrep.commands.base import run_guarded
from mic_diffrep.models.baselines import create_baseline, save_baseline
from mic_diffrep.models.mic_diffrep.unet import UNET_PRESETS
from mic_diffrep.training import PretrainingArguments, pretrain


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def model_dir(tmp_path):
    config = MicDiffRepConfig(unet_config=dict(UNET_PRESETS["tiny"], sample_size=16), timesteps=[5], hidden_size=8,
                              num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    torch.manual_seed(0)
    MicDiffRepForImageClassification(config).save_pretrained(tmp_path / "model")
    MicDiffRepImageProcessor(resolution=16).save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


def _script(name, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(REPO, "training", name), *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_training_scripts_and_cli_report_bad_input_alike(tmp_path, capsys):
    out = tmp_path / "out"
    result = _script("pretrain.py", "--train_data_dir", str(tmp_path / "missing"), "--output_dir", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == f"training/pretrain.py: error: Data folder '{tmp_path / 'missing'}' does not exist."
    assert not [line for line in lines if " - INFO - " in line]  # no accelerate state logged before the checks
    with pytest.raises(SystemExit) as error:
        cli(["pretrain", "--train_data_dir", str(tmp_path / "missing"), "--output_dir", str(out)])
    assert error.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"Data folder '{tmp_path / 'missing'}' does not exist.")
    assert not out.exists()  # a failed run leaves no empty folder behind
    bad_setting = _script("linear_probe.py", "--pretrained", str(tmp_path), "--data_dir", str(tmp_path),
                          "--validation_split", "2")
    assert bad_setting.returncode == 2 and "validation_split" in bad_setting.stderr.splitlines()[-1]


def test_a_run_destroys_the_process_group_it_started(tmp_path):
    # left to interpreter shutdown, gloo can abort a rank after its work is done, failing a whole torchrun launch
    def work():
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                             world_size=1)
        return "done"

    try:
        assert run_guarded("test", work) == "done" and not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_a_source_checkout_imports_without_being_installed():
    """`pipelines/` is installed as `mic_diffrep.pipelines`: a clone on the import path but not installed
    (`PYTHONPATH=.`, a notebook in the repository) failed at `import mic_diffrep` (no module mic_diffrep.pipelines).
    `python -S` leaves out the installed copy (its editable-install finder, from a .pth file)."""
    import site
    import sysconfig

    paths = [REPO, sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    code = ("import sys, mic_diffrep; from mic_diffrep.pipelines import DiffusionFeaturePipeline as P; "
            "assert mic_diffrep.DiffusionFeaturePipeline is P and 'site-packages' not in mic_diffrep.__file__; "
            "assert mic_diffrep.pipelines.DiffusionFeaturePipeline is P; "
            "print(P.__module__)")
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(paths)), cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "mic_diffrep.pipelines.pipeline_diffusion_features"


def test_help_shows_defaults():
    result = _script("pretrain.py", "--help")
    assert result.returncode == 0
    assert "(default: 32)" in result.stdout and "--save_images_epochs" in result.stdout
    assert "(default: ddim)" in result.stdout
    # ... once: not after a help that states its default, nor as "(default: None)"
    assert "(default: None)" not in result.stdout
    from mic_diffrep.commands import build_parser

    run_help = " ".join(build_parser().subcommands["run"].format_help().split())
    assert "(default None)" not in run_help and "(default cosine)" not in run_help  # `run` writes its own
    assert "Warm-up steps of the schedule (paper: 0). (default 100)" in run_help
    assert re.search(r"every split except test,\s+so test\s+images are never used unless asked for\.\n", result.stdout)


def test_resume_leaves_no_old_files(unlabelled_folder, tmp_path):
    argv = ["--train_data_dir", unlabelled_folder, "--output_dir", str(tmp_path / "out"), "--resolution", "16",
            "--model_config_name_or_path", "tiny", "--train_batch_size", "8", "--logger", "none",
            "--save_images_epochs", "0", "--checkpointing_steps", "2"]
    pretrain(parse(PretrainingArguments, argv + ["--max_train_steps", "2"]))
    pretrain(parse(PretrainingArguments, argv + ["--max_train_steps", "4", "--resume_from_checkpoint", "latest"]))
    names = os.listdir(tmp_path / "out")
    assert "model_index.json" in names and not [n for n in names if ".old-" in n or n.startswith(".tmp")]
    mode = lambda name: os.stat(tmp_path / "out" / name).st_mode & 0o777  # noqa: E731
    assert mode("unet/diffusion_pytorch_model.safetensors") == mode("model_index.json")  # not 0600 (safetensors 0.8)
    weights = [f"checkpoint-4/{name}" for name in os.listdir(tmp_path / "out" / "checkpoint-4")
               if name.endswith(".safetensors")]
    assert weights and {mode(name) for name in weights} == {mode("model_index.json")}  # the checkpoint's too
    assert "samples" not in names  # --save_images_epochs 0: no sample grid


def test_predict_takes_folders_and_skips_bad_images(model_dir, tmp_path, capsys):
    folder = write_class_folder(tmp_path / "images", per_class=2, seed=0, size=20, classes=("a", "b"))
    (tmp_path / "images" / "a" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(SystemExit) as error:
        cli(["predict", "--model", model_dir, folder])
    message = capsys.readouterr().err
    assert error.value.code == 2 and "broken.png" in message and "--skip_bad_images" in message
    predictions = cli(["predict", "--model", model_dir, folder, "--skip_bad_images", "--json"])
    printed = json.loads(capsys.readouterr().out)
    # every file is accounted for, in file order: the skipped one with its error (the JSON left it out)
    assert len(predictions) == len(printed) == 5
    assert [os.path.basename(p["file"]) for p in printed][:3] == ["a_0_0.png", "a_0_1.png", "broken.png"]
    skipped = printed[2]
    assert skipped["label"] is None and skipped["probabilities"] is None and skipped["error"]
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in printed if p["probabilities"])
    cli(["predict", "--model", model_dir, folder, "--skip_bad_images"])
    assert re.search(r"broken\.png: skipped \(.+\)", capsys.readouterr().out)
    # in the order given, a file given twice twice (a first version grouped the rows by file)
    a, b = sorted(p["file"] for p in printed if p["probabilities"])[:2]
    broken = str(tmp_path / "images" / "a" / "broken.png")
    again = cli(["predict", "--model", model_dir, a, broken, b, a, "--skip_bad_images", "--json"])
    assert [p["file"] for p in again] == [a, broken, b, a] and again[0]["probabilities"] == again[3]["probabilities"]
    with pytest.raises(SystemExit):
        cli(["predict", "--model", model_dir, str(tmp_path / "nothing.png")])
    assert "not found" in capsys.readouterr().err


def test_evaluate_a_plain_class_folder_tree(model_dir, tmp_path, capsys):
    folder = write_class_folder(tmp_path / "labelled", per_class=2, seed=1, size=20, classes=("a", "b", "c"))
    report = cli(["evaluate", "--model", model_dir, "--data_dir", folder, "--output", str(tmp_path / "eval.json")])
    printed = capsys.readouterr().out
    assert report["splits"] == ["all"] and report["num_examples"] == 6
    assert printed.startswith("6 images (all) of") and "accuracy" in printed and "{" not in printed
    assert os.path.isfile(tmp_path / "eval_confusion_matrix.png")
    # --json with --output: stdout is the JSON alone (the note on the files written goes to stderr)
    cli(["evaluate", "--model", model_dir, "--data_dir", folder, "--output", str(tmp_path / "again.json"), "--json"])
    printed = capsys.readouterr()
    assert json.loads(printed.out)["num_examples"] == 6 and "again.json" in printed.err


def test_a_missing_or_baseline_model_folder_is_named_for_what_it_is(tmp_path):
    from mic_diffrep.inference import load_classifier

    with pytest.raises(FileNotFoundError, match="'.*nope' does not exist"):  # it said "has no config.json"
        load_classifier(str(tmp_path / "nope"))
    (tmp_path / "byol-probe").mkdir()
    (tmp_path / "byol-probe" / "results.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="a baseline encoder's probe is scored only"):  # "train one with probe"
        load_classifier(str(tmp_path / "byol-probe"))


def test_evaluate_a_folder_of_one_class(model_dir, tmp_path, capsys, caplog):
    """A folder holding one class folder (`Testing/a/`) read as unlabelled: "has no labels"."""
    write_class_folder(tmp_path / "one" / "Testing", per_class=2, seed=1, size=20, classes=("a",))
    for data_dir in (tmp_path / "one", tmp_path / "one" / "Testing" / "a"):
        caplog.clear()
        with caplog.at_level("WARNING"):
            report = cli(["evaluate", "--model", model_dir, "--data_dir", str(data_dir), "--json"])
        assert report["num_examples"] == 2 and report["per_class_recall"]["a"] == report["accuracy"]
        assert "reading all its 2 image file(s) as class 'a'" in caplog.text
    write_class_folder(tmp_path / "other", per_class=2, seed=1, size=20, classes=("x",))  # not a class of the model
    with pytest.raises(SystemExit) as error:
        cli(["evaluate", "--model", model_dir, "--data_dir", str(tmp_path / "other")])
    assert error.value.code == 2 and "named as a class of the model" in capsys.readouterr().err


def test_evaluate_a_folder_of_one_class_sorted_by_patient(model_dir, tmp_path, capsys, monkeypatch):
    """`evaluate --data_dir Testing/a` with `a/patient1/`, `a/patient2/` read the patients as classes: "has classes
    ['patient1', 'patient2'] the model does not know", after loading the model and decoding every image."""
    for patient in ("patient1", "patient2"):
        write_class_folder(tmp_path / "Testing" / "a", per_class=1, seed=1, size=20, classes=(patient,))
    report = cli(["evaluate", "--model", model_dir, "--data_dir", str(tmp_path / "Testing" / "a"), "--json"])
    assert report["num_examples"] == 2 and report["per_class_recall"]["a"] == report["accuracy"]
    write_class_folder(tmp_path / "unknown", per_class=1, seed=1, size=20, classes=("a", "x"))

    def load_classifier(*args):
        raise AssertionError("the model was loaded before the classes were checked")

    monkeypatch.setattr("mic_diffrep.inference.load_classifier", load_classifier)
    with pytest.raises(SystemExit):
        cli(["evaluate", "--model", model_dir, "--data_dir", str(tmp_path / "unknown")])
    assert "has classes ['x'] the model does not know" in capsys.readouterr().err


def test_predict_says_when_an_image_is_blank(model_dir, tmp_path, capsys):
    """An all-constant slice (an empty DICOM frame) got "glioma 1.000" without a word; the demo says so."""
    PIL.Image.new("L", (20, 20), 80).save(tmp_path / "blank.png")
    write_class_folder(tmp_path / "images", per_class=1, seed=0, size=20, classes=("a",))
    rows = cli(["predict", "--model", model_dir, str(tmp_path / "blank.png"), str(tmp_path / "images")])
    out = capsys.readouterr().out
    assert [row.get("warning") for row in rows] == ["blank model input (one grey level): the prediction says nothing "
                                                    "about the image", None]
    assert "blank.png: " in out and "(blank model input (one grey level)" in out and out.count("blank model") == 1


def test_predict_leaves_out_hidden_files_as_evaluate_does(model_dir, tmp_path, capsys):
    folder = write_class_folder(tmp_path / "images", per_class=2, seed=0, size=20, classes=("a", "b"))
    (tmp_path / "images" / "a" / "._a_0_0.png").write_bytes(b"macOS resource fork")
    write_class_folder(tmp_path / "images" / "a" / ".ipynb_checkpoints", per_class=1, seed=0, size=20, classes=("x",))
    predictions = cli(["predict", "--model", model_dir, folder])
    capsys.readouterr()
    assert len(predictions) == 4 and not any("/." in p["file"] for p in predictions)


def test_evaluate_checks_the_data_folder_before_loading_the_model(model_dir, tmp_path, capsys, monkeypatch):
    def load_classifier(*args):
        raise AssertionError("the model was loaded before the data folder was checked")

    monkeypatch.setattr("mic_diffrep.inference.load_classifier", load_classifier)
    with pytest.raises(SystemExit) as error:
        cli(["evaluate", "--model", model_dir, "--data_dir", str(tmp_path / "missing")])
    assert error.value.code == 2 and "missing" in capsys.readouterr().err
    folder = write_class_folder(tmp_path / "labelled", per_class=1, seed=1, size=20, classes=("a", "b"))
    with pytest.raises(SystemExit) as error:
        cli(["evaluate", "--model", model_dir, "--data_dir", folder, "--splits", "validation"])
    assert error.value.code == 2 and "validation" in capsys.readouterr().err


def test_probe_checks_for_labels_before_decoding(unlabelled_folder, tmp_path, capsys):
    from mic_diffrep import DiffusionFeaturePipeline, create_scheduler, create_unet

    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "probe"
    with pytest.raises(SystemExit) as error:
        cli(["probe", "--pretrained", str(tmp_path / "pipe"), "--data_dir", unlabelled_folder, "--output_dir",
             str(out), "--timesteps", "10"])
    assert error.value.code == 2 and "has no labels" in capsys.readouterr().err
    assert not out.exists()  # no decoded-image cache left behind


def test_probe_refuses_push_to_hub_for_a_baseline_before_any_work(kaggle_folder, tmp_path, capsys):
    save_baseline(create_baseline("byol", resolution=16), str(tmp_path / "byol"))
    out = tmp_path / "probe"
    with pytest.raises(SystemExit) as error:
        cli(["probe", "--pretrained", str(tmp_path / "byol"), "--data_dir", kaggle_folder, "--output_dir", str(out),
             "--push_to_hub", "--hub_model_id", "me/byol-probe"])
    assert error.value.code == 2 and "scored only" in capsys.readouterr().err and not out.exists()


def test_probe_push_to_hub_creates_the_repository_once_and_uploads_into_it(kaggle_folder, tmp_path):
    """The repository was created at the start and again at the upload: a network lost by then was reported as
    "cannot create the Hub repository" instead of the failed upload's "upload it again" message."""
    from unittest import mock

    from mic_diffrep import DiffusionFeaturePipeline, create_scheduler, create_unet
    from mic_diffrep.probing import ProbeArguments, run_probe
    from mic_diffrep.reporting import HubError

    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(tmp_path / "pipe")
    probe = ["probe", "--pretrained", str(tmp_path / "pipe"), "--data_dir", kaggle_folder, "--timesteps", "10",
             "--num_epochs", "1", "--hidden_size", "8", "--push_to_hub", "--hub_model_id", "mri-classifier"]
    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/mri-classifier")) as \
            create, mock.patch("huggingface_hub.HfApi.upload_folder") as upload:
        cli(probe + ["--output_dir", str(tmp_path / "probe")])
    assert create.call_count == 1 and upload.call_args.kwargs["repo_id"] == "me/mri-classifier"
    with mock.patch("huggingface_hub.HfApi.create_repo", side_effect=[mock.Mock(repo_id="me/mri-classifier"),
                                                                      ConnectionError("network lost")]), \
            mock.patch("huggingface_hub.HfApi.upload_folder", side_effect=ConnectionError("network lost")):
        with pytest.raises(HubError, match="^The upload to 'me/mri-classifier' failed .* upload it again later"):
            run_probe(parse(ProbeArguments, probe[1:] + ["--output_dir", str(tmp_path / "again")]))
    assert (tmp_path / "again" / "model.safetensors").is_file()


def test_a_cpu_run_warns_when_accelerate_leaves_cores_idle(monkeypatch, caplog):
    from mic_diffrep.utils import create_accelerator

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what `accelerate launch` sets unless given a thread count
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr("torch.get_num_threads", lambda: 1)
    create_accelerator()
    assert "--num_cpu_threads_per_process 2" in caplog.text
    caplog.clear()
    monkeypatch.setattr("torch.get_num_threads", lambda: 2)
    create_accelerator()
    assert "num_cpu_threads_per_process" not in caplog.text
    # Two processes of 2 threads each on 2 cores: the threads spin against each other (nothing was said)
    from mic_diffrep.utils import _check_cpu_threads

    _check_cpu_threads(2)
    assert "2 process(es) x 2 torch thread(s) on 2 CPU cores" in caplog.text
    assert "--num_cpu_threads_per_process 1" in caplog.text


def test_generate_on_a_baseline_folder_is_a_clear_error(tmp_path, capsys):
    save_baseline(create_baseline("byol", resolution=16), str(tmp_path / "byol"))
    with pytest.raises(SystemExit) as error:
        cli(["generate", "--pretrained", str(tmp_path / "byol"), "--output", str(tmp_path / "s.png")])
    assert error.value.code == 2 and "cannot generate images" in capsys.readouterr().err


def test_a_16_bit_copy_of_an_8_bit_slice_gets_the_same_prediction(model_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    slice8 = (rng.random((24, 24)) * 170).astype(np.uint8)
    PIL.Image.fromarray(slice8).save(tmp_path / "eight.png")
    PIL.Image.fromarray(slice8.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    predictions = cli(["predict", "--model", model_dir, str(tmp_path / "eight.png"), str(tmp_path / "sixteen.png")])
    capsys.readouterr()
    assert predictions[0]["label"] == predictions[1]["label"]
    for name in ("a", "b", "c"):
        assert abs(predictions[0]["probabilities"][name] - predictions[1]["probabilities"][name]) < 0.02


def test_the_hub_token_is_written_nowhere(kaggle_folder, tmp_path, monkeypatch):
    """Results files, the pretraining summary and tracker logs are uploaded by --push_to_hub: none may hold the
    token given on the command line."""
    secret = "hf_SECRETTOKEN123"
    pipe, model = tmp_path / "pipe", tmp_path / "model"
    argv = ["pretrain", "--train_data_dir", kaggle_folder, "--output_dir", str(pipe), "--resolution", "16",
            "--model_config_name_or_path", "tiny", "--train_batch_size", "8", "--max_train_steps", "1",
            "--save_images_epochs", "0", "--logger", "tensorboard", "--hub_token", secret]
    monkeypatch.setattr(sys, "argv", ["mic-diffrep"] + argv)
    cli(argv)
    argv = ["probe", "--pretrained", str(pipe), "--data_dir", kaggle_folder, "--output_dir", str(model),
            "--timesteps", "10", "--layers", "mid_block", "--num_epochs", "1", f"--hub-token={secret}"]
    monkeypatch.setattr(sys, "argv", ["mic-diffrep"] + argv)
    cli(argv)
    written = [path for folder in (pipe, model) for path in folder.rglob("*") if path.is_file()]
    assert any(path.name == "results.json" for path in written) and any("events" in path.name for path in written)
    assert [str(path) for path in written if secret.encode() in path.read_bytes()] == []
    assert "--hub-token=***" in json.loads((model / "results.json").read_text())["command"]


def test_push_folder_leaves_the_training_images_and_checkpoints_local(tmp_path):
    """`push_folder` (public) uploaded a folder whole: the decode cache (every training image as pixels), feature
    caches, checkpoints and tracker logs; its retry command (`hf upload`) would have too."""
    from huggingface_hub.utils import filter_repo_objects

    from mic_diffrep.reporting import HubError, push_folder

    for name in (".cache/decoded-1.safetensors", "features/train.safetensors", "checkpoint-2/model.safetensors",
                 "logs/events", "model.safetensors", "config.json"):
        (tmp_path / "out" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / name).write_text("x")
    uploaded = {}

    def upload_folder(**kwargs):
        files = [str(p.relative_to(kwargs["folder_path"])) for p in pathlib.Path(kwargs["folder_path"]).rglob("*")
                 if p.is_file()]
        uploaded["files"] = sorted(filter_repo_objects(files, ignore_patterns=kwargs["ignore_patterns"]))

    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/out")), \
            mock.patch("huggingface_hub.HfApi.upload_folder", side_effect=upload_folder):
        push_folder(str(tmp_path / "out"), "me/out")
    assert uploaded["files"] == ["config.json", "model.safetensors"]
    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/out")), \
            mock.patch("huggingface_hub.HfApi.upload_folder", side_effect=ConnectionError("reset")):
        with pytest.raises(HubError, match=r"upload it again later with `hf upload me/out .*/out --exclude "
                                           r"'checkpoint-\*' --exclude '.cache/\*'"):
            push_folder(str(tmp_path / "out"), "me/out")


def test_commands_take_hub_repository_ids_as_from_pretrained_does(model_dir, kaggle_folder, tmp_path, monkeypatch,
                                                                  capsys):
    """`--pretrained user/repo` and `--model user/repo`, the ids the model cards give, were refused: "Pretrained
    folder 'user/repo' does not exist" / "Model folder ... train one with mic-diffrep probe"."""
    import huggingface_hub

    def cache(repo_id, folder):  # a repository as a download leaves it in the Hub cache
        root = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(folder, root / "snapshots" / ("0" * 40))
        (root / "refs").mkdir()
        (root / "refs" / "main").write_text("0" * 40)

    pipe = tmp_path / "pipe"
    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(pipe)
    cache("me/pre", pipe)
    cache("me/cls", model_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # nothing is downloaded in the tests
    image = os.path.join(kaggle_folder, "Testing", "glioma", os.listdir(os.path.join(kaggle_folder, "Testing",
                                                                                      "glioma"))[0])
    by_id, by_folder = (cli(["predict", "--model", model, image, "--json"]) for model in ("me/cls", model_dir))
    assert by_id[0]["probabilities"] == by_folder[0]["probabilities"]
    cli(["extract", "--pretrained", "me/pre", "--data_dir", kaggle_folder, "--output",
         str(tmp_path / "features.safetensors"), "--timesteps", "5", "--layers", "mid_block"])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "features.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["source_model"]) == "me/pre"  # as given, not a cache path
    # a classifier probed from a Hub pipeline names it as its base_model (the Hub's model tree)
    cli(["probe", "--pretrained", "me/pre", "--data_dir", kaggle_folder, "--output_dir", str(tmp_path / "probe"),
         "--timesteps", "5", "--layers", "mid_block", "--num_epochs", "1"])
    card = (tmp_path / "probe" / "README.md").read_text()
    assert "base_model: me/pre" in card and "[`me/pre`](https://huggingface.co/me/pre)" in card
    # the commit read is recorded, and --revision pins another (a branch, tag or commit of the repository)
    results = json.loads((tmp_path / "probe" / "results.json").read_text())
    assert results["pretrained_revision"] == "0" * 40 and "at commit `0000000000`" in card
    other = tmp_path / "other"  # the classifier, with another class balance
    shutil.copytree(model_dir, other)
    with torch.no_grad():
        model = MicDiffRepForImageClassification.from_pretrained(other)
        model.head.classifier.bias[0] += 2.0
        model.save_pretrained(other)
    root = tmp_path / "hub" / "models--me--cls"
    shutil.copytree(other, root / "snapshots" / ("1" * 40))
    (root / "refs" / "v2").write_text("1" * 40)
    pinned = [cli(["predict", "--model", "me/cls", image, "--json", "--revision", revision])[0]["probabilities"]
              for revision in ("v2", "1" * 40, "main")]
    assert pinned[0] == pinned[1] != pinned[2] == by_id[0]["probabilities"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli(["predict", "--model", model_dir, image, "--revision", "v2"])
    assert "--revision v2: model folder" in capsys.readouterr().err  # a local folder has no revisions
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli(["predict", "--model", "me/missing", image])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Model folder 'me/missing' does not exist here, and no Hub repository 'me/missing' could be loaded" in message
    # a local path with a typo (its first folder is here) is not looked up on the Hub
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with mock.patch("huggingface_hub.snapshot_download") as download, pytest.raises(SystemExit):
        cli(["predict", "--model", "runs/modle", image])
    assert not download.called
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "Model folder 'runs/modle' does not exist; train one with `mic-diffrep probe` or `mic-diffrep run`.")


def test_a_run_or_pipeline_folder_given_as_the_model_names_the_classifier_folder(model_dir, tmp_path, capsys):
    """`predict`, `evaluate` and `demo --model runs/mic-diffrep` (or its pretrain/) said "has no config.json; train one
    with `mic-diffrep probe` or `mic-diffrep run`" to a user who had just run `run`; `generate` names the folder."""
    run = tmp_path / "run"
    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(run / "pretrain")
    image = tmp_path / "slice.png"
    PIL.Image.new("L", (16, 16), 50).save(image)

    def error(model):
        with pytest.raises(SystemExit):
            cli(["predict", "--model", str(model), str(image)])
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert "is a `mic-diffrep run` folder: its classifier is" in error(run) and "not written yet" in error(run)
    assert f"make one from it with `mic-diffrep probe --pretrained {run / 'pretrain'}" in error(run / "pretrain")
    shutil.copytree(model_dir, run / "model")
    assert error(run).endswith(f"its classifier is {str(run / 'model')!r}.")
    assert error(run / "pretrain").endswith(f"the classifier of its run is {str(run / 'model')!r}.")
    from mic_diffrep.demo import load_demo_model

    with pytest.raises(FileNotFoundError, match="is a `mic-diffrep run` folder"):
        load_demo_model(str(run))


def test_a_relative_data_folder_is_published_by_its_name(kaggle_folder, tmp_path, monkeypatch):
    """`probe --data_dir ../data/kaggle` uploaded "Test split: the test split of ../data/kaggle" in its card and
    results: the results record the folder as an absolute path, which publishing cuts, while the split's description
    kept it as typed."""
    from mic_diffrep.reporting.model_card import model_card_text, published_results

    pipe, model = tmp_path / "pipe", tmp_path / "model"
    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(pipe)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    relative = os.path.relpath(kaggle_folder)
    assert relative.startswith("..")
    cli(["probe", "--pretrained", str(pipe), "--data_dir", relative, "--output_dir", str(model),
         "--timesteps", "10", "--layers", "mid_block", "--num_epochs", "1"])
    results = json.loads((model / "results.json").read_text())
    published = published_results(results)
    assert published["test_split"] == "the test split of kaggle"
    assert relative not in json.dumps(published) and relative not in model_card_text(published, "me/model")


def test_a_test_folder_of_one_class_is_read_as_that_class(kaggle_folder, tmp_path):
    """`probe --test_data_dir site2` with only `site2/meningioma/` (another site's cases of one diagnosis) said "has
    no labels", where `evaluate` reads the same folder as that class."""
    write_class_folder(tmp_path / "site2", per_class=3, seed=5, size=20, classes=("meningioma",))
    pipe, model = tmp_path / "pipe", tmp_path / "model"
    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(pipe)
    cli(["probe", "--pretrained", str(pipe), "--data_dir", os.path.join(kaggle_folder, "Training"),
         "--test_data_dir", str(tmp_path / "site2"), "--output_dir", str(model), "--timesteps", "10", "--layers",
         "mid_block", "--num_epochs", "1"])
    results = json.loads((model / "results.json").read_text())
    assert results["num_test"] == 3
    matrix = results["msfa"]["test"]["all"]["confusion_matrix"]
    assert [sum(row) for row in matrix] == [0, 3, 0, 0]  # all three are meningioma


def test_the_datas_own_validation_split_chooses_layers_and_timesteps(tmp_path, caplog):
    """A train/ val/ test/ layout merged val/ into the training images and carved a validation part of its own: the
    user's split was not the one layers and timesteps were chosen on."""
    pipe = tmp_path / "pipe"
    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(pipe)
    for split, per_class, seed in (("train", 6, 0), ("val", 3, 1), ("test", 2, 2)):
        write_class_folder(tmp_path / "data" / split, per_class=per_class, seed=seed, size=20, classes=("a", "b"))

    def probe(data, out):
        cli(["probe", "--pretrained", str(pipe), "--data_dir", str(data), "--output_dir", str(out), "--timesteps",
             "10", "--layers", "mid_block", "--num_epochs", "1"])
        return json.loads((out / "results.json").read_text())

    results = probe(tmp_path / "data", tmp_path / "model")
    assert (results["num_train"], results["num_validation"], results["num_test"]) == (12, 6, 4)
    assert results["validation_split"] == f"the validation split of {tmp_path / 'data'}"
    assert f"6 validation (the validation split of {tmp_path / 'data'})" in (tmp_path / "model" / "results.md"
                                                                              ).read_text()
    # Validation images with a near-duplicate in train/ (a copy, a mirror image) are counted and warned about: their
    # scores flatter what is chosen on them (val/ was not checked against train/)
    from PIL import Image, ImageOps

    train_a = sorted((tmp_path / "data" / "train" / "a").iterdir())
    shutil.copy(train_a[0], tmp_path / "data" / "val" / "a" / "copy.png")
    ImageOps.mirror(Image.open(train_a[1])).save(tmp_path / "data" / "val" / "a" / "mirror.png")
    with caplog.at_level(logging.WARNING):
        results = probe(tmp_path / "data", tmp_path / "leaky")
    assert results["validation_split"] == (f"the validation split of {tmp_path / 'data'} (2 of its 8 images have a "
                                           f"near-duplicate among the training images)")
    assert "2 of the 8 validation images" in caplog.text
    for name in ("copy.png", "mirror.png"):
        (tmp_path / "data" / "val" / "a" / name).unlink()
    # Without a test split, the test images are carved from train/ only; val/ stays the validation part
    shutil.rmtree(tmp_path / "data" / "test")
    results = probe(tmp_path / "data", tmp_path / "model2")
    assert results["num_validation"] == 6 and results["num_train"] + results["num_test"] == 12
    tested = (tmp_path / "model2" / "test_images.txt").read_text().split()
    assert tested and not any("/val/" in path or path.startswith("val/") for path in tested)
    assert "of its training images" in results["test_split"]
    assert "chosen on the validation images: the validation split of" in (tmp_path / "model" / "README.md").read_text()
    # val/ without train/ is training images, as before validation splits were used (it failed after pretraining)
    shutil.move(str(tmp_path / "data" / "train"), str(tmp_path / "train-aside"))
    write_class_folder(tmp_path / "data" / "test", per_class=2, seed=2, size=20, classes=("a", "b"))
    results = probe(tmp_path / "data", tmp_path / "model3")
    assert results["num_train"] + results["num_validation"] == 6 and results["num_test"] == 4
    assert "carved from the training images" in results["validation_split"]


def test_results_of_a_class_without_test_images_are_strict_json(tmp_path, monkeypatch):
    """A class missing from Testing/ has no recall: results.json held `NaN`, which is not JSON (JavaScript's and
    most other readers refuse it), while `evaluate --json` wrote null; the card and results.md then failed on it."""
    from mic_diffrep.reporting import push_to_hub
    from mic_diffrep.reporting.model_card import model_card_text
    from mic_diffrep.reporting.results import results_markdown

    root = tmp_path / "data"
    write_class_folder(root / "Training", per_class=6, seed=1, size=20, classes=("a", "b", "c"))
    write_class_folder(root / "Testing", per_class=3, seed=2, size=20, classes=("a", "b"))
    pipe, model = tmp_path / "pipe", tmp_path / "model"
    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(pipe)
    cli(["probe", "--pretrained", str(pipe), "--data_dir", str(root), "--output_dir", str(model),
         "--timesteps", "10", "--layers", "mid_block", "--num_epochs", "1"])

    def strict(path):
        return json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{path.name} holds {name}"))

    results = strict(model / "results.json")
    assert results["msfa"]["test"]["all"]["per_class_recall"]["c"] is None
    # and the results say so, where the headline accuracy does not
    warning = "Class(es) without test images: c; they have no recall, and the accuracy says nothing of them."
    assert warning in results["class_warnings"] and warning in (model / "results.md").read_text()
    assert "| n/a |" in results_markdown(results) and "c n/a" in model_card_text(results, "me/model")
    uploaded = {}
    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/model")), \
            mock.patch("huggingface_hub.HfApi.upload_folder",
                       side_effect=lambda **kwargs: uploaded.update(results=strict(
                           pathlib.Path(kwargs["folder_path"]) / "results.json"))):
        push_to_hub(str(model), "me/model")  # reads the results file back: null, not NaN
    assert uploaded["results"]["msfa"]["test"]["all"]["per_class_recall"]["c"] is None


def test_the_command_recorded_starts_the_processes_and_module_that_ran(monkeypatch):
    """Results recorded `training/pretrain.py ...` for a two-process run, and the path of `mic_diffrep/__main__.py`
    for `python -m mic_diffrep`: pasted back, neither ran the same way."""
    from mic_diffrep.utils import command_line

    main_py = os.path.join(os.path.dirname(mic_diffrep.__file__), "__main__.py")
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert command_line([main_py, "probe", "--x", "1"]) == "python -m mic_diffrep probe --x 1"
    assert command_line(["training/pretrain.py", "--x", "1"]) == "training/pretrain.py --x 1"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    launcher = "torchrun --nproc_per_node 2 --nnodes 2"
    assert command_line(["training/pretrain.py", "--x"]) == f"{launcher} training/pretrain.py --x"
    assert command_line([main_py, "run"]) == f"{launcher} -m mic_diffrep run"
    assert command_line(["/venv/bin/mic-diffrep", "run"]) == f"{launcher} --no-python mic-diffrep run"
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: the same as none
    assert command_line(["/venv/bin/mic-diffrep", "run"]) == "mic-diffrep run"


def test_only_the_first_process_of_a_launch_logs_progress_and_warnings():
    """Every process of a launch printed each warning (logged or warned) once more: two processes, twice."""
    script = ("import logging, warnings; from mic_diffrep.commands.base import configure_logging; configure_logging(); "
              "log = logging.getLogger('mic_diffrep.x'); log.info('progress-line'); log.warning('logged-warning'); "
              "warnings.warn('warned-warning'); log.error('logged-error'); "
              "import diffusers.utils.logging as d; d.get_logger('diffusers.x').warning('library-warning')")
    said = {}
    for local_rank in (None, "0", "1"):  # no launcher; torchrun's first and second processes
        env = {key: value for key, value in os.environ.items() if key != "LOCAL_RANK"}
        env.update({"LOCAL_RANK": local_rank} if local_rank else {})
        stderr = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True).stderr
        said[local_rank] = [line for line in ("progress", "logged-warning", "warned-warning", "logged-error",
                                              "library-warning") if line in stderr]
    assert said[None] == said["0"] == ["progress", "logged-warning", "warned-warning", "logged-error",
                                       "library-warning"]
    assert said["1"] == ["logged-error"]


def test_generate_samples_with_ddpm_as_it_says_and_names_its_flag(tmp_path, capsys):
    """`generate` (--scheduler ddpm, "the pipeline's own") sampled with DDIM from a pipeline saved with a
    DDIMScheduler; too many steps failed in diffusers' words, without the flag."""
    from diffusers import DDIMScheduler

    pipe = DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler())
    ddpm = pipe(batch_size=2, num_inference_steps=3, output_type="np",
                generator=[torch.Generator().manual_seed(seed) for seed in (0, 1)]).images
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "pipe")
    generate = ["generate", "--pretrained", str(tmp_path / "pipe"), "--num_images", "2", "--seed", "0",
                "--mixed_precision", "no", "--output", str(tmp_path / "grid.png")]
    cli(generate + ["--num_inference_steps", "3"])
    grid = np.asarray(PIL.Image.open(tmp_path / "grid.png"))
    assert np.array_equal(grid, np.asarray(save_image_grid(ddpm, str(tmp_path / "ddpm.png"))))
    with pytest.raises(SystemExit):
        cli(generate + ["--num_inference_steps", "2000"])
    assert "--num_inference_steps 2000: the pipeline was trained on 1000 timesteps" in capsys.readouterr().err


def test_generate_draws_each_image_with_its_own_seed_in_batches_and_writes_one_file_each(tmp_path, capsys,
                                                                                          monkeypatch):
    """`generate` drew all its images in one batch (no --batch_size) from one generator, so an image depended on how
    many were drawn with it, and wrote only a grid (no file per image)."""
    pipe = DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    monkeypatch.chdir(tmp_path)
    generate = ["generate", "--pretrained", str(tmp_path / "pipe"), "--scheduler", "ddim", "--num_inference_steps",
                "3", "--mixed_precision", "no"]
    cli(generate + ["--num_images", "5", "--batch_size", "2", "--seed", "3", "--output_dir", str(tmp_path / "out")])
    assert sorted(os.listdir(tmp_path / "out")) == [f"seed{seed:04d}.png" for seed in range(3, 8)]
    assert not os.path.exists("samples.png") and "Saved 5 sample(s) (seeds 3-7)" in capsys.readouterr().out
    cli(generate + ["--num_images", "2", "--seed", "7", "--output_dir", str(tmp_path / "out")])
    assert "Replacing 1 image(s) of " in capsys.readouterr().err  # seed0007.png, drawn before; seed0008.png is new
    cli(generate + ["--num_images", "1", "--seed", "6", "--output", str(tmp_path / "alone.png")])
    alone = np.asarray(PIL.Image.open(tmp_path / "alone.png").convert("L"), dtype=int)
    sixth = np.asarray(PIL.Image.open(tmp_path / "out" / "seed0006.png"), dtype=int)
    assert np.abs(alone - sixth).max() <= 1  # drawn alone or in a batch of two: the same image
    assert np.abs(sixth - np.asarray(PIL.Image.open(tmp_path / "out" / "seed0007.png"), dtype=int)).max() > 10
    cli(generate + ["--num_images", "5", "--seed", "3", "--output", str(tmp_path / "grid.png")])
    grid = np.asarray(PIL.Image.open(tmp_path / "grid.png").convert("L"), dtype=int)  # 2 rows: seeds 3-5, 6-7
    assert np.abs(grid[16:32, :16] - alone).max() <= 1
    with pytest.raises(SystemExit):
        cli(generate + ["--batch_size", "0"])
    assert "--batch_size must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # torch seeds are 64-bit signed: an overflow error named nothing
        cli(generate + ["--seed", str(2**64 - 1)])
    assert "--seed must be in [0, 2**63 - --num_images]" in capsys.readouterr().err


def test_output_paths_are_checked_before_the_work(model_dir, unlabelled_folder, tmp_path, capsys, monkeypatch):
    """A file, a folder of the other kind of model, an unwritable folder or a file name PIL cannot write failed after
    the work (a traceback), or mixed a pipeline into a classifier folder (its model card replaced)."""
    from mic_diffrep import DiffusionFeaturePipeline, create_scheduler, create_unet

    pipe = str(tmp_path / "pipe")
    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(pipe)
    labelled = write_class_folder(tmp_path / "labelled", per_class=2, seed=1, size=20, classes=("a", "b", "c"))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    card = (tmp_path / "model" / "config.json").read_text()

    def fails(argv, named):
        with pytest.raises(SystemExit) as error:
            cli(argv)
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.value.code == 2 and named in message, message

    pretrain_flags = ["pretrain", "--train_data_dir", unlabelled_folder, "--resolution", "16",
                      "--model_config_name_or_path", "tiny", "--max_train_steps", "1", "--logger", "none"]
    fails(pretrain_flags + ["--output_dir", str(a_file)], f"--output_dir {a_file} is a file; give a folder")
    fails(pretrain_flags + ["--output_dir", model_dir], "holds a transformers classifier folder")
    assert (tmp_path / "model" / "config.json").read_text() == card and os.listdir(model_dir) == os.listdir(
        tmp_path / "model")
    fails(["probe", "--pretrained", pipe, "--data_dir", labelled, "--output_dir", pipe, "--timesteps", "5"],
          "holds a diffusers pipeline folder (model_index.json)")
    fails(["generate", "--pretrained", pipe, "--output", str(tmp_path / "samples.txt")],
          "give the name of an image file PIL can write")
    fails(["extract", "--pretrained", pipe, "--data_dir", labelled, "--output", str(tmp_path)], "is a folder")
    fails(["extract", "--pretrained", pipe, "--data_dir", labelled, "--output", str(tmp_path / "features.csv")],
          "ending in .safetensors")

    from mic_diffrep.utils import output_folder

    (tmp_path / "byol").mkdir()
    (tmp_path / "byol" / "baseline_config.json").write_text("{}")
    for folder, kind, held in ((model_dir, "baseline", "a transformers classifier folder"),
                               (pipe, "baseline", "a diffusers pipeline folder"),
                               (str(tmp_path / "byol"), "model", "a baseline encoder folder"),
                               (str(tmp_path / "byol"), "pipeline", "a baseline encoder folder")):  # was mixed
        with pytest.raises(ValueError, match=f"holds {held}"):  # its model.safetensors would be replaced
            with output_folder(folder, kind=kind):
                pass

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("mic_diffrep.utils.tempfile.NamedTemporaryFile", read_only)
    fails(pretrain_flags + ["--output_dir", str(tmp_path / "new")], "cannot write into")
    assert not (tmp_path / "new").exists()
    fails(["evaluate", "--model", model_dir, "--data_dir", labelled, "--output", str(tmp_path / "r.json")],
          "cannot write into")


def test_python_entry_points_take_one_path_or_split_as_a_string(model_dir, tmp_path, unlabelled_folder):
    """A string was taken as a list of one-character paths ("Image file or folder not found: t") or splits."""
    from mic_diffrep.inference import evaluate_folder, predict_files

    folder = write_class_folder(tmp_path / "labelled", per_class=2, seed=1, size=20, classes=("a", "b", "c"))
    one = os.path.join(folder, "a", sorted(os.listdir(os.path.join(folder, "a")))[0])
    assert len(predict_files(model_dir, one)) == 1
    assert evaluate_folder(model_dir, folder, splits="all")["num_examples"] == 6
    # A classifier folder where a UNet config is expected: a TypeError from UNet2DModel before
    with pytest.raises(ValueError, match="is the config of a 'mic_diffrep' model, not of a UNet2DModel"):
        PretrainingArguments(train_data_dir=unlabelled_folder, model_config_name_or_path=model_dir)


def test_ctrl_c_outside_training_is_one_line_and_exit_code_130(capsys):
    def probe():  # Ctrl-C while features are extracted: a KeyboardInterrupt traceback before
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as error:
        run_guarded("mic-diffrep probe", probe)
    assert error.value.code == 130 and capsys.readouterr().err == "mic-diffrep probe: interrupted\n"


def test_a_damaged_model_folder_is_one_line_naming_it(model_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])  # a truncated copy: a SafetensorError traceback before
    image = str(tmp_path / "slice.png")
    PIL.Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(image)
    with pytest.raises(SystemExit) as error:
        cli(["predict", "--model", str(broken), image])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.value.code == 2 and f"Model folder {str(broken)!r} cannot be loaded" in message
    (broken / "preprocessor_config.json").unlink()  # an OSError traceback from transformers before
    weights.write_bytes((tmp_path / "model" / "model.safetensors").read_bytes())
    with pytest.raises(SystemExit) as error:
        cli(["predict", "--model", str(broken), image])
    assert error.value.code == 2 and "cannot be loaded" in capsys.readouterr().err


def test_an_interrupted_launch_says_so_once(monkeypatch, capsys):
    """Every process of a 2-process launch printed the "interrupted; a checkpoint was saved" line, and lines of two
    processes ran into each other (print writes the newline apart)."""
    from mic_diffrep.commands.base import run_guarded

    for rank, said in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as error:
            run_guarded("prog", lambda: {"stop_reason": "interrupted"})
        assert error.value.code == 130 and ("prog: interrupted; a checkpoint was saved" in capsys.readouterr().err) \
            == said


def test_extract_seed_is_a_deprecated_name_of_noise_seed():
    """`extract --seed` was the noise seed, `probe --seed` the split and training seed: one name, two ideas."""
    from mic_diffrep.features import ExtractionArguments

    base = ["--pretrained", "P", "--data_dir", "D", "--output", "f.safetensors"]
    with pytest.warns(FutureWarning, match="`seed` of extract is deprecated.*noise_seed"):
        args = parse(ExtractionArguments, base + ["--seed", "3"])
    assert args.noise_seed == 3 and args.seed is None
    assert parse(ExtractionArguments, base + ["--noise_seed", "3"]).noise_seed == 3
    with pytest.raises(ValueError, match="give --noise_seed only"):
        parse(ExtractionArguments, base + ["--seed", "3", "--noise_seed", "4"])
    with pytest.raises(ValueError, match="give --noise_seed only"):  # an explicit 0 is not the default: 5 was taken
        parse(ExtractionArguments, base + ["--seed", "5", "--noise_seed", "0"])
    assert parse(ExtractionArguments, base).noise_seed == 0


def test_extract_and_probe_follow_accelerate_launchs_precision_when_not_given(kaggle_folder, tmp_path, monkeypatch):
    """`accelerate launch --mixed_precision bf16` (or the accelerate config) was ignored by extract and probe,
    which ran in float32 unless given --mixed_precision, while pretraining followed it."""
    from safetensors import safe_open

    from mic_diffrep import DiffusionFeaturePipeline, create_scheduler, create_unet

    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(tmp_path / "pipe")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what the launcher passes its processes
    cli(["extract", "--pretrained", str(tmp_path / "pipe"), "--data_dir", kaggle_folder, "--output",
         str(tmp_path / "f.safetensors"), "--timesteps", "10"])
    settings = json.loads(safe_open(str(tmp_path / "f.safetensors"), "pt").metadata()["settings"])
    assert settings["mixed_precision"] == "bf16"
    cli(["probe", "--pretrained", str(tmp_path / "pipe"), "--data_dir", kaggle_folder, "--output_dir",
         str(tmp_path / "probe"), "--timesteps", "10", "--num_epochs", "1", "--hidden_size", "8"])
    assert json.loads((tmp_path / "probe" / "config.json").read_text())["mixed_precision"] == "bf16"


def test_predict_on_many_files_shows_progress_and_converts_a_batch_at_a_time(model_dir, tmp_path, capsys):
    """`predict` on 8,000 images printed nothing for minutes, and `predict` / `evaluate` made float32 copies of every
    decoded image at once (+6.4 GiB for 50,000 images at 112 px) before classifying them a batch at a time."""
    from mic_diffrep.data import decode_images, pixels_to_model_input
    from mic_diffrep.inference import load_classifier, predict_probabilities

    folder = write_class_folder(tmp_path / "many", per_class=6, seed=4, size=20, classes=("a", "b", "c"))
    model, processor = load_classifier(model_dir)
    pixels = decode_images(sorted(str(p) for p in (tmp_path / "many").rglob("*.png")), processor.preprocessing,
                           show_progress=False).pixels
    torch.testing.assert_close(predict_probabilities(model, pixels, batch_size=4),
                               predict_probabilities(model, pixels_to_model_input(pixels), batch_size=4))
    capsys.readouterr()
    rows = cli(["predict", "--model", model_dir, folder, "--batch_size", "4", "--json"])
    assert len(rows) == 18 and "Classifying" in capsys.readouterr().err


def test_results_record_the_package_version_and_the_commit_they_were_made_with():
    """Results files recorded library versions only: not which version of this package's code made them."""
    from mic_diffrep.utils import environment_info

    info = environment_info()
    assert info["mic_diffrep"] == mic_diffrep.__version__
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert info["source_commit"].split("+")[0] == head.stdout.strip()


@pytest.mark.parametrize("file, changes", [
    ("preprocessor_config.json", {"image_processor_type": "EvilProcessor", "auto_map": {
        "AutoImageProcessor": "evil.EvilProcessor"}}),
    ("config.json", {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}})])
def test_a_model_folder_naming_code_of_its_own_is_refused_without_running_it(model_dir, tmp_path, monkeypatch,
                                                                            capsys, file, changes):
    """`predict` loaded a classifier folder through the Auto classes: one naming code of its own (`auto_map`) got
    a terminal asked "Do you wish to run the custom code? [y/N]", and "y" ran it before the folder was refused."""
    import transformers.dynamic_module_utils

    folder = tmp_path / "crafted"
    shutil.copytree(model_dir, folder)
    marker = tmp_path / "code_ran"
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                    "class EvilProcessor: pass\nclass EvilConfig: pass\n")
    settings = json.loads((folder / file).read_text())
    (folder / file).write_text(json.dumps({**settings, **changes}))
    monkeypatch.setattr(transformers.dynamic_module_utils, "resolve_trust_remote_code",
                        lambda *args, **kwargs: True)  # a user answering "y" at the prompt
    image = tmp_path / "x.png"
    PIL.Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(image)
    with pytest.raises(SystemExit):
        cli(["predict", "--model", str(folder), str(image)])
    err = capsys.readouterr().err
    assert "is not a MicDiffRep classifier folder" in err and "none of its code was run" in err
    assert not marker.exists()


def test_outputs_inside_the_data_folder_are_refused_before_any_work(model_dir, kaggle_folder, tmp_path, capsys):
    """`evaluate --output` replaced an input image with its JSON report (and its confusion matrix became a new
    image of the class); `probe` and `pretrain` into the data folder replaced its README.md and left their files to
    be read as data."""
    image = os.path.join(kaggle_folder, "Testing", "glioma", sorted(os.listdir(
        os.path.join(kaggle_folder, "Testing", "glioma")))[0])
    before = open(image, "rb").read()
    files_before = sorted(str(p) for p in pathlib.Path(kaggle_folder).rglob("*"))
    commands = [["evaluate", "--model", model_dir, "--data_dir", kaggle_folder, "--output", image],
                ["probe", "--pretrained", "p", "--data_dir", kaggle_folder, "--output_dir", kaggle_folder],
                ["pretrain", "--train_data_dir", kaggle_folder, "--output_dir",
                 os.path.join(kaggle_folder, "Training", "out")],
                ["run", "--data_dir", kaggle_folder, "--output_dir", os.path.join(kaggle_folder, "run")]]
    for command in commands:
        with pytest.raises(SystemExit) as error:
            cli(command)
        assert error.value.code == 2
        assert "is inside the data folder" in capsys.readouterr().err, command
    assert open(image, "rb").read() == before
    assert sorted(str(p) for p in pathlib.Path(kaggle_folder).rglob("*")) == files_before


def test_a_readme_of_the_users_own_is_not_replaced_by_a_model_card(kaggle_folder, unlabelled_folder, tmp_path,
                                                                   capsys):
    """`probe` and `pretrain` into a folder holding the user's README.md replaced it with their model card (only
    their own files counted as an earlier run's); a folder of an earlier run, card and all, is replaced as before."""
    pipe = tmp_path / "pipe"
    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(pipe)
    for name, command in (("probe", ["probe", "--pretrained", str(pipe), "--data_dir", kaggle_folder, "--timesteps",
                                     "5", "--num_epochs", "1", "--hidden_size", "8"]),
                          ("pretrain", ["pretrain", "--train_data_dir", unlabelled_folder, "--resolution", "16",
                                        "--model_config_name_or_path", "tiny", "--max_train_steps", "1",
                                        "--logger", "none"])):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "README.md").write_text("# My notes\n")
        with pytest.raises(SystemExit):
            cli(command + ["--output_dir", str(folder)])
        assert "holds a README.md that is not a mic-diffrep model card" in capsys.readouterr().err
        assert (folder / "README.md").read_text() == "# My notes\n"
        (folder / "README.md").unlink()
        cli(command + ["--output_dir", str(folder)])  # its own card, then replaced by a rerun's
        assert "mic-diffrep" in (folder / "README.md").read_text()
        cli(command + ["--output_dir", str(folder), "--overwrite_output_dir"])


def test_a_results_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """`results.json`, `report.json` and `--output` were written in place: a run killed while writing left a
    truncated file instead of the earlier one."""
    from mic_diffrep import utils

    path = tmp_path / "results.json"
    utils.write_json(str(path), {"accuracy": 0.5})
    if os.name == "posix":
        umask = os.umask(0o022)
        os.umask(umask)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(utils.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        utils.write_json(str(path), {"accuracy": 0.9})
    assert json.loads(path.read_text()) == {"accuracy": 0.5} and os.listdir(tmp_path) == ["results.json"]
