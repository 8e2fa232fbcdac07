"""The decision rules of the benchmark scripts (fast; the real-data runs are in test_benchmark_slow.py)."""

import os
import sys

import pytest


sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
ablations = pytest.importorskip("ablations")


def test_readout_cost_counts_unet_forwards():
    assert ablations.readout_cost("sweep 10-250") == 5
    assert ablations.readout_cost("4 noise draws") == 20


@pytest.mark.parametrize("scores, chosen", [
    ({"sweep 10-250": 0.900, "sweep 0-250": 0.895, "4 noise draws": 0.901}, "sweep 10-250"),  # a tie: the cheapest
    ({"sweep 10-250": 0.880, "sweep 0-250": 0.897, "4 noise draws": 0.901}, "sweep 0-250"),   # cheaper and close
    ({"sweep 10-250": 0.880, "sweep 0-250": 0.880, "4 noise draws": 0.901}, "4 noise draws"),  # a clear win
])
def test_choose_readout_takes_the_cheapest_within_tolerance(scores, chosen):
    assert ablations.choose_readout(scores) == chosen


def test_the_benchmarks_mae_recipe_is_the_package_default():
    common = pytest.importorskip("common")
    from transformers import HfArgumentParser

    from mic_diffrep.commands.base import settings_from
    from mic_diffrep.training import BaselinePretrainingArguments

    name, flags = common.BASELINE_RECIPES["mae"]
    assert name != "mae"  # runs made with the shared settings before keep their folder
    parser = HfArgumentParser(BaselinePretrainingArguments)
    given = settings_from(BaselinePretrainingArguments,
                          parser.parse_args(["--method", "mae", "--train_data_dir", "data", *flags]))
    default = BaselinePretrainingArguments(method="mae", train_data_dir="data")
    assert given == default and common.baseline_recipe("byol") == {}
