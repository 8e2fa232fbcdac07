"""Probing frozen features: heads (`heads`), selection on validation and test scoring (`selection`), the probe's
splits (`splits`), its outputs (`export`), and the whole probe (`probe.run_probe`, settings in `arguments`)."""

from .arguments import ProbeArguments
from .export import probe_classifier
from .heads import ProbeConfig, TrainedProbe, accuracy, standardization, train_heads
from .probe import cached_features, run_probe
from .selection import msfa_candidates, run_probes
from .splits import ProbeSplits, load_probe_splits


__all__ = ["ProbeArguments", "ProbeConfig", "ProbeSplits", "TrainedProbe", "accuracy", "cached_features",
           "load_probe_splits", "msfa_candidates", "probe_classifier", "run_probe", "run_probes", "standardization",
           "train_heads"]
