"""Real-data smoke runs of the benchmarks (marked slow: `python -m pytest -m slow`; needs ../shared)."""

import json
import os
import subprocess
import sys

import pytest


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "..", "shared", "data", "brain-tumor-mri")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason="needs ../shared/data/brain-tumor-mri")


def _run(script, *args):
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), "--data_dir", DATA, *args], check=True)


@pytest.mark.slow
@needs_data
def test_brain_tumor_mri_benchmark_smoke(tmp_path):
    output = str(tmp_path / "out")
    _run("brain_tumor_mri.py", "--max_images", "300", "--pretrain_minutes", "0.05", "--unet", "mini",
         "--timesteps", "10", "100", "--baselines", "mae", "mocov2", "byol", "--work_dir", str(tmp_path / "work"),
         "--output", output)
    with open(output + ".json") as f:
        result = json.load(f)
    assert {"environment", "command", "results", "pretraining"} <= set(result)
    methods = {(r["protocol"], r["direction"], r["method"]) for r in result["results"]}
    for direction in ("sartaj->other", "other->sartaj"):
        for method in ("micdiffrep-ms", "micdiffrep-sl-best", "random-unet-ms", "pixels-logreg", "pixels-1nn"):
            assert ("cross-source", direction, method) in methods
    for method in ("baseline-mae", "baseline-mocov2", "baseline-byol"):
        assert ("in-split", None, method) in methods
        (row,) = [r for r in result["results"] if r["method"] == method and r["protocol"] == "in-split"]
        assert row["pretraining_steps"] > 0 and row["pretraining_images_per_second"] > 0
        assert row["pretraining_budget_minutes"] == 0.05
    for row in result["results"]:
        assert 0 <= row["accuracy"] <= 1 and set(row["per_class_recall"]) == {"glioma", "meningioma", "notumor",
                                                                               "pituitary"}
    assert os.path.isfile(output + "_samples.png") and os.path.isfile(output + ".md")
    with open(output + ".md") as f:
        table = f.read()
    assert "| CLIP | not run here" in table and "| MoCo v2 | 0." in table and "## Targets" in table


@pytest.mark.slow
@needs_data
def test_ablations_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    from ablations import READOUTS

    output = str(tmp_path / "ablations")
    _run("ablations.py", "--max_images", "200", "--proxy_minutes", "0.02", "--unet", "mini",
         "--work_dir", str(tmp_path / "work"), "--output", output)
    with open(output + ".json") as f:
        result = json.load(f)
    stages = {row["stage"] for row in result["rows"]}
    assert {"1 learning rate", "2 one lever", "4 second round", "5 third round", "6 fourth round", "7 fifth round",
            "8 sixth round", "9 seventh round", "10 eighth round", "11 ninth round", "12 read-out",
            "13 seed check"} <= stages
    assert result["chosen"]["recipe"] in {row["recipe"] for row in result["rows"]}
    assert set(READOUTS) <= {row["readout"] for row in result["rows"]}  # the probe-flips row included
    for row in result["rows"]:
        assert 0 <= row["validation_accuracy"] <= 1
    # Re-deciding from the results file measures nothing again and reaches the same choice.
    _run("ablations.py", "--max_images", "200", "--proxy_minutes", "0.02", "--unet", "mini", "--reuse_results",
         "--work_dir", str(tmp_path / "missing"), "--output", output)
    with open(output + ".json") as f:
        again = json.load(f)
    assert again["chosen"] == result["chosen"]
    assert [row["validation_accuracy"] for row in again["rows"]] == [row["validation_accuracy"] for row in result["rows"]]


@pytest.mark.slow
@needs_data
def test_budget_curve_smoke(tmp_path):
    """A curve of one seed, then a second seed on a machine without its runs or calibrations (another work folder):
    the second restores seed 0's calibration from the results file and trains seed 0's steps."""
    output = str(tmp_path / "curve")
    smoke = ["--max_images", "200", "--unet", "mini", "--minutes", "0.02", "--output", output]
    _run("budget_curve.py", *smoke, "--seeds", "0", "--work_dir", str(tmp_path / "work"))
    _run("budget_curve.py", *smoke, "--seeds", "0", "1", "--reuse_results", "--work_dir", str(tmp_path / "fresh"))
    with open(output + ".json") as f:
        points = json.load(f)["points"]
    assert [(p["method"], p["seed"]) for p in points] == [("micdiffrep", 0), ("mocov2", 0), ("micdiffrep", 1),
                                                          ("mocov2", 1)]
    for method in ("micdiffrep", "mocov2"):
        seed_0, seed_1 = (p for p in points if p["method"] == method)
        assert seed_1["steps"] == seed_0["steps"] > 0
        assert 0 <= seed_1["other->sartaj"]["accuracy"] <= 1
    assert os.path.isfile(output + ".png") and os.path.isfile(output + ".md")
