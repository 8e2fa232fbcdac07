"""Resumable checkpoints and atomic writes of output folders.

Everything is written under a temporary name and renamed, so a run killed at any moment leaves the previous
checkpoint (and the previous model files) intact and loadable.
"""

import json
import logging
import os
import pickle
import re
import shutil
import time
from typing import Optional

import torch
from diffusers import DiffusionPipeline
from safetensors import SafetensorError

from ..features.cache import pixels_fingerprint
from ..models.baselines.configuration import CONFIG_NAME as BASELINE_CONFIG_NAME
from ..utils import SUMMARY_FILE, error_summary, share_as_umask_allows


logger = logging.getLogger(__name__)


TRAINING_STATE_FILE = "training_state.json"


def _read_training_state(checkpoint: str) -> dict:
    """The `training_state.json` of a checkpoint; raises `OSError` / `ValueError` / `TypeError` / `KeyError` when it
    cannot be read or lacks where the run was."""
    with open(os.path.join(checkpoint, TRAINING_STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    int(state["global_step"]), int(state["epoch"]), int(state["batches_done"])
    return state


def _saved_at(checkpoint: str) -> float:
    """When a checkpoint was written, as its training state records it (0 for older checkpoints; infinity for one
    whose state cannot be read, so that resuming it reports the damage instead of passing over it)."""
    try:
        return float(_read_training_state(checkpoint).get("saved_at", 0.0))
    except (OSError, ValueError, TypeError, KeyError):
        return float("inf")


def _latest_checkpoint(output_dir: str) -> Optional[str]:
    """The checkpoint written last (`"latest"`): after a new run in a folder of an earlier run's checkpoints, the new
    run's, whatever their steps; among older checkpoints that recorded no time, the highest step."""
    if not os.path.isdir(output_dir):
        return None
    names = [d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d.split("-", 1)[1].isdigit()]
    if not names:
        return None
    return max((os.path.join(output_dir, d) for d in names),
               key=lambda path: (_saved_at(path), int(path.rsplit("-", 1)[1])))


def _prune_checkpoints(output_dir: str, limit: Optional[int], keep: Optional[str] = None) -> None:
    """Keeps the `limit` checkpoints of the highest steps, and `keep` (the one just written) whatever its step: an
    earlier run's checkpoint of a higher step left in the folder must not push out the new run's."""
    if limit is None:
        return
    names = sorted(
        (d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d.split("-", 1)[1].isdigit()
         and d != keep),
        key=lambda d: int(d.split("-", 1)[1]),
    )
    kept = limit - (1 if keep is not None else 0)
    for name in names[: max(0, len(names) - kept)]:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _replace_dir(tmp_path: str, final_path: str) -> None:
    """Moves `tmp_path` (a folder or a file) to `final_path`; an existing `final_path` stays intact until the new one
    is in place, and is then removed (files included: no `*.old-PID` is left behind)."""
    old = None
    if os.path.lexists(final_path):
        old = f"{final_path}.old-{os.getpid()}"
        os.replace(final_path, old)
    os.replace(tmp_path, final_path)
    if old is not None:
        _remove(old)


def save_training_state(accelerator, output_dir: str, global_step: int, epoch: int, batches_done: int,
                        total_limit: Optional[int] = None, totals: Optional[dict] = None,
                        settings: Optional[dict] = None) -> str:
    """`accelerator.save_state` into `checkpoint-{global_step}`, written under a temporary name and renamed, so a run
    killed at any moment leaves the previous checkpoint loadable. Also records where in the data the run was,
    `totals` (images seen and training seconds so far, which a resumed run's summary continues) and the `settings` a
    resumed run must have (`check_checkpoint`)."""
    final = os.path.join(output_dir, f"checkpoint-{global_step}")
    tmp = f"{final}.tmp"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a run killed while saving
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
    except KeyboardInterrupt:  # a second Ctrl-C while saving: no half-written folder is left behind
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            latest = _latest_checkpoint(output_dir)
            logger.warning("Stopped while saving checkpoint-%d, which was not saved; %s", global_step,
                           f"the latest checkpoint is {os.path.basename(latest)}" if latest else "there is no "
                           "checkpoint to resume from")
        raise
    if accelerator.is_main_process:
        with open(os.path.join(tmp, TRAINING_STATE_FILE), "w", encoding="utf-8") as f:
            json.dump({"global_step": global_step, "epoch": epoch, "batches_done": batches_done,
                       "num_processes": accelerator.num_processes, "totals": totals or {},
                       "settings": settings or {}, "saved_at": time.time()}, f)
        share_as_umask_allows(tmp)  # accelerate writes its weights with safetensors: 0600 whatever the umask
        _replace_dir(tmp, final)
        _prune_checkpoints(output_dir, total_limit, keep=os.path.basename(final))
        logger.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(output_dir: str, resume_from_checkpoint: Optional[str]) -> Optional[str]:
    """The checkpoint folder `--resume_from_checkpoint` names (`"latest"`: the newest in `output_dir`; a name such as
    `checkpoint-500` that is not a folder here: that checkpoint of `output_dir`, as diffusers' scripts read it), or
    `None`."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        return _latest_checkpoint(output_dir)
    inside = os.path.join(output_dir, resume_from_checkpoint)
    if not os.path.isdir(resume_from_checkpoint) and os.sep not in resume_from_checkpoint.rstrip(os.sep) \
            and os.path.isdir(inside):
        return inside
    return resume_from_checkpoint


def check_checkpoint(path: str, settings: Optional[dict] = None, num_processes: Optional[int] = None) -> dict:
    """The training state of checkpoint `path`, after checking it can be read and, when it recorded them, that it was
    written with `settings` (those a resumed run cannot change: model, data, data order, optimisation) and on
    `num_processes` processes; a `ValueError` names what differs, before any data is decoded."""
    if not os.path.isfile(os.path.join(path, TRAINING_STATE_FILE)):
        raise FileNotFoundError(f"`resume_from_checkpoint` {path!r} is not a checkpoint folder (it has no "
                                f"{TRAINING_STATE_FILE}).")
    try:
        state = _read_training_state(path)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"`resume_from_checkpoint` {path!r}: its training_state.json cannot be read ({error}); the "
                         f"checkpoint is damaged: resume from an earlier one or start a new run.") from None
    saved = state.get("settings") or {}  # not recorded by older checkpoints
    changed = [name for name in saved if settings is not None and name in settings and saved[name] != settings[name]]
    if changed:
        differences = ", ".join(f"{name} {saved[name]!r} (this run: {settings[name]!r})" for name in changed)
        raise ValueError(f"`resume_from_checkpoint` {path!r} was written with other settings: {differences}. Resume "
                         f"with the checkpoint's settings, or start a new run in another output folder; the checkpoint "
                         f"is left as it is.")
    # The learning-rate schedule steps once per process and the data is sharded per process: resumed on another
    # number of processes, the schedule would run past its end (or stop short) and the data order would not resume.
    saved_processes = state.get("num_processes", num_processes)  # not recorded by older checkpoints
    if num_processes is not None and saved_processes != num_processes:
        raise ValueError(f"`resume_from_checkpoint` {path!r} was written by a run on {saved_processes} process(es); "
                         f"resume it on {saved_processes} (this run has {num_processes}), or start a new run in "
                         f"another output folder. The checkpoint is left as it is.")
    return state


# Files a pretraining run leaves in its output folder besides checkpoints: its summary (written at the end, also of
# an interrupted run) and its weights (saved after some epochs).
RUN_FILES = (SUMMARY_FILE, DiffusionPipeline.config_name, BASELINE_CONFIG_NAME)


def check_new_run(output_dir: str, resume_from_checkpoint: Optional[str], overwrite_output_dir: bool) -> None:
    """Refuses a new run (no `--resume_from_checkpoint`) in an `output_dir` holding an earlier run's checkpoints or
    weights, unless `--overwrite_output_dir` says to start over: they would be replaced or pruned, and a forgotten
    `--resume_from_checkpoint` (after Ctrl-C, whose message asks for it) lost hours of training. A
    `--resume_from_checkpoint latest` that finds no checkpoint starts a new run, so it is refused there too."""
    if overwrite_output_dir:
        return
    earlier = _latest_checkpoint(output_dir)
    if resume_from_checkpoint and (resume_from_checkpoint != "latest" or earlier is not None):
        return
    if earlier is not None:
        raise ValueError(f"{output_dir} holds checkpoints of an earlier run (the latest: "
                         f"{os.path.basename(earlier)}). Continue that run with --resume_from_checkpoint latest, start "
                         f"over there with --overwrite_output_dir (its checkpoints are then replaced or pruned), or "
                         f"give another --output_dir; nothing was changed.")
    held = [name for name in RUN_FILES if os.path.isfile(os.path.join(output_dir, name))]
    if held:
        resuming = (" but no checkpoint for --resume_from_checkpoint latest to continue (a run saves one every "
                    "--checkpointing_steps steps and when stopped)" if resume_from_checkpoint else "")
        raise ValueError(f"{output_dir} holds an earlier run's outputs ({', '.join(held)}){resuming}. Start over "
                         f"there with --overwrite_output_dir (they are then replaced), or give another --output_dir; "
                         f"nothing was changed.")


def images_record(pixels: torch.Tensor) -> dict:
    """What a checkpoint records of its training images (`settings["images"]`): their number and a hash of their
    decoded pixels, in order, wherever the files are (the same images staged to another disk resume alike)."""
    return {"num_images": len(pixels), "pixels": pixels_fingerprint(pixels)}


def resume_training_state(accelerator, output_dir: str, resume_from_checkpoint: Optional[str],
                          images: Optional[dict] = None):
    """Loads a checkpoint (a folder, or `"latest"` in `output_dir`); returns `(global_step, epoch, batches_done,
    totals)` (`totals`: what `save_training_state` recorded, empty for a new run or an older checkpoint). Its
    settings were compared with the run's by the run's arguments (`CommonPretrainingArguments`), before any data was
    decoded; its training images (`images_record`, where it recorded them) are compared with `images` here."""
    if accelerator.is_main_process and os.path.isdir(output_dir):  # saves a killed run left half-written
        for name in os.listdir(output_dir):
            if re.fullmatch(r"checkpoint-\d+\.tmp", name):
                logger.info("Removing %s, a checkpoint an earlier run did not finish saving.", name)
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    if not resume_from_checkpoint:
        earlier = _latest_checkpoint(output_dir)
        if earlier is not None:  # --overwrite_output_dir (`check_new_run` refuses it otherwise)
            logger.warning("%s holds checkpoints of an earlier run (the latest: %s); with --overwrite_output_dir this "
                           "new run starts from step 0, replaces the model files there, and its checkpoints replace "
                           "or prune those.", output_dir, os.path.basename(earlier))
        return 0, 0, 0, {}
    path = find_checkpoint(output_dir, resume_from_checkpoint)
    if path is None:
        logger.warning("No checkpoint in %s: starting a new training run (its model files there will be replaced).",
                       output_dir)
        return 0, 0, 0, {}
    if not os.path.isdir(path):
        raise FileNotFoundError(f"`resume_from_checkpoint` {path!r} is not a checkpoint folder.")
    state = check_checkpoint(path)  # its number of processes was checked when the accelerator was made
    saved_images = (state.get("settings") or {}).get("images")
    if images is not None and saved_images is not None and saved_images != images:
        raise ValueError(f"`resume_from_checkpoint` {path!r} was trained on other images ({saved_images['num_images']} "
                         f"then, {images['num_images']} now: another --train_data_dir, images added, removed or "
                         f"changed since, or decoded otherwise by another Pillow version). Resume with the images it "
                         f"was trained on, or start a new run (--overwrite_output_dir); the checkpoint is left as it "
                         f"is.")
    logger.info("Resuming from %s", path)
    try:
        accelerator.load_state(path)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error) and "unsupported GLOBAL" not in str(error):
            raise ValueError(f"`resume_from_checkpoint` {path!r} cannot be loaded: a pickle of it is damaged "
                             f"(UnpicklingError). It is left as it is: resume from an earlier checkpoint or start a new "
                             f"run.") from error
        raise ValueError(f"`resume_from_checkpoint` {path!r} holds a pickle of more than weights (code or other "
                         f"objects), which is not loaded: resume only from checkpoints your own runs wrote. It is "
                         f"left as it is.") from error
    except (RuntimeError, KeyError, OSError, EOFError, SafetensorError) as error:
        # a truncated or missing file (torch: "PytorchStreamReader failed ..." is a RuntimeError), or, from a
        # checkpoint that recorded no settings, another model or optimizer
        raise ValueError(f"`resume_from_checkpoint` {path!r} cannot be loaded: a file of it is damaged or missing, "
                         f"or it was written with other settings (model, --use_ema, optimizer) "
                         f"({error_summary(error)}). It is left as it is: resume from an earlier checkpoint or start "
                         f"a new run.") from error
    return state["global_step"], state["epoch"], state["batches_done"], state.get("totals", {})


def save_pipeline(pipeline, output_dir: str) -> None:
    """Writes the pipeline files into `output_dir` atomically: each of model_index.json, unet/, scheduler/ is
    written under a temporary name first, so a killed run never leaves a half-written model behind."""
    tmp = os.path.join(output_dir, f".tmp-pipeline-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    share_as_umask_allows(tmp)
    for name in sorted(os.listdir(tmp)):
        _replace_dir(os.path.join(tmp, name), os.path.join(output_dir, name))
    shutil.rmtree(tmp, ignore_errors=True)
