"""Hub uploads: pretrained pipeline folders and trained classifier folders.

```python
>>> from mic_diffrep.reporting.hub import push_to_hub
>>> push_to_hub("runs/model", "user/mri-classifier")  # doctest: +SKIP
```
"""

import os
import shutil
import tempfile
from typing import Optional, Sequence

from huggingface_hub import HfApi

from ..models.mic_diffrep import MicDiffRepImageProcessor


# Files of a model folder that belong on the Hub (features, caches and checkpoints stay local).
HUB_FILES = (".json", ".safetensors", ".py", ".md", ".png")
# What stays local when a pretrained pipeline folder is uploaded.
PIPELINE_IGNORE_PATTERNS = ("checkpoint-*", ".cache/*", ".tmp-*", "logs/*")


def push_folder(folder: str, repo_id: str, token: Optional[str] = None, private: bool = False,
                commit_message: str = "Upload", ignore_patterns: Optional[Sequence[str]] = None) -> str:
    """Creates `repo_id` if needed and uploads `folder` into it; returns the repository id."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                      ignore_patterns=list(ignore_patterns) if ignore_patterns else None)
    return repo_id


def push_pipeline_to_hub(pipeline_dir: str, repo_id: str, token: Optional[str] = None, private: bool = False) -> str:
    """Uploads a pretrained pipeline folder (weights, configs, sample grids; no checkpoints, caches or logs)."""
    return push_folder(pipeline_dir, repo_id, token, private, "MicDiffRep pretraining", PIPELINE_IGNORE_PATTERNS)


def push_to_hub(model_dir: str, repo_id: str, token: Optional[str] = None, private: bool = False,
                commit_message: str = "Upload MicDiffRep classifier") -> str:
    """Uploads a model folder made by `training/linear_probe.py` to the Hub; returns the repository id.

    The uploaded folder holds the config and weights, the image processor, the model card, results and plots, and
    the code files with `auto_map` entries, so `AutoModelForImageClassification` / `AutoImageProcessor` load it with
    `trust_remote_code=True` where mic-diffrep is not installed.
    """
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{model_dir} is not a model folder (no config.json).")
    with tempfile.TemporaryDirectory() as staging:
        for name in sorted(os.listdir(model_dir)):
            if os.path.isfile(os.path.join(model_dir, name)) and name.endswith(HUB_FILES):
                shutil.copy2(os.path.join(model_dir, name), os.path.join(staging, name))
        processor = MicDiffRepImageProcessor.from_pretrained(model_dir)
        MicDiffRepImageProcessor.register_for_auto_class("AutoImageProcessor")
        try:
            processor.save_pretrained(staging)  # writes its auto_map and copies its code file
        finally:
            MicDiffRepImageProcessor._auto_class = None
        return push_folder(staging, repo_id, token, private, commit_message)
