"""The model, config, image processor and pipeline behave as transformers / diffusers users expect, in the spirit
of transformers' `ModelTesterMixin`, `ConfigTester`, `ImageProcessingTestMixin` and diffusers' `PipelineTesterMixin`;
and the exported classifier reproduces the probe's figures exactly."""

import logging
import pathlib

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification
from transformers.utils import logging as transformers_logging

from conftest import write_class_folder
from mic_diffrep import (DiffusionFeaturePipeline, DiffusionFeaturesOutput, MicDiffRepConfig,
                         MicDiffRepForImageClassification, MicDiffRepImageProcessor, decode_images, load_image_folder)
from mic_diffrep.data import pixels_to_model_input
from mic_diffrep.features import DiffusionFeatureExtractor, FeatureArguments
from mic_diffrep.inference import evaluate_folder, load_classifier
from mic_diffrep.models.mic_diffrep.unet import UNET_PRESETS, create_scheduler, create_unet
from mic_diffrep.models.mic_diffrep.unet_features import concatenate_features
from mic_diffrep.probing import ProbeConfig, train_heads


def tiny_config(**kwargs):
    defaults = dict(unet_config=dict(UNET_PRESETS["tiny"], sample_size=16), timesteps=[5, 50], hidden_size=8,
                    num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    return MicDiffRepConfig(**{**defaults, **kwargs})


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    model = MicDiffRepForImageClassification(tiny_config()).eval()
    model.save_pretrained(tmp_path / "model")
    MicDiffRepImageProcessor(resolution=16).save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


@pytest.fixture
def pixel_values():
    return torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


def test_bf16_from_pretrained_and_to(model_dir, pixel_values):
    reference = MicDiffRepForImageClassification.from_pretrained(model_dir)(pixel_values).logits
    loaded = MicDiffRepForImageClassification.from_pretrained(model_dir, dtype=torch.bfloat16)
    assert loaded.unet.dtype == torch.bfloat16
    # The head, the standardisation and the schedule stay float32 (as in the probe that trained the head).
    assert loaded.head.classifier.weight.dtype == torch.float32 and loaded.feature_mean.dtype == torch.float32
    logits = loaded(pixel_values).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, reference, atol=0.02, rtol=0.05)
    cast = MicDiffRepForImageClassification.from_pretrained(model_dir).to(torch.bfloat16)
    logits = cast(pixel_values.bfloat16()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits.float(), reference, atol=0.02, rtol=0.05)


def test_missing_weights_are_initialised_and_reported(pixel_values, caplog):
    transformers_logging.set_verbosity_warning()
    transformers_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            model = MicDiffRepForImageClassification.from_pretrained(None, config=tiny_config(), state_dict={})
    finally:
        transformers_logging.disable_propagation()
    assert "newly initialized" in caplog.text
    for name, tensor in model.state_dict().items():
        assert torch.isfinite(tensor).all() and tensor.abs().max() < 100, name
    torch.testing.assert_close(model.feature_std, torch.ones_like(model.feature_std))
    assert torch.isfinite(model(pixel_values).logits).all()


def test_noise_schedule_is_a_non_persistent_buffer_and_meta_init_works(model_dir, pixel_values):
    model = MicDiffRepForImageClassification.from_pretrained(model_dir)
    assert "alphas_cumprod" in dict(model.named_buffers()) and "alphas_cumprod" not in model.state_dict()
    torch.testing.assert_close(model.alphas_cumprod, create_scheduler().alphas_cumprod)
    with torch.device("meta"):
        on_meta = MicDiffRepForImageClassification(tiny_config())
    assert on_meta.alphas_cumprod.is_meta and on_meta.unet.conv_in.weight.is_meta
    # What accelerate's big-model loading does: initialise on the meta device, then load.
    mapped = MicDiffRepForImageClassification.from_pretrained(model_dir, device_map="cpu")
    assert not mapped.alphas_cumprod.is_meta
    torch.testing.assert_close(mapped(pixel_values).logits, model(pixel_values).logits)


