"""Small helpers shared by training, feature extraction and benchmarks."""

import contextlib
import dataclasses
import json
import logging
import math
import numbers
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import typing
from typing import List, Literal, Optional, Sequence, Union

import accelerate
import datasets
import diffusers
import huggingface_hub
import torch
import transformers
from accelerate import Accelerator
from accelerate.state import AcceleratorState


MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return any(_matches(value, arg) for arg in args)
    if origin is Literal:
        return value in args
    if origin in (list, typing.List):
        return isinstance(value, (list, tuple, range)) and all(_matches(item, args[0]) for item in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, (str, os.PathLike))
    if hint is bool:
        return isinstance(value, bool)
    return True  # anything else is checked where it is used


def check_settings(settings) -> None:
    """Checks every field of a settings dataclass against its annotation (`int`, `float`, `bool`, `str`, `Literal`
    choices, `List[...]`, `Optional[...]`): a value from a YAML file or Python fails here, naming the field, rather
    than deep inside a run.

    ```python
    >>> from mic_diffrep.features import FeatureArguments
    >>> FeatureArguments(pooling="max")
    Traceback (most recent call last):
    ...
    ValueError: `pooling` must be one of 'avg', 'avgmax', 'grid', got 'max'.

    ```
    """
    hints = typing.get_type_hints(type(settings))
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        check_value(f"`{field.name}`", value, hints[field.name])
        if (field.name == "seed" or field.name.endswith("_seed")) and isinstance(value, int) and not 0 <= value < 2**32:
            raise ValueError(f"`{field.name}` must be in [0, 2**32) (numpy's seeds), got {value}.")
        if field.name == "mixed_precision" and value == "fp16" and not torch.cuda.is_available():
            check_mixed_precision(value, "cpu")  # runs go to the CPU without CUDA (`create_accelerator`)


def check_value(name: str, value, hint) -> None:
    """Raises a `ValueError` naming `name` unless `value` fits the annotation `hint` (see `check_settings`)."""
    if _matches(value, hint):
        return
    literal = next((arg for arg in (hint, *typing.get_args(hint)) if typing.get_origin(arg) is Literal), None)
    if literal is not None:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, typing.get_args(literal)))}, got {value!r}.")
    raise ValueError(f"{name} must be {_type_name(hint)}, got {value!r}.")


def _type_name(hint) -> str:
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) is Union and len(args) == 1:
        return f"{_type_name(args[0])} or null"
    if typing.get_origin(hint) in (list, typing.List):
        return f"a list of which each is {_type_name(args[0])}"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_mixed_precision(mixed_precision: Optional[str], device: torch.device) -> None:
    """Refuses fp16 on CPU instead of silently running fp32 (what accelerate does there)."""
    if mixed_precision in (None, "no"):
        return
    if mixed_precision not in MIXED_PRECISION_CHOICES:
        raise ValueError(f"`mixed_precision` must be one of {MIXED_PRECISION_CHOICES}, got {mixed_precision!r}.")
    if mixed_precision == "fp16" and torch.device(device).type == "cpu":
        raise ValueError(
            "`mixed_precision` fp16 is not supported on CPU (it would silently run in fp32). "
            "Use bf16, which is fast on CPUs with AMX/AVX-512-BF16, or 'no'."
        )


