"""Choosing SL-best and the MSFA layer x timestep set on validation, refitting, and scoring the test split once.

1. `train_heads` (see `heads`): one linear head per `(layer, timestep)`, all trained together (paper Fig. 4).
2. `msfa_candidates`: layer x timestep sets to aggregate; each is trained as MSFA (concat -> Linear -> ReLU ->
   Linear, paper eqs. 4-6) on the fit part of the training split and scored on the validation part.
3. `run_probes`: picks SL-best and the MSFA set on validation, refits both on the whole training split and scores
   the test split once.
"""

import logging
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..models.mic_diffrep.unet_features import concatenate_features as concatenate
from ..reporting.metrics import classification_report
from .heads import Key, ProbeConfig, accuracy, train_heads


logger = logging.getLogger(__name__)


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


def checked_label_names(label_names) -> List[str]:
    """`label_names` (any sequence: a list, a numpy array, a `ClassLabel`'s `names`) as a list of distinct strings,
    or an error: a saved classifier's `id2label` / `label2id` are made of them."""
    names = [str(name) for name in list(label_names)]
    if not names:
        raise ValueError("`label_names` is empty: name the classes, in the order of their indices.")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"`label_names` names {repeated} more than once ({names}): each class needs a name of its "
                         f"own.")
    return names


def _class_indices(labels, name: str, label_names: Optional[List[str]] = None) -> torch.Tensor:
    """`labels` (a tensor, array or list of class indices, or of class names among `label_names`) as a 1-D int64
    tensor, or an error naming `name`."""
    if not isinstance(labels, torch.Tensor):
        labels = np.asarray(labels)
        if labels.dtype.kind in "UO" and labels.ndim == 1 and all(isinstance(v, str) for v in labels.tolist()):
            unknown = sorted(set(labels.tolist()) - set(label_names or []))
            if unknown:
                raise ValueError(f"`{name}` holds class names that `label_names` ({label_names}) does not list: "
                                 f"{unknown[:3]}{' ...' if len(unknown) > 3 else ''}.")
            index = {label: i for i, label in enumerate(label_names)}
            labels = np.array([index[label] for label in labels.tolist()], dtype=np.int64)
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"`{name}` must be a 1-D sequence of class indices (or of class names), got {labels.dtype} "
                         f"of shape {tuple(labels.shape)}.")
    if len(labels) and labels.min() < 0:
        raise ValueError(f"`{name}` must hold class indices 0 or above, got {int(labels.min())}.")
    return labels.long()


def _checked_features(features, labels: torch.Tensor, layers, timesteps, name: str) -> Dict[Key, torch.Tensor]:
    """The `layers` x `timesteps` features of `features` as float tensors of one row per label, or an error naming
    `name` and what is missing."""
    missing = [(layer, t) for t in timesteps for layer in layers if (layer, t) not in features]
    if missing:
        raise ValueError(f"`{name}` has no features for {missing[:3]}{' ...' if len(missing) > 3 else ''}; it holds "
                         f"{sorted(features)[:6]}{' ...' if len(features) > 6 else ''}.")
    checked = {}
    for key in ((layer, t) for t in timesteps for layer in layers):
        value = torch.as_tensor(features[key]).float()
        if value.ndim != 2 or len(value) != len(labels):
            raise ValueError(f"`{name}`[{key}] must be one row per label, (N={len(labels)}, C), got shape "
                             f"{tuple(value.shape)}.")
        checked[key] = value
    return checked


