"""Linear probing on frozen features: the single-layer (SL) sweep and MSFA, with selection on a validation split.

The protocol is the paper's (Adam, learning rate 0.01, cosine annealing, batch 128, 15 epochs; all configurable).
Everything here works on features already extracted (a feature cache), so training takes seconds.

1. `train_heads`: one linear head per `(layer, timestep)`, all trained together in one loop over the cached
   features (paper Fig. 4).
2. `msfa_candidates`: layer x timestep sets to aggregate; each is trained as MSFA (concat -> Linear -> ReLU ->
   Linear, paper eqs. 4-6) on the fit part of the training split and scored on the validation part.
3. `run_probes`: picks SL-best and the MSFA set on validation, refits both on the whole training split and scores
   the test split once.
"""

import logging
import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .metrics import classification_report
from .modeling_mic_diffrep import MicDiffRepMSFAHead


logger = logging.getLogger(__name__)

Key = Tuple[str, int]


@dataclass
class ProbeConfig:
    """Training settings of every probe (paper: Adam 0.01, cosine annealing, batch 128, 15 epochs)."""

    num_epochs: int = 15
    learning_rate: float = 0.01
    train_batch_size: int = 128
    weight_decay: float = 0.0
    hidden_size: int = 512
    dropout: float = 0.0
    standardize: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.num_epochs < 1 or self.train_batch_size < 1:
            raise ValueError("num_epochs and train_batch_size must be at least 1.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")
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
                hidden_size: Optional[int] = None) -> Dict[Key, TrainedProbe]:
    """Trains one head per entry of `features` (each `(N, D_k)`), all in one loop over shared mini-batches.

    `hidden_size=0` (the default for an SL sweep) makes linear heads; a positive size makes MSFA heads. The heads
    have separate parameters and Adam is per-parameter, so training them together equals training them one by one.
    """
    hidden_size = 0 if hidden_size is None else hidden_size
    keys = list(features)
    num_examples = len(labels)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    stats = {key: standardization(features[key], config.standardize) for key in keys}
    inputs = {key: (features[key] - stats[key][0]) / stats[key][1] for key in keys}
    heads = nn.ModuleDict({str(i): MicDiffRepMSFAHead(features[key].shape[1], hidden_size, num_labels, config.dropout)
                           for i, key in enumerate(keys)})
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(num_examples / config.train_batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.num_epochs * steps_per_epoch)
    heads.train()
    for _ in range(config.num_epochs):
        order = torch.randperm(num_examples, generator=generator)
        for start in range(0, num_examples, config.train_batch_size):
            batch = order[start : start + config.train_batch_size]
            loss = sum(nn.functional.cross_entropy(heads[str(i)](inputs[key][batch]), labels[batch])
                       for i, key in enumerate(keys))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return {key: TrainedProbe(heads[str(i)], *stats[key]) for i, key in enumerate(keys)}


def accuracy(probe: TrainedProbe, features: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probe.predict(features) == labels).float().mean())


def concatenate(features: Dict[Key, torch.Tensor], layers: Sequence[str], timesteps: Sequence[int]) -> torch.Tensor:
    """MSFA input (eq. 4): timestep-major, layers in the given order, as `MicDiffRepForImageClassification`."""
    return torch.cat([features[(layer, t)] for t in timesteps for layer in layers], dim=1)


def msfa_candidates(sl_validation: Dict[Key, float], layers: Sequence[str], timesteps: Sequence[int]):
    """Layer x timestep sets worth aggregating, ranked from the SL validation accuracies.

    All layers at each single timestep (the MSFA curve of Fig. 4), all layers at the best 2 and 3 timesteps, the
    best 3 and 5 layers at the best 1-3 timesteps, and everything.
    """
    def mean_over(items, key_of):
        return {item: sum(acc for k, acc in sl_validation.items() if key_of(k) == item) /
                max(1, sum(1 for k in sl_validation if key_of(k) == item)) for item in items}

    best_t = sorted(timesteps, key=lambda t: -mean_over(timesteps, lambda k: k[1])[t])
    layer_order = {name: i for i, name in enumerate(layers)}
    best_layers = sorted(layers, key=lambda l: -mean_over(layers, lambda k: k[0])[l])
    candidates = [(tuple(layers), (t,)) for t in timesteps]
    for m in (2, 3):
        if m <= len(timesteps):
            candidates.append((tuple(layers), tuple(sorted(best_t[:m]))))
    for k in (3, 5):
        if k < len(layers):
            chosen = tuple(sorted(best_layers[:k], key=layer_order.get))
            for m in (1, 2, 3):
                if m <= len(timesteps):
                    candidates.append((chosen, tuple(sorted(best_t[:m]))))
    candidates.append((tuple(layers), tuple(timesteps)))
    return list(dict.fromkeys(candidates))


