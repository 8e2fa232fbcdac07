import os
import shutil

import pytest
import torch

from mic_diffrep.features import EncoderFeatureExtractor, FeatureArguments, load_feature_extractor
from mic_diffrep.data.augmentations import GreyAugment, gaussian_blur, intensity_jitter, random_flip, random_resized_crop
from mic_diffrep.training import BaselinePretrainingArguments, pretrain_baseline
from mic_diffrep.models.baselines import BYOL, MoCoV2, create_baseline, load_baseline, momentum_update
from mic_diffrep.probing import ProbeArguments, run_probe as probe

from conftest import parse


def images(n=8, size=16, seed=0):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_augmentations_keep_shape_range_and_are_seeded():
    x = images()
    for fn in (random_resized_crop, random_flip, intensity_jitter, gaussian_blur):
        out = fn(x, generator=torch.Generator().manual_seed(1))
        assert out.shape == x.shape
        assert out.min() >= -1 - 1e-5 and out.max() <= 1 + 1e-5, fn.__name__
    a = GreyAugment()(x, torch.Generator().manual_seed(2))
    b = GreyAugment()(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, x)
    # A full-size crop of aspect 1 is the identity; a flip with p=1 mirrors.
    torch.testing.assert_close(random_resized_crop(x, scale=(1, 1), ratio=(1, 1)), x, atol=1e-5, rtol=0)
    assert torch.equal(random_flip(x, p=1.0), x.flip(-1))


def test_momentum_update_formula_and_byol_schedule():
    online, target = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = target.weight.detach().clone()
    momentum_update(target, online, 0.9)
    torch.testing.assert_close(target.weight, 0.9 * before + 0.1 * online.weight.detach())

    byol = create_baseline("byol", 16, encoder_widths=[8, 16], hidden_dim=32, projection_dim=8)
    with torch.no_grad():
        for p in byol.encoder.parameters():
            p.add_(1.0)
    frozen = [p.clone() for p in byol.target_encoder.parameters()]
    byol.after_optimizer_step(progress=1.0)  # tau = 1 at the end: the target no longer moves
    assert all(torch.equal(a, b) for a, b in zip(frozen, byol.target_encoder.parameters()))
    byol.after_optimizer_step(progress=0.0)  # tau = momentum at the start
    expected = [0.99 * f + 0.01 * o for f, o in zip(frozen, byol.encoder.parameters())]
    for e, t in zip(expected, byol.target_encoder.parameters()):
        torch.testing.assert_close(t, e)


def test_moco_queue_enqueues_and_wraps():
    moco = create_baseline("mocov2", 16, encoder_widths=[8, 16], hidden_dim=32, projection_dim=4, queue_size=5)
    keys = torch.arange(12, dtype=torch.float32).view(3, 4)
    moco.enqueue(keys)
    assert int(moco.queue_ptr) == 3 and torch.equal(moco.queue[:3], keys)
    moco.enqueue(keys + 100)
    assert int(moco.queue_ptr) == 1  # 6 keys into 5 slots: wrapped around, the oldest replaced first
    assert torch.equal(moco.queue[3:], (keys + 100)[:2]) and torch.equal(moco.queue[0], (keys + 100)[2])


@pytest.mark.parametrize("method", ["mocov2", "byol", "mae"])
def test_loss_is_finite_and_falls_on_a_tiny_batch(method):
    torch.manual_seed(0)
    kwargs = {"mae_hidden_size": 32, "mae_num_layers": 1} if method == "mae" else \
        {"encoder_widths": [8, 16], "hidden_dim": 32, "projection_dim": 8, "queue_size": 16}
    model = create_baseline(method, 16, **kwargs)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batch = images(16)
    losses = []
    for step in range(40):
        loss = model(batch, generator=torch.Generator().manual_seed(step))
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.after_optimizer_step(step / 40)
        losses.append(loss.item())
    # From step 1 on, MoCo's queue holds real keys (queue size = batch size): compare like with like.
    early, late = sum(losses[1:6]) / 5, sum(losses[-5:]) / 5
    assert late < early, (early, late)


@pytest.mark.parametrize("method", ["byol", "mae"])
def test_baseline_pretraining_output_plugs_into_the_probe(method, kaggle_folder, tmp_path):
    out = str(tmp_path / method)
    summary = pretrain_baseline(parse(BaselinePretrainingArguments, [
        "--method", method, "--train_data_dir", kaggle_folder, "--output_dir", out, "--resolution", "16",
        "--train_batch_size", "8", "--max_train_steps", "2", "--logger", "none", "--checkpointing_steps", "1",
        "--slice_axis", "1"]))
    assert summary["global_step"] == 2 and summary["splits"] == ["train"] and summary["stop_reason"] == "max_train_steps"
    assert summary["num_processes"] == 1 and summary["mixed_precision"] == "no" and summary["command"]
    assert load_feature_extractor(out).slice_settings == {  # what extract and probe read volumes with by default
        "slice_axis": 1, "slice_range": None, "keep_empty_slices": False}
    assert {"baseline_config.json", "model.safetensors", "checkpoint-2"} <= set(os.listdir(out))
    modes = {os.stat(os.path.join(out, name)).st_mode & 0o777 for name in ("baseline_config.json", "model.safetensors")}
    assert len(modes) == 1  # the weights as readable as the config (safetensors 0.8 writes 0600)
    assert isinstance(load_baseline(out), (BYOL, MoCoV2)) or method == "mae"
    results = probe(parse(ProbeArguments, ["--pretrained", out, "--data_dir", kaggle_folder, "--output_dir",
                                str(tmp_path / "probe"), "--num_epochs", "2", "--hidden_size", "8"]))
    assert results["method"] == f"baseline-{method}" and results["msfa"]["timesteps"] == [0]
    assert 0 <= results["msfa"]["test"]["all"]["accuracy"] <= 1
    assert os.path.isfile(tmp_path / "probe" / "results.md")
    assert not os.path.exists(tmp_path / "probe" / "model.safetensors")  # no UNet classifier for baselines
    assert not os.path.exists(tmp_path / "probe" / "accuracy_vs_timestep.png")  # no timesteps: it had one point