def precision_dtype(mixed_precision: Optional[str], device="cpu") -> torch.dtype:
    """The dtype that `--mixed_precision` ("no", "fp16", "bf16") asks features and inference to run in (fp16 is
    refused on CPU)."""
    check_mixed_precision(mixed_precision, device)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def precision_name(dtype: torch.dtype) -> str:
    """The `--mixed_precision` setting of a dtype, `precision_dtype`'s inverse: "bf16", "fp16" or "no"."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def autocast(device: torch.device, mixed_precision: Optional[str] = None):
    """An autocast context for `mixed_precision` ("no", "fp16", "bf16") on `device`, or a no-op."""
    check_mixed_precision(mixed_precision, device)
    if mixed_precision in (None, "no"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def create_accelerator(**kwargs):
    """An `accelerate.Accelerator`; on a machine without CUDA, `cpu=True`, so that `torchrun --nproc_per_node N` runs
    N gloo DDP processes. fp16 on a CPU is refused rather than silently run in fp32."""
    kwargs.setdefault("cpu", not torch.cuda.is_available())
    requested = kwargs.get("mixed_precision") or os.environ.get("ACCELERATE_MIXED_PRECISION") or "no"
    if kwargs["cpu"] or not torch.cuda.is_available():
        check_mixed_precision(requested, "cpu")  # before any state is touched
    # Each run its own precision: accelerate keeps the first Accelerator's state for the whole process (shared by
    # every Accelerator), so in one notebook a probe after a bf16 pretraining ran in bf16, and a second pretraining
    # in another precision failed ("AcceleratorState has already been initialized"). Only a state in another
    # precision is reset (an Accelerator of the same settings still in use keeps its state); the process state
    # (devices, the process group of a launch) stays.
    if AcceleratorState._shared_state.get("_mixed_precision", requested) != requested:
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(**kwargs)
    check_mixed_precision(accelerator.mixed_precision, accelerator.device)
    if accelerator.device.type == "cpu" and is_first_local_process():  # once per machine
        # the processes of this machine (a launch over several machines counts them all in num_processes)
        _check_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    return accelerator


def _check_cpu_threads(num_processes: int) -> None:
    """Warns about torch threads that do not fit the CPU cores: `accelerate launch` without
    `--num_cpu_threads_per_process` sets OMP_NUM_THREADS=1, which leaves cores idle (one process on 2 cores trains at
    about 0.57x), and more threads than cores over all processes spin against each other (up to 10x slower)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = max(cores // max(num_processes, 1), 1)
    if torch.get_num_threads() * num_processes > cores:
        logging.getLogger(__name__).warning(
            "Running %d process(es) x %d torch thread(s) on %d CPU cores: threads beyond the cores spin against each "
            "other (up to 10x slower). For full speed: `accelerate launch --num_cpu_threads_per_process %d ...` "
            "(or OMP_NUM_THREADS=%d).", num_processes, torch.get_num_threads(), cores, per_process, per_process)
    elif torch.get_num_threads() < per_process and os.environ.get("OMP_NUM_THREADS"):
        logging.getLogger(__name__).warning(
            "Running on %d torch thread(s) per process with %d CPU cores for %d process(es): OMP_NUM_THREADS=%s "
            "(which `accelerate launch` sets to 1 unless told otherwise). For full speed: `accelerate launch "
            "--num_cpu_threads_per_process %d ...`.", torch.get_num_threads(), cores, num_processes,
            os.environ["OMP_NUM_THREADS"], per_process)


def json_safe(value):
    """`value` for strict JSON: NaN and infinities (the recall of a class without test images, a diverged loss) become
    `null`, which every JSON reader takes; Python's `json` would write `NaN`, which is not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_json(path: str, data) -> None:
    """`data` as strict JSON (`json_safe`), indented, into `path`: written beside it and renamed, so that a run
    killed while writing leaves the earlier file whole, not a truncated one."""
    text = json.dumps(json_safe(data), indent=2, allow_nan=False)  # a value JSON cannot hold fails before writing
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
        share_as_umask_allows(temporary)  # mkstemp's 0600 otherwise
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def format_score(value, digits: int = 3) -> str:
    """A number with `digits` decimals; "n/a" where it is undefined (`None` in a JSON file, where `write_json` puts
    NaN and infinities: a class without test images, a diverged loss)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def error_summary(error: BaseException) -> str:
    """`"TypeName: first line of the message"`, for one-line errors that wrap another."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def check_writable(folder: str, flag: str, path: str) -> None:
    """Fails with a `ValueError` naming `flag` when no file can be written into `folder` (before the work, not after
    it)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise ValueError(f"{flag} {path}: cannot write into {folder} ({error.strerror or error}).") from None


def check_outside_data(path: str, data_folders: Sequence[Optional[str]], flag: str) -> None:
    """Refuses an output path that is one of the data folders a command reads, or inside one: its files (model
    folders, plots) would replace images there or be read as images of it the next time. Compared as the file
    system sees paths (through links; without case on Windows)."""
    real = os.path.normcase(os.path.realpath(path))
    for folder in data_folders:
        if folder and os.path.isdir(folder):
            root = os.path.normcase(os.path.realpath(folder))
            if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
                raise ValueError(f"{flag} {path} is inside the data folder {folder}: what is written there would "
                                 f"replace its images or be read as images of it; give a path outside it.")


def check_card_replaceable(output_dir: str) -> None:
    """Refuses an output folder holding a `README.md` that is no mic-diffrep model card (a user's own notes, a
    dataset's card): the run writes its card there, and `--overwrite_output_dir` is about earlier runs, not that."""
    path = os.path.join(output_dir, "README.md")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(4096)
    parts = head.split("---", 2)
    front_matter = parts[1] if head.startswith("---") and len(parts) == 3 else ""  # a card's YAML: its tags
    if "mic-diffrep" not in front_matter:
        raise ValueError(f"{output_dir} holds a README.md that is not a mic-diffrep model card, which this run would "
                         f"replace with its own: give another folder, or move the README.md; nothing was changed.")


def prepare_output_file(path: str, flag: str = "--output", extensions: Optional[Sequence[str]] = None,
                        data_folders: Sequence[Optional[str]] = ()) -> None:
    """Checks an output file's path (not a folder, one of `extensions`, outside the `data_folders` the command
    reads, a folder that can be made and written) and makes its folder before the work, so that a mistyped path
    costs nothing."""
    check_outside_data(path, data_folders, flag)
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder; give a file name.")
    if extensions and not path.lower().endswith(tuple(extensions)):
        raise ValueError(f"{flag} {path}: give a file name ending in {', '.join(extensions)}.")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{flag} {path}: cannot make its folder ({error.strerror or error}).") from None
    check_writable(folder, flag, path)


# What each kind of output folder must not already hold: another kind of model folder, which the run would mix its
# files into (replacing its model card, or its `model.safetensors`).
_PIPELINE = "a diffusers pipeline folder (model_index.json)"
_CLASSIFIER = "a transformers classifier folder (config.json with a model_type)"
_BASELINE = "a baseline encoder folder (baseline_config.json)"
_OTHER_KIND = {"pipeline": (_CLASSIFIER, _BASELINE), "model": (_PIPELINE, _BASELINE), "baseline": (_PIPELINE, _CLASSIFIER)}


def _other_kind_held(path: str, kind: str) -> Optional[str]:
    """Which other kind of model folder `path` holds, of those a `kind` folder must not be mixed into."""
    for other, marker in ((_PIPELINE, "model_index.json"), (_BASELINE, "baseline_config.json")):
        if other in _OTHER_KIND[kind] and os.path.isfile(os.path.join(path, marker)):
            return other
    if _CLASSIFIER in _OTHER_KIND[kind]:
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                if "model_type" in json.load(f):
                    return _CLASSIFIER
        except (OSError, ValueError, TypeError):
            pass
    return None


def check_folder(path: str, name: str, give: str, missing: str = "") -> None:
    """Refuses a `path` that should be an existing folder: "{name} 'path' is a file; give {give}."
    (`NotADirectoryError`) or "{name} 'path' does not exist{missing}." (`FileNotFoundError`)."""
    if os.path.isfile(path):
        raise NotADirectoryError(f"{name} {os.fspath(path)!r} is a file; give {give}.")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{name} {os.fspath(path)!r} does not exist{missing}.")


# A Hub repository id (`user/name`, `name`-less forms excluded): what `from_pretrained` takes besides a folder.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_repo_id(path: str) -> bool:
    """Whether `path` names a Hub repository (`user/name`) rather than a local path: it is no path here, and its
    first folder is not here either (`runs/pretrian` is a local path with a typo)."""
    path = os.fspath(path)
    return not os.path.exists(path) and bool(_REPO_ID.fullmatch(path)) and not os.path.isdir(path.split("/")[0])


def model_folder(path: str, name: str, give: str, missing: str = "", revision: Optional[str] = None) -> str:
    """The local folder of `path`, as `from_pretrained` takes it: `path` itself when it exists, else, for a Hub
    repository id (`user/name`), its snapshot at `revision` (a branch, tag or commit; default `main`), from the local
    cache, downloaded first unless `HF_HUB_OFFLINE=1`. Anything else fails as `check_folder` says, naming `path`."""
    path = os.fspath(path)
    if not is_repo_id(path):  # (an existing path is never one)
        check_folder(path, name, give, missing)
        if revision is not None:
            raise ValueError(f"--revision {revision}: {name.lower()} {path!r} is a local folder; a revision is one "
                             f"of a Hub repository's.")
        return path
    try:
        return huggingface_hub.snapshot_download(path, revision=revision)
    except Exception as error:  # not found, offline and not cached, no access
        at = f" at revision {revision!r}" if revision is not None else ""
        raise FileNotFoundError(f"{name} {path!r} does not exist here, and no Hub repository {path!r}{at} could be "
                                f"loaded ({error_summary(error)}){missing}.") from None


def hub_commit(folder: Optional[str]) -> Optional[str]:
    """The commit of a Hub repository snapshot folder (`.../snapshots/<commit>`, as `model_folder` gives it), which a
    result records with the repository id; `None` for a local folder (or none)."""
    if not folder:
        return None
    parent, commit = os.path.split(os.path.normpath(os.fspath(folder)))
    return commit if os.path.basename(parent) == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def model_source(path: str) -> str:
    """How a file records the model it was made with: a local folder's absolute path, a Hub repository id as given."""
    return os.path.abspath(path) if os.path.exists(path) else os.fspath(path)


def not_a_pipeline(path: str) -> Optional[str]:
    """What a local folder that is not a pretrained pipeline holds instead, and which folder to load, as a sentence;
    `None` where it is not one of the folders people mistake for one (a run's classifier, `unet/`, checkpoint or
    root, or a baseline's folder)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return None
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return None
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(path, "training_state.json")):  # `checkpoint-N`: accelerate state of a run
        if os.path.isfile(os.path.join(parent, "model_index.json")):
            return (f"{path} is a training checkpoint (for --resume_from_checkpoint), not a pretrained pipeline: load "
                    f"the folder of the run that wrote it ({parent}).")
        return (f"{path} is a training checkpoint (for --resume_from_checkpoint) of a run that has not finished: "
                f"continue it with `--output_dir {parent} --resume_from_checkpoint latest`, then load {parent}.")
    if os.path.isfile(os.path.join(path, "pretrain", "model_index.json")):
        return (f"{path} is a `mic-diffrep run` folder: its pretrained pipeline is {os.path.join(path, 'pretrain')} "
                f"(and its classifier {os.path.join(path, 'model')}).")
    if os.path.isfile(os.path.join(path, "baseline_config.json")):
        return (f"{path} holds a baseline encoder (baseline_config.json), not a diffusion pipeline: it extracts "
                f"features (`mic-diffrep extract --pretrained`) but cannot generate images.")
    if any(name.startswith("checkpoint-") and os.path.isfile(os.path.join(path, name, "training_state.json"))
           for name in os.listdir(path)):  # a pretraining stopped (Ctrl-C, SIGTERM) before it saved its weights
        return (f"{path} holds only the checkpoints of a pretraining stopped before it saved its weights: continue it "
                f"(`resume_from_checkpoint=\"latest\"`, `--resume_from_checkpoint latest`), then load {path}.")
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if config.get("model_type") == "mic_diffrep":
        return (f"{path} is a MicDiffRep classifier folder (transformers' config.json), not a pretrained pipeline: "
                f"load it with `MicDiffRepForImageClassification.from_pretrained`, or load the pipeline folder its "
                f"probe was given (`--pretrained`).")
    if config.get("_class_name") == "UNet2DModel":
        return f"{path} is the UNet of a pretrained pipeline: load the folder that holds it ({parent})."
    return None


@contextlib.contextmanager
def output_folder(path: str, flag: str = "--output_dir", kind: Optional[str] = None,
                  data_folders: Sequence[Optional[str]] = ()):
    """Creates `path` for a run's outputs, after checking it is a folder that can be written, outside the
    `data_folders` the run reads (and, with `kind` `"pipeline"`, `"model"` or `"baseline"`, not a folder of another
    kind of model); if the run fails before writing anything there, the empty folders it created (its parents too)
    are removed again, so a failed run leaves nothing behind."""
    check_outside_data(path, data_folders, flag)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file; give a folder.")
    held = kind and os.path.isdir(path) and _other_kind_held(path, kind)
    if held:
        raise ValueError(f"{flag} {path} holds {held}: give another folder (a {kind} folder would be mixed into "
                         f"it).")
    created = []  # the folders `makedirs` makes: `path` and the missing parents above it
    missing = os.path.abspath(path)
    while not os.path.isdir(missing):
        created.append(missing)
        missing = os.path.dirname(missing)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{flag} {path}: cannot make the folder ({error.strerror or error}).") from None
    try:
        check_writable(path, flag, path)
        yield path
    except BaseException:
        for folder in created:  # innermost first, while empty
            if not os.path.isdir(folder) or os.listdir(folder):
                break
            os.rmdir(folder)
        raise


_WARNED = set()


def warn_once(logger: logging.Logger, message: str, *args) -> None:
    """`logger.warning(message, *args)`, once per process for the same message and values: a warning about data that
    a run reads several times (its checks, pretraining, the probe)."""
    key = (logger.name, message, repr(args))
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(message, *args)


def is_first_local_process() -> bool:
    """Whether this is the first process of its machine under `torchrun` / `accelerate launch` (`LOCAL_RANK` 0),
    or the only one (no launcher: unset, or -1): it alone logs progress and warnings meant once per machine."""
    return os.environ.get("LOCAL_RANK", "0") in ("", "0", "-1")


def is_first_process() -> bool:
    """Whether this is the first process of a launch (`RANK` 0), or the only one, read from the launcher's
    environment: it alone says and writes what is meant once per run, also before any `Accelerator` exists (one
    made early, without `cpu=True`, would set every process of a CPU launch up as a run of its own)."""
    return os.environ.get("RANK", "0") in ("", "0")


def progress_interval() -> float:
    """tqdm's `mininterval`: one line every 30 s at most where stderr is a file or a pipe (a log, a batch job's
    output); smooth in a terminal and in Jupyter, whose stderr is no terminal but shows one updating bar."""
    if sys.stderr.isatty() or "ipykernel" in sys.modules:
        return 0.1
    return 30.0


# The summary a pretraining run (diffusion or baseline) writes into its output folder.
SUMMARY_FILE = "pretraining_summary.json"


def share_as_umask_allows(path: str) -> None:
    """Gives `path` (a file, or every `.safetensors` file under a folder) the mode a new file gets from the umask
    (`0o666 & ~umask`): safetensors >= 0.8 writes its files 0600 whatever the umask (safetensors#782), so the weights
    of a model folder shared with other users or a serving account were the one file they could not read."""
    if os.name != "posix":
        return
    umask = os.umask(0o022)  # reading the umask sets it: put it back at once
    os.umask(umask)
    files = [path] if os.path.isfile(path) else [
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names if name.endswith(".safetensors")]
    for file in files:
        os.chmod(file, 0o666 & ~umask)


def save_safetensors(tensors: dict, path: str, metadata: Optional[dict] = None) -> None:
    """`safetensors.torch.save_file`, atomically (a temporary name, then renamed) and readable as the umask allows
    (`share_as_umask_allows`)."""
    from safetensors.torch import save_file

    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    share_as_umask_allows(tmp)
    os.replace(tmp, path)


# Settings never written to results files or trackers: those files are uploaded by --push_to_hub.
SECRET_SETTINGS = ("hub_token",)


def _is_secret_flag(name: str) -> bool:
    # argparse also takes unambiguous prefixes (`--hub_tok`) and HfArgumentParser the dashed spelling (`--hub-token`)
    key = name.lstrip("-").replace("-", "_")
    return name.startswith("--") and any(len(key) >= 5 and secret.startswith(key) for secret in SECRET_SETTINGS)


def _launcher() -> List[str]:
    """The `torchrun` prefix of a command that ran in several processes (`torchrun`, `accelerate launch`: both set
    `WORLD_SIZE` and `LOCAL_WORLD_SIZE`), or `[]`: a recorded command then starts as many processes again. `-m
    mic_diffrep` or `--no-python` is added by `command_line` to fit the command."""
    world, local = os.environ.get("WORLD_SIZE", "1"), os.environ.get("LOCAL_WORLD_SIZE")
    if not (world.isdigit() and int(world) > 1 and local and local.isdigit()):
        return []
    nodes = int(world) // max(int(local), 1)
    return ["torchrun", "--nproc_per_node", local] + (["--nnodes", str(nodes)] if nodes > 1 else [])


def command_line(argv=None) -> str:
    """The command that ran (`sys.argv` by default), as results files record it, with the value of `--hub_token`
    masked.

    >>> command_line(["/venv/bin/mic-diffrep", "probe", "--hub_token", "hf_a", "--hub-token=x", "--data_dir", "my d"])
    "mic-diffrep probe --hub_token '***' '--hub-token=***' --data_dir 'my d'"

    A command that ran in several processes (`torchrun`, `accelerate launch`) is recorded as the `torchrun` command
    that starts as many: `torchrun --nproc_per_node 2 training/pretrain.py ...`.
    """
    argv = [str(arg) for arg in (sys.argv if argv is None else argv)]
    if argv and os.path.splitext(os.path.basename(argv[0]))[0] == "mic-diffrep":  # the script, not its install path
        argv[0] = "mic-diffrep"
    launcher = _launcher()
    if argv and argv[0].endswith(os.path.join("mic_diffrep", "__main__.py")):  # `python -m mic_diffrep`
        argv[:1] = ["-m", "mic_diffrep"] if launcher else ["python", "-m", "mic_diffrep"]
    elif argv and launcher and argv[0] == "mic-diffrep":  # a command, not a Python script
        launcher.append("--no-python")
    argv = launcher + argv if argv else argv
    masked, hide_next = [], False
    for arg in argv:
        name, equals, _ = arg.partition("=")
        if hide_next:
            masked.append("***")
        elif _is_secret_flag(name) and equals:
            masked.append(f"{name}=***")
        else:
            masked.append(arg)
        hide_next = not hide_next and not equals and _is_secret_flag(name)
    return shlex.join(masked)  # quoted as a shell reads it: paths with spaces paste back


def tracker_config(args) -> dict:
    """A settings dataclass as tracker hyper-parameters (`accelerator.init_trackers(config=)`): scalars as they are,
    the rest as strings, secrets left out."""
    return {key: (value if isinstance(value, (int, float, str, bool)) else str(value))
            for key, value in vars(args).items() if key not in SECRET_SETTINGS}


def environment_info() -> dict:
    """Versions and machine, for results files: with the package's version, the commit of the source checkout it
    runs from (`source_commit`, `+dirty` when files tracked there are changed; `None` for an installed copy)."""
    from . import __version__

    info = {
        "mic_diffrep": __version__,
        "source_commit": source_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def source_commit() -> Optional[str]:
    """The git commit of the checkout the package was imported from, `+dirty` when tracked files differ from it;
    `None` when it is no git checkout (a wheel) or git is missing."""
    folder = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(folder, ".git")):
        return None
    try:
        commit = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        changed = subprocess.run(["git", "-C", folder, "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if changed else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU), or peak allocated CUDA memory, in MiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
