# Copyright 2026 The mic-diffrep authors. Licensed under the Apache License, Version 2.0.
"""`DiffusionFeaturePipeline`: pooled UNet block activations of noised images, and DDPM image generation.

This file is also a diffusers custom pipeline: `save_pretrained` (and so `push_to_hub` and `mic-diffrep pretrain`)
copies it into the pipeline's folder, which plain diffusers then loads with
`DiffusionPipeline.from_pretrained(folder_or_repo, custom_pipeline="pipeline_diffusion_features", trust_remote_code=True)`
(it needs `pip install mic-diffrep` for the shared preprocessing).
"""

import contextlib
import inspect
import numbers
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from diffusers.utils import BaseOutput, make_image_grid, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

try:
    from mic_diffrep.data.medical import SLICE_SETTINGS, SliceSelection, slice_selection
    from mic_diffrep.models.mic_diffrep.preprocessing import (INTENSITY_WINDOWS, RESIZE_MODES, ImagePreprocessing,
                                                              check_choice, iter_images_with_ids,
                                                              pixels_to_model_input)
    from mic_diffrep.models.mic_diffrep.unet_features import (DEFAULT_POOLING, DEFAULT_TIMESTEPS, POOLING_CHOICES,
                                                              block_names, check_layers, concatenate_features,
                                                              feature_noise, is_self_conditioned,
                                                              noisy_block_features)
    from mic_diffrep.utils import not_a_pipeline, progress_interval
except ImportError as error:  # loaded as a custom pipeline (a Hub repository's copy) without the package
    if isinstance(error, ModuleNotFoundError) and error.name == "mic_diffrep":
        raise ModuleNotFoundError("DiffusionFeaturePipeline needs the mic-diffrep package (its preprocessing and "
                                  "hooked UNet forward): `pip install mic-diffrep`.", name=error.name) from error
    if (error.name or "").startswith("mic_diffrep"):  # a copy newer than the package installed: a module or a name
        raise ImportError(f"This DiffusionFeaturePipeline needs a newer mic-diffrep ({error}): "
                          f"`pip install -U mic-diffrep`.", name=error.name) from error
    raise