def test_config_fallbacks_for_hidden_states_and_return_dict(model_dir, pixel_values):
    model = MicDiffRepForImageClassification.from_pretrained(model_dir, output_hidden_states=True)
    assert model.config.output_hidden_states
    output = model(pixel_values)
    assert output.hidden_states[0].shape == (4, model.feature_size)
    assert model(pixel_values, output_hidden_states=False).hidden_states is None
    model.config.return_dict = False
    logits, hidden = model(pixel_values)
    torch.testing.assert_close(logits, output.logits)


def test_an_empty_batch_gives_empty_outputs(model_dir, pixel_values):
    """An empty batch (the last of a filtered dataset, say) failed inside the UNet ("cannot reshape tensor of 0
    elements"); other transformers image classifiers return empty logits."""
    model = MicDiffRepForImageClassification.from_pretrained(model_dir)
    output = model(pixel_values[:0], output_hidden_states=True)
    assert output.logits.shape == (0, model.config.num_labels) and output.hidden_states[0].shape == (0, model.feature_size)


@pytest.mark.parametrize("problem_type, labels, expected", [
    ("single_label_classification", torch.tensor([0, 2, 1, 0]), "cross_entropy"),
    ("multi_label_classification", torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]]), "bce"),
    (None, torch.tensor([0, 2, 1, 0]), "cross_entropy"),
    (None, torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]]), "bce"),
])
def test_problem_types(problem_type, labels, expected, pixel_values):
    torch.manual_seed(0)
    model = MicDiffRepForImageClassification(tiny_config(problem_type=problem_type))
    output = model(pixel_values, labels=labels)
    if expected == "cross_entropy":
        reference = torch.nn.functional.cross_entropy(output.logits, labels)
        assert model.config.problem_type == "single_label_classification"
    else:
        reference = torch.nn.functional.binary_cross_entropy_with_logits(output.logits, labels)
        assert model.config.problem_type == "multi_label_classification"
    torch.testing.assert_close(output.loss, reference)
    output.loss.backward()
    assert model.head.classifier.weight.grad is not None and model.unet.conv_in.weight.grad is None


def test_regression_and_invalid_problem_type(pixel_values):
    torch.manual_seed(0)
    model = MicDiffRepForImageClassification(tiny_config(num_labels=1, id2label={0: "score"}, label2id={"score": 0}))
    targets = torch.tensor([0.5, -1.0, 2.0, 0.0])
    output = model(pixel_values, labels=targets)
    assert model.config.problem_type == "regression"
    torch.testing.assert_close(output.loss, torch.nn.functional.mse_loss(output.logits.squeeze(-1), targets))
    with pytest.raises(ValueError, match="problem_type"):
        tiny_config(problem_type="ranking")


