import json
import os
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, pipeline

from mic_diffrep import (DiffusionFeaturePipeline, MicDiffRepConfig, MicDiffRepForImageClassification,
                         MicDiffRepImageProcessor, preprocess_images)
from mic_diffrep.reporting import push_to_hub, write_model_card
from mic_diffrep.models.mic_diffrep import MicDiffRepMSFAHead
from mic_diffrep.data import pixels_to_model_input
from mic_diffrep.models.mic_diffrep.unet import UNET_PRESETS, create_scheduler


def tiny_config(**kwargs):
    defaults = dict(unet_config=dict(UNET_PRESETS["tiny"], sample_size=16), timesteps=[5, 50], hidden_size=8,
                    num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    return MicDiffRepConfig(**{**defaults, **kwargs})


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MicDiffRepForImageClassification(tiny_config()).eval()


def test_config_round_trip_and_validation(tmp_path):
    config = tiny_config(layers=["mid_block", "up_blocks.1"], pooling="grid", pooling_grid_size=2)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MicDiffRepConfig) and loaded.model_type == "mic_diffrep"
    assert loaded.layers == ["mid_block", "up_blocks.1"] and loaded.timesteps == [5, 50]
    assert loaded.unet_config == config.unet_config and loaded.id2label == {0: "a", 1: "b", 2: "c"}
    assert loaded.resolution == 16
    with pytest.raises(ValueError, match="Valid layers are"):
        tiny_config(layers=["up_blocks.9"])
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        tiny_config(timesteps=[1000])
    with pytest.raises(ValueError, match="pooling"):
        tiny_config(pooling="median")
    with pytest.raises(ValueError, match="hidden_size"):
        tiny_config(hidden_size=-1)


def test_forward_shapes_loss_and_tuple_output(model):
    pixel_values = torch.rand(4, 1, 16, 16) * 2 - 1
    output = model(pixel_values, labels=torch.tensor([0, 1, 2, 0]), output_hidden_states=True)
    assert output.logits.shape == (4, 3)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    expected_loss = torch.nn.functional.cross_entropy(output.logits, torch.tensor([0, 1, 2, 0]))
    torch.testing.assert_close(output.loss, expected_loss)
    assert output.hidden_states[0].shape == (4, model.feature_size)
    logits, = model(pixel_values, return_dict=False)
    torch.testing.assert_close(logits, output.logits)
    torch.testing.assert_close(model(pixel_values).logits, output.logits)  # deterministic (fixed noise)
    with pytest.raises(ValueError, match="MicDiffRepImageProcessor"):
        model(torch.rand(2, 3, 16, 16))
    # uint8 pixels and 0..255 floats were scored (every image predicted as one class)
    with pytest.raises(ValueError, match="floats in \\[-1, 1\\], got torch.uint8"):
        model(torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8))
    with pytest.raises(ValueError, match="floats in \\[-1, 1\\], got torch.float32 values in \\[0, 255\\]"):
        model(torch.cat([torch.zeros(1, 1, 16, 16), torch.full((1, 1, 16, 16), 255.0)]))


@pytest.mark.parametrize("flip_average", [False, True])
def test_model_features_equal_pipeline_fixed_noise_features(flip_average):
    torch.manual_seed(0)
    model = MicDiffRepForImageClassification(tiny_config(flip_average=flip_average)).eval()
    pixels = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    pipe = DiffusionFeaturePipeline(model.unet, create_scheduler())
    out = pipe.extract_features(pixels, timesteps=[5, 50], flip_average=flip_average, preprocessed=True)
    torch.testing.assert_close(model.extract_features(pixels_to_model_input(pixels)),
                               out.concatenate(layers=model.config.layers), rtol=0, atol=0)


