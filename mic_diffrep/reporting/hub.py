"""Hub uploads: pretrained pipeline folders and trained classifier folders.

```python
>>> from mic_diffrep.reporting.hub import push_to_hub
>>> push_to_hub("runs/model", "user/mri-classifier")  # doctest: +SKIP

```
"""

import fnmatch
import json
import logging
import os
import shlex
import shutil
import tempfile
from typing import Optional, Sequence

from huggingface_hub import HfApi, ModelCard

from ..models.mic_diffrep import MicDiffRepConfig, MicDiffRepImageProcessor
from ..models.mic_diffrep.unet_features import is_self_conditioned
from ..utils import SUMMARY_FILE, is_repo_id, write_json
from .model_card import published_results, unevaluated_model_card_text, write_model_card, write_pipeline_card
from .results import results_markdown


logger = logging.getLogger(__name__)

# Files of a model folder that belong on the Hub (features, caches and checkpoints stay local).
HUB_FILES = (".json", ".safetensors", ".py", ".md", ".png")
# What stays local when a pretrained pipeline folder is uploaded.
PIPELINE_IGNORE_PATTERNS = ("checkpoint-*", ".cache/*", ".tmp-*", "logs/*")
# What `push_folder` leaves local unless told otherwise: the above (the decode cache holds every training image as
# pixels), and a probe's feature caches.
LOCAL_ONLY_PATTERNS = PIPELINE_IGNORE_PATTERNS + ("features/*",)


class HubError(ValueError):
    """A Hub repository that cannot be created or uploaded to (no network, no login, no rights): one line, naming
    the repository; the files written locally stay where they are."""


def _one_line(error: Exception) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


def default_repo_id(output_dir: str, hub_model_id: Optional[str] = None) -> str:
    """`--hub_model_id`, or by default the output folder's name (as diffusers' and transformers' scripts do)."""
    return hub_model_id or os.path.basename(os.path.abspath(output_dir))


def create_hub_repo(repo_id: str, token: Optional[str] = None, private: Optional[bool] = False) -> str:
    """Creates `repo_id` if needed and returns its full id. Runs with `--push_to_hub` call it before their work (as
    diffusers' training scripts do), so that a run that could not upload fails at once, not after training."""
    try:
        return HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True).repo_id
    except Exception as error:  # connection, login and HTTP errors alike
        raise HubError(f"Cannot create the Hub repository {repo_id!r} ({_one_line(error)}).") from error


def push_folder(folder: str, repo_id: str, token: Optional[str] = None, private: bool = False,
                commit_message: str = "Upload", ignore_patterns: Optional[Sequence[str]] = LOCAL_ONLY_PATTERNS,
                retry: Optional[str] = None) -> str:
    """Creates `repo_id` if needed and uploads `folder` into it, without what stays local (`ignore_patterns`: by
    default checkpoints, tracker logs and the decode and feature caches, which hold the training images and their
    features); returns the repository id. A failed upload's error says how to upload again: `retry` (a call), by
    default `hf upload` of `folder`."""
    return _upload(folder, create_hub_repo(repo_id, token, private), token, commit_message, ignore_patterns, retry)


def _upload(folder: str, repo_id: str, token: Optional[str], commit_message: str,
            ignore_patterns: Optional[Sequence[str]] = None, retry: Optional[str] = None, create_pr: bool = False
            ) -> str:
    """`push_folder` into `repo_id`, a repository already created (its full id)."""
    try:
        HfApi(token=token).upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                         ignore_patterns=list(ignore_patterns) if ignore_patterns else None,
                                         **({"create_pr": True} if create_pr else {}))
    except Exception as error:
        retry = retry or shlex.join(["hf", "upload", repo_id, folder]
                                    + [arg for pattern in ignore_patterns or () for arg in ("--exclude", pattern)])
        raise HubError(f"The upload to {repo_id!r} failed ({_one_line(error)}); nothing local was "
                       f"lost: upload it again later with `{retry}`.") from error
    return repo_id


