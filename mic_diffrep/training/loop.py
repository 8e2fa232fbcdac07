"""The training loop that diffusion pretraining and the baselines' pretraining share.

`prepare_training` decodes the images once and builds the data loader, optimizer and learning-rate schedule;
`train` runs the epochs (`train_one_epoch`), checkpoints, stops on steps, the time budget or Ctrl-C, and calls back
into the method for its loss, its after-step update (EMA, momentum targets) and its end-of-epoch work (sample grids,
saving).

Reproducibility: data order and flips depend on `(seed, epoch)`, the noise, timesteps and augmentations of a batch
on `(seed, epoch, batch, process)`, so a run resumed from a checkpoint ends with the same weights as one that never
stopped (exactly so on CPU in fp32).
"""

import hashlib
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..data import (DecodedImages, PretrainingDataset, decode_images, listed_files, load_image_folder,
                    relative_image_id, seed_for, select_splits)
from ..data.decoding import source_file
from ..utils import create_accelerator, is_first_local_process, progress_interval
from .arguments import CommonPretrainingArguments
from .checkpointing import (check_checkpoint, find_checkpoint, images_record, resume_training_state,
                            save_training_state)


logger = logging.getLogger(__name__)


@dataclass
class TrainingState:
    """Where a run is, and what it has done so far."""

    global_step: int = 0
    epoch: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0
    last_loss: float = float("nan")
    stop_reason: Optional[str] = None
    epochs_completed: int = 0  # epochs run to their last batch (a run stopped within one has not completed it)
    first_epoch_indices: List[int] = field(default_factory=list)  # images this process saw first: shards must not overlap


def make_accelerator(args: CommonPretrainingArguments, log_with: Optional[str] = None):
    """The run's `Accelerator`; a checkpoint to resume is checked against its number of processes here, before any
    data is decoded (its settings were checked with the arguments)."""
    accelerator = create_accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)))
    checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint is not None and os.path.isdir(checkpoint):
        check_checkpoint(checkpoint, num_processes=accelerator.num_processes)
    return accelerator


def training_images(args: CommonPretrainingArguments):
    """`(splits, dataset, excluded)`: the undecoded images of the splits pretraining reads (`--pretrain_splits` of
    `--train_data_dir`), and the files of them it leaves out (`--exclude_image_list`, relative to the data folder;
    `None` without a list)."""
    splits, dataset = select_splits(load_image_folder(args.train_data_dir), args.pretrain_splits)
    excluded = (listed_files(dataset, args.train_data_dir, args.exclude_image_list)
                if args.exclude_image_list else None)
    return splits, dataset, excluded


def training_fingerprint(fingerprint: Optional[str], excluded: Optional[set]) -> Optional[str]:
    """The fingerprint of pretraining's images: that of the splits' images (`images_fingerprint`), and of the files
    left out of them, if any."""
    if not excluded or fingerprint is None:
        return fingerprint
    return hashlib.sha256("\n".join([fingerprint, *sorted(excluded)]).encode()).hexdigest()[:32]


def load_training_images(args: CommonPretrainingArguments, accelerator):
    """The unlabelled training images, decoded once; returns `(decoded, splits)`. The main process goes first: it
    writes the decode cache, which the other processes then read. Images left out (`--exclude_image_list`) are left
    out of the decoded splits, whose decode cache the probe of `mic-diffrep run` shares."""
    with accelerator.main_process_first():
        splits, dataset, excluded = training_images(args)
        decoded = decode_images(dataset, args.preprocessing, skip_bad_images=args.skip_bad_images,
                                num_workers=args.dataloader_num_workers,
                                cache_dir=args.cache_dir or os.path.join(args.output_dir, ".cache"),
                                show_progress=accelerator.is_local_main_process, slices=args.slices)
    if excluded:
        kept = [index for index, path in enumerate(decoded.paths)
                if source_file(relative_image_id(path, args.train_data_dir)) not in excluded]
        if not kept:
            raise ValueError(f"--exclude_image_list {args.exclude_image_list} leaves none of the images of "
                             f"{args.train_data_dir} to pretrain on.")
        fingerprint = training_fingerprint(decoded.fingerprint, excluded)
        decoded = decoded.subset(kept)
        decoded.fingerprint = fingerprint
    return decoded, splits


