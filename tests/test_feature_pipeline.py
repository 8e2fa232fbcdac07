import contextlib
import json
import logging
import os
import subprocess
import sys
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from mic_diffrep import DiffusionFeaturePipeline, save_image_grid
from mic_diffrep.features import (DiffusionFeatureExtractor, FeatureArguments, StaleFeatureCacheError, load_features,
                                  model_fingerprint, save_features)
from mic_diffrep.models.mic_diffrep.preprocessing import pixels_to_model_input
from mic_diffrep.models.mic_diffrep.unet import create_scheduler, create_unet
from mic_diffrep.models.mic_diffrep.unet_features import add_noise, feature_noise, unet_block_features


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE_FILE = os.path.join(REPO, "pipelines", "pipeline_diffusion_features.py")
LAYERS = ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]


@pytest.fixture
def pipe():
    torch.manual_seed(0)
    return DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler())


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)) for _ in range(5)]


def test_shapes_and_keys_for_every_layer(pipe, images):
    out = pipe.extract_features(images, timesteps=[5, 50], generator=torch.Generator().manual_seed(0))
    assert out.layers == LAYERS == pipe.layer_names and out.timesteps == [5, 50]
    # The default pooling (avgmax, chosen in the ablations) gives twice each block's channels.
    channels = {"down_blocks.0": 16, "down_blocks.1": 32, "mid_block": 32, "up_blocks.0": 32, "up_blocks.1": 16}
    assert set(out.features) == {(layer, t) for layer in LAYERS for t in (5, 50)}
    for (layer, t), feature in out.features.items():
        assert feature.shape == (5, channels[layer]) and feature.dtype == torch.float32
    assert out.concatenate().shape == (5, 2 * sum(channels.values()))


def test_one_layer_and_one_timestep_may_be_given_bare(pipe, images):
    """`layers="mid_block"` was split into letters: "Unknown layer name(s) ['m', 'i', 'd', ...]"."""
    bare = pipe.extract_features(images, 10, "mid_block")
    listed = pipe.extract_features(images, [10], ["mid_block"])
    assert bare.layers == ["mid_block"] and set(bare.features) == {("mid_block", 10)}
    torch.testing.assert_close(bare.features[("mid_block", 10)], listed.features[("mid_block", 10)])