def _python_retry(function: str, folder: str, repo_id: str, **kwargs) -> str:
    """How to upload `folder` again from a shell, from any directory: the staged upload (`function`), not a copy of
    the folder."""
    arguments = ", ".join([repr(os.path.abspath(folder)), repr(repo_id)] + [f"{k}={v!r}" for k, v in kwargs.items()])
    return f"python -c \"from mic_diffrep.reporting import {function}; {function}({arguments})\""


def _self_conditioned(pipeline_dir: str) -> bool:
    """Whether the UNet of a pipeline folder is self-conditioned (`is_self_conditioned` of its config)."""
    try:
        with open(os.path.join(pipeline_dir, "unet", "config.json"), encoding="utf-8") as f:
            return is_self_conditioned(json.load(f))
    except (OSError, ValueError, KeyError):
        return False


def push_pipeline_to_hub(pipeline_dir: str, repo_id: str, token: Optional[str] = None, private: Optional[bool] = False,
                         logging_dir: str = "logs", create_repo: bool = True,
                         commit_message: str = "MicDiffRep pretraining", create_pr: bool = False,
                         retry: Optional[str] = None) -> str:
    """Uploads a pretrained pipeline folder (weights, configs, code, sample grids, its summary with local paths cut
    to their names and a model card that loads from `repo_id`; no checkpoints, caches or tracker logs, wherever
    `logging_dir` put them inside the folder). A folder without a pretraining summary (`save_pretrained`) gets a
    card that says how to use it. `create_repo=False`: `repo_id` is the full id of a repository created before (by a
    run, at its start), uploaded to as it is. `private=None`: the Hub's default for the namespace. `retry`: how a
    failed upload is done again (default: this call), for a `pipeline_dir` that will not be there."""
    if not os.path.isfile(os.path.join(pipeline_dir, "model_index.json")):
        raise FileNotFoundError(f"{pipeline_dir} is not a pretrained pipeline folder (no model_index.json).")
    if create_repo:
        repo_id = create_hub_repo(repo_id, token, private)  # the full id (`user/name`), which the model card loads
    ignore = list(PIPELINE_IGNORE_PATTERNS)
    try:
        logs = os.path.relpath(os.path.join(pipeline_dir, logging_dir), pipeline_dir)
    except ValueError:  # another drive (Windows): not inside the folder
        logs = os.pardir
    if not logs.startswith(os.pardir):
        ignore.append(f"{logs.replace(os.sep, '/')}/*")
    with tempfile.TemporaryDirectory() as staging:
        for root, _, files in os.walk(pipeline_dir):
            for name in files:
                path = os.path.join(root, name)
                relative = os.path.relpath(path, pipeline_dir).replace(os.sep, "/")
                if not any(fnmatch.fnmatch(relative, pattern) for pattern in ignore):  # as upload_folder filters
                    os.makedirs(os.path.dirname(os.path.join(staging, relative)), exist_ok=True)
                    shutil.copy2(path, os.path.join(staging, relative))
        summary_file, summary = os.path.join(staging, SUMMARY_FILE), {}
        if os.path.isfile(summary_file):  # local paths stay local
            with open(summary_file, encoding="utf-8") as f:
                summary = published_results(json.load(f))
            summary["hub_repo_id"] = repo_id  # this upload's repository, not that of an earlier upload
            write_json(summary_file, summary)
        # its usage snippet loads from the repository
        write_pipeline_card(staging, summary, repo_id, self_conditioned=_self_conditioned(pipeline_dir))
        _upload(staging, repo_id, token, commit_message, create_pr=create_pr,
                retry=retry or _python_retry("push_pipeline_to_hub", pipeline_dir, repo_id,
                                             **({"logging_dir": logging_dir} if logging_dir != "logs" else {})))
    if not create_pr:
        _record_hub_repo(pipeline_dir, repo_id)
    return repo_id