def make_dataloader(decoded: DecodedImages, args: CommonPretrainingArguments, drop_last: bool = False):
    """A seeded `PretrainingDataset` (order and flips per epoch) in a sequential loader that accelerate can shard."""
    dataset = PretrainingDataset(decoded.pixels, seed=args.seed, random_flip=not args.no_random_flip)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=False,
                                         drop_last=drop_last, num_workers=args.dataloader_num_workers)
    if len(loader) == 0:
        raise ValueError(f"`train_batch_size` {args.train_batch_size} is larger than the {len(decoded)} images.")
    return dataset, loader


def plan_schedule(args: CommonPretrainingArguments, loader, optimizer, accelerator):
    """`(max_train_steps, num_epochs, lr_scheduler)`; the schedule spans `max_train_steps` (or `num_epochs`)."""
    batches_per_process = math.ceil(len(loader) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    if args.lr_warmup_steps > max_train_steps and accelerator.is_main_process:
        logger.warning("--lr_warmup_steps %d is longer than the run's %d steps: the learning rate ends its warm-up at "
                       "%.3g, not --learning_rate %g (fewer warm-up steps, or more steps, reach it).",
                       args.lr_warmup_steps, max_train_steps,
                       args.learning_rate * max_train_steps / args.lr_warmup_steps, args.learning_rate)
    # A prepared scheduler steps once per process at each optimizer step.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    return max_train_steps, num_epochs, lr_scheduler


def summary_stop_reason(state: TrainingState, args: CommonPretrainingArguments) -> str:
    """Why the run stopped, for its summary: `"num_epochs"` when it ran the epochs it was given (its last step is
    also the planned step count, which it reached), else `state.stop_reason`."""
    if state.stop_reason is None or (state.stop_reason == "max_train_steps" and args.max_train_steps is None):
        return "num_epochs"
    return state.stop_reason


def end_trackers(accelerator) -> None:
    """`accelerator.end_training()` but for the process group, which it destroys: the caller may go on with
    collective work (`mic-diffrep run` probes after pretraining, in the same processes); the commands destroy it
    before the program exits (`mic_diffrep.commands.base.run_guarded`)."""
    for tracker in accelerator.trackers:
        tracker.finish()


def optimization_step(accelerator, model, loss, optimizer, lr_scheduler, max_grad_norm: float, where: str) -> None:
    """Stops on a NaN or infinite loss (naming `where`), else backpropagates, clips and steps optimizer and schedule."""
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"Loss is {loss.item()} at {where}. Lower the learning rate, try mixed precision 'no', or resume from the "
            f"last checkpoint; saved checkpoints are untouched."
        )
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad()


def stop_reason_for(accelerator, global_step: int, max_train_steps: int, start_time: float,
                    time_budget_minutes: Optional[float], interrupted: bool = False) -> Optional[str]:
    """`"interrupted"`, `"max_train_steps"` or `"time_budget_minutes"` when training should stop, else `None`; every
    process agrees: a signal one process received stops them all at the same step (ranks signalled a little apart
    would otherwise wait for each other, one in the checkpoint's barrier, the other in the next step), and the
    slowest process's elapsed time decides the budget."""
    elapsed = time.time() - start_time
    if accelerator.num_processes > 1:  # one collective for both
        agreed = accelerator.reduce(torch.tensor([float(interrupted), elapsed], device=accelerator.device),
                                    reduction="max")
        signalled_here = interrupted
        interrupted, elapsed = bool(agreed[0].item()), agreed[1].item()
        if interrupted and not signalled_here and accelerator.is_main_process:  # said where the run's log is
            logger.warning("Interrupted: another process of the run was signalled; saving a checkpoint after this "
                           "step.")
    if interrupted:
        return "interrupted"
    if global_step >= max_train_steps:
        return "max_train_steps"
    if time_budget_minutes is not None and elapsed >= 60 * time_budget_minutes:
        return "time_budget_minutes"
    return None