@pytest.mark.parametrize("accumulation", [2, 4])
def test_trainer_gradient_accumulation_matches_one_big_batch(accumulation, pixel_values, tmp_path):
    # transformers' Trainer infers from `**kwargs` in `forward` that the loss is summed over `num_items_in_batch`;
    # a mean loss then grew k-fold with k accumulation steps (and its gradients too).
    from transformers import Trainer, TrainingArguments

    rows = [{"pixel_values": image, "labels": label} for image, label in zip(pixel_values, [0, 2, 1, 0])]
    results = []
    for batch_size, steps in ((4, 1), (4 // accumulation, accumulation)):
        torch.manual_seed(0)
        model = MicDiffRepForImageClassification(tiny_config(hidden_size=0))
        args = TrainingArguments(str(tmp_path / f"trainer-{steps}"), per_device_train_batch_size=batch_size,
                                 gradient_accumulation_steps=steps, max_steps=1, learning_rate=0.1,
                                 max_grad_norm=1e9, use_cpu=True, report_to=[], save_strategy="no", seed=0,
                                 dataloader_drop_last=False, logging_steps=1)
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        results.append((trainer.state.log_history[0]["loss"], model.head.classifier.weight.detach().clone()))
    (loss_one, weight_one), (loss_accumulated, weight_accumulated) = results
    assert loss_accumulated == pytest.approx(loss_one, rel=1e-4)
    torch.testing.assert_close(weight_accumulated, weight_one)


def test_train_mode_keeps_the_frozen_unet_deterministic(pixel_values):
    torch.manual_seed(0)
    model = MicDiffRepForImageClassification(tiny_config(unet_config=dict(UNET_PRESETS["tiny"], sample_size=16,
                                                                          dropout=0.5)))
    model.train()
    assert model.training and model.head.training and not model.unet.training
    torch.testing.assert_close(model.extract_features(pixel_values),
                               model.extract_features(pixel_values))
    assert set(model.dummy_inputs) == {"pixel_values"}
    assert model(**model.dummy_inputs).logits.shape == (1, 3)


# ---------------------------------------------------------------------------------------------------------------
# Image processor
# ---------------------------------------------------------------------------------------------------------------


def test_image_processor_options_are_declared_saved_and_overridable(tmp_path):
    processor = MicDiffRepImageProcessor(resolution=24, resize_mode="center_crop", intensity_window="none")
    for name in ("resolution", "resize_mode", "intensity_window"):
        assert name in MicDiffRepImageProcessor.valid_kwargs.__annotations__
    saved = processor.to_dict()
    for key, value in {"resolution": 24, "resize_mode": "center_crop", "intensity_window": "none", "do_resize": True,
                       "do_rescale": True, "do_normalize": True}.items():
        assert saved[key] == value
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, MicDiffRepImageProcessor) and loaded.to_dict() == saved
    image = PIL.Image.fromarray((np.random.default_rng(0).random((30, 40)) * 255).astype(np.uint8))
    torch.testing.assert_close(loaded(image)["pixel_values"], processor(image)["pixel_values"])
    assert processor(image, resolution=8)["pixel_values"].shape == (1, 1, 8, 8)  # per-call override
    raw = processor(image, do_rescale=False, do_normalize=False)["pixel_values"]
    assert raw.max() > 1 and raw.min() >= 0  # 0..255 without rescaling
    assert processor(image, return_tensors="np")["pixel_values"].dtype == np.float32
    with pytest.raises(ValueError, match="do_resize=False"):
        processor(image, do_resize=False)
    square = PIL.Image.new("L", (24, 24), 128)
    assert processor(square, do_resize=False)["pixel_values"].shape == (1, 1, 24, 24)
    with pytest.raises(ValueError, match="resize_mode"):
        MicDiffRepImageProcessor(resize_mode="stretch")
    with pytest.raises(TypeError, match="Unexpected keyword"):
        processor(image, crop_size=32)
    # transformers' `size` is the resolution, in the constructor, from_pretrained and per call alike (the constructor
    # dropped it silently while a call refused it)
    assert processor(image, size=32)["pixel_values"].shape == (1, 1, 32, 32)
    assert MicDiffRepImageProcessor(size={"height": 48, "width": 48}).resolution == 48
    assert AutoImageProcessor.from_pretrained(tmp_path, size={"shortest_edge": 40}).resolution == 40
    with pytest.raises(ValueError, match="`size` must be square"):
        MicDiffRepImageProcessor(size={"height": 48, "width": 32})


# ---------------------------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def pipe():
    torch.manual_seed(0)
    pipe = DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_outputs_determinism_and_keyword_options(pipe):
    images = [np.random.default_rng(i).integers(0, 255, (20, 20), dtype=np.uint8) for i in range(3)]
    out = pipe.extract_features(images, [5, 50], generator=torch.Generator().manual_seed(1))
    assert isinstance(out, DiffusionFeaturesOutput)
    again = pipe.extract_features(images, [5, 50], generator=torch.Generator().manual_seed(1))
    for key in out.features:
        torch.testing.assert_close(out.features[key], again.features[key], rtol=0, atol=0)
    features, layers, timesteps = pipe.extract_features(images, [5, 50], return_dict=False)
    assert layers == pipe.layer_names and timesteps == [5, 50] and set(features) == set(out.features)
    with pytest.raises(TypeError):
        pipe.extract_features(images, [5], None, "avg")  # options after `layers` are keyword-only
    samples = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    repeat = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    np.testing.assert_array_equal(samples.images, repeat.images)
    images_only, = pipe(batch_size=1, num_inference_steps=2, output_type="pt", return_dict=False)
    assert images_only.shape == (1, 1, 16, 16)


def test_pipeline_progress_bar_follows_its_config(pipe, capsys):
    pipe.set_progress_bar_config(disable=False)
    pipe.extract_features([np.zeros((16, 16), dtype=np.uint8)], [5])
    assert "Extracting features" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe.extract_features([np.zeros((16, 16), dtype=np.uint8)], [5])
    assert capsys.readouterr().err == ""


def test_pipeline_takes_grey_image_files_and_paths(pipe, tmp_path):
    grey = (np.random.default_rng(0).random((20, 24)) * 255).astype(np.uint8)
    PIL.Image.fromarray(grey).save(tmp_path / "grey.jpg")  # mode "L": the normal MRI case
    PIL.Image.fromarray(grey).convert("RGB").save(tmp_path / "rgb.png")
    by_str = pipe.extract_features([str(tmp_path / "grey.jpg")], [5]).features[("mid_block", 5)]
    by_path = pipe.extract_features([tmp_path / "grey.jpg"], [5]).features[("mid_block", 5)]
    single = pipe.extract_features(pathlib.Path(tmp_path / "grey.jpg"), [5]).features[("mid_block", 5)]
    torch.testing.assert_close(by_str, by_path, rtol=0, atol=0)
    torch.testing.assert_close(single, by_str, rtol=0, atol=0)
    assert by_str.shape == (1, 32)  # 16 channels, average and max


# ---------------------------------------------------------------------------------------------------------------
# The exported classifier reproduces the probe
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixed_precision, flip_average", [("no", False), ("bf16", False), ("no", True)])
def test_exported_subset_model_reproduces_the_probe_exactly(mixed_precision, flip_average, tmp_path):
    """A head trained on a subset of the sweep's cached features (t=300 out of 5/50/300, two of five blocks) scores
    exactly the same with `evaluate` on the exported model: its noise at t=300 is the sweep's noise at t=300."""
    root = write_class_folder(tmp_path / "data", per_class=6, seed=3, size=24, classes=("a", "b", "c"))
    decoded = decode_images(load_image_folder(root)["train"], 16)
    torch.manual_seed(0)
    extractor = DiffusionFeatureExtractor(DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()))
    extractor.pipeline.set_progress_bar_config(disable=True)
    if mixed_precision == "bf16":
        extractor.to(torch.bfloat16)
    args = extractor.resolve(FeatureArguments(timesteps=[5, 50, 300], mixed_precision=mixed_precision,
                                              flip_average=flip_average))
    sweep = extractor.extract(decoded.pixels, args)  # what the probe caches
    layers, timesteps = ["mid_block", "up_blocks.1"], [300]
    subset = concatenate_features(sweep, layers, timesteps)
    probe = train_heads({("msfa", 0): subset}, decoded.labels, 3, ProbeConfig(num_epochs=3, hidden_size=8),
                        hidden_size=8)[("msfa", 0)]
    probe_predictions = probe.predict(subset)
    model = extractor.classifier(probe.head, probe.mean, probe.std, layers, timesteps, decoded.label_names, args, 8, 0.0)
    model.save_pretrained(tmp_path / "model")
    MicDiffRepImageProcessor(resolution=16).save_pretrained(tmp_path / "model")

    report = evaluate_folder(str(tmp_path / "model"), root, mixed_precision=mixed_precision)
    probe_accuracy = int((probe_predictions == decoded.labels).sum()) / len(decoded.labels)
    assert report["accuracy"] == probe_accuracy
    # Without being told, the folder runs in the precision its head was trained on (the user's report: a bf16 probe
    # evaluated in float32 by default disagreed on one image of 40).
    assert load_classifier(str(tmp_path / "model"))[0].unet.dtype == extractor.pipeline.unet.dtype
    assert evaluate_folder(str(tmp_path / "model"), root)["confusion_matrix"] == report["confusion_matrix"]
    # So does plain `from_pretrained` (transformers' dtype "auto"), with the head and standardisation in float32.
    plain = AutoModelForImageClassification.from_pretrained(tmp_path / "model")
    assert plain.unet.dtype == extractor.pipeline.unet.dtype and plain.head.classifier.weight.dtype == torch.float32
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "model", dtype=extractor.pipeline.unet.dtype)
    with torch.no_grad():
        features = loaded.extract_features(pixels_to_model_input(decoded.pixels))
    torch.testing.assert_close(features, subset, rtol=1e-5, atol=1e-6)  # float rounding of another kernel at most