def run_probes(train_features: Dict[Key, torch.Tensor], train_labels: torch.Tensor,
               test_features: Dict[Key, torch.Tensor], test_labels: torch.Tensor, label_names: List[str],
               validation_mask: torch.Tensor, config: Optional[ProbeConfig] = None,
               layers: Optional[Sequence[str]] = None, timesteps: Optional[Sequence[int]] = None,
               test_subsets: Optional[Dict[str, torch.Tensor]] = None,
               train_features_mirrored: Optional[Dict[Key, torch.Tensor]] = None) -> Tuple[dict, dict]:
    """The SL sweep and MSFA, selected on validation, refit on the whole training split, scored on test.

    Args:
        train_features, test_features (`Dict[(layer, timestep), Tensor]`): pooled features `(N, C)` (tensors or
            arrays), as `DiffusionFeaturePipeline.extract_features` gives them (`.features`).
        train_labels, test_labels: class indices in `[0, len(label_names))` (tensors, arrays or lists), or class
            names among `label_names`.
        config (`ProbeConfig`, *optional*): the heads' training (default: the paper's protocol, `ProbeConfig()`).
        layers, timesteps (*optional*): which of the features' layers and timesteps to probe (default: all).
        validation_mask (`torch.BoolTensor` of shape `(N_train,)`, or their indices, as `group_stratified_split`
            gives them): which training images form the validation part.
        test_subsets (`Dict[str, torch.BoolTensor]`, *optional*): extra masks of the test split to report (e.g.
            `"deduplicated"`: test images without a near-duplicate in training).
        train_features_mirrored (`Dict`, *optional*): the training images' features mirrored left-right, for
            `config.random_flip` (heads train on either view; validation and test images are scored as they are).

    Returns:
        `(results, probes)`: a JSON-able results dict, and the refit `TrainedProbe`s under `"sl_best"` and `"msfa"`.
    """
    config = ProbeConfig() if config is None else config
    label_names = checked_label_names(label_names)
    train_labels = _class_indices(train_labels, "train_labels", label_names)
    test_labels = _class_indices(test_labels, "test_labels", label_names)
    layers = list(dict.fromkeys(k[0] for k in train_features)) if layers is None else [layers] if isinstance(
        layers, str) else list(layers)
    timesteps = list(dict.fromkeys(k[1] for k in train_features)) if timesteps is None else [timesteps] if isinstance(
        timesteps, int) else list(timesteps)
    train_features = _checked_features(train_features, train_labels, layers, timesteps, "train_features")
    test_features = _checked_features(test_features, test_labels, layers, timesteps, "test_features")
    if train_features_mirrored is not None:
        train_features_mirrored = _checked_features(train_features_mirrored, train_labels, layers, timesteps,
                                                    "train_features_mirrored")
    num_labels = len(label_names)
    for name, labels in (("train_labels", train_labels), ("test_labels", test_labels)):
        if len(labels) and labels.max() >= num_labels:
            raise ValueError(f"`{name}` holds class {int(labels.max())}, but `label_names` names {num_labels} "
                             f"class(es): {list(label_names)}.")
    unseen = sorted(set(test_labels.tolist()) - set(train_labels.tolist()))
    if unseen:  # as `mic-diffrep probe` refuses such a split; here the heads train, and score 0 on those classes
        logger.warning("Test images of class(es) %s have no training images: the heads cannot predict them.",
                       [label_names[i] for i in unseen])
    validation_mask = torch.as_tensor(validation_mask)
    num_train = len(train_labels)
    if validation_mask.dtype != torch.bool:  # indices, as `group_stratified_split` returns them
        indices = validation_mask.long().reshape(-1)
        if len(indices) == num_train > 2 and set(indices.tolist()) <= {0, 1}:
            raise ValueError("`validation_mask` holds 0s and 1s for every training image: pass it as a bool mask "
                             "(`mask.bool()`), or pass the validation images' indices.")
        if len(indices) and (indices.min() < 0 or indices.max() >= num_train):
            raise ValueError(f"`validation_mask`: indices must be in [0, {num_train}), got {indices.tolist()[:5]}...")
        validation_mask = torch.zeros(num_train, dtype=torch.bool)
        validation_mask[indices] = True
    if validation_mask.shape != (num_train,):
        raise ValueError(f"`validation_mask` must be a bool mask of the {num_train} training images (or their "
                         f"indices), got shape {tuple(validation_mask.shape)}.")
    fit = ~validation_mask
    if fit.sum() == 0 or validation_mask.sum() == 0:
        raise ValueError("The validation split and the rest of the training split must both be non-empty.")
    keys = [(layer, t) for t in timesteps for layer in layers]

    def subset(features, mask):
        return {key: features[key][mask] for key in keys}

    if config.random_flip and train_features_mirrored is None:
        raise ValueError("`random_flip` needs `train_features_mirrored`: the training images' features mirrored.")
    mirrored = train_features_mirrored if config.random_flip else None

    def mirrored_inputs(sets):
        """The mirror images' MSFA inputs of each layer x timestep set, for `random_flip`; else None."""
        return None if mirrored is None else {c: concatenate(mirrored, *c) for c in sets}

    # The fit and validation parts, copied once for the sweep and the MSFA candidates (each candidate's inputs are
    # concatenated from them, never from every training image: those were all in memory at once, with their copies)
    fit_features, validation_features = subset(train_features, fit), subset(train_features, validation_mask)
    fit_mirrored = None if mirrored is None else subset(mirrored, fit)

    # 1. SL sweep: fit part -> validation accuracy (selection); whole training split -> test accuracy (Fig. 4).
    logger.info("SL sweep: %d linear heads", len(keys))
    fit_heads = train_heads(fit_features, train_labels[fit], num_labels, config, hidden_size=0, mirrored=fit_mirrored)
    sl_validation = {key: accuracy(fit_heads[key], validation_features[key], train_labels[validation_mask])
                     for key in keys}
    full_heads = train_heads({key: train_features[key] for key in keys}, train_labels, num_labels, config,
                             hidden_size=0, mirrored=mirrored)
    sl_test = {key: accuracy(full_heads[key], test_features[key], test_labels) for key in keys}

    # 2. MSFA candidates on validation.
    candidates = msfa_candidates(sl_validation, layers, timesteps)
    logger.info("MSFA: %d candidate layer x timestep sets", len(candidates))
    candidate_heads = train_heads(
        {c: concatenate(fit_features, *c) for c in candidates}, train_labels[fit], num_labels, config,
        hidden_size=config.hidden_size,
        mirrored=None if fit_mirrored is None else {c: concatenate(fit_mirrored, *c) for c in candidates})
    msfa_validation = {c: accuracy(candidate_heads[c], concatenate(validation_features, *c),
                                   train_labels[validation_mask]) for c in candidates}
    width = {c: sum(train_features[(layer, t)].shape[1] for t in c[1] for layer in c[0]) for c in candidates}
    best_msfa = max(candidates, key=lambda c: (msfa_validation[c], -width[c]))
    del fit_features, validation_features, fit_mirrored

    # 3. Refit on the whole training split: the chosen MSFA set, and the per-timestep MSFA curve of Fig. 4.
    per_timestep = [(tuple(layers), (t,)) for t in timesteps]
    refit_sets = list(dict.fromkeys(per_timestep + [best_msfa]))
    refit = train_heads({c: concatenate(train_features, *c) for c in refit_sets}, train_labels, num_labels, config,
                        hidden_size=config.hidden_size, mirrored=mirrored_inputs(refit_sets))
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