class _Interrupt:
    """Ctrl-C or SIGTERM (`accelerate launch` forwards Ctrl-C as SIGTERM; preemption, `timeout`, `docker stop`):
    finish the current step, save a checkpoint, exit. A second Ctrl-C aborts; a SIGTERM after the first signal does
    not: a Ctrl-C in a terminal reaches the process and `accelerate launch`, which then sends it SIGTERM."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():  # only the main thread can take signals: a
            return self  # run in another thread (a notebook's background job) trains without the handlers
        for signum in self.SIGNALS:
            self.previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            if signum == signal.SIGINT:  # the user's second Ctrl-C
                self._restore()
                raise KeyboardInterrupt
            return  # the launcher's SIGTERM after the Ctrl-C both received: the checkpoint is on its way
        self.requested = True
        if is_first_local_process():  # once per machine, not once per process
            logger.warning("Interrupted: saving a checkpoint after this step (press Ctrl-C again to abort).")

    def _restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def __exit__(self, *exc):
        self._restore()


def train_one_epoch(state: TrainingState, accelerator, model, loader, dataset, optimizer, lr_scheduler,
                    args: CommonPretrainingArguments, max_train_steps: int, compute_loss: Callable,
                    after_step: Callable, skip_batches: int, progress, interrupt: _Interrupt, start_time: float,
                    record_indices: bool, checkpoint_settings: dict) -> None:
    """One epoch of optimisation; sets `state.stop_reason` when the run must stop."""
    model.train()
    dataset.shuffle_for_epoch(state.epoch)
    batches = accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
    epoch_start = time.time()
    batches_done = skip_batches
    for batch_index, batch in enumerate(batches, start=skip_batches):
        if record_indices:
            state.first_epoch_indices.extend(batch["index"].tolist())
        generator = torch.Generator().manual_seed(seed_for(args.seed, state.epoch, batch_index,
                                                           accelerator.process_index))
        with accelerator.accumulate(model):
            loss = compute_loss(model, batch["pixel_values"], generator)
            optimization_step(accelerator, model, loss, optimizer, lr_scheduler, args.max_grad_norm,
                              f"epoch {state.epoch}, batch {batch_index} (step {state.global_step})")
        state.images_seen += accelerator.reduce(
            torch.tensor(len(batch["pixel_values"]), device=accelerator.device), reduction="sum").item()
        batches_done = batch_index + 1
        if not accelerator.sync_gradients:
            continue
        state.global_step += 1
        state.last_loss = accelerator.reduce(loss.detach().float(), reduction="mean").item()
        logs = {"loss": state.last_loss, "lr": lr_scheduler.get_last_lr()[0], "step": state.global_step,
                **(after_step(state) or {})}
        progress.update(1)
        # refresh=False: the bar redraws at its own pace (once every 30 s into a log file), not on every step
        progress.set_postfix(loss=f"{state.last_loss:.4f}", lr=f"{logs['lr']:.2e}", refresh=False)
        accelerator.log(logs, step=state.global_step)
        totals = {"images_seen": state.images_seen, "train_seconds": state.train_seconds + time.time() - epoch_start,
                  "last_loss": state.last_loss}
        if state.global_step % args.checkpointing_steps == 0:
            save_training_state(accelerator, args.output_dir, state.global_step, state.epoch, batch_index + 1,
                                args.checkpoints_total_limit, totals, checkpoint_settings)
        state.stop_reason = stop_reason_for(accelerator, state.global_step, max_train_steps, start_time,
                                            args.time_budget_minutes, interrupt.requested)
        # A run cut short can be resumed, and a finished one continued (more epochs) from where it ended instead of
        # its last checkpoint's step
        if state.stop_reason and state.global_step % args.checkpointing_steps:
            save_training_state(accelerator, args.output_dir, state.global_step, state.epoch, batch_index + 1,
                                args.checkpoints_total_limit, totals, checkpoint_settings)
        if state.stop_reason == "time_budget_minutes" and accelerator.is_main_process:
            logger.warning("Stopped by --time_budget_minutes %g after %d of %d steps; checkpoint-%d was saved: add "
                           "--resume_from_checkpoint latest to continue.", args.time_budget_minutes,
                           state.global_step, max_train_steps, state.global_step)
        if state.stop_reason:
            break
    if batches_done == len(loader):
        state.epochs_completed = state.epoch + 1
    state.train_seconds += time.time() - epoch_start
    accelerator.log({"epoch": state.epoch, "epoch_seconds": time.time() - epoch_start}, step=state.global_step)


def train(accelerator, model, loader, dataset, optimizer, lr_scheduler, args: CommonPretrainingArguments,
          max_train_steps: int, num_epochs: int, compute_loss: Callable, after_step: Callable = lambda state: None,
          end_of_epoch: Callable = lambda state, last_epoch: None, desc: str = "Pretraining") -> TrainingState:
    """Resumes from `args.resume_from_checkpoint` if asked, then runs `train_one_epoch` until the run stops.

    Args:
        compute_loss (`Callable[[model, pixel_values, generator], torch.Tensor]`): the method's loss of one batch;
            `generator` is seeded by `(seed, epoch, batch, process)`.
        after_step (`Callable[[TrainingState], Optional[dict]]`): after each optimizer step (EMA, momentum
            targets); returns extra values to log.
        end_of_epoch (`Callable[[TrainingState, bool], None]`): after each epoch but an interrupted one (sample
            grids, saving); the flag says whether it is the last one.
    """
    # A checkpoint records the images it was trained on: a run resuming it on others is refused
    images = images_record(dataset.pixels)
    global_step, first_epoch, resume_batches, totals = resume_training_state(accelerator, args.output_dir,
                                                                             args.resume_from_checkpoint, images)
    state = TrainingState(global_step=global_step, epoch=first_epoch, images_seen=totals.get("images_seen", 0),
                          train_seconds=totals.get("train_seconds", 0.0),
                          last_loss=totals.get("last_loss", float("nan")), epochs_completed=first_epoch)
    checkpoint_settings = {**args.checkpoint_settings(), "images": images}
    progress = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc=desc, unit="step", mininterval=progress_interval())
    start_time = time.time()
    if global_step >= max_train_steps:  # a checkpoint of the last step (or past it): nothing left to train
        logger.warning("The checkpoint resumed is at step %d and the run has %d steps: nothing left to train; saving "
                       "its weights.", global_step, max_train_steps)
        state.stop_reason = "max_train_steps"
        first_epoch = num_epochs  # no epoch: the weights are saved as after the last one
        end_of_epoch(state, True)
    try:
        with _Interrupt() as interrupt:
            for epoch in range(first_epoch, num_epochs):
                state.epoch = epoch
                train_one_epoch(state, accelerator, model, loader, dataset, optimizer, lr_scheduler, args,
                                max_train_steps, compute_loss, after_step, resume_batches if epoch == first_epoch
                                else 0, progress, interrupt, start_time, record_indices=epoch == first_epoch,
                                checkpoint_settings=checkpoint_settings)
                if state.stop_reason == "interrupted":
                    break
                end_of_epoch(state, state.stop_reason is not None or epoch == num_epochs - 1)
                if state.stop_reason:
                    break
    finally:
        progress.close()
    accelerator.wait_for_everyone()
    return state