def test_pooling_variants(pipe, images):
    kwargs = dict(timesteps=[10], layers=["mid_block"])
    avg = pipe.extract_features(images, pooling="avg", **kwargs).features[("mid_block", 10)]
    avgmax = pipe.extract_features(images, **kwargs).features[("mid_block", 10)]  # the default
    grid = pipe.extract_features(images, pooling="grid", pooling_grid_size=2, **kwargs).features[("mid_block", 10)]
    assert avg.shape == (5, 16) and avgmax.shape == (5, 32) and grid.shape == (5, 64)
    torch.testing.assert_close(avgmax[:, :16], avg)
    # The average of the 2x2 grid cells is the global average.
    torch.testing.assert_close(grid.view(5, 16, 4).mean(-1), avg, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pooling_grid_size 64 is larger than a [0-9]+x[0-9]+ feature map"):
        pipe.extract_features(images, pooling="grid", pooling_grid_size=64, **kwargs)  # was repeated positions
    one = pipe.extract_features(images, timesteps=10, layers=["mid_block"]).features  # one timestep as an int
    torch.testing.assert_close(one[("mid_block", 10)], avgmax)


def test_flip_average_is_the_mean_over_the_image_and_its_mirror_noised_alike(pipe, images):
    pixels = pipe.prepare_pixels(images)
    flipped = pipe.extract_features(pixels, timesteps=[50], pooling="avg", flip_average=True,
                                    preprocessed=True).features
    clean = pixels_to_model_input(pixels)
    noise = feature_noise([0] * len(pixels), 50, 1, clean.shape[1:])[:, 0]
    noisy = [add_noise(pipe.scheduler.alphas_cumprod, x, noise, 50) for x in (clean, clean.flip(-1))]
    views = [unet_block_features(pipe.unet, x, 50, LAYERS) for x in noisy]
    for layer in LAYERS:
        torch.testing.assert_close(flipped[(layer, 50)], (views[0][layer] + views[1][layer]) / 2)
    plain = pipe.extract_features(pixels, timesteps=[50], pooling="avg", preprocessed=True).features
    torch.testing.assert_close(plain[("mid_block", 50)], views[0]["mid_block"])
    assert not torch.allclose(plain[("mid_block", 50)], flipped[("mid_block", 50)])


def test_flip_averaged_features_are_mirror_invariant_with_the_fixed_noise(pipe, images):
    pixels = pipe.prepare_pixels(images)
    kwargs = {"timesteps": [10, 100], "flip_average": True}
    features = pipe.extract_features(pixels, **kwargs, preprocessed=True).features
    mirrored = pipe.extract_features(pixels.flip(-1), **kwargs, preprocessed=True).features
    for key in features:
        torch.testing.assert_close(mirrored[key], features[key], atol=1e-5, rtol=1e-5)
    plain = pipe.extract_features(pixels, timesteps=[10], preprocessed=True).features[("mid_block", 10)]
    plain_mirrored = pipe.extract_features(pixels.flip(-1), timesteps=[10],
                                           preprocessed=True).features[("mid_block", 10)]
    assert not torch.allclose(plain, plain_mirrored, atol=1e-3)  # without it, a mirror image is another image


def test_one_unet_forward_per_timestep(pipe, images):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        pipe.extract_features(images, timesteps=[5, 50, 500], batch_size=5, num_noise_samples=2)
    finally:
        handle.remove()
    assert calls == [10, 10, 10]  # 5 images x 2 noise draws, once per timestep, all layers at once


def test_hooks_are_removed_also_after_an_exception(pipe, images):
    def hooks():
        return sum(len(m._forward_hooks) for m in pipe.unet.modules())

    pipe.extract_features(images, timesteps=[5])
    assert hooks() == 0

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = pipe.unet.up_blocks[1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        pipe.extract_features(images, timesteps=[5], layers=["mid_block", "up_blocks.1"])
    handle.remove()
    assert hooks() == 0


def test_same_generator_same_features_whatever_the_batch_size(pipe, images):
    def run(batch_size):
        return pipe.extract_features(images, timesteps=[5, 300], generator=torch.Generator().manual_seed(3),
                                     batch_size=batch_size, num_noise_samples=2).features

    one, two, all_ = run(1), run(2), run(64)
    for key in one:
        torch.testing.assert_close(one[key], all_[key], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(two[key], all_[key], atol=1e-5, rtol=1e-5)
    other = pipe.extract_features(images, timesteps=[300], generator=torch.Generator().manual_seed(4),
                                  ).features[("up_blocks.1", 300)]
    assert not torch.allclose(other, all_[("up_blocks.1", 300)])


def test_fixed_noise_features_depend_on_the_image_only(pipe, images):
    first = pipe.extract_features(images, timesteps=[100]).features[("mid_block", 100)]
    reordered = pipe.extract_features(images[::-1], timesteps=[100]).features[("mid_block", 100)]
    torch.testing.assert_close(reordered.flip(0), first, atol=1e-5, rtol=1e-5)


def test_input_kinds_and_bad_arguments(pipe, images, tmp_path):
    grey = np.asarray(images[0].convert("L"))
    path = tmp_path / "a.png"
    images[0].save(path)
    reference = pipe.extract_features(images[:1], timesteps=[5]).features[("mid_block", 5)]
    for image in (grey, torch.from_numpy(np.array(images[0])).permute(2, 0, 1), str(path)):
        torch.testing.assert_close(
            pipe.extract_features([image], timesteps=[5]).features[("mid_block", 5)], reference)
    with pytest.raises(ValueError, match="Valid layers are: down_blocks.0, down_blocks.1, mid_block"):
        pipe.extract_features(images, layers=["up_blocks.7"])
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        pipe.extract_features(images, timesteps=[1000])
    with pytest.raises(ValueError, match="pooling"):
        pipe.extract_features(images, pooling="median")


def test_timesteps_as_tensors_and_repeated_timesteps(pipe, images):
    once = pipe.extract_features(images[:3], timesteps=[10, 20], layers=["mid_block"])
    for timesteps in (torch.tensor([10, 20]), [torch.tensor(10), torch.tensor(20)], np.array([10, 20]),
                      [10, 20, 10], (10, 10, 20)):
        out = pipe.extract_features(images[:3], timesteps=timesteps, layers=["mid_block"])
        assert out.timesteps == [10, 20] and out.features[("mid_block", 10)].shape[0] == 3  # one row per image
        torch.testing.assert_close(out.concatenate(), once.concatenate())
    with pytest.raises(KeyError, match=r"No features for \[\('mid_block', 99\)\].*timesteps \[10, 20\]"):
        once.concatenate(timesteps=[99])
    with pytest.raises(ValueError, match="timesteps"):
        pipe.extract_features(images[:1], timesteps=torch.tensor([0.5]))
    assert FeatureArguments(timesteps=[10, 10, 5], layers=["mid_block", "mid_block"]).timesteps == [10, 5]
    assert FeatureArguments(timesteps=np.array([10, 100])).timesteps == [10, 100]  # as extract_features takes them


def test_bf16_pipeline_features_are_close_to_fp32(pipe, images):
    fp32 = pipe.extract_features(images, timesteps=[50]).features[("up_blocks.1", 50)]
    pipe.to(torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16
    bf16 = pipe.extract_features(images, timesteps=[50]).features[("up_blocks.1", 50)]
    assert bf16.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(fp32, bf16).min() > 0.98
    images = pipe(batch_size=2, num_inference_steps=3, output_type="pt").images
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


def test_a_pipeline_around_a_unet_in_training_reads_and_samples_without_dropout(images):
    """`DiffusionFeaturePipeline(unet, scheduler)` with a UNet fresh from `create_unet` (or a training loop) ran it in
    training mode: with dropout, two extractions of the same images differed (by up to 2.0 here) and samples were
    drawn with dropout on. Both now run as the saved pipeline does, and the UNet is left in the mode it was in."""
    unet = create_unet(16, "tiny", dropout=0.5)
    unet.mid_block.eval()  # a part the caller keeps in eval mode stays so
    pipe = DiffusionFeaturePipeline(unet, create_scheduler())
    first, again = (pipe.extract_features(images, timesteps=[10], layers=["up_blocks.0"]).features[("up_blocks.0", 10)]
                    for _ in range(2))
    assert torch.equal(first, again)
    samples = [pipe(batch_size=2, num_inference_steps=3, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images for _ in range(2)]
    assert torch.equal(samples[0], samples[1])
    assert unet.training and unet.up_blocks[0].training and not unet.mid_block.training
    unet.eval()
    assert torch.equal(first, pipe.extract_features(images, timesteps=[10], layers=["up_blocks.0"]).features[
        ("up_blocks.0", 10)])


def test_save_load_round_trip_gives_identical_features_and_images(pipe, images, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = DiffusionFeaturePipeline.from_pretrained(tmp_path / "pipe")
    kwargs = dict(timesteps=[5, 50], generator=None)
    for key, value in pipe.extract_features(images, **kwargs).features.items():
        # Bit-identical weights; loaded tensors may differ in memory layout, hence ~1e-7 differences at most.
        torch.testing.assert_close(loaded.extract_features(images, **kwargs).features[key], value, rtol=1e-5, atol=1e-6)
    a = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt",
             ).images
    b = loaded(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt",
               ).images
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("custom_pipeline", ["the saved copy", "the repository's file"])
def test_loads_as_a_diffusers_custom_pipeline(pipe, images, tmp_path, custom_pipeline):
    pipe.save_pretrained(tmp_path / "pipe")
    # `save_pretrained` copies the pipeline's code into the folder (as it would be on the Hub), so the folder loads
    # in plain diffusers by the file's name alone; the repository's file works too.
    with open(tmp_path / "pipe" / "pipeline_diffusion_features.py", encoding="utf-8") as f, \
            open(PIPELINE_FILE, encoding="utf-8") as g:
        assert f.read() == g.read()
    name = "pipeline_diffusion_features" if custom_pipeline == "the saved copy" else PIPELINE_FILE
    custom = DiffusionPipeline.from_pretrained(tmp_path / "pipe", custom_pipeline=name, trust_remote_code=True)
    assert type(custom).__name__ == "DiffusionFeaturePipeline"
    expected = pipe.extract_features(images, timesteps=[5]).features[("mid_block", 5)]
    torch.testing.assert_close(custom.extract_features(images, timesteps=[5])
                               .features[("mid_block", 5)], expected)
    # It does not change how the package itself loads the folder: the class, not a copy of it, and no remote code.
    assert type(DiffusionFeaturePipeline.from_pretrained(tmp_path / "pipe")) is DiffusionFeaturePipeline


def test_diffusers_push_to_hub_uploads_a_mic_diffrep_card_and_no_caches(pipe, tmp_path):
    """`pipe.push_to_hub(repo)` uploaded diffusers' empty template card ("[More Information Needed]"), and
    `save_pretrained(folder, push_to_hub=True)` over a pretraining's folder uploaded it whole: its decode cache (every
    training image), checkpoints and the summary with local paths."""
    from unittest import mock

    from mic_diffrep.models.mic_diffrep.unet import create_unet

    uploads = []

    def upload_folder(self, repo_id, folder_path, ignore_patterns=None, **kwargs):
        files = sorted(os.path.relpath(os.path.join(root, name), folder_path)
                       for root, _, names in os.walk(folder_path) for name in names)
        uploads.append({"repo_id": repo_id, "files": files, "create_pr": kwargs.get("create_pr", False),
                        "card": open(os.path.join(folder_path, "README.md")).read()})

    with mock.patch("huggingface_hub.HfApi.create_repo", side_effect=lambda repo_id, **kw: mock.Mock(
            repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")), \
            mock.patch("huggingface_hub.HfApi.upload_folder", upload_folder):
        pipe.push_to_hub("me/ddpm", create_pr=True)
        folder = tmp_path / "pretrain"
        pipe.save_pretrained(folder)
        (folder / ".cache").mkdir()
        (folder / ".cache" / "decoded-1.safetensors").write_text("patient pixels")
        (folder / "checkpoint-5").mkdir()
        (folder / "checkpoint-5" / "training_state.json").write_text("{}")
        (folder / "pretraining_summary.json").write_text(json.dumps({
            "num_images": 24, "train_data_dir": "/home/me/private/scans", "resolution": 16, "global_step": 5,
            "stop_reason": "max_train_steps", "mixed_precision": "bf16", "recipe": {"self_conditioning": False}}))
        pipe.save_pretrained(folder, push_to_hub=True, repo_id="me/ddpm2")
        conditioned = DiffusionFeaturePipeline(create_unet(16, "tiny", self_conditioning=True), pipe.scheduler)
        conditioned.push_to_hub("me/ddpm3")
    memory, saved, self_conditioned = uploads
    assert (memory["repo_id"], memory["create_pr"]) == ("me/ddpm", True)
    assert "# MicDiffRep pretrained pipeline" in memory["card"] and "More Information Needed" not in memory["card"]
    assert 'DiffusionFeaturePipeline.from_pretrained("me/ddpm"' in memory["card"] and "Not recorded" in memory["card"]
    assert {"model_index.json", "pipeline_diffusion_features.py", "README.md"} <= set(memory["files"])
    assert saved["repo_id"] == "me/ddpm2" and "24 unlabelled images of `scans`" in saved["card"]
    assert not any(name.startswith((".cache", "checkpoint-")) for name in saved["files"])
    assert not (folder / "README.md").exists()  # the local folder keeps what it had
    assert "`diffusers.DDPMPipeline` cannot sample from it" in self_conditioned["card"]
    # a failed upload from memory says to push the pipeline again, not a temporary folder that is gone; `private`
    # left unset is the Hub's default for the namespace (an organisation's may be private)
    from mic_diffrep.reporting import HubError

    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/ddpm")) as create, \
            mock.patch("huggingface_hub.HfApi.upload_folder", side_effect=ConnectionError("reset")):
        with pytest.raises(HubError, match=r"upload it again later with `pipe.push_to_hub\('me/ddpm'\)`"):
            pipe.push_to_hub("me/ddpm")
    assert create.call_args.kwargs["private"] is None


def test_the_custom_pipeline_file_says_what_to_install_where_mic_diffrep_is_missing():
    """A Hub repository's copy of the pipeline loaded where mic-diffrep is not installed said only "No module named
    'mic_diffrep'" (and the package's pip name is mic-diffrep)."""
    def load_without(missing):
        code = ("import importlib.util, sys\n"
                "class NotInstalled:\n"
                "    def find_spec(self, name, path=None, target=None):\n"
                f"        if name == {missing!r}:\n"
                "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
                "sys.meta_path.insert(0, NotInstalled())\n"
                f"spec = importlib.util.spec_from_file_location('pipeline_diffusion_features', {PIPELINE_FILE!r})\n"
                "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode == 1
        return result.stderr.strip().splitlines()[-1]

    assert load_without("mic_diffrep") == (
        "ModuleNotFoundError: DiffusionFeaturePipeline needs the mic-diffrep package (its preprocessing and hooked "
        "UNet forward): `pip install mic-diffrep`.")
    assert load_without("mic_diffrep.utils") == (  # an older mic-diffrep than the copy: a module missing,
        "ImportError: This DiffusionFeaturePipeline needs a newer mic-diffrep (No module named 'mic_diffrep.utils'): "
        "`pip install -U mic-diffrep`.")
    # or, more often, a name: the copy imports what the package's module does not have yet
    code = ("import importlib.util, mic_diffrep.utils\n"
            "del mic_diffrep.utils.progress_interval\n"
            f"spec = importlib.util.spec_from_file_location('pipeline_diffusion_features', {PIPELINE_FILE!r})\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stderr.strip().splitlines()[-1].startswith(
        "ImportError: This DiffusionFeaturePipeline needs a newer mic-diffrep (cannot import name "
        "'progress_interval' from 'mic_diffrep.utils'")
    assert load_without("diffusers").endswith("No module named 'diffusers'")  # the rest as Python says it


def test_decoded_pixels_as_an_array_pass_through_as_the_tensor_does(pipe, images):
    """`extract_features(decoded.pixels.numpy())` was refused, and the processor's `pixel_values` as an array too;
    the form the error then suggested was windowed again (12% feature difference)."""
    from mic_diffrep import MicDiffRepImageProcessor

    pixels = pipe.prepare_pixels(images)
    expected = pipe.extract_features(pixels, timesteps=[5], preprocessed=True).features[("mid_block", 5)]
    as_array = pipe.extract_features(pixels.numpy(), timesteps=[5], preprocessed=True)
    torch.testing.assert_close(as_array.features[("mid_block", 5)], expected)
    values = MicDiffRepImageProcessor(resolution=pipe.resolution)(images, return_tensors="np")["pixel_values"]
    torch.testing.assert_close(pipe.extract_features(values, timesteps=[5], preprocessed=True).features[
        ("mid_block", 5)], expected)


def test_plain_diffusion_pipeline_loads_a_saved_folder_once_mic_diffrep_is_imported(pipe, images, tmp_path):
    """The Hub's snippet for a diffusers repository, `DiffusionPipeline.from_pretrained(repo)`, said "module diffusers
    has no attribute DiffusionFeaturePipeline" even after `import mic_diffrep`."""
    pipe = DiffusionFeaturePipeline(pipe.unet, pipe.scheduler, resize_mode="center_crop", slice_axis=1)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert type(loaded) is DiffusionFeaturePipeline
    assert loaded.config.resize_mode == "center_crop" and loaded.slices.slice_axis == 1
    torch.testing.assert_close(loaded.extract_features(images, timesteps=[5]).features[("mid_block", 5)],
                               pipe.extract_features(images, timesteps=[5]).features[("mid_block", 5)])


def test_generation_shapes_ranges_and_ddim(pipe, tmp_path):
    pil = pipe(batch_size=3, num_inference_steps=4).images
    assert len(pil) == 3 and pil[0].mode == "L" and pil[0].size == (16, 16)
    array = pipe(batch_size=2, num_inference_steps=4, output_type="np").images
    assert array.shape == (2, 16, 16, 1) and 0 <= array.min() and array.max() <= 1
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    tensor, = pipe(batch_size=2, num_inference_steps=5, output_type="pt", return_dict=False)
    assert tensor.shape == (2, 1, 16, 16) and 0 <= tensor.min() and tensor.max() <= 1
    grid = save_image_grid(pil, str(tmp_path / "grid.png"))
    assert grid.size == (16 * 3, 16) and os.path.isfile(tmp_path / "grid.png")


def test_sampling_arguments_as_diffusers_pipelines_take_them(pipe):
    """`num_inference_steps=0` failed with a bare ZeroDivisionError and 2000 in diffusers' words; a numpy batch
    size, which DDPMPipeline takes, was refused; DDIM sampling had no `eta`, as DDIMPipeline has."""
    for steps in (0, 2000):
        with pytest.raises(ValueError, match=rf"`num_inference_steps` must be an integer in \[1, 1000\].*got {steps}"):
            pipe(num_inference_steps=steps)
    assert len(pipe(batch_size=np.int64(2), num_inference_steps=2).images) == 2
    with pytest.raises(ValueError, match="`eta` is taken by DDIM sampling; the pipeline's DDPMScheduler has none"):
        pipe(num_inference_steps=2, eta=1.0)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    deterministic, stochastic = (pipe(num_inference_steps=5, output_type="pt", eta=eta,
                                      generator=torch.Generator().manual_seed(0)).images for eta in (0.0, 1.0))
    assert not torch.equal(deterministic, stochastic)  # eta reaches the scheduler
    assert torch.equal(deterministic, pipe(num_inference_steps=5, output_type="pt",
                                           generator=torch.Generator().manual_seed(0)).images)


def test_sampling_with_schedulers_of_another_noise_scale_or_without_noise(pipe):
    """With an Euler scheduler, sampling started from unit noise (its first noise is ~100x larger) and fed the UNet
    unscaled inputs: wrong images, and diffusers' "`scale_model_input` should be called" warning; a PNDM scheduler
    failed ("unexpected keyword argument 'generator'")."""
    import functools

    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    first_samples = []
    step = pipe.scheduler.step

    @functools.wraps(step)  # its signature, which the pipeline reads
    def recording_step(model_output, timestep, sample, **kwargs):
        first_samples.append(sample.std().item())
        return step(model_output, timestep, sample, **kwargs)

    pipe.scheduler.step = recording_step
    images = pipe(batch_size=2, num_inference_steps=3, output_type="pt").images
    assert first_samples[0] > 10 and pipe.scheduler.is_scale_input_called and torch.isfinite(images).all()
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    assert pipe(batch_size=2, num_inference_steps=4, output_type="pt").images.shape == (2, 1, 16, 16)


def test_a_batch_at_the_pipelines_resolution_is_taken_as_preprocessed_only_when_said(pipe):
    """Raw slices stacked to uint8 (N, 1, R, R) at the pipeline's resolution were taken as preprocessed pixels
    without a word: their intensities were not windowed, and their features differed from those of the same images
    in a list by 17% on the sample."""
    rng = np.random.default_rng(0)
    raw = (rng.random((3, 1, 16, 16)) * 120 + 40).astype(np.uint8)  # 40..160: windowing stretches it
    listed = pipe.extract_features([image[0] for image in raw], timesteps=[5]).concatenate()
    with pytest.warns(UserWarning, match=r"taken as preprocessed pixels, not windowed again: pass `preprocessed=True`"):
        as_pixels = pipe.extract_features(torch.from_numpy(raw), timesteps=[5]).concatenate()
    assert not torch.allclose(as_pixels, listed)
    torch.testing.assert_close(pipe.extract_features(raw, timesteps=[5], preprocessed=False).concatenate(), listed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels = pipe.prepare_pixels([image[0] for image in raw])
        torch.testing.assert_close(pipe.extract_features(pixels, timesteps=[5], preprocessed=True).concatenate(),
                                   listed)
    with pytest.raises(ValueError, match=r"`preprocessed=True` takes uint8 pixels .* of shape \(N, 1, 16, 16\), got "
                                         r"\(3, 1, 8, 8\) torch.uint8"):
        pipe.extract_features(pixels[..., :8, :8], timesteps=[5], preprocessed=True)
    # the image processor's output is model input, clamped, even a hair outside [-1, 1]; never preprocessed again
    from transformers import BatchFeature

    values = pixels.float() / 127.5 - 1
    values[0, 0, 0, 0] = 1.0001  # read as 255
    clamped = pixels.clone()
    clamped[0, 0, 0, 0] = 255
    out = pipe.extract_features(BatchFeature({"pixel_values": values}), timesteps=[5]).concatenate()
    torch.testing.assert_close(out, pipe.extract_features(clamped, timesteps=[5], preprocessed=True).concatenate())
    with pytest.raises(ValueError, match="The image processor's output is preprocessed"):
        pipe.extract_features(BatchFeature({"pixel_values": values}), timesteps=[5], preprocessed=False)


def test_odd_arguments_of_extract_features_are_named_or_take_their_defaults(pipe, images):
    """A walk through the Python API met bare Python errors ("'int' object is not iterable", "'float' object cannot
    be interpreted as an integer", IndexError) where the argument could have been named, `timesteps=None` failed
    where `layers=None` means every layer, and `timesteps=[True]` was read as t=1."""
    import datasets

    default = pipe.extract_features(images[:1])
    assert pipe.extract_features(images[:1], timesteps=None).timesteps == default.timesteps == [10, 25, 50, 100, 250]
    for call, error, message in (
            (lambda: pipe.extract_features(5), TypeError, "Expected images .* got int"),
            (lambda: pipe.extract_features(images, timesteps=[True]), ValueError, r"`timesteps` .* got \[True\]"),
            (lambda: pipe.extract_features(images, batch_size=2.5), ValueError, "`batch_size` must be an integer .*2.5"),
            (lambda: default.concatenate([], [10]), ValueError, "at least one layer and one timestep"),
            (lambda: pipe.extract_features([PIL.Image.new("L", (0, 0))]), ValueError, "size 0 x 0: no pixels"),
            (lambda: pipe.extract_features(datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": []})})),
             TypeError, r"DatasetDict of the splits \['train'\]: pass one split")):
        with pytest.raises(error, match=message):
            call()


def extraction_settings(pipe, timesteps, layers, **kwargs):
    extractor = DiffusionFeatureExtractor(pipe)
    return extractor.cache_settings(extractor.resolve(FeatureArguments(timesteps=timesteps, layers=layers, **kwargs)))


def test_feature_cache_round_trip_and_stale_detection(pipe, images, tmp_path):
    out = pipe.extract_features(images, timesteps=[5, 50])
    settings = extraction_settings(pipe, [5, 50], None, pooling="avg")  # the pipeline's default pooling
    ids = [f"img{i}.png" for i in range(5)]
    path = str(tmp_path / "features.safetensors")
    save_features(path, out.features, settings, image_ids=ids, labels=[0, 1, 0, 1, 1], label_names=["a", "b"])
    cached = load_features(path, expected_settings=settings, expected_image_ids=ids)
    for key, value in out.features.items():
        torch.testing.assert_close(cached.features[key], value, rtol=0, atol=0)
    assert cached.labels.tolist() == [0, 1, 0, 1, 1] and cached.label_names == ["a", "b"] and cached.image_ids == ids

    with pytest.raises(StaleFeatureCacheError, match="timesteps"):
        load_features(path, expected_settings=extraction_settings(pipe, [5, 100], None, pooling="avg"))
    with pytest.raises(StaleFeatureCacheError, match="pooling"):
        load_features(path, expected_settings=extraction_settings(pipe, [5, 50], None, pooling="avgmax"))
    with pytest.raises(StaleFeatureCacheError, match="other images"):
        load_features(path, expected_settings=settings, expected_image_ids=ids[::-1])
    torch.manual_seed(1)
    other = DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler())
    assert model_fingerprint(other.unet) != model_fingerprint(pipe.unet)
    with pytest.raises(StaleFeatureCacheError, match="model_fingerprint"):
        load_features(path, expected_settings=extraction_settings(other, [5, 50], None))
    with open(path, "r+b") as f:  # truncated: a stale cache (the probe recomputes it), not a SafetensorError
        f.truncate(200)
    with pytest.raises(StaleFeatureCacheError, match="cannot be read, it is damaged"):
        load_features(path, expected_settings=settings)


def test_save_features_refuses_what_it_could_not_read_back(tmp_path):
    import numpy as np

    rows = torch.zeros(3, 4)
    path = str(tmp_path / "f.safetensors")
    with pytest.raises(ValueError, match="layer x timestep grid"):  # load_features failed on it with a SafetensorError
        save_features(path, {("mid_block", 10): rows, ("up_blocks.0", 100): rows}, {}, image_ids=["a", "b", "c"])
    with pytest.raises(ValueError, match="`image_ids` must name the 3 feature rows"):
        save_features(path, {("mid_block", 10): rows}, {}, image_ids=None)
    save_features(path, {("mid_block", np.int64(10)): rows}, {}, image_ids=["a", "b", "c"])  # numpy timesteps
    assert load_features(path).timesteps == [10]


def test_model_fingerprint_is_the_same_in_every_process():
    # diffusers keeps `_use_default_values` in the config in string-hash order, which changes with PYTHONHASHSEED
    code = ("import torch; from mic_diffrep.models.mic_diffrep.unet import create_unet; from mic_diffrep.features.cache import "
            "model_fingerprint; torch.manual_seed(0); print(model_fingerprint(create_unet(16, 'tiny')))")
    prints = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}).stdout.split()[-1]
              for seed in ("1", "2", "3")}
    assert len(prints) == 1


def test_a_stopped_extraction_continues_from_its_saved_parts(pipe, unlabelled_folder, tmp_path, monkeypatch, caplog):
    """An extraction was all or nothing: its features were written once at the end, so hours of extraction stopped
    by Ctrl-C, a crash or a lost machine started over. Parts are saved as they are extracted; a rerun of the same
    settings extracts only the rest and gives the same features, and parts of other settings are not used."""
    import mic_diffrep.features.extraction as extraction
    from mic_diffrep.commands import main

    pipe.save_pretrained(tmp_path / "pipe")
    common = ["extract", "--pretrained", str(tmp_path / "pipe"), "--data_dir", unlabelled_folder, "--timesteps", "5",
              "--noise", "per_image", "--batch_size", "5", "--mixed_precision", "no"]
    main(common + ["--output", str(tmp_path / "whole.safetensors")])  # 24 images, in one part
    whole = load_features(str(tmp_path / "whole.safetensors"))

    monkeypatch.setattr(extraction, "PART_SIZE", 5)  # 5 parts: 5, 5, 5, 5, 4 images
    calls, extract = [], DiffusionFeatureExtractor.extract

    def stopped_after(parts):
        def counted(self, pixels, *args, **kwargs):
            calls.append(len(pixels))
            if len(calls) > parts:
                raise KeyboardInterrupt
            return extract(self, pixels, *args, **kwargs)
        return counted

    out = tmp_path / "features.safetensors"
    monkeypatch.setattr(DiffusionFeatureExtractor, "extract", stopped_after(2))
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit):  # Ctrl-C
        main(common + ["--output", str(out)])
    assert not out.exists() and len(os.listdir(f"{out}.parts")) == 2
    assert "The features of 10 images are saved in" in caplog.text
    calls.clear()
    monkeypatch.setattr(DiffusionFeatureExtractor, "extract", stopped_after(99))
    main(common + ["--output", str(out), "--timesteps", "6"])  # other settings: the saved parts are not theirs
    assert len(calls) == 5 and not os.path.exists(f"{out}.parts")
    with pytest.raises(SystemExit):
        monkeypatch.setattr(DiffusionFeatureExtractor, "extract", stopped_after(3))
        calls.clear()
        main(common + ["--output", str(out)])
    calls.clear()
    monkeypatch.setattr(DiffusionFeatureExtractor, "extract", stopped_after(99))
    main(common + ["--output", str(out)])
    assert calls == [5, 4] and not os.path.exists(f"{out}.parts")  # the three saved parts are not extracted again
    resumed = load_features(str(out))
    assert resumed.image_ids == whole.image_ids
    for key, value in whole.features.items():
        assert torch.equal(resumed.features[key], value)


def test_parts_split_the_images_between_processes_as_without_parts(tmp_path, monkeypatch):
    """Parts of 1,024 images were shared out whole: 2,100 images on 2 processes gave one process 2,048 of them (twice
    the time), and 5 images on 4 processes left one process without images, whose extraction failed."""
    import contextlib

    import mic_diffrep.features.extraction as extraction

    class Extractor:
        def extract(self, pixels, args, noise_seeds, show_progress=True):
            if not len(pixels):
                raise ValueError("nothing to extract")  # as torch.cat of no batches
            return {("mid_block", 10): pixels.float().view(len(pixels), -1)[:, :1]}

    class Process:  # what `split_between_processes` gives process `index` of `count`
        def __init__(self, index, count):
            self.process_index, self.num_processes, self.is_local_main_process = index, count, index == 0

        @contextlib.contextmanager
        def split_between_processes(self, items):
            per, extra = divmod(len(items), self.num_processes)
            start = self.process_index * per + min(self.process_index, extra)
            yield items[start : start + per + (self.process_index < extra)]

    args = FeatureArguments(timesteps=[10], batch_size=64)
    for num_images, count, expected in ((2100, 2, [1050, 1050]), (5, 4, [2, 1, 1, 1]), (3, 4, [1, 1, 1, 0])):
        pixels = torch.arange(num_images, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
        seeds = torch.zeros(num_images, dtype=torch.long)
        shares, gathered = [], []
        for index in range(count):
            features, shard = extraction._extract_parts(Extractor(), pixels, args, Process(index, count), seeds,
                                                        str(tmp_path / f"parts-{num_images}"), {"a": 1})
            shares.append(len(shard))
            gathered.append(features[("mid_block", 10)])
        assert shares == expected and torch.equal(torch.cat(gathered).flatten(), pixels[:, 0, 0, 0].float())


def test_two_processes_gather_features_in_input_order(pipe, unlabelled_folder, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    common = ["--pretrained", str(tmp_path / "pipe"), "--data_dir", unlabelled_folder, "--timesteps", "5", "50",
              "--noise", "per_image", "--batch_size", "5"]
    script = os.path.join(REPO, "training", "extract_features.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, script, *common, "--output", str(tmp_path / "one.safetensors")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             script, *common, "--output", str(tmp_path / "two.safetensors")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    one = load_features(str(tmp_path / "one.safetensors"))
    two = load_features(str(tmp_path / "two.safetensors"))
    assert one.image_ids == two.image_ids and len(one.image_ids) == 24
    for key in one.features:
        torch.testing.assert_close(two.features[key], one.features[key], atol=1e-5, rtol=1e-5)


def test_extractor_loads_in_bf16_as_the_cast_pipeline_extracts(pipe, images, tmp_path):
    pipe.save_pretrained(tmp_path)
    args = FeatureArguments(timesteps=[10, 100])
    pixels = pipe.prepare_pixels(images)
    loaded = DiffusionFeatureExtractor.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert loaded.pipeline.unet.dtype == torch.bfloat16 and loaded.source == str(tmp_path)
    cast = DiffusionFeatureExtractor(pipe).to(dtype=torch.bfloat16)
    extracted = [extractor.extract(pixels, extractor.resolve(args), show_progress=False) for extractor in (loaded, cast)]
    for key, value in extracted[0].items():
        torch.testing.assert_close(value, extracted[1][key], rtol=0, atol=0)


def test_flip_averaged_feature_caches_record_the_mirror_noise(pipe):
    """Caches of the earlier flip read-out (noise mirrored with the image) lack the key, so they read as stale."""
    assert extraction_settings(pipe, [5], None, flip_average=True)["mirror_noise"] == "shared"
    assert "mirror_noise" not in extraction_settings(pipe, [5], None)


def test_the_image_processors_output_is_not_preprocessed_again(pipe, images):
    """Its `pixel_values` (floats in [-1, 1]) were windowed and resized again: features 31% off."""
    from mic_diffrep import MicDiffRepImageProcessor

    processed = MicDiffRepImageProcessor(resolution=16)(images)
    expected = pipe.extract_features(images, 10, "mid_block").features[("mid_block", 10)]
    for given in (processed, processed["pixel_values"], processed["pixel_values"].numpy()):
        if isinstance(given, np.ndarray):
            given = {"pixel_values": given}
        bare = isinstance(given, torch.Tensor)  # not a BatchFeature: passes through, saying so
        with pytest.warns(UserWarning, match="taken as preprocessed") if bare else contextlib.nullcontext():
            features = pipe.extract_features(given, 10, "mid_block").features[("mid_block", 10)]
        torch.testing.assert_close(features, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pixel_values.*\\(N, 1, 16, 16\\).*got \\(5, 1, 32, 32\\)"):
        pipe.extract_features(MicDiffRepImageProcessor(resolution=32)(images), 10, "mid_block")


def test_features_train_a_probe_and_misuse_is_named(pipe, images):
    """From an API walkthrough: features were inference-mode tensors (a probe could not backpropagate through them);
    `pooling_grid_size=0` gave empty features; `concatenate(layers="mid_block")` split the name into letters; a zero
    batch, a generator list of another length, no images and no layers failed deep inside torch."""
    out = pipe.extract_features(images, timesteps=[100], layers=["mid_block"])
    x = out.features[("mid_block", 100)]
    x -= x.mean(0)  # in place, as standardisation does
    logits = torch.nn.Linear(x.shape[1], 2)(x)
    torch.nn.functional.cross_entropy(logits, torch.arange(len(x)) % 2).backward()
    assert torch.equal(out.concatenate(layers="mid_block", timesteps=100), out.concatenate())
    for kwargs, message in (({"pooling": "grid", "pooling_grid_size": 0}, "pooling_grid_size` must be at least 1"),
                            ({"layers": []}, "`layers` is empty")):
        with pytest.raises(ValueError, match=message):
            pipe.extract_features(images, timesteps=[100], **kwargs)
    with pytest.raises(TypeError, match="got None"):
        pipe.extract_features(None)
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer, got 0"):
        pipe(batch_size=0, num_inference_steps=2)
    with pytest.raises(ValueError, match="list of generators of length 2"):
        pipe(batch_size=3, num_inference_steps=2, generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="No images"):
        save_image_grid([], "grid.png")


def test_an_unreadable_image_is_named(tmp_path):
    """A truncated file gave PIL's "image file is truncated", and a truncated datasets record "Truncated File Read",
    naming neither the file nor the record."""
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    torch.manual_seed(0)
    pipe = DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler())
    good = tmp_path / "good.png"
    PIL.Image.fromarray((np.arange(400).reshape(20, 20) % 255).astype(np.uint8)).save(good)
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"Cannot read image .*cut.png: "):
        pipe.extract_features([str(good), str(tmp_path / "cut.png")], timesteps=[5], layers=["mid_block"])
    with pytest.raises(FileNotFoundError):  # the kind of error kept
        pipe.extract_features([str(tmp_path / "missing.png")], timesteps=[5], layers=["mid_block"])
    records = Dataset.from_dict({"image": [{"path": "scan_7.png", "bytes": data[: len(data) // 2]}]},
                                features=Features({"image": ImageFeature(decode=False)}))
    with pytest.raises(OSError, match=r"Cannot read image scan_7.png \(the bytes of a datasets record\)"):
        pipe.extract_features(records, timesteps=[5], layers=["mid_block"])