def test_msfa_head_matches_equations_4_to_6():
    head = MicDiffRepMSFAHead(in_features=3, hidden_size=2, num_labels=2)
    with torch.no_grad():
        head.aggregate.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.5]]))  # W
        head.aggregate.bias.zero_()
        head.classifier.weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 2.0]]))  # M
        head.classifier.bias.zero_()
    f1, f2 = torch.tensor([[1.0, 2.0]]), torch.tensor([[-4.0]])
    features = torch.cat([f1, f2], dim=1)  # eq. 4: F = concat(F1, F2) = [1, 2, -4]
    # eq. 5: W F = [1 - (-4), 0.5 * (1 + 2 - 4)] = [5, -0.5]; ReLU -> [5, 0]
    # eq. 6: M F_agg = [5, 0]; softmax -> [e^5, 1] / (e^5 + 1)
    logits = head(features)
    torch.testing.assert_close(logits, torch.tensor([[5.0, 0.0]]))
    torch.testing.assert_close(logits.softmax(-1), torch.tensor([[np.exp(5) / (np.exp(5) + 1), 1 / (np.exp(5) + 1)]],
                                                                dtype=torch.float32))


def test_save_load_identical_logits_auto_classes_and_pipeline(model, tmp_path):
    model.save_pretrained(tmp_path)
    MicDiffRepImageProcessor(resolution=16).save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "model.safetensors")
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in os.listdir(tmp_path))
    assert json.load(open(tmp_path / "config.json"))["auto_map"]["AutoModelForImageClassification"] == \
        "modeling_mic_diffrep.MicDiffRepForImageClassification"

    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert isinstance(loaded, MicDiffRepForImageClassification)
    pixel_values = torch.rand(2, 1, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded(pixel_values).logits, model(pixel_values).logits, rtol=1e-5, atol=1e-6)

    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(processor, MicDiffRepImageProcessor)
    assert processor.size == {"height": 16, "width": 16}  # where transformers' training scripts read the input size
    image = PIL.Image.fromarray((np.random.default_rng(0).random((30, 20, 3)) * 255).astype(np.uint8))
    torch.testing.assert_close(processor(image, return_tensors="pt")["pixel_values"], preprocess_images(image, 16))

    classify = pipeline("image-classification", model=str(tmp_path))
    predictions = classify(image)
    assert {p["label"] for p in predictions} == {"a", "b", "c"}
    assert abs(sum(p["score"] for p in predictions) - 1) < 1e-5
    expected = model(processor(image)["pixel_values"]).logits.softmax(-1)[0]
    assert abs(predictions[0]["score"] - expected.max().item()) < 1e-5

    # With the UNet in bf16 the pipeline (which casts inputs to `model.dtype`) still hands over float32 pixels, so it
    # scores exactly as the model does on the processor's pixels.
    bf16 = AutoModelForImageClassification.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.unet.dtype == torch.bfloat16 and processor(image).to(torch.bfloat16)["pixel_values"].dtype == torch.float32
    scores = {p["label"]: p["score"] for p in pipeline("image-classification", model=bf16, image_processor=processor)(
        image, top_k=3)}
    expected = bf16(processor(image)["pixel_values"]).logits.softmax(-1)[0]
    for index, label in bf16.config.id2label.items():
        assert scores[label] == pytest.approx(expected[index].item(), abs=1e-7)


