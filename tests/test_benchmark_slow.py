"""Real-data smoke run of the benchmark (marked slow: `python -m pytest -m slow`; needs ../shared)."""

import json
import os
import subprocess
import sys

import pytest


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "..", "shared", "data", "brain-tumor-mri")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(DATA), reason="needs ../shared/data/brain-tumor-mri")
def test_brain_tumor_mri_benchmark_smoke(tmp_path):
    output = str(tmp_path / "out")
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "brain_tumor_mri.py"), "--data_dir", DATA,
                    "--max_images", "300", "--pretrain_minutes", "0.3", "--throughput_minutes", "0.05",
                    "--probe_epochs", "3", "--timesteps", "10", "100", "--sampling_steps", "5",
                    "--baselines", "mae", "mocov2", "byol",
                    "--work_dir", str(tmp_path / "work"), "--output", output], check=True)
    with open(output + ".json") as f:
        result = json.load(f)
    assert {"environment", "command", "results"} <= set(result)
    methods = {(r["protocol"], r["direction"], r["method"]) for r in result["results"]}
    for direction in ("sartaj->other", "other->sartaj"):
        for method in ("micdiffrep-ms", "micdiffrep-sl-best", "random-unet-ms", "pixels-logreg", "pixels-1nn"):
            assert ("cross-source", direction, method) in methods
    for method in ("baseline-mae", "baseline-mocov2", "baseline-byol"):
        assert ("in-split", None, method) in methods
        (summary,) = [r for r in result["results"] if r["method"] == method and r["protocol"] == "in-split"]
        assert 0 < summary["pretraining_minutes"] <= 0.3 * 1.5 and summary["pretraining_images_per_second"] > 0
    assert ("in-split", None, "micdiffrep-ms") in methods
    for row in result["results"]:
        assert 0 <= row["accuracy"] <= 1 and set(row["per_class_recall"]) == {"glioma", "meningioma", "notumor",
                                                                               "pituitary"}
    assert os.path.isfile(output + "_samples.png") and os.path.isfile(output + ".md")
    with open(output + ".md") as f:
        table = f.read()
    assert "| CLIP | not run |" in table and "| MoCo v2 | 0." in table