def _record_hub_repo(pipeline_dir: str, repo_id: str) -> None:
    """Records in a pipeline folder's summary the repository it was uploaded to (`hub_repo_id`), which the model card
    of a classifier probed from the folder links to as its `base_model`."""
    path = os.path.join(pipeline_dir, SUMMARY_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):  # a folder without a summary (`save_pretrained`) records nothing
        return
    if isinstance(summary, dict) and summary.get("hub_repo_id") != repo_id:
        try:
            write_json(path, {**summary, "hub_repo_id": repo_id})
        except OSError as error:  # a read-only folder: the upload itself succeeded
            logger.warning("Uploaded to %s, but %s could not record it (%s).", repo_id, path, error)


def published_pipeline(pretrained: str) -> Optional[str]:
    """The Hub repository of a pretrained pipeline: `pretrained` itself when it is a repository id (no such path
    here), else the repository the local folder was uploaded to (`push_pipeline_to_hub`, `--push_to_hub`), else
    `None`.

    ```py
    >>> published_pipeline("me/mri-ddpm")
    'me/mri-ddpm'

    ```
    """
    pretrained = os.fspath(pretrained)
    if not os.path.exists(pretrained):
        return pretrained if is_repo_id(pretrained) else None
    try:
        with open(os.path.join(pretrained, SUMMARY_FILE), encoding="utf-8") as f:
            repo_id = json.load(f).get("hub_repo_id")
    except (OSError, ValueError, AttributeError):
        return None
    return repo_id if isinstance(repo_id, str) else None  # recorded by an upload: a repository id


def push_to_hub(model_dir: str, repo_id: str, token: Optional[str] = None, private: bool = False,
                commit_message: str = "Upload MicDiffRep classifier", create_repo: bool = True) -> str:
    """Uploads a model folder made by `training/linear_probe.py` to the Hub; returns the repository id.

    The uploaded folder holds the config and weights, the image processor, the model card, results (local paths cut
    to their names: `published_results`) and plots, and the code files with `auto_map` entries, so
    `AutoModelForImageClassification` / `AutoImageProcessor` load it with `trust_remote_code=True` where mic-diffrep
    is not installed. `create_repo=False`: `repo_id` is the full id of a repository created before (by a run, at
    its start), uploaded to as it is.
    """
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir} is not a model folder (no config.json).")
    if create_repo:
        repo_id = create_hub_repo(repo_id, token, private)  # the full id (`user/name`), which the model card loads
    with tempfile.TemporaryDirectory() as staging:
        for name in sorted(os.listdir(model_dir)):
            if os.path.isfile(os.path.join(model_dir, name)) and name.endswith(HUB_FILES):
                shutil.copy2(os.path.join(model_dir, name), os.path.join(staging, name))
        results_file = os.path.join(model_dir, "results.json")
        if os.path.isfile(results_file):  # the card's usage snippet loads from the repository
            with open(results_file, encoding="utf-8") as f:
                results = published_results(json.load(f))  # local paths stay local
            write_json(os.path.join(staging, "results.json"), results)
            with open(os.path.join(staging, "results.md"), "w", encoding="utf-8") as f:
                f.write(results_markdown(results))
            write_model_card(staging, results, repo_id)
        elif not os.path.isfile(os.path.join(staging, "README.md")):  # saved from Python: a card of what it is
            from ..inference import check_classifier_folder  # (the inference module imports this one's package)

            check_classifier_folder(model_dir)
            ModelCard(unevaluated_model_card_text(MicDiffRepConfig.from_pretrained(model_dir), repo_id)).save(
                os.path.join(staging, "README.md"))
        processor = MicDiffRepImageProcessor.from_pretrained(model_dir)
        with processor._with_auto_map():
            processor.save_pretrained(staging)  # writes its auto_map and copies its code file
        return _upload(staging, repo_id, token, commit_message, retry=_python_retry("push_to_hub", model_dir, repo_id))