def test_baseline_pretraining_logs_to_tensorboard_as_the_diffusion_one_does(kaggle_folder, tmp_path):
    out = tmp_path / "byol"
    pretrain_baseline(parse(BaselinePretrainingArguments, [
        "--method", "byol", "--train_data_dir", kaggle_folder, "--output_dir", str(out), "--resolution", "16",
        "--train_batch_size", "8", "--max_train_steps", "1"]))  # --logger tensorboard is the default
    events = [name for _, _, names in os.walk(out / "logs") for name in names if name.startswith("events.out")]
    assert events


def test_local_clip_vision_model_plugs_into_the_probe(kaggle_folder, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(
        tmp_path / "clip")
    results = probe(parse(ProbeArguments, ["--pretrained", str(tmp_path / "clip"), "--data_dir", kaggle_folder, "--output_dir",
                                str(tmp_path / "probe"), "--num_epochs", "2", "--hidden_size", "8",
                                "--resolution", "32"]))
    assert results["method"] == "baseline-clip"
    # a folder of pickled weights only (older CLIP checkpoints) is refused in one line, saying how to convert it
    (tmp_path / "pickled").mkdir()
    shutil.copy(tmp_path / "clip" / "config.json", tmp_path / "pickled" / "config.json")
    torch.save(CLIPVisionModel.from_pretrained(tmp_path / "clip").state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickled: a CLIP folder is read from model.safetensors only .*convert it"):
        probe(parse(ProbeArguments, ["--pretrained", str(tmp_path / "pickled"), "--data_dir", kaggle_folder,
                                     "--output_dir", str(tmp_path / "probe2"), "--resolution", "32"]))


@pytest.mark.parametrize("method", ["mocov2", "mae"])
def test_flip_averaged_encoder_features_are_mirror_invariant(method):
    torch.manual_seed(0)
    extractor = EncoderFeatureExtractor(create_baseline(method, resolution=16))
    pixels = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    args = extractor.resolve(FeatureArguments(flip_average=True))
    flipped = extractor.extract(pixels, args, show_progress=False)[("encoder", 0)]
    mirrored = extractor.extract(pixels.flip(-1), args, show_progress=False)[("encoder", 0)]
    torch.testing.assert_close(flipped, mirrored)
    plain = extractor.extract(pixels, extractor.resolve(FeatureArguments()), show_progress=False)[("encoder", 0)]
    assert not torch.allclose(plain, flipped)


@pytest.mark.parametrize("method", ["mocov2", "mae"])
def test_encoder_features_are_pooled_as_asked(method):
    """avgmax keeps the average pooling's features and adds the max of the same activations."""
    torch.manual_seed(0)
    extractor = EncoderFeatureExtractor(create_baseline(method, resolution=16))
    pixels = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    avg = extractor.extract(pixels, extractor.resolve(FeatureArguments(pooling="avg")),
                            show_progress=False)[("encoder", 0)]
    avgmax = extractor.extract(pixels, extractor.resolve(FeatureArguments(pooling="avgmax")),
                               show_progress=False)[("encoder", 0)]
    assert avgmax.shape == (4, 2 * avg.shape[1])
    torch.testing.assert_close(avgmax[:, : avg.shape[1]], avg)
    assert (avgmax[:, avg.shape[1]:] >= avgmax[:, : avg.shape[1]] - 1e-5).all()  # a max is at least the mean
    grid = extractor.extract(pixels, extractor.resolve(FeatureArguments(pooling="grid")),
                             show_progress=False)[("encoder", 0)]
    assert grid.shape == (4, 4 * avg.shape[1])
    torch.testing.assert_close(grid.view(4, avg.shape[1], 4).mean(-1), avg)  # four equal regions average to the whole


@pytest.mark.parametrize("method", ["mocov2", "mae"])
def test_encoder_features_do_not_depend_on_the_global_generator(method):
    """MAE's patch shuffle used torch's global generator: features changed in the last bits with the seed."""
    torch.manual_seed(0)
    extractor = EncoderFeatureExtractor(create_baseline(method, resolution=16))
    pixels = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    args = extractor.resolve(FeatureArguments(pooling="avg"))
    features = []
    for seed in range(4):
        torch.manual_seed(seed)
        features.append(extractor.extract(pixels, args, show_progress=False)[("encoder", 0)])
        assert torch.equal(torch.get_rng_state(), torch.manual_seed(seed).get_state())  # nothing drawn from it
    assert all(torch.equal(features[0], other) for other in features[1:])