# The name of this file where `save_pretrained` copies it (diffusers' `custom_pipeline=` takes it without ".py").
CUSTOM_PIPELINE_FILE = "pipeline_diffusion_features.py"

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import PIL.Image
        >>> import torch
        >>> from diffusers import DDIMScheduler
        >>> from mic_diffrep import DiffusionFeaturePipeline

        >>> pipe = DiffusionFeaturePipeline.from_pretrained("runs/pretrain", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> images = ["a.jpg", "b.jpg"]  # or PIL images, numpy arrays, tensors, DICOM / NIfTI files (a row per slice)
        >>> out = pipe.extract_features(images, timesteps=[10, 100])  # doctest: +SKIP
        >>> out.features[("up_blocks.1", 100)].shape  # (N, C)  # doctest: +SKIP
        >>> samples = pipe(batch_size=4, num_inference_steps=1000).images  # DDPM, as in the paper  # doctest: +SKIP
        >>> pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # doctest: +SKIP
        >>> samples = pipe(batch_size=4, num_inference_steps=50).images  # DDIM, 20x faster  # doctest: +SKIP

        ```
"""


@dataclass
class DiffusionFeaturesOutput(BaseOutput):
    """Output of `DiffusionFeaturePipeline.extract_features`.

    Args:
        features (`Dict[Tuple[str, int], torch.Tensor]`):
            pooled features of shape `(N, C)` (float32, on CPU) for every `(layer, timestep)`, images in input order.
        layers (`List[str]`): the layers, in UNet execution order.
        timesteps (`List[int]`): the timesteps, in the order asked for.
        image_ids (`List[Optional[str]]`): one per row: the file an image came from (`"<path>#slice=<k>"` for slice
            `k` of a multi-slice DICOM / NIfTI file, which gives several rows), `None` for an image given in memory.
    """

    features: Dict[Tuple[str, int], torch.Tensor]
    layers: List[str]
    timesteps: List[int]
    image_ids: Optional[List[Optional[str]]] = None

    def concatenate(self, layers: Optional[Sequence[str]] = None, timesteps: Optional[Sequence[int]] = None):
        """Features of several layers and timesteps side by side, shape `(N, sum of C)`: the MSFA input (eq. 4)."""
        return concatenate_features(self.features, self.layers if layers is None else layers,
                                    self.timesteps if timesteps is None else timesteps)


class DiffusionFeaturePipeline(DiffusionPipeline):
    r"""
    Feature extraction from, and image generation with, a DDPM-pretrained `UNet2DModel` (MicDiffRep).

    `extract_features` noises images to chosen timesteps, runs the UNet once per timestep with forward hooks on the
    requested blocks, and pools their activations. `__call__` generates images with the pipeline's scheduler.

    Precision follows the UNet, as in every diffusers pipeline: `from_pretrained(..., dtype=torch.bfloat16)`
    or `pipe.to(torch.bfloat16)` runs both in bf16 (about 2x faster on CPUs with AMX/AVX-512-BF16); features are
    returned in float32. Progress bars follow `set_progress_bar_config` (e.g. `disable=True`).

    Args:
        unet ([`UNet2DModel`]): the denoising UNet (one grey input channel for MRI).
        scheduler ([`SchedulerMixin`]): the noise schedule, a [`DDPMScheduler`] from pretraining; any compatible
            scheduler (e.g. [`DDIMScheduler`]) for generation.
        resize_mode (`str`, *optional*, defaults to `"pad"`): how images of another aspect ratio are made square
            (`"pad"` or `"center_crop"`); stored in `model_index.json` so features use pretraining's preprocessing.
        intensity_window (`str`, *optional*, defaults to `"percentile"`): the intensity rule of pretraining
            (`"percentile"` or `"none"`, see `mic_diffrep.models.mic_diffrep.preprocessing`).
        slice_axis (`int`, *optional*, defaults to 2), slice_range (`[start, stop]`, *optional*), keep_empty_slices
            (`bool`, *optional*, defaults to `False`): the slices of NIfTI volumes pretraining read (as its
            `--slice_axis`, `--slice_range`, `--keep_empty_slices`); stored in `model_index.json`, they are the
            default of `extract_features` and of `mic-diffrep extract` / `probe` on this folder (`pipe.slices`).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, resize_mode: str = "pad",
                 intensity_window: str = "percentile", slice_axis: int = 2, slice_range: Optional[List[int]] = None,
                 keep_empty_slices: bool = False):
        super().__init__()
        check_choice(resize_mode, RESIZE_MODES, "resize_mode")
        check_choice(intensity_window, INTENSITY_WINDOWS, "intensity_window")
        slice_selection(slice_axis, slice_range, keep_empty_slices)  # checks them
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(resize_mode=resize_mode, intensity_window=intensity_window, slice_axis=slice_axis,
                                slice_range=None if slice_range is None else list(slice_range),
                                keep_empty_slices=bool(keep_empty_slices))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`DiffusionPipeline.from_pretrained`, with a clear error for a local folder that is not a pipeline but one
        people mistake for it (a MicDiffRep classifier, a pipeline's `unet/`, a training checkpoint, a `mic-diffrep
        run` folder, a baseline's folder), where diffusers would say only that `model_index.json` is missing. Weights are
        read as safetensors only, unless `use_safetensors=False` is passed."""
        mistaken = not_a_pipeline(pretrained_model_name_or_path)
        if mistaken:
            raise OSError(mistaken)
        kwargs.setdefault("use_safetensors", True)  # weights as safetensors only (a `.bin` is a pickle)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """`DiffusionPipeline.save_pretrained`, plus a copy of this file (`pipeline_diffusion_features.py`), so the
        folder, and a Hub repository made from it by `push_to_hub`, also loads in plain diffusers with
        `DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_diffusion_features",
        trust_remote_code=True)`, as transformers copies a custom model's code next to its weights. With
        `push_to_hub=True` the upload gets a MicDiffRep model card (see `push_to_hub`)."""
        hub = {key: kwargs.pop(key) for key in ("repo_id", "commit_message", "private", "create_pr", "token")
               if key in kwargs}
        super().save_pretrained(save_directory, **kwargs)
        shutil.copyfile(os.path.abspath(__file__), os.path.join(save_directory, CUSTOM_PIPELINE_FILE))
        if push_to_hub:
            self._upload_with_card(save_directory, hub.pop("repo_id", os.path.basename(os.path.normpath(
                save_directory))), **hub)

    def push_to_hub(self, repo_id: str, commit_message: Optional[str] = None, private: Optional[bool] = None,
                    token: Optional[str] = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: Optional[str] = None):
        """`DiffusionPipeline.push_to_hub`, with a MicDiffRep model card (how to load and use it) where diffusers
        writes an empty template, and this file. A pipeline pushed from memory records no training; `mic-diffrep
        pretrain --push_to_hub` (or `mic_diffrep.reporting.push_pipeline_to_hub` of its folder) uploads its
        summary and sample grids too."""
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            # a failed upload is done again from the pipeline, not from this folder, which will be gone
            return self._upload_with_card(folder, repo_id, commit_message, private, create_pr, token,
                                          retry=f"pipe.push_to_hub({repo_id!r})")

    def _upload_with_card(self, folder: str, repo_id: str, commit_message: Optional[str] = None,
                          private: Optional[bool] = None, create_pr: bool = False, token: Optional[str] = None,
                          retry: Optional[str] = None):
        """`mic_diffrep.reporting.push_pipeline_to_hub` of `folder`: a model card, and no caches, checkpoints or
        logs of a pretraining's folder saved over, where diffusers would upload the folder whole."""
        from mic_diffrep.reporting import push_pipeline_to_hub  # (the reporting package imports this module)

        return push_pipeline_to_hub(folder, repo_id, token=token, private=private, create_pr=create_pr,
                                    commit_message=commit_message or "Upload MicDiffRep pipeline", retry=retry)

    @property
    def resolution(self) -> int:
        size = self.unet.config.sample_size
        return size if isinstance(size, int) else size[0]

    @property
    def preprocessing(self) -> ImagePreprocessing:
        """The preprocessing of pretraining (resolution, resize mode, intensity window)."""
        return ImagePreprocessing(self.resolution, self.config.resize_mode, self.config.intensity_window)

    @property
    def slice_settings(self) -> Dict:
        """The slices of NIfTI volumes pretraining read: `{"slice_axis", "slice_range", "keep_empty_slices"}`."""
        return {name: self.config[name] for name in SLICE_SETTINGS}

    @property
    def slices(self) -> SliceSelection:
        """The slices of NIfTI volumes pretraining read, as a `SliceSelection` (the default of `extract_features`)."""
        return slice_selection(**self.slice_settings)

    @property
    def layer_names(self) -> List[str]:
        return block_names(self.unet)

    def progress_bar(self, iterable=None, total=None, desc: Optional[str] = None):
        """tqdm over `iterable` with a label; in a log file (not a terminal) it writes a line every 30 s at most.
        `set_progress_bar_config(...)` overrides these settings."""
        config = {"desc": desc, "mininterval": progress_interval(), **getattr(self, "_progress_bar_config", {})}
        return tqdm(iterable, total=total, **config)

    def check_inputs(self, timesteps, layers, pooling, num_noise_samples, batch_size, pooling_grid_size: int = 2):
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        bad = [t for t in timesteps if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer))
               or not 0 <= int(t) < num_train_timesteps]
        if not timesteps or bad:
            raise ValueError(
                f"`timesteps` must be a non-empty list of integers in [0, {num_train_timesteps}), got {list(timesteps)}."
            )
        check_layers(layers, self.layer_names)
        check_choice(pooling, POOLING_CHOICES, "pooling")
        for name, value in (("num_noise_samples", num_noise_samples), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"`{name}` must be an integer of at least 1, got {value!r}.")
        if pooling == "grid" and pooling_grid_size < 1:  # 0 pooled every block into empty vectors
            raise ValueError(f"`pooling_grid_size` must be at least 1, got {pooling_grid_size}.")

    def prepare_pixels(self, images, return_ids: bool = False, slices=None, preprocessed: Optional[bool] = None,
                       _stacklevel: int = 2):
        """Images (PIL / numpy / tensors / file paths, one or a list, or a batch tensor) to uint8 `(N, 1, R, R)`.

        Uses the shared preprocessing of pretraining. Preprocessed pixels pass through: uint8 `(N, 1, R, R)` pixels
        (a decode cache, or this method's output; a tensor or an array), and the image processor's output
        (`MicDiffRepImageProcessor`: its `BatchFeature`, or its `pixel_values`, float `(N, 1, R, R)` in [-1, 1]),
        mapped back to its pixels: windowed again, preprocessed pixels would be stretched. A batch of such a shape
        could also be images that are not preprocessed yet: `preprocessed=True` says it is (else it passes through
        with a warning), `preprocessed=False` that it is not (it is preprocessed as a list of images). A DICOM or
        NIfTI file path gives one row per slice (see `mic_diffrep.models.mic_diffrep.preprocessing.as_image_list`).
        With `return_ids`, also the id of each row (`image_list_with_ids`: a file's path, `"<path>#slice=<k>"` for
        a slice, `None` for an image given in memory). `slices`: which slices of a NIfTI volume (`SliceSelection`;
        default: `self.slices`, pretraining's).
        """
        resolution = self.resolution
        processed = isinstance(images, Mapping) and "pixel_values" in images  # a BatchFeature
        if processed:
            images = torch.as_tensor(images["pixel_values"])
        elif isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1] == 1:  # as the tensors
            images = torch.from_numpy(images)
        batch = (isinstance(images, torch.Tensor) and images.ndim == 4
                 and tuple(images.shape[1:]) == (1, resolution, resolution))
        uint8 = batch and images.dtype == torch.uint8
        in_range = bool(batch and images.is_floating_point() and images.numel()
                        and images.min() >= -1 and images.max() <= 1)
        # float model input: the image processor's (clamped as before), or in [-1, 1] with negative values (no
        # image, raw or in [0, 1], has them)
        model_input = bool(batch and processed) or (in_range and bool(preprocessed or images.min() < 0))
        if processed and not batch:
            raise ValueError(f"`pixel_values` must have shape (N, 1, {resolution}, {resolution}) (this pipeline's "
                             f"resolution), got {tuple(images.shape)}.")
        if processed and preprocessed is False:
            raise ValueError("The image processor's output is preprocessed: `preprocessed=False` takes images.")
        if preprocessed and not (uint8 or in_range):
            got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"`preprocessed=True` takes uint8 pixels or float model input in [-1, 1] of shape (N, 1, "
                             f"{resolution}, {resolution}), got {got}.")
        passes = (uint8 or model_input) and (processed or preprocessed is not False)
        if passes and preprocessed is None and not processed:
            warnings.warn(f"A {'float [-1, 1]' if model_input else 'uint8'} (N, 1, {resolution}, {resolution}) batch "
                          f"is taken as preprocessed pixels, not windowed again: pass `preprocessed=True` to say so, "
                          f"or `preprocessed=False` for images not yet preprocessed.", UserWarning,
                          stacklevel=_stacklevel)
        if passes and model_input:
            images = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        if passes:
            pixels, ids = images.cpu(), [None] * len(images)
        else:
            pixels, ids = [], []
            for image, image_id in iter_images_with_ids(images, self.slices if slices is None else slices):
                try:  # a file's slices are preprocessed before the next is read
                    pixels.append(self.preprocessing(image))
                except (OSError, SyntaxError) as error:  # PIL's own messages do not name the file ("truncated")
                    kind = type(error) if isinstance(error, OSError) else OSError  # FileNotFoundError stays one
                    raise kind(f"Cannot read image {image_id or f'#{len(pixels)}'}: {error}") from error
                ids.append(image_id)
            if not pixels:
                raise ValueError("No images given.")
            pixels = torch.stack(pixels)
        return (pixels, ids) if return_ids else pixels

    def prepare_noise_seeds(self, num_images: int, generator=None, noise_seeds=None) -> torch.Tensor:
        """One noise seed per image, fixed up front, so an image's noise does not depend on the batch size.

        `noise_seeds` (one int per image) wins; else seeds are drawn from `generator`; with neither, every image
        gets the same fixed noise (seed 0), so features are a pure function of the image, as in
        `MicDiffRepForImageClassification`.
        """
        if noise_seeds is not None:
            noise_seeds = torch.as_tensor(noise_seeds, dtype=torch.long).cpu()
            if noise_seeds.shape != (num_images,):
                raise ValueError(f"`noise_seeds` must hold one seed per image ({num_images}), got "
                                 f"{tuple(noise_seeds.shape)}.")
            return noise_seeds
        if generator is None:
            return torch.zeros(num_images, dtype=torch.long)
        if isinstance(generator, list):
            raise ValueError("`extract_features` takes one torch.Generator, not a list.")
        return torch.randint(0, 2**62, (num_images,), generator=generator, device=generator.device).cpu()

    @torch.no_grad()
    def extract_features(
        self,
        images,
        timesteps: Union[int, Sequence[int]] = DEFAULT_TIMESTEPS,
        layers: Optional[Sequence[str]] = None,
        *,
        pooling: str = DEFAULT_POOLING,
        pooling_grid_size: int = 2,
        num_noise_samples: int = 1,
        flip_average: bool = False,
        generator: Optional[torch.Generator] = None,
        noise_seeds: Optional[Sequence[int]] = None,
        batch_size: int = 16,
        return_dict: bool = True,
        slices=None,
        preprocessed: Optional[bool] = None,
    ) -> Union[DiffusionFeaturesOutput, Tuple]:
        r"""
        Pooled activations of UNet blocks for noised images.

        Args:
            images: PIL images, numpy arrays, tensors or file paths (grey or RGB, any size), a uint8
                `(N, 1, R, R)` tensor of already preprocessed pixels, or the image processor's output (its
                `BatchFeature`, or `pixel_values` in [-1, 1]), which is not preprocessed again (see
                `preprocessed`). DICOM (`.dcm`) and
                NIfTI (`.nii`, `.nii.gz`) paths give one row per slice (every non-empty axial slice of a volume,
                every frame of a multi-frame DICOM, in order; the slices pretraining read, see `slices`), windowed
                with the file's own display window when it has one.
            timesteps (`int` or `Sequence[int]`, defaults to `(10, 25, 50, 100, 250)`; `None` too): noise levels, in
                `[0, num_train_timesteps)` (a list, array or tensor; a repeated one is extracted once); the default
                is the read-out chosen in `benchmarks/results/ablations.md`.
            layers (`str` or `Sequence[str]`, *optional*): block names such as `"down_blocks.1"`, `"mid_block"`,
                `"up_blocks.2"`; `None` means every block (`pipe.layer_names`).
            pooling (`str`, defaults to `"avgmax"`): `"avg"` (the paper's global average), `"avgmax"` (average and
                max, concatenated; chosen in the ablations) or `"grid"` (see `pool_features`).
            pooling_grid_size (`int`, defaults to 2): grid size for `pooling="grid"`.
            num_noise_samples (`int`, defaults to 1): noise draws per image, whose pooled features are averaged.
            flip_average (`bool`, defaults to `False`): also run each image mirrored left-right, noised with the
                same noise, and average the two features (test-time flip averaging; twice the UNet forwards). With
                the fixed noise, an image and its mirror image get the same features.
            generator (`torch.Generator`, *optional*): random noise per image; `None` uses one fixed noise for all.
            noise_seeds (`Sequence[int]`, *optional*): one noise seed per image instead of `generator` (sharded
                extraction passes each process its images' seeds).
            batch_size (`int`, defaults to 16): images per UNet forward (times `num_noise_samples`). Small batches
                stay in the CPU's caches: on 2 cores, 16 gives about twice the images/s of 128
                (`benchmarks/results/throughput.md`); on a GPU use a few hundred.
            return_dict (`bool`, defaults to `True`): return a [`DiffusionFeaturesOutput`] rather than a tuple.
            slices (`mic_diffrep.data.SliceSelection`, *optional*): which slices of NIfTI volumes are images (axis,
                range, empty slices; as `--slice_axis`, `--slice_range`, `--keep_empty_slices`); default: those
                pretraining read (`pipe.slices`; every non-empty axial slice unless it was told otherwise).
            preprocessed (`bool`, *optional*): whether a uint8 `(N, 1, R, R)` batch (or a float one in [-1, 1]) is
                preprocessed pixels (`True`: it passes through) or images at the pipeline's resolution still to be
                preprocessed (`False`: their intensities are windowed as pretraining's were). Unset, such a batch
                passes through with a warning; other images are always preprocessed.

        The noise of an image is a function of its noise seed, the timestep and the draw only (`feature_noise`), so
        a timestep gives the same features alone or within a sweep.

        Returns:
            [`DiffusionFeaturesOutput`] with `features[(layer, t)]` of shape `(N, C)`, or `(features, layers,
            timesteps)` when `return_dict=False`.
        """
        # 1. Check inputs
        if timesteps is None:  # as `layers=None`: the default
            timesteps = DEFAULT_TIMESTEPS
        if isinstance(timesteps, (torch.Tensor, np.ndarray)):  # e.g. a slice of `scheduler.timesteps`
            timesteps = timesteps.tolist()
        if isinstance(timesteps, (int, np.integer)):
            timesteps = [timesteps]
        timesteps = [t.item() if isinstance(t, torch.Tensor) and t.ndim == 0 and not t.is_floating_point() else t
                     for t in timesteps]
        timesteps = [int(t) if isinstance(t, (int, np.integer)) and not isinstance(t, bool) else t for t in timesteps]
        layers = self.layer_names if layers is None else [layers] if isinstance(layers, str) else list(layers)
        self.check_inputs(timesteps, layers, pooling, num_noise_samples, batch_size, pooling_grid_size)
        timesteps = list(dict.fromkeys(timesteps))  # a repeated timestep is extracted once, as a repeated layer
        order = {name: i for i, name in enumerate(self.layer_names)}
        layers = sorted(dict.fromkeys(layers), key=order.__getitem__)

        # 2. Preprocess images and fix each image's noise seed
        pixels, image_ids = self.prepare_pixels(images, return_ids=True, slices=slices, preprocessed=preprocessed,
                                                _stacklevel=4)  # the warning names the caller's line (no_grad between)
        seeds = self.prepare_noise_seeds(len(pixels), generator, noise_seeds)
        alphas_cumprod = self.scheduler.alphas_cumprod
        shape = (self.unet.config.out_channels, self.resolution, self.resolution)
        prediction_type = self.scheduler.config.prediction_type

        # 3. One hooked UNet forward per batch and timestep (without dropout, as the saved pipeline reads them)
        collected = {(layer, t): [] for layer in layers for t in timesteps}
        with eval_mode(self.unet):
            for start in self.progress_bar(range(0, len(pixels), batch_size), desc="Extracting features"):
                clean = pixels_to_model_input(pixels[start : start + batch_size]).to(self.device)
                batch_seeds = seeds[start : start + batch_size].tolist()
                for t in timesteps:
                    noise = feature_noise(batch_seeds, t, num_noise_samples, shape).to(self.device)
                    pooled = noisy_block_features(self.unet, alphas_cumprod, clean, noise, t, layers, pooling,
                                                  pooling_grid_size, flip_average, prediction_type)
                    for layer in layers:
                        collected[(layer, t)].append(pooled[layer].float().cpu())
        features = {key: torch.cat(chunks) for key, chunks in collected.items()}
        if not return_dict:
            return features, layers, timesteps
        return DiffusionFeaturesOutput(features=features, layers=layers, timesteps=timesteps, image_ids=image_ids)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        batch_size: int = 1,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
        eta: float = 0.0,
    ) -> Union[ImagePipelineOutput, Tuple]:
        r"""
        Generates images by reverse diffusion with the pipeline's scheduler (DDPM, 1000 steps, as in the paper).

        Args:
            batch_size (`int`, defaults to 1): number of images.
            generator (`torch.Generator`, *optional*): for reproducible samples.
            num_inference_steps (`int`, defaults to 1000): denoising steps (e.g. 50 with a `DDIMScheduler`).
            output_type (`str`, defaults to `"pil"`): `"pil"` (grey PIL images), `"np"` (`(N, H, W, 1)` in [0, 1])
                or `"pt"` (`(N, 1, H, W)` in [0, 1]).
            return_dict (`bool`, defaults to `True`): return an [`ImagePipelineOutput`] rather than a tuple.
            eta (`float`, defaults to 0.0): the DDIM paper's eta (0: deterministic DDIM) for a scheduler that takes
                one (`DDIMScheduler`), as `DDIMPipeline` takes it.

        Examples:
        """
        check_choice(output_type, ("pil", "np", "pt"), "output_type")
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        batch_size = int(batch_size)
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        if (isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral)
                or not 1 <= num_inference_steps <= num_train_timesteps):
            raise ValueError(f"`num_inference_steps` must be an integer in [1, {num_train_timesteps}] (the timesteps "
                             f"the pipeline was trained on), got {num_inference_steps!r}.")
        step_parameters = inspect.signature(self.scheduler.step).parameters
        # A scheduler whose steps draw no noise (PNDM) takes no generator; one of another noise scale (Euler, Heun)
        # scales its first noise and the UNet's input, as diffusers' pipelines do (both do nothing for DDPM / DDIM).
        step_kwargs = {"generator": generator} if "generator" in step_parameters else {}
        if "eta" in step_parameters:
            step_kwargs["eta"] = eta
        elif eta:
            raise ValueError(f"`eta` is taken by DDIM sampling; the pipeline's {type(self.scheduler).__name__} has "
                             f"none (`pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`).")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"You have passed a list of generators of length {len(generator)}, but requested an "
                             f"effective batch size of {batch_size}. Make sure the batch size matches the length of "
                             f"the generators.")  # as diffusers' pipelines say it

        # 1. Sample Gaussian noise
        shape = (batch_size, self.unet.config.out_channels, self.resolution, self.resolution)
        image = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        # A self-conditioned UNet also sees its previous step's clean-image estimate (zeros at the first step).
        clean_estimate = torch.zeros_like(image) if is_self_conditioned(self.unet) else None

        # 2. Set the timesteps
        self.scheduler.set_timesteps(int(num_inference_steps))
        image = image * self.scheduler.init_noise_sigma

        with eval_mode(self.unet):  # without dropout, as the saved pipeline samples
            for t in self.progress_bar(self.scheduler.timesteps, desc="Sampling"):
                # 3. Predict the noise (in the UNet's dtype; the scheduler step stays in float32)
                model_input = self.scheduler.scale_model_input(image, t)
                if clean_estimate is not None:
                    model_input = torch.cat([model_input, clean_estimate], dim=1)
                model_output = self.unet(model_input.to(self.unet.dtype), t).sample.float()
                # 4. Compute the previous noisy sample x_t -> x_t-1
                step = self.scheduler.step(model_output, t, image, **step_kwargs)
                image = step.prev_sample
                if clean_estimate is not None:
                    if getattr(step, "pred_original_sample", None) is None:
                        raise ValueError(f"A self-conditioned UNet feeds on the clean-image estimate of each step, "
                                         f"which {type(self.scheduler).__name__} does not return: sample with "
                                         f"DDPMScheduler, DDIMScheduler or EulerDiscreteScheduler.")
                    clean_estimate = step.pred_original_sample.clamp(-1, 1)

        image = (image / 2 + 0.5).clamp(0, 1).float()
        if output_type == "pt":
            images = image.cpu()
        else:
            images = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """`module` in eval mode (no dropout) for the duration, then each of its sub-modules back in its own mode: a
    pipeline built around a UNet in training (`DiffusionFeaturePipeline(unet, scheduler)`; `from_pretrained` loads
    it in eval mode) reads the features and samples the images the saved pipeline would."""
    modes = [(part, part.training) for part in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for part, training in modes:
            part.training = training


def save_image_grid(images, path: str, rows: Optional[int] = None) -> PIL.Image.Image:
    """Saves images (PIL, `(N, H, W, C)` numpy in [0, 1], or `(N, C, H, W)` tensor in [0, 1]) as one PNG grid."""
    if isinstance(images, torch.Tensor):
        images = images.permute(0, 2, 3, 1).cpu().numpy()
    if isinstance(images, np.ndarray):
        images = DiffusionPipeline.numpy_to_pil(images)
    images = list(images)
    if not images:
        raise ValueError("No images to save in a grid.")
    rows = rows or max(1, int(np.floor(np.sqrt(len(images)))))
    cols = int(np.ceil(len(images) / rows))
    images = images + [PIL.Image.new(images[0].mode, images[0].size)] * (rows * cols - len(images))
    grid = make_image_grid(images, rows=rows, cols=cols)
    grid.save(path)
    return grid