def test_a_bf16_cast_logs_no_empty_fp32_modules_warning():
    """diffusers 0.42 warns of float32 modules to keep on every `.to(dtype)`, naming an empty list; mic_diffrep drops
    that one message (the cast is exact) and lets a warning that names modules through."""
    from mic_diffrep import create_unet

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
    diffusers_logger.addHandler(handler)
    try:
        create_unet(16, "tiny").to(torch.bfloat16)
        assert not [r for r in records if "float32" in r.getMessage()]
        diffusers_logger.warning("There are modules in UNet2DModel that should be kept in float32: ['norm'].")
        assert len(records) == 1
    finally:
        diffusers_logger.removeHandler(handler)


def test_the_pipeline_card_promises_ddpm_sampling_only_where_diffusers_can_do_it():
    """The card of a self-conditioned pipeline said `DDPMPipeline` samples from it: it runs and returns two-channel
    noise (its UNet takes a second channel only `DiffusionFeaturePipeline` feeds)."""
    from mic_diffrep.reporting.model_card import pipeline_card_text

    summary = {"recipe": {"self_conditioning": False}, "global_step": 3, "stop_reason": "max_train_steps"}
    plain = pipeline_card_text(summary, "me/ddpm")
    assert 'DDPMPipeline.from_pretrained("me/ddpm")` samples from it too' in plain
    assert ('DiffusionPipeline.from_pretrained("me/ddpm", custom_pipeline="pipeline_diffusion_features", '
            'trust_remote_code=True)') in plain
    self_conditioned = pipeline_card_text({**summary, "recipe": {"self_conditioning": True}}, "me/ddpm")
    assert "samples from it too" not in self_conditioned
    assert "`diffusers.DDPMPipeline` cannot sample from it: its UNet is self-conditioned" in self_conditioned