def run_probes(train_features: Dict[Key, torch.Tensor], train_labels: torch.Tensor,
               test_features: Dict[Key, torch.Tensor], test_labels: torch.Tensor, label_names: List[str],
               validation_mask: torch.Tensor, config: ProbeConfig, layers: Sequence[str], timesteps: Sequence[int],
               test_subsets: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[dict, dict]:
    """The SL sweep and MSFA, selected on validation, refit on the whole training split, scored on test.

    Args:
        validation_mask (`torch.BoolTensor` of shape `(N_train,)`): which training images form the validation part.
        test_subsets (`Dict[str, torch.BoolTensor]`, *optional*): extra masks of the test split to report (e.g.
            `"deduplicated"`: test images without a near-duplicate in training).

    Returns:
        `(results, probes)`: a JSON-able results dict, and the refit `TrainedProbe`s under `"sl_best"` and `"msfa"`.
    """
    num_labels = len(label_names)
    fit = ~validation_mask
    if fit.sum() == 0 or validation_mask.sum() == 0:
        raise ValueError("The validation split and the rest of the training split must both be non-empty.")
    keys = [(layer, t) for t in timesteps for layer in layers]

    def subset(features, mask):
        return {key: features[key][mask] for key in keys}

    # 1. SL sweep: fit part -> validation accuracy (selection); whole training split -> test accuracy (Fig. 4).
    logger.info("SL sweep: %d linear heads", len(keys))
    fit_heads = train_heads(subset(train_features, fit), train_labels[fit], num_labels, config, hidden_size=0)
    sl_validation = {key: accuracy(fit_heads[key], train_features[key][validation_mask], train_labels[validation_mask])
                     for key in keys}
    full_heads = train_heads({key: train_features[key] for key in keys}, train_labels, num_labels, config,
                             hidden_size=0)
    sl_test = {key: accuracy(full_heads[key], test_features[key], test_labels) for key in keys}

    # 2. MSFA candidates on validation.
    candidates = msfa_candidates(sl_validation, layers, timesteps)
    logger.info("MSFA: %d candidate layer x timestep sets", len(candidates))
    inputs = {c: concatenate(train_features, *c) for c in candidates}
    candidate_heads = train_heads({c: inputs[c][fit] for c in candidates}, train_labels[fit], num_labels, config,
                                  hidden_size=config.hidden_size)
    msfa_validation = {c: accuracy(candidate_heads[c], inputs[c][validation_mask], train_labels[validation_mask])
                       for c in candidates}
    best_msfa = max(candidates, key=lambda c: (msfa_validation[c], -inputs[c].shape[1]))

    # 3. Refit on the whole training split: the chosen MSFA set, and the per-timestep MSFA curve of Fig. 4.
    per_timestep = [(tuple(layers), (t,)) for t in timesteps]
    refit_sets = list(dict.fromkeys(per_timestep + [best_msfa]))
    refit = train_heads({c: concatenate(train_features, *c) for c in refit_sets}, train_labels, num_labels, config,
                        hidden_size=config.hidden_size)
    msfa_test_curve = {c[1][0]: accuracy(refit[c], concatenate(test_features, *c), test_labels) for c in per_timestep}

    sl_best_key = max(keys, key=lambda k: sl_validation[k])
    test_subsets = {"all": torch.ones(len(test_labels), dtype=torch.bool), **(test_subsets or {})}

    def report(probe, features):
        predictions = probe.predict(features)
        return {name: classification_report(predictions[mask].tolist(), test_labels[mask].tolist(), label_names)
                for name, mask in test_subsets.items() if mask.any()}

    results = {
        "label_names": list(label_names),
        "num_train": int(fit.sum()), "num_validation": int(validation_mask.sum()), "num_test": len(test_labels),
        "probe_config": asdict(config),
        "single_layer": [{"layer": layer, "timestep": t, "validation_accuracy": sl_validation[(layer, t)],
                          "test_accuracy": sl_test[(layer, t)]} for (layer, t) in keys],
        "sl_best": {"layer": sl_best_key[0], "timestep": sl_best_key[1],
                    "validation_accuracy": sl_validation[sl_best_key],
                    "test": report(full_heads[sl_best_key], test_features[sl_best_key])},
        "msfa_per_timestep": [{"timestep": t, "test_accuracy": msfa_test_curve[t]} for t in timesteps],
        "msfa_candidates": [{"layers": list(c[0]), "timesteps": list(c[1]), "validation_accuracy": msfa_validation[c]}
                            for c in candidates],
        "msfa": {"layers": list(best_msfa[0]), "timesteps": list(best_msfa[1]),
                 "validation_accuracy": msfa_validation[best_msfa],
                 "test": report(refit[best_msfa], concatenate(test_features, *best_msfa))},
    }
    return results, {"sl_best": full_heads[sl_best_key], "msfa": refit[best_msfa]}
