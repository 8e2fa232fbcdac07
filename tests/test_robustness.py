"""Bad inputs fail clearly (or are skipped and listed), interrupted runs resume exactly, failures keep checkpoints."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from conftest import parse, synthetic_slice, write_class_folder
from mic_diffrep import DiffusionFeaturePipeline
from mic_diffrep.commands import main as cli
from mic_diffrep.data import BadImageError, decode_images
from mic_diffrep.training import PretrainingArguments, pretrain
from mic_diffrep.models.mic_diffrep.unet import create_scheduler, create_unet


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_bad_files(folder):
    good = PIL.Image.fromarray(synthetic_slice(0, np.random.default_rng(0)))
    good.save(folder / "truncated.jpg")
    data = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image")


@pytest.mark.parametrize("name", ["truncated.jpg", "empty.png", "notes.jpg"])
def test_unreadable_files_fail_with_their_name(tmp_path, name):
    write_bad_files(tmp_path)
    with pytest.raises(BadImageError, match=name) as error:
        decode_images([str(tmp_path / name)], 16)
    assert "--skip_bad_images" in str(error.value)


def test_skip_bad_images_lists_them(unlabelled_folder, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(unlabelled_folder, folder)
    write_bad_files(folder)
    with pytest.raises(BadImageError, match="(truncated.jpg|empty.png|notes.jpg)"):
        pretrain(parse(PretrainingArguments, ["--train_data_dir", str(folder), "--output_dir", str(tmp_path / "fail"),
                             "--resolution", "16", "--model_config_name_or_path", "tiny", "--logger", "none",
                             "--max_train_steps", "1"]))
    summary = pretrain(parse(PretrainingArguments, ["--train_data_dir", str(folder), "--output_dir", str(tmp_path / "out"),
                                   "--resolution", "16", "--model_config_name_or_path", "tiny", "--logger", "none",
                                   "--max_train_steps", "1", "--skip_bad_images", "--ddpm_num_inference_steps", "1"]))
    assert summary["num_images"] == 24
    assert sorted(os.path.basename(s["path"]) for s in summary["skipped_images"]) == ["empty.png", "notes.jpg",
                                                                                      "truncated.jpg"]


def test_every_unreadable_file_is_named_at_once_and_listed_once(tmp_path, caplog):
    """Three bad files took three rounds of fix-and-rerun (only the first was named); a probe with a carved test split
    listed each skipped file twice (the train and test parts of one decode share its list)."""
    folder = tmp_path / "labelled"
    write_class_folder(folder, per_class=8, seed=3, size=20, classes=("a", "b"))
    write_bad_files(folder / "a")
    with pytest.raises(BadImageError) as error:
        decode_images(sorted(str(p) for p in folder.rglob("*.*")), 16, cache_dir=str(tmp_path / "cache"))
    message = str(error.value)
    assert message.startswith("Cannot read 3 images: ") and "--skip_bad_images" in message
    assert all(name in message for name in ("truncated.jpg", "empty.png", "notes.jpg"))
    assert os.listdir(tmp_path / "cache")  # decoded once: the rerun with --skip_bad_images reads the cache
    with pytest.raises(BadImageError, match="^Cannot read 3 images: "):  # and so does one without it
        decode_images(sorted(str(p) for p in folder.rglob("*.*")), 16, cache_dir=str(tmp_path / "cache"))
    with caplog.at_level("WARNING", logger="mic_diffrep.data.decoding"):  # read from the cache, skipped with a word
        decode_images(sorted(str(p) for p in folder.rglob("*.*")), 16, cache_dir=str(tmp_path / "cache"),
                      skip_bad_images=True)
    assert all(f"Skipping unreadable image {folder / 'a' / name}" in caplog.text
               for name in ("truncated.jpg", "empty.png", "notes.jpg"))

    pipe = tmp_path / "pipe"
    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(pipe)
    cli(["probe", "--pretrained", str(pipe), "--data_dir", str(folder), "--output_dir", str(tmp_path / "model"),
         "--timesteps", "5", "--layers", "mid_block", "--num_epochs", "1", "--skip_bad_images", "--test_split",
         "0.25"])
    results = json.loads((tmp_path / "model" / "results.json").read_text())
    assert sorted(os.path.basename(item["path"]) for item in results["skipped_images"]) == [
        "empty.png", "notes.jpg", "truncated.jpg"]
    assert "3 unreadable file(s) skipped" in (tmp_path / "model" / "results.md").read_text()


def test_odd_images_decode(tmp_path):
    rng = np.random.default_rng(0)
    images = {
        "rgba.png": PIL.Image.fromarray((rng.random((20, 20, 4)) * 255).astype(np.uint8), "RGBA"),
        "palette.png": PIL.Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).convert("P"),
        "grey16.png": PIL.Image.fromarray((rng.random((20, 30)) * 60000).astype(np.uint16)),
        "cmyk.jpg": PIL.Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).convert("CMYK"),
        "tiny.png": PIL.Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)),
        "huge.png": PIL.Image.new("L", (4000, 4000), 128),
        "wide.png": PIL.Image.new("RGB", (90, 30), (200, 100, 50)),
    }
    for name, image in images.items():
        image.save(tmp_path / name)
    decoded = decode_images([str(tmp_path / n) for n in images], 32)
    assert decoded.pixels.shape == (len(images), 1, 32, 32) and decoded.pixels.dtype == torch.uint8
    assert decoded.pixels[5].min() >= 127 and decoded.pixels[5].max() <= 129  # huge, grey 128
    wide = decoded.pixels[6, 0]
    assert wide[0].max() == 0 and wide[16].min() > 0  # padded above and below


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("resolution, message", [("0", "positive"), ("-8", "positive"), ("20", "not divisible by 8")])
def test_bad_resolution_is_named(unlabelled_folder, tmp_path, capsys, resolution, message):
    code, err = run_cli(["pretrain", "--train_data_dir", unlabelled_folder, "--output_dir", str(tmp_path / "o"),
                         "--resolution", resolution, "--logger", "none"], capsys)
    assert code == 2 and "resolution" in err and message in err
    assert not (tmp_path / "o").exists()  # checked with the settings: no decoded-image cache left behind


def test_bad_pretrained_dir_layers_and_timesteps_are_named(kaggle_folder, tmp_path, capsys):
    code, err = run_cli(["probe", "--pretrained", kaggle_folder, "--data_dir", kaggle_folder,
                         "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "not a pretrained pipeline folder" in err and "model_index.json" in err
    torch.manual_seed(0)
    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(tmp_path / "pipe")
    code, err = run_cli(["probe", "--pretrained", str(tmp_path / "pipe"), "--data_dir", kaggle_folder,
                         "--output_dir", str(tmp_path / "o"), "--layers", "up_blocks.5"], capsys)
    assert code == 2 and "up_blocks.5" in err and "Valid layers are" in err
    code, err = run_cli(["probe", "--pretrained", str(tmp_path / "pipe"), "--data_dir", kaggle_folder,
                         "--output_dir", str(tmp_path / "o"), "--timesteps", "1000"], capsys)
    assert code == 2 and "[0, 1000)" in err


def test_class_folders_missing_from_one_split(tmp_path, capsys):
    torch.manual_seed(0)
    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(tmp_path / "pipe")
    # Testing lacks a class: fine, the labels stay those of the union.
    write_class_folder(tmp_path / "a" / "Training", 8, seed=1)
    write_class_folder(tmp_path / "a" / "Testing", 3, seed=2, classes=("glioma", "meningioma", "notumor"))
    from mic_diffrep.probing import ProbeArguments, run_probe as probe
    results = probe(parse(ProbeArguments, ["--pretrained", str(tmp_path / "pipe"), "--data_dir", str(tmp_path / "a"),
                                "--output_dir", str(tmp_path / "out"), "--timesteps", "5", "--num_epochs", "1",
                                "--hidden_size", "4"]))
    assert results["label_names"] == ["glioma", "meningioma", "notumor", "pituitary"]
    # Training lacks a class the test split has: refused, naming the class.
    write_class_folder(tmp_path / "b" / "Training", 8, seed=1, classes=("glioma", "meningioma", "notumor"))
    write_class_folder(tmp_path / "b" / "Testing", 3, seed=2)
    code, err = run_cli(["probe", "--pretrained", str(tmp_path / "pipe"), "--data_dir", str(tmp_path / "b"),
                         "--output_dir", str(tmp_path / "out2"), "--timesteps", "5"], capsys)
    assert code == 2 and "pituitary" in err and "no training images" in err


def tiny_argv(data_dir, output_dir, *extra):
    return ["--train_data_dir", data_dir, "--output_dir", output_dir, "--resolution", "16",
            "--model_config_name_or_path", "tiny", "--train_batch_size", "4", "--logger", "none",
            "--save_images_epochs", "1000", "--save_model_epochs", "1000", "--ddpm_num_inference_steps", "1",
            "--eval_batch_size", "1", *extra]


def test_nan_loss_fails_fast_and_keeps_the_last_checkpoint(unlabelled_folder, tmp_path, monkeypatch):
    import mic_diffrep.training.diffusion as pretraining

    calls = {"n": 0}
    original = pretraining.F.mse_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(pretraining.F, "mse_loss", poisoned)
    out = str(tmp_path / "out")
    with pytest.raises(FloatingPointError, match="Loss is nan at epoch 0, batch 4"):
        pretrain(parse(PretrainingArguments, tiny_argv(unlabelled_folder, out, "--max_train_steps", "10", "--checkpointing_steps", "2")))
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    weights = load_file(os.path.join(out, "checkpoint-4", "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def _wait_for(predicate, timeout=120):
    start = time.time()
    while not predicate():
        if time.time() - start > timeout:
            raise TimeoutError
        time.sleep(0.05)


def test_sigkill_then_resume_equals_an_uninterrupted_run(unlabelled_folder, tmp_path):
    # All three runs in subprocesses with the same thread count: it changes float reduction order.
    extra = ["--max_train_steps", "30", "--checkpointing_steps", "4", "--seed", "3"]
    script = [sys.executable, os.path.join(REPO, "training", "pretrain.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full = str(tmp_path / "full")
    subprocess.run(script + tiny_argv(unlabelled_folder, full, *extra), check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    killed = str(tmp_path / "killed")
    process = subprocess.Popen(script + tiny_argv(unlabelled_folder, killed, *extra),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        _wait_for(lambda: os.path.isdir(os.path.join(killed, "checkpoint-8")) or process.poll() is not None)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert not os.path.exists(os.path.join(killed, "unet")), "the run was killed too late to test resuming"
    subprocess.run(script + tiny_argv(unlabelled_folder, killed, *extra, "--resume_from_checkpoint", "latest"),
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    expected = load_file(os.path.join(full, "unet", "diffusion_pytorch_model.safetensors"))
    actual = load_file(os.path.join(killed, "unet", "diffusion_pytorch_model.safetensors"))
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)


def test_sigint_saves_a_checkpoint_before_exiting(unlabelled_folder, tmp_path):
    out = str(tmp_path / "out")
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "training", "pretrain.py"),
                                *tiny_argv(unlabelled_folder, out, "--max_train_steps", "100000",
                                           "--checkpointing_steps", "100000")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        _wait_for(lambda: os.path.isdir(os.path.join(out, ".cache")) or process.poll() is not None)
        time.sleep(3)  # some training steps
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    checkpoints = [d for d in os.listdir(out) if d.startswith("checkpoint-")]
    assert len(checkpoints) == 1 and not checkpoints[0].endswith(".tmp"), process.stderr.read()[-2000:]
    with open(os.path.join(out, "pretraining_summary.json")) as f:
        summary = json.load(f)
    assert summary["stop_reason"] == "interrupted"
    assert checkpoints[0] == f"checkpoint-{summary['global_step']}"
    assert process.returncode == 130  # a calling script sees the run was cut short (it exited 0)


def test_bad_image_messages_name_the_file_once():
    from mic_diffrep.data.decoding import _bad_image_message

    message = _bad_image_message("a/x.dcm", "MedicalImageError: a/x.dcm: no slice left (all pixels equal).")
    assert message.count("a/x.dcm") == 1 and ".." not in message
    assert message.startswith("Cannot read image a/x.dcm: MedicalImageError: no slice left (all pixels equal). Fix")


def test_weights_are_read_as_safetensors_only_and_a_broken_file_is_one_line(kaggle_folder, tmp_path, capsys):
    """A `.bin` pickle beside (or instead of) the safetensors weights was read by generate and predict, and a
    truncated weights file or a `.bin` carrying code ended in a traceback."""
    from mic_diffrep import MicDiffRepConfig, MicDiffRepForImageClassification, MicDiffRepImageProcessor
    from mic_diffrep.models.mic_diffrep.unet import UNET_PRESETS

    pipe = tmp_path / "pipe"
    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(pipe)
    weights = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), pipe / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    model = tmp_path / "model"
    config = MicDiffRepConfig(unet_config=dict(UNET_PRESETS["tiny"], sample_size=16), timesteps=[5], hidden_size=8,
                              num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})
    MicDiffRepForImageClassification(config).save_pretrained(model)
    MicDiffRepImageProcessor(resolution=16).save_pretrained(model)
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:1000])  # truncated
    image = next((tmp_path / "kaggle" / "Testing").rglob("*.png"))
    for command, message in ((["generate", "--pretrained", str(pipe), "--output", str(tmp_path / "g.png")],
                              "no file named diffusion_pytorch_model.safetensors"),
                             (["predict", "--model", str(model), str(image)], "cannot be loaded")):
        with pytest.raises(SystemExit) as error:
            cli(command)
        err = capsys.readouterr().err.strip()
        assert error.value.code == 2 and message in err.splitlines()[-1] and "Traceback" not in err


def test_a_multi_page_tiff_is_one_image_per_page_everywhere(tmp_path):
    """A TIFF stack (microscopy, some scanners' exports) was read as its first page alone, in training and at
    inference alike, without a word."""
    from mic_diffrep.models.mic_diffrep.preprocessing import image_to_pixels

    rng = np.random.default_rng(0)
    pages = [PIL.Image.fromarray(synthetic_slice(k, rng)) for k in range(3)]
    path = str(tmp_path / "stack.tif")
    pages[0].save(path, save_all=True, append_images=pages[1:])
    decoded = decode_images([path], 16)
    assert decoded.paths == [f"{path}#slice={k}" for k in range(3)]
    for k, page in enumerate(pages):
        assert torch.equal(decoded.pixels[k], image_to_pixels(page, 16))
    pipe = DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler())
    pipe.set_progress_bar_config(disable=True)
    out = pipe.extract_features([path], timesteps=[5], layers=["mid_block"])
    assert out.image_ids == decoded.paths
    torch.testing.assert_close(out.features[("mid_block", 5)],
                               pipe.extract_features(decoded.pixels, timesteps=[5], layers=["mid_block"], preprocessed=True)
                               .features[("mid_block", 5)])
    pages[0].save(tmp_path / "one.tif")  # a one-page TIFF stays one image, named by its path
    assert decode_images([str(tmp_path / "one.tif")], 16).paths == [str(tmp_path / "one.tif")]