def test_push_to_hub_uploads_config_weights_code_and_card(model, tmp_path):
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    MicDiffRepImageProcessor(resolution=16).save_pretrained(folder)
    os.makedirs(folder / "features")
    (folder / "features" / "train.safetensors").write_bytes(b"not uploaded")
    results = json.load(open(os.path.join(os.path.dirname(__file__), "data", "probe_results.json")))
    results.update(data_dir="/home/me/private/brain-mri", pretrained="/home/me/runs/pretrain",
                   command="mic-diffrep probe --pretrained /home/me/runs/pretrain "
                           "--data_dir=/home/me/private/brain-mri --output_dir runs/model", test_split="the test split of /home/me/private/brain-mri",
                   skipped_images=[{"path": "/home/me/private/brain-mri/Testing/glioma/bad.jpg",
                                    "error": "/home/me/private/brain-mri/Testing/glioma/bad.jpg: truncated"}])
    write_model_card(str(folder), results)
    (folder / "results.json").write_text(json.dumps(results))  # as the probe writes them

    uploaded = {}

    def fake_upload_folder(self, repo_id, folder_path, **kwargs):
        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(os.listdir(folder_path))
        uploaded["preprocessor"] = json.load(open(os.path.join(folder_path, "preprocessor_config.json")))
        uploaded["card"] = open(os.path.join(folder_path, "README.md")).read()
        uploaded["results"] = json.load(open(os.path.join(folder_path, "results.json")))
        uploaded["results.md"] = open(os.path.join(folder_path, "results.md")).read()

    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/mic-diffrep")), \
            mock.patch("huggingface_hub.HfApi.upload_folder", fake_upload_folder):
        assert push_to_hub(str(folder), "me/mic-diffrep") == "me/mic-diffrep"
    assert uploaded["repo_id"] == "me/mic-diffrep"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "modeling_mic_diffrep.py",
            "configuration_mic_diffrep.py", "image_processing_mic_diffrep.py", "unet_features.py",
            "preprocessing.py"} <= set(uploaded["files"])
    assert "features" not in uploaded["files"]
    assert uploaded["preprocessor"]["auto_map"]["AutoImageProcessor"].endswith("MicDiffRepImageProcessor")
    assert "pipeline_tag: image-classification" in uploaded["card"] and "Limitations" in uploaded["card"]
    assert "accuracy **0.750**" in uploaded["card"]
    # The card loads from the repository and lists its test metrics for the Hub; no local paths are published.
    assert 'model="me/mic-diffrep", trust_remote_code=True' in uploaded["card"] and "path/or/repo-id" not in \
        uploaded["card"]
    card = ModelCard(uploaded["card"])
    results_index = card.data.eval_results
    assert {r.dataset_split for r in results_index} == {"test"}
    assert [(r.metric_type, r.metric_value) for r in results_index] == [
        ("accuracy", round(results["msfa"]["test"]["all"]["accuracy"], 4)),
        ("f1", round(results["msfa"]["test"]["all"]["macro_f1"], 4))]
    assert "/home/me/private" not in uploaded["card"] and "`brain-mri`" in uploaded["card"]
    # results.json and results.md were uploaded with the data folder's and runs' local paths and the command's
    published = uploaded["results"]
    assert "/home/me" not in json.dumps(published) and "/home/me" not in uploaded["results.md"]
    assert (published["data_dir"], published["pretrained"]) == ("brain-mri", "pretrain")
    assert published["command"] == ("mic-diffrep probe --pretrained pretrain --data_dir=brain-mri --output_dir "
                                    "runs/model")
    assert published["skipped_images"] == [{"path": "brain-mri/Testing/glioma/bad.jpg",
                                            "error": "brain-mri/Testing/glioma/bad.jpg: truncated"}]
    assert published["msfa"] == results["msfa"]
    assert json.load(open(folder / "results.json"))["data_dir"] == "/home/me/private/brain-mri"  # kept locally
    assert 'model="path/to/this/folder"' in (folder / "README.md").read_text()  # the local card stays local
    assert MicDiffRepImageProcessor._auto_class is None  # local folders keep loading without remote-code prompts


