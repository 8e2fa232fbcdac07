"""Probe heads trained on frozen features: linear (SL) and MSFA heads, many at once, with their standardisation.

The protocol is the paper's (Adam, learning rate 0.01, cosine annealing, batch 128, 15 epochs; all configurable).
Everything here works on features already extracted (a feature cache), so training takes seconds.
"""

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.mic_diffrep import MicDiffRepMSFAHead
from ..utils import check_settings, progress_interval


Key = Tuple[str, int]


@dataclass
class ProbeConfig:
    """Training settings of every probe (paper: Adam 0.01, cosine annealing, batch 128, 15 epochs).

    `random_flip`: each training image is seen as it is or, at random (per image and epoch), mirrored left-right, as
    in the linear evaluation of MoCo, BYOL and SimCLR; the heads then need the mirror images' features too
    (`train_heads(..., mirrored=)`). Inference is unchanged.
    """

    num_epochs: int = 15
    learning_rate: float = 0.01
    train_batch_size: int = 128
    weight_decay: float = 0.0
    hidden_size: int = 512
    dropout: float = 0.0
    standardize: bool = True
    random_flip: bool = False
    seed: int = 0

    def __post_init__(self):
        check_settings(self)  # types: a batch size of 1.5 is refused
        if self.num_epochs < 1 or self.train_batch_size < 1:
            raise ValueError("num_epochs and train_batch_size must be at least 1.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        if self.hidden_size < 0 or not 0 <= self.dropout < 1:
            raise ValueError("hidden_size must be >= 0 and dropout in [0, 1).")


def standardization(features: torch.Tensor, enabled: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of `features` (zeros and ones when `enabled` is False)."""
    if not enabled:
        return torch.zeros(features.shape[1]), torch.ones(features.shape[1])
    return features.mean(dim=0), features.std(dim=0, unbiased=False).clamp_min(1e-6)


class TrainedProbe(nn.Module):
    """A trained head with the standardisation it was trained with."""

    def __init__(self, head: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.head = head
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        self.eval()
        return self.head((features - self.mean) / self.std).argmax(dim=1)


def train_heads(features: Dict[Key, torch.Tensor], labels: torch.Tensor, num_labels: int, config: ProbeConfig,
                hidden_size: Optional[int] = None,
                mirrored: Optional[Dict[Key, torch.Tensor]] = None) -> Dict[Key, TrainedProbe]:
    """Trains one head per entry of `features` (each `(N, D_k)`), all in one loop over shared mini-batches.

    `hidden_size=0` (the default for an SL sweep) makes linear heads; a positive size makes MSFA heads. The heads
    have separate parameters and Adam is per-parameter, so they do not interact while training; their initial
    weights, though, are drawn one after another from `config.seed`, so a head's initialisation (and with few
    epochs its scores) depends on its place in `features`. The caller's global torch random state is left as it was.
    With `config.random_flip`, `mirrored` holds the features of the same images mirrored left-right (same keys and
    shapes); each image of a batch is replaced by its mirror image with probability 1/2 (the order of the batches,
    and the standardisation, are those of the images as they are).
    """
    hidden_size = 0 if hidden_size is None else hidden_size
    with torch.random.fork_rng(devices=[]):  # seeds the heads' initialisation, not the caller's random state
        return _train_heads(features, labels, num_labels, config, hidden_size, mirrored)


def _train_heads(features, labels, num_labels, config, hidden_size, mirrored):
    keys = list(features)
    num_examples = len(labels)
    generator = torch.Generator().manual_seed(config.seed)
    flip_generator = torch.Generator().manual_seed(config.seed + 1)
    torch.manual_seed(config.seed)
    stats = {key: standardization(features[key], config.standardize) for key in keys}

    def standardized(source, key, batch):
        # A batch at a time (the same values as the whole set standardised first, without its copy in memory)
        return (source[key][batch] - stats[key][0]) / stats[key][1]

    if config.random_flip:
        if mirrored is None or any(mirrored.get(key) is None or mirrored[key].shape != features[key].shape
                                   for key in keys):
            raise ValueError("`random_flip` needs `mirrored`: the mirror images' features, with the keys and shapes "
                             "of `features`.")
    heads = nn.ModuleDict({str(i): MicDiffRepMSFAHead(features[key].shape[1], hidden_size, num_labels, config.dropout)
                           for i, key in enumerate(keys)})
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(num_examples / config.train_batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.num_epochs * steps_per_epoch)
    heads.train()
    # Minutes for tens of thousands of images: shown when it takes more than 2 s
    progress = tqdm(total=config.num_epochs * steps_per_epoch, desc=f"Training {len(heads)} probe head(s)",
                    unit="step", delay=2, mininterval=progress_interval())
    for _ in range(config.num_epochs):
        order = torch.randperm(num_examples, generator=generator)
        for start in range(0, num_examples, config.train_batch_size):
            batch = order[start : start + config.train_batch_size]
            if config.random_flip:
                flip = (torch.rand(len(batch), generator=flip_generator) < 0.5)[:, None]
                views = {key: torch.where(flip, standardized(mirrored, key, batch), standardized(features, key, batch))
                         for key in keys}
            else:
                views = {key: standardized(features, key, batch) for key in keys}
            loss = sum(nn.functional.cross_entropy(heads[str(i)](views[key]), labels[batch])
                       for i, key in enumerate(keys))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            progress.update()
    progress.close()
    return {key: TrainedProbe(heads[str(i)], *stats[key]) for i, key in enumerate(keys)}


def accuracy(probe: TrainedProbe, features: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probe.predict(features) == labels).float().mean())
