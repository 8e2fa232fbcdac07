"""`--self_conditioning`: a UNet that also sees its own clean-image estimate, in training, sampling, feature read-out
and the exported classifier alike."""

import os

import pytest
import torch

from mic_diffrep import DiffusionFeaturePipeline, MicDiffRepForImageClassification
from mic_diffrep.data import pixels_to_model_input
from mic_diffrep.features import DiffusionFeatureExtractor, FeatureArguments
from mic_diffrep.models.mic_diffrep import MicDiffRepMSFAHead
from mic_diffrep.models.mic_diffrep.unet import create_scheduler, create_unet
from mic_diffrep.models.mic_diffrep.unet_features import (add_noise, feature_noise, is_self_conditioned,
                                                          predicted_clean, unet_block_features)
from mic_diffrep.training import PretrainingArguments, pretrain

from conftest import parse
from test_pretraining import tiny_args


@pytest.fixture
def pipe():
    torch.manual_seed(0)
    return DiffusionFeaturePipeline(create_unet(16, "tiny", self_conditioning=True), create_scheduler())


def test_a_self_conditioned_unet_has_twice_the_input_channels():
    unet = create_unet(16, "tiny", self_conditioning=True)
    assert (unet.config.in_channels, unet.config.out_channels) == (2, 1) and is_self_conditioned(unet)
    assert not is_self_conditioned(create_unet(16, "tiny"))


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_the_clean_estimate_inverts_the_forward_process(prediction_type):
    scheduler = create_scheduler(prediction_type=prediction_type)
    clean, noise, t = torch.rand(2, 1, 8, 8) * 2 - 1, torch.randn(2, 1, 8, 8), torch.tensor([30, 600])
    noisy = scheduler.add_noise(clean, noise, t)
    target = {"epsilon": noise, "sample": clean, "v_prediction": scheduler.get_velocity(clean, noise, t)}
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(predicted_clean(target[prediction_type], noisy, alpha_bar, prediction_type), clean,
                               atol=1e-4, rtol=0)


def test_features_come_from_the_forward_that_sees_the_estimate(pipe):
    pixels = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0][:, 1].abs().sum().item()))
    try:
        features = pipe.extract_features(pixels, timesteps=[5, 50], pooling="avg", preprocessed=True).features
    finally:
        handle.remove()
    assert len(calls) == 4 and calls[0] == 0 and calls[1] > 0  # per timestep: without, then with the estimate
    clean = pixels_to_model_input(pixels)
    noisy = add_noise(pipe.scheduler.alphas_cumprod, clean, feature_noise([0] * 3, 50, 1, (1, 16, 16))[:, 0], 50)
    steps = torch.full((3,), 50)
    first = pipe.unet(torch.cat([noisy, torch.zeros_like(noisy)], dim=1), steps).sample
    estimate = predicted_clean(first, noisy, pipe.scheduler.alphas_cumprod[50])
    expected = unet_block_features(pipe.unet, torch.cat([noisy, estimate], dim=1), 50, ["mid_block"])
    torch.testing.assert_close(features[("mid_block", 50)], expected["mid_block"])


def test_sampling_feeds_each_step_the_previous_estimate(pipe):
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0][:, 1].abs().sum().item()))
    try:
        images = pipe(batch_size=2, num_inference_steps=3, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
    finally:
        handle.remove()
    assert images.shape == (2, 1, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert seen[0] == 0 and all(s > 0 for s in seen[1:]) and len(seen) == 3


def test_sampling_with_a_scheduler_that_gives_no_estimate_says_so(pipe):
    """PNDM and DPM-Solver return no clean-image estimate: sampling failed with an AttributeError."""
    from diffusers import PNDMScheduler

    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="clean-image estimate of each step, which PNDMScheduler does not return"):
        pipe(batch_size=1, num_inference_steps=4)


def test_pretraining_exports_a_classifier_with_the_probes_features(unlabelled_folder, tmp_path):
    out = str(tmp_path / "out")
    summary = pretrain(tiny_args(unlabelled_folder, out, "--max_train_steps", "4", "--self_conditioning"))
    assert summary["recipe"]["self_conditioning"] is True and torch.isfinite(torch.tensor(summary["final_loss"]))
    extractor = DiffusionFeatureExtractor.from_pretrained(out)
    assert extractor.pipeline.unet.config.in_channels == 2
    pixels = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    args = FeatureArguments(timesteps=[5, 50])
    features = extractor.extract(pixels, args, show_progress=False)
    layers = extractor.pipeline.layer_names
    size = sum(features[(layer, 5)].shape[1] for layer in layers) * 2
    head = MicDiffRepMSFAHead(size, 0, 2)
    model = extractor.classifier(head, torch.zeros(size), torch.ones(size), layers, [5, 50], ["a", "b"], args, 0, 0.0)
    model.save_pretrained(str(tmp_path / "model"))
    loaded = MicDiffRepForImageClassification.from_pretrained(str(tmp_path / "model")).eval()
    assert loaded.config.prediction_type == "epsilon" and os.path.isdir(str(tmp_path / "model"))
    torch.testing.assert_close(loaded.extract_features(pixels_to_model_input(pixels)),
                               torch.cat([features[(layer, t)] for t in (5, 50) for layer in layers], dim=1))


def test_the_flag_is_part_of_the_recipe():
    def parse_args_with(*flags):
        return parse(PretrainingArguments, ["--train_data_dir", "d", "--output_dir", "o", *flags])

    assert parse_args_with("--self_conditioning").self_conditioning and not parse_args_with().self_conditioning