def test_medical_image_classification_pipeline_reads_16_bit_and_float_images(model, tmp_path):
    """transformers' image-classification pipeline makes every path or PIL image 8-bit RGB first: a 16-bit slice
    saturates and a float one goes black. The medical-image-classification pipeline scores them as the 8-bit slice."""
    model.save_pretrained(tmp_path / "model")
    MicDiffRepImageProcessor(resolution=16).save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    slice8 = (rng.random((24, 20)) * 200).astype(np.uint8)
    PIL.Image.fromarray(slice8).save(tmp_path / "eight.png")
    PIL.Image.fromarray(slice8.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    PIL.Image.fromarray(slice8.astype(np.float32) / 255).save(tmp_path / "float.tif")
    files = [str(tmp_path / name) for name in ("eight.png", "sixteen.png", "float.tif")]

    classify = pipeline("medical-image-classification", model=str(tmp_path / "model"))
    assert type(classify).__name__ == "MedicalImageClassificationPipeline"
    scores = [{p["label"]: p["score"] for p in prediction} for prediction in classify(files, top_k=3)]
    for other in scores[1:]:
        assert other == pytest.approx(scores[0], abs=1e-3)  # saturated to 8-bit RGB, the tiny model moves 4e-3
    assert classify(PIL.Image.open(files[1]), top_k=3) == classify(files[1], top_k=3)  # a PIL image as its path
    assert classify(files[0], top_k=1)[0]["label"] == max(scores[0], key=scores[0].get)

    stock = pipeline("image-classification", model=str(tmp_path / "model"))
    assert stock(files[0], top_k=3) == classify(files[0], top_k=3)  # 8-bit: the two agree

    # Saving the pipeline failed writing the model's config (the task's `default` refused every lookup), left a
    # 0-byte config.json, and the model could not be saved any more
    classify.save_pretrained(tmp_path / "saved")
    # the saved config names the task's code, copied beside it: transformers runs it only when trusted
    again = pipeline("medical-image-classification", model=str(tmp_path / "saved"), trust_remote_code=True)
    assert again(files[1], top_k=3) == classify(files[1], top_k=3)
    classify.model.save_pretrained(tmp_path / "model_again")
    assert AutoModelForImageClassification.from_pretrained(tmp_path / "model_again").config.num_labels == 3


def test_loading_keeps_the_unet_frozen_and_the_head_float32(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert not any(p.requires_grad for p in loaded.unet.parameters())
    assert loaded.num_parameters(only_trainable=True) == sum(p.numel() for p in loaded.head.parameters())

    # A new number of labels on a bf16 UNet: the re-initialised classifier is float32 like the rest of the head.
    relabelled = AutoModelForImageClassification.from_pretrained(
        tmp_path, dtype=torch.bfloat16, num_labels=2, id2label={0: "x", 1: "y"}, label2id={"x": 0, "y": 1},
        ignore_mismatched_sizes=True)
    assert relabelled.unet.dtype == torch.bfloat16
    assert {p.dtype for p in relabelled.head.parameters()} == {torch.float32}
    out = relabelled(pixel_values=torch.rand(2, 1, 16, 16) * 2 - 1, labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, 2) and torch.isfinite(out.loss)


def test_a_cast_to_bf16_and_back_keeps_the_exact_noise_schedule(model):
    from mic_diffrep.models.mic_diffrep.modeling_mic_diffrep import ddpm_alphas_cumprod

    exact = ddpm_alphas_cumprod(model.config)
    pixel_values = torch.rand(2, 1, 16, 16) * 2 - 1
    reference = model(pixel_values).logits
    model.to(torch.bfloat16)
    torch.testing.assert_close(model.noise_schedule(), exact, rtol=0, atol=0)
    model.to(torch.float32)
    assert model.alphas_cumprod[10] != exact[10]  # the buffer itself was rounded by the cast
    torch.testing.assert_close(model.noise_schedule(), exact, rtol=0, atol=0)
    # Only the weights' bf16 rounding is left
    torch.testing.assert_close(model(pixel_values).logits, reference, rtol=0, atol=0.05)


def test_the_medical_pipeline_without_a_model_says_what_to_pass():
    # transformers looks up the task's default model: a KeyError 'default' before, as the task has none
    with pytest.raises(ValueError, match="needs `model=`.*mic-diffrep probe"):
        pipeline("medical-image-classification")


def test_loading_a_pretrained_pipeline_as_a_classifier_says_what_it_is(tmp_path):
    """The pipeline's `unet/` folder failed with "TypeError: '<' not supported between 'int' and 'NoneType'" (its
    diffusers config read as a classifier config); the pipeline folder with transformers' "no model.safetensors"."""
    from mic_diffrep import create_unet

    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(tmp_path / "pipe")
    with pytest.raises(ValueError, match="diffusers UNet2DModel .*DiffusionFeaturePipeline.from_pretrained"):
        MicDiffRepForImageClassification.from_pretrained(tmp_path / "pipe" / "unet")
    with pytest.raises(OSError, match="pretrained pipeline folder.*mic-diffrep probe --pretrained"):
        MicDiffRepForImageClassification.from_pretrained(str(tmp_path / "pipe"))


def test_loading_a_classifier_or_a_unet_as_a_pipeline_says_what_it_is(model, tmp_path):
    """diffusers said only "no file named model_index.json" for both."""
    from mic_diffrep import create_unet

    model.save_pretrained(tmp_path / "model")
    with pytest.raises(OSError, match="is a MicDiffRep classifier folder.*MicDiffRepForImageClassification"):
        DiffusionFeaturePipeline.from_pretrained(tmp_path / "model")
    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(tmp_path / "pipe")
    with pytest.raises(OSError, match=f"the UNet of a pretrained pipeline: load .*{tmp_path / 'pipe'}"):
        DiffusionFeaturePipeline.from_pretrained(str(tmp_path / "pipe" / "unet"))
    assert DiffusionFeaturePipeline.from_pretrained(tmp_path / "pipe").resolution == 16


def test_loading_a_checkpoint_a_run_folder_or_a_baseline_as_a_pipeline_names_the_folder_to_load(tmp_path):
    """diffusers said only "no file named model_index.json" for each of the folders beside a pipeline."""
    from mic_diffrep import create_unet
    from mic_diffrep.features.extractors import load_pipeline

    run = tmp_path / "run"
    DiffusionFeaturePipeline(create_unet(16, "tiny"), create_scheduler()).save_pretrained(run / "pretrain")
    unfinished = tmp_path / "unfinished" / "checkpoint-20"
    for checkpoint in (run / "pretrain" / "checkpoint-10", unfinished):
        checkpoint.mkdir(parents=True)
        (checkpoint / "training_state.json").write_text('{"global_step": 10}')
    (tmp_path / "byol").mkdir()
    (tmp_path / "byol" / "baseline_config.json").write_text('{"method": "byol"}')
    cases = {run / "pretrain" / "checkpoint-10": f"training checkpoint .*load the folder of the run that wrote it "
                                                 f"\\({run / 'pretrain'}\\)",
             unfinished: f"has not finished: continue it with `--output_dir {unfinished.parent} "
                         f"--resume_from_checkpoint latest`",
             run: f"`mic-diffrep run` folder: its pretrained pipeline is {run / 'pretrain'}",
             tmp_path / "byol": "baseline encoder .*cannot generate images",
             # a pretraining interrupted (in a notebook, say) before it saved weights: diffusers said only
             # "no file named model_index.json"
             unfinished.parent: "holds only the checkpoints of a pretraining stopped before it saved its weights: "
                                "continue it"}
    for folder, message in cases.items():
        with pytest.raises(OSError, match=message):
            DiffusionFeaturePipeline.from_pretrained(str(folder))
    for folder in (run / "pretrain" / "checkpoint-10", run):  # `extract --pretrained` / `generate --pretrained`
        with pytest.raises(ValueError, match=cases[folder]):
            load_pipeline(str(folder))
    assert DiffusionFeaturePipeline.from_pretrained(run / "pretrain").resolution == 16


def test_published_results_cut_the_test_folder_to_its_name_wherever_it_appears():
    """A probe's `--test_data_dir` was uploaded whole in its skipped files ("/home/alice/site b/glioma/bad.jpg"), and
    its description was split at spaces ("--test_data_dir home alice/site b")."""
    from mic_diffrep.reporting.model_card import published_results

    test_dir = "/home/alice/site b"
    results = {"data_dir": "/home/alice/data", "test_data_dir": test_dir, "test_split": f"--test_data_dir {test_dir}",
               "skipped_images": [{"path": f"{test_dir}/glioma/bad.jpg",
                                   "error": f"OSError: {test_dir}/glioma/bad.jpg"}],
               "leakage": {"skipped_images": [{"path": f"{test_dir}/glioma/bad.jpg"}]},
               "command": f"mic-diffrep probe --data_dir /home/alice/data --test_data_dir '{test_dir}'"}
    published = published_results(results)
    assert "alice" not in json.dumps(published)
    assert published["test_split"] == "--test_data_dir site b"
    assert published["skipped_images"][0]["path"] == "site b/glioma/bad.jpg"


def test_a_folder_saved_from_python_is_uploaded_with_a_card_that_records_no_accuracy(model, tmp_path):
    """`probe_classifier` then `save_pretrained` (the README's Python route) wrote no results.json, and
    `push_to_hub` then uploaded no model card at all: no licence, task or usage. A card of one's own is kept."""
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    MicDiffRepImageProcessor(resolution=16).save_pretrained(folder)
    cards = []

    def fake_upload_folder(self, repo_id, folder_path, **kwargs):
        cards.append(open(os.path.join(folder_path, "README.md")).read())

    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/cls")), \
            mock.patch("huggingface_hub.HfApi.upload_folder", fake_upload_folder):
        push_to_hub(str(folder), "me/cls")
        (folder / "README.md").write_text("my own card")
        push_to_hub(str(folder), "me/cls")
    card = ModelCard(cards[0])
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "image-classification"
    assert f"MicDiffRep classifier ({', '.join(model.config.id2label.values())})" in cards[0]
    assert "No evaluation is recorded" in cards[0] and 'model="me/cls", trust_remote_code=True' in cards[0]
    assert "Not a medical device" in cards[0] and "accuracy **" not in cards[0]
    assert cards[1] == "my own card"


def test_the_processors_own_push_to_hub_uploads_its_code(tmp_path):
    """`model.push_to_hub(repo); processor.push_to_hub(repo)`, the transformers way, uploaded a processor without
    `auto_map` or code: where mic-diffrep is not installed the repository failed with "Unrecognized image
    processor". A local folder still gets neither (`transformers.pipeline` would prompt for trust_remote_code)."""
    processor = MicDiffRepImageProcessor(resolution=16)
    uploaded = {}

    def upload(self, working_dir, repo_id, files_timestamps, **kwargs):
        uploaded["files"] = sorted(os.listdir(working_dir))
        uploaded["config"] = json.load(open(os.path.join(working_dir, "preprocessor_config.json")))

    with mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.Mock(repo_id="me/cls")), \
            mock.patch("transformers.utils.hub.create_and_tag_model_card", return_value=mock.Mock()), \
            mock.patch("transformers.utils.hub.PushToHubMixin._upload_modified_files", upload):
        processor.push_to_hub("me/cls")
    assert "image_processing_mic_diffrep.py" in uploaded["files"]
    assert uploaded["config"]["auto_map"]["AutoImageProcessor"].endswith("MicDiffRepImageProcessor")
    processor.save_pretrained(tmp_path / "local")
    assert "auto_map" not in json.loads((tmp_path / "local" / "preprocessor_config.json").read_text())
    assert MicDiffRepImageProcessor._auto_class is None


def test_config_and_processor_take_the_forms_transformers_users_write():
    """`MicDiffRepConfig(layers="mid_block", timesteps=10)` split the name into letters / failed on the int; an
    unknown beta_schedule surfaced as diffusers' NotImplementedError when the model was built; `image_mean=[0.5]`
    (transformers' list form) crashed the processor."""
    import numpy as np

    from mic_diffrep.data import decode_images

    config = MicDiffRepConfig(layers="mid_block", timesteps=10)
    assert (config.layers, config.timesteps) == (["mid_block"], [10])
    with pytest.raises(ValueError, match="beta_schedule must be one of .* got 'cosine'"):
        MicDiffRepConfig(beta_schedule="cosine")
    processor = MicDiffRepImageProcessor(resolution=16, image_mean=[0.5], image_std=[0.5])
    assert torch.equal(processor(np.zeros((20, 20)))["pixel_values"],
                       MicDiffRepImageProcessor(resolution=16)(np.zeros((20, 20)))["pixel_values"])
    with pytest.raises(ValueError, match="`image_mean` must be a number, or a list of one"):
        MicDiffRepImageProcessor(image_mean=[0.5, 0.5, 0.5])
    with pytest.raises(TypeError, match="decode_images takes file paths .* got a Image"):
        decode_images([PIL.Image.new("L", (8, 8))], 16)