def test_a_classifier_from_a_probe_trained_in_python_predicts_as_the_probe(tmp_path):
    """`run_probes` returned trained heads, but only an internal method of nine arguments turned one into a
    transformers model."""
    from transformers import pipeline

    from mic_diffrep.probing import probe_classifier, run_probes

    torch.manual_seed(0)
    pipe = DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler())
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray((rng.random((20, 20)) * 255).astype(np.uint8)) for _ in range(24)]
    labels = torch.arange(24) % 3
    out = pipe.extract_features(images, timesteps=[5, 10])
    results, probes = run_probes(out.features, labels, out.features, labels, ["a", "b", "c"],
                                 torch.arange(24) % 4 == 0, ProbeConfig(num_epochs=2, hidden_size=8))
    layers, timesteps = results["msfa"]["layers"], results["msfa"]["timesteps"]
    model, processor = probe_classifier(pipe, probes["msfa"], layers, timesteps, ["a", "b", "c"])
    expected = probes["msfa"].predict(out.concatenate(layers, timesteps))
    with torch.no_grad():
        assert torch.equal(model(**processor(images)).logits.argmax(-1), expected)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    classify = pipeline("medical-image-classification", model=str(tmp_path / "model"))
    assert [result[0]["label"] for result in classify(images[:4])] == [["a", "b", "c"][i] for i in expected[:4]]
