"""The decision rules of the benchmark scripts (fast; the real-data runs are in test_benchmark_slow.py)."""

import argparse
import json
import os
import re
import shutil
import sys

import pytest


sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
ablations = pytest.importorskip("ablations")


def test_readout_cost_counts_unet_forwards():
    assert ablations.readout_cost("sweep 10-250") == 5
    assert ablations.readout_cost("4 noise draws") == 20
    assert ablations.readout_cost("flip average") == 10


def test_an_ablation_recipe_means_the_same_whatever_the_package_defaults():
    """"paper" is the paper's optimiser and uniform timesteps, though the package defaults are the chosen recipe."""
    common = pytest.importorskip("common")
    paper = common.training_settings("micdiffrep", ["--train_data_dir", "data", *ablations.PAPER_FLAGS])
    assert (paper["learning_rate"], paper["lr_scheduler"], paper["lr_warmup_steps"], paper["timestep_power"]) == (
        1e-4, "linear", 0, 1.0)
    second = ablations.merge_flags(ablations.PAPER_FLAGS, ["--timestep_power", "2"], ["--timestep_power", "3"])
    assert common.training_settings("micdiffrep", ["--train_data_dir", "data", *second])["timestep_power"] == 3.0


def test_a_run_names_its_data_by_the_real_path(tmp_path):
    """`../shared/data` and the folder it resolves to are one data set: a run or calibration made with one is reused
    with the other, not refused for other settings."""
    common = pytest.importorskip("common")
    (tmp_path / "shared" / "data" / "Training").mkdir(parents=True)
    (tmp_path / "main").mkdir()
    by_link = common.common_argv(str(tmp_path / "main" / ".." / "shared" / "data"), "work", 64, 0)
    direct = common.common_argv(str(tmp_path / "shared" / "data"), "work", 64, 0)
    assert by_link == direct and os.path.realpath(tmp_path / "shared" / "data" / "Training") in direct


def test_a_run_made_with_other_settings_is_refused_not_reused(tmp_path, monkeypatch):
    common = pytest.importorskip("common")
    argv = ["--train_data_dir", "data", "--learning_rate", "2e-3"]
    calibration = {"steps_per_second": 1.0, "images_per_second": 32.0,
                   "settings": common.training_settings("micdiffrep", argv)}
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "recipe.json").write_text(common.json.dumps(calibration))
    trained = []
    monkeypatch.setattr(common, "run_pretraining", lambda method, argv: trained.append(argv) or {"global_step": 60})
    monkeypatch.setattr(common, "common_argv", lambda *args: ["--train_data_dir", "data"])
    run = common.pretrain_for_budget("micdiffrep", 1, str(tmp_path), "data", recipe_argv=["--learning_rate", "2e-3"],
                                     name="recipe")
    assert run["planned_steps"] == 60 and len(trained) == 1
    (tmp_path / "recipe-1min" / "pretraining_summary.json").write_text('{"global_step": 60}')
    common.pretrain_for_budget("micdiffrep", 1, str(tmp_path), "data", recipe_argv=["--learning_rate", "2e-3"],
                               name="recipe")
    assert len(trained) == 1  # reused
    with pytest.raises(ValueError, match=r"calibration.*learning_rate: 0.002 there, 0.001 now"):
        common.pretrain_for_budget("micdiffrep", 1, str(tmp_path), "data", name="recipe")
    with open(tmp_path / "calibration" / "recipe.json", "w") as f:  # a stale calibration alone would not catch it
        common.json.dump(dict(calibration, settings=None), f)
    with pytest.raises(ValueError, match=r"recipe-1min was made with other pretraining settings"):
        common.pretrain_for_budget("micdiffrep", 1, str(tmp_path), "data", name="recipe")


def test_an_interrupted_run_stops_the_script_and_is_continued_not_reused(tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM stopped the pretraining (which saved a checkpoint and returned), and the script went on:
    a cut-short calibration was recorded, and the interrupted run's summary was reused as a finished run's."""
    common = pytest.importorskip("common")
    monkeypatch.setattr(common, "pretrain", lambda args: {"stop_reason": "interrupted", "global_step": 57})
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 57"):
        common.run_pretraining("micdiffrep", ["--train_data_dir", "data", "--output_dir", str(tmp_path / "x")])

    argv = ["--train_data_dir", "data"]
    calibration = {"steps_per_second": 1.0, "images_per_second": 32.0,
                   "settings": common.training_settings("micdiffrep", argv)}
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "recipe.json").write_text(common.json.dumps(calibration))
    (tmp_path / "recipe-1min").mkdir()
    (tmp_path / "recipe-1min" / "pretraining_summary.json").write_text(
        '{"global_step": 30, "stop_reason": "interrupted"}')
    trained = []
    monkeypatch.setattr(common, "run_pretraining",
                        lambda method, argv: trained.append(argv) or {"global_step": 60, "stop_reason": "max_train_steps"})
    monkeypatch.setattr(common, "common_argv", lambda *args: ["--train_data_dir", "data"])
    run = common.pretrain_for_budget("micdiffrep", 1, str(tmp_path), "data", name="recipe")
    assert len(trained) == 1 and "--resume_from_checkpoint" in trained[0] and run["summary"]["global_step"] == 60


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


def test_a_round_combines_the_winning_levers_and_keeps_the_best():
    scores = {"start + wide": 0.91, "start + slow": 0.85, "start + fast": 0.92, "start + wide + fast": 0.93}
    evaluated = []
    ablation = object.__new__(ablations.Ablation)
    ablation.evaluate = lambda stage, name, flags, seed=0, **calibration: evaluated.append(
        (stage, name, flags)) or {"validation_accuracy": scores[name]}
    levers = {"wide": ["--width", "2"], "slow": ["--lr", "1"], "fast": ["--lr", "3"]}
    chosen, candidates = ablation.round("5 third round", "start", (["--lr", "2"], 0.90), levers)
    assert chosen == "start + wide + fast"
    assert candidates[chosen] == (["--lr", "3", "--width", "2"], 0.93)  # a lever's flag replaces the recipe's
    assert [stage for stage, _, _ in evaluated] == ["5 third round"] * 3 + ["5 combined"]
    assert "start + slow" not in candidates  # lost to its starting point: not combined


def test_a_confirmed_round_keeps_a_lever_only_if_it_wins_on_two_seeds():
    scores = {("start", 0): 0.90, ("start", 1): 0.92, ("start + lucky", 0): 0.91, ("start + lucky", 1): 0.90,
              ("start + real", 0): 0.915, ("start + real", 1): 0.93, ("start + worse", 0): 0.89}
    evaluated = []
    ablation = object.__new__(ablations.Ablation)
    ablation.evaluate = lambda stage, name, flags, seed=0, **calibration: evaluated.append(
        (name, seed)) or {
        "validation_accuracy": scores[name, seed]}
    levers = {"lucky": ["--a"], "real": ["--b"], "worse": ["--c"]}
    chosen, candidates = ablation.round("6 fourth round", "start", (["--lr", "2"], 0.90), levers, confirm=True)
    # start: (0.90 + 0.92) / 2 = 0.91; lucky: 0.905 (out); real: 0.9225 (kept); worse lost on seed 0: no second seed
    assert chosen == "start + real" and candidates[chosen][1] == pytest.approx(0.9225)
    assert candidates["start"][1] == pytest.approx(0.91) and "start + lucky" not in candidates
    assert ("start + worse", 1) not in evaluated and ("start", 1) in evaluated


def test_a_start_chosen_in_a_confirmed_round_is_scored_by_its_two_seeds_once():
    """The start's score passed on from a confirmed round is its two-seed mean: averaged with its seed 1 again, seed 1
    counted three times in four, and a lever of mean 0.925 beat a start of mean 0.9255."""
    scores = {("start", 0): 0.931, ("start", 1): 0.920, ("start + lever", 0): 0.930, ("start + lever", 1): 0.920}
    ablation = object.__new__(ablations.Ablation)
    ablation.evaluate = lambda stage, name, flags, seed=0, **calibration: {"validation_accuracy": scores[name, seed]}
    chosen, candidates = ablation.round("10 eighth round", "start", (["--lr", "2"], 0.9255), {"lever": ["--b"]},
                                        confirm=True)
    assert chosen == "start" and candidates["start"][1] == pytest.approx(0.9255)


def test_a_lever_of_the_same_compute_trains_its_starting_recipes_steps(monkeypatch):
    """min-SNR weighting changes the loss only: it shares the calibration of the recipe it starts from, on both seeds."""
    assert "min-snr-5" in ablations.SAME_COMPUTE and set(ablations.SAME_COMPUTE) <= {
        lever for _, levers, _ in ablations.ROUNDS.values() for lever in levers}
    assert "batch-16" in ablations.MEASURED_AGAINST_START and set(ablations.MEASURED_AGAINST_START) <= {
        lever for _, levers, _ in ablations.ROUNDS.values() for lever in levers}
    evaluated = []
    ablation = object.__new__(ablations.Ablation)
    ablation.evaluate = lambda stage, name, flags, seed=0, **calibration: evaluated.append(
        (name, seed, calibration)) or {"validation_accuracy": 0.95 if "+" in name else 0.90}
    monkeypatch.setattr(ablations, "SAME_COMPUTE", {"weighted"})
    monkeypatch.setattr(ablations, "MEASURED_AGAINST_START", {"smaller-batch"})
    levers = {"weighted": ["--snr_gamma", "5"], "wider": ["--width", "2"], "smaller-batch": ["--batch", "16"]}
    ablation.round("7 fifth round", "start", (["--lr", "2"], 0.90), levers, confirm=True)
    calibrations = {(name, seed): calibration for name, seed, calibration in evaluated}
    start = ("start", ["--lr", "2"])
    assert calibrations["start + weighted", 0] == calibrations["start + weighted", 1] == {"calibrated_as": start}
    assert calibrations["start + wider", 0] == calibrations["start + wider", 1] == {}
    assert calibrations["start + smaller-batch", 0] == calibrations["start + smaller-batch", 1] == {
        "calibrated_against": start}


def test_the_validation_noise_floor_shrinks_with_more_images():
    small = ablations.validation_standard_error({"a": 400, "b": 400}, 0.9)
    assert small == pytest.approx(0.0106, abs=1e-4)  # sqrt(0.9 * 0.1 / 400) / sqrt(2)
    assert ablations.validation_standard_error({"a": 1600, "b": 1600}, 0.9) == pytest.approx(small / 2)


def test_remeasured_readouts_are_dropped_from_the_reused_rows(tmp_path, monkeypatch):
    rows = [{"recipe": "start", "readout": readout} for readout in ("sweep 10-250", "flip average")]
    output = tmp_path / "ablations"
    output.with_suffix(".json").write_text(json.dumps({"proxy_minutes": 8.0, "resolution": 64, "rows": rows}))
    argv = ["ablations.py", "--output", str(output), "--reuse_results"]
    monkeypatch.setattr(sys, "argv", argv + ["--remeasure", "flip average"])
    assert [row["readout"] for row in ablations.reusable_rows(ablations.parse_args())] == ["sweep 10-250"]
    monkeypatch.setattr(sys, "argv", argv + ["--proxy_minutes", "10"])  # another budget: nothing to reuse
    assert ablations.reusable_rows(ablations.parse_args()) == []
    monkeypatch.setattr(sys, "argv", ["ablations.py", "--remeasure", "flip average"])
    with pytest.raises(SystemExit):
        ablations.parse_args()


def test_an_interrupted_search_keeps_the_reused_rows_it_has_not_reached(tmp_path, monkeypatch):
    """A search reusing a results file rewrites it after every row: the rows it has not reached yet (later rounds,
    read-outs) were dropped from the file when it was stopped."""
    row = lambda recipe, readout="sweep 10-250": {"recipe": recipe, "flags": [f"--{recipe}"], "readout": readout,
                                                  "seed": 0}
    written = []
    monkeypatch.setattr(ablations, "write_results", lambda output, result, markdown: written.append(result))
    monkeypatch.setattr(ablations, "markdown", lambda result: "")
    ablation = object.__new__(ablations.Ablation)
    ablation.args = argparse.Namespace(levers=[], output=str(tmp_path / "ablations"), proxy_minutes=8.0, note="",
                                       resolution=64, unet="base", max_images=None,
                                       **{flag: [] for flag, _, _ in ablations.ROUNDS.values()})
    ablation.splits = {}
    ablation.previous = [row("start"), row("start", "flip average"), row("start + lever")]
    ablation.rows = [dict(row("start"), stage="1 learning rate"), row("start + new")]
    measured_on = {"processor": "the measuring machine", "cpu_count": 2, "torch": "2.0"}
    ablation.recorded, ablation.measured = {"environment": measured_on, "note": "what else ran"}, 1
    ablation.save()
    assert written[-1]["environment"] != measured_on and written[-1]["note"] == ""  # rows measured: this machine
    assert [(r["recipe"], r["readout"]) for r in written[-1]["rows"]] == [
        ("start", "sweep 10-250"), ("start + new", "sweep 10-250"), ("start", "flip average"),
        ("start + lever", "sweep 10-250")]
    ablation.save(chosen={"recipe": "start"})  # the finished search: the rows it reached
    assert [r["recipe"] for r in written[-1]["rows"]] == ["start", "start + new"]
    # A re-render (every row reused, nothing measured) kept the recorded rows but stamped this machine's versions
    ablation.measured = 0
    ablation.save(chosen={"recipe": "start"})
    assert written[-1]["environment"] == measured_on and written[-1]["note"] == "what else ran"


def test_every_readout_but_the_pooling_ones_is_average_pooled():
    """The rows were measured with average pooling: a new package default must not change what they mean."""
    pooling = {name: args.pooling for name, args in ablations.READOUTS.items()}
    assert pooling.pop("avg+max pooling") == "avgmax"
    assert pooling.pop("2x2 grid pooling") == "grid"
    for readout, features_of in ablations.PROBE_FLIPS.items():  # a probe variant reads out as the read-out it names
        assert pooling.pop(readout) == ablations.READOUTS[features_of].pooling
        assert ablations.readout_cost(readout) == ablations.readout_cost(features_of)
    assert set(pooling.values()) == {"avg"}


def test_benchmark_readout_keeps_the_package_default_unless_a_flag_is_given():
    common = pytest.importorskip("common")
    from mic_diffrep.features import FeatureArguments

    assert common.readout_arguments() == FeatureArguments()
    args = common.readout_arguments(True, "avg", [10])
    assert (args.flip_average, args.pooling, args.timesteps) == (True, "avg", [10])
    assert common.feature_cache_name("run", args) == "run-flip"
    assert common.feature_cache_name("run", FeatureArguments(pooling="avgmax")) == "run-avgmax"


def test_validation_test_agreement_ranks_recipes_and_readouts_apart():
    def row(recipe, readout, validation, test, stage="2 one lever", seed=0):
        scores = {"validation_accuracy": validation, "test_accuracy": test, "test_accuracy_deduplicated": test}
        return {"recipe": recipe, "readout": readout, "seed": seed, "stage": stage,
                "sartaj->other": scores, "other->sartaj": scores}

    rows = [row("a", "sweep 10-250", 0.80, 0.70), row("b", "sweep 10-250", 0.85, 0.75),
            row("c", "sweep 10-250", 0.90, 0.80), row("c", "sweep 10-250", 0.99, 0.10, seed=1),
            row("c", "flip", 0.88, 0.90, "7 read-out"), row("c", "pool", 0.91, 0.60, "7 read-out")]
    lines = ablations.validation_test_agreement(rows)
    recipes = next(line for line in lines if line.startswith("| recipes"))
    readouts = next(line for line in lines if line.startswith("| read-outs"))
    assert recipes.endswith("| 3 | +1.00 | +1.00 | +1.00 | +1.00 |")  # the seed-1 row is left out
    assert readouts.endswith("| 3 | -1.00 | -1.00 | -1.00 | -1.00 |")  # c: sweep, flip, pool: reversed
    assert ablations.rank_correlation([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)


def test_a_second_seed_gets_its_own_run_and_seed_0s_calibration(tmp_path, monkeypatch):
    """A seed changes no compute: seed 1 trains as many steps as seed 0, in its own folder, with its own seed."""
    common = pytest.importorskip("common")
    calibrated, trained = [], []
    monkeypatch.setattr(common, "calibrate", lambda method, name, work_dir, argv, reference=None: calibrated.append(
        (name, argv)) or {
        "steps_per_second": 1.0, "settings": {}})
    monkeypatch.setattr(common, "run_pretraining", lambda method, argv: trained.append(argv) or {"global_step": 60})
    run = common.pretrain_for_budget("mocov2", 1, str(tmp_path), "data", seed=1)
    assert os.path.basename(run["output_dir"]) == "mocov2-seed1-1min" and run["planned_steps"] == 60
    assert calibrated[0][0] == "mocov2" and calibrated[0][1][calibrated[0][1].index("--seed") + 1] == "0"
    assert trained[0][trained[0].index("--seed") + 1] == "1"
    assert trained[0][trained[0].index("--max_train_steps") + 1] == "60"
    with open(os.path.join(run["output_dir"], "benchmark_settings.json")) as f:
        assert common.json.load(f)["seed"] == 1  # a seed-0 run in this folder would be refused
    run = common.pretrain_for_budget("mocov2", 1, str(tmp_path), "data")
    assert os.path.basename(run["output_dir"]) == "mocov2-1min"  # seed 0: the name runs have always had
    assert calibrated[1] == calibrated[0]


def test_a_recipe_of_the_same_compute_shares_anothers_calibration(tmp_path, monkeypatch):
    common = pytest.importorskip("common")
    calibrated = []
    monkeypatch.setattr(common, "calibrate", lambda method, name, work_dir, argv, reference=None: calibrated.append(
        (name, argv)) or {
        "steps_per_second": 2.0, "settings": {}})
    monkeypatch.setattr(common, "run_pretraining", lambda method, argv: {"global_step": 120})
    run = common.pretrain_for_budget("micdiffrep", 1, str(tmp_path), "data", recipe_argv=["--snr_gamma", "5"],
                                     name="weighted", calibrated_as=("plain", ["--timestep_power", "3"]))
    assert os.path.basename(run["output_dir"]) == "weighted-1min" and run["planned_steps"] == 120
    name, argv = calibrated[0]
    assert name == "plain" and "--snr_gamma" not in argv and argv[argv.index("--timestep_power") + 1] == "3"
    with open(os.path.join(run["output_dir"], "benchmark_settings.json")) as f:
        assert common.json.load(f)["snr_gamma"] == 5.0  # the run records its own recipe


def test_a_restored_calibration_trains_the_recorded_steps_and_never_replaces_a_measured_one(tmp_path, monkeypatch):
    """On a fresh machine a lever of the same compute trains what its start's recorded row did, not a new
    measurement's steps."""
    common = pytest.importorskip("common")
    monkeypatch.setattr(common, "run_pretraining", lambda method, argv: {"global_step": int(
        argv[argv.index("--max_train_steps") + 1])})
    recipe = ["--timestep_power", "3"]
    for planned in [1742, 1741, 997]:
        work_dir = str(tmp_path / str(planned))
        common.restore_calibration("micdiffrep", "plain", work_dir, "data", 64, recipe, planned, 8, 116.1, "ab.json")
        run = common.pretrain_for_budget("micdiffrep", 8, work_dir, "data", recipe_argv=["--snr_gamma", "5"],
                                         name="weighted", calibrated_as=("plain", recipe))
        assert run["planned_steps"] == planned and run["calibration"]["restored_from"] == "ab.json"
    common.restore_calibration("micdiffrep", "plain", work_dir, "data", 64, recipe, 10, 8, 1.0, "other.json")
    with open(os.path.join(work_dir, "calibration", "plain.json")) as f:
        assert common.json.load(f)["restored_from"] == "ab.json"  # a cached calibration is left alone
    with pytest.raises(ValueError, match="timestep_power"):  # and checked against the recipe as a measured one is
        common.pretrain_for_budget("micdiffrep", 8, work_dir, "data", recipe_argv=["--snr_gamma", "5"],
                                   name="other", calibrated_as=("plain", ["--timestep_power", "2"]))


def test_a_recipe_measured_against_a_recorded_one_trains_the_steps_of_the_recorded_machine(tmp_path, monkeypatch):
    """On a machine half as fast as the one the start's calibration was recorded on, a lever of another compute is
    scaled back by the start's speed measured here, before and after it: it trains the steps the recorded machine
    would have given it, not half as many."""
    common = pytest.importorskip("common")
    speeds = {"plain-now": iter([1.9, 2.1]), "smaller": iter([3.6])}  # the start measured 2.0 here, recorded 4.0
    measured = []
    monkeypatch.setattr(common, "measure_throughput", lambda method, name, work_dir, argv: measured.append(name) or {
        "steps_per_second": next(speeds[name]), "images_per_step": 16.0, "calibration_seconds": [1.0, 2.0]})
    monkeypatch.setattr(common, "run_pretraining", lambda method, argv: {"global_step": int(
        argv[argv.index("--max_train_steps") + 1])})
    common.restore_calibration("micdiffrep", "plain", str(tmp_path), "data", 64, [], 1920, 8, 128.0, "ab.json")
    run = common.pretrain_for_budget("micdiffrep", 8, str(tmp_path), "data", recipe_argv=["--train_batch_size", "16"],
                                     name="smaller", calibrated_against=("plain", []))
    assert measured == ["plain-now", "smaller", "plain-now"]  # back to back, the start on either side
    assert run["calibration"]["reference"]["machine_speed"] == pytest.approx(2.0 / 4.0, rel=1e-3)
    recorded_speed = (1920 + 0.5) / (8 * 60)  # the restored calibration's steps/s
    assert run["planned_steps"] == int(8 * 60 * 3.6 * recorded_speed / 2.0) == 3456  # not the 1728 of 3.6 steps/s
    assert run["calibration"]["images_per_second"] == pytest.approx(16.0 * run["calibration"]["steps_per_second"])
    # cached: a second seed (or a rerun) trains the same steps without measuring again
    again = common.pretrain_for_budget("micdiffrep", 8, str(tmp_path), "data", recipe_argv=["--train_batch_size", "16"],
                                       name="smaller", seed=1, calibrated_against=("plain", []))
    assert again["planned_steps"] == run["planned_steps"] and len(measured) == 3
    with pytest.raises(ValueError, match="not both"):
        common.pretrain_for_budget("micdiffrep", 8, str(tmp_path), "data", name="x", calibrated_as=("plain", []),
                                   calibrated_against=("plain", []))


def test_the_ablation_restores_a_calibration_from_its_starts_seed_0_row(tmp_path, monkeypatch):
    restored = []
    monkeypatch.setattr(ablations, "restore_calibration", lambda *args: restored.append(args))
    ablation = object.__new__(ablations.Ablation)
    ablation.args = argparse.Namespace(work_dir=str(tmp_path), data_dir="data", resolution=64, proxy_minutes=8,
                                       unet="base", output="results/ablations")
    ablation.rows = [{"recipe": "start", "flags": ["--a"], "seed": 1, "planned_steps": 900, "images_per_second": 1}]
    ablation.previous = [{"recipe": "start", "flags": ["--a"], "seed": 0, "planned_steps": 1742,
                          "images_per_second": 116.1}]
    ablation.restore_calibration("start", ["--a"])
    ablation.restore_calibration("unrecorded", ["--b"])  # nothing to restore from: calibrated as before
    assert len(restored) == 1
    method, name, _, _, _, argv, steps, minutes, speed, source = restored[0]
    assert (name, steps, minutes, speed, source) == ("ablation-start", 1742, 8, 116.1, "results/ablations.json")
    assert argv[-1] == "--a" and "--learning_rate" in argv  # the recipe as the search trains it


def test_a_setting_added_since_a_run_was_recorded_matches_only_when_left_off():
    common = pytest.importorskip("common")
    recorded = {"learning_rate": 1e-3}
    common.check_settings("run", recorded, {"learning_rate": 1e-3, "snr_gamma": None, "self_conditioning": False})
    with pytest.raises(ValueError, match="self_conditioning: None there, True now"):
        common.check_settings("run", recorded, {"learning_rate": 1e-3, "self_conditioning": True})
    with pytest.raises(ValueError, match="snr_gamma: None there, 5.0 now"):
        common.check_settings("run", recorded, {"learning_rate": 1e-3, "snr_gamma": 5.0})
    with pytest.raises(ValueError, match="learning_rate"):
        common.check_settings("run", recorded, {"learning_rate": 2e-3})


def test_the_budget_curve_averages_seeds_and_crosses_on_the_means():
    budget_curve = pytest.importorskip("budget_curve")

    def point(method, minutes, seed, accuracy):
        scores = {"accuracy": accuracy, "accuracy_deduplicated": accuracy - 0.1}
        return {"method": method, "minutes": minutes, "seed": seed, "steps": 10,
                "sartaj->other": scores, "other->sartaj": scores}

    points = [point("micdiffrep", 10, 0, 0.70), point("micdiffrep", 10, 1, 0.74), point("mocov2", 10, 0, 0.75),
              point("micdiffrep", 30, 0, 0.90), point("mocov2", 30, 0, 0.80)]
    means = budget_curve.mean_points(points)
    mine = next(p for p in means if (p["method"], p["minutes"]) == ("micdiffrep", 10))
    assert mine["sartaj->other"]["accuracy"] == pytest.approx(0.72) and mine["seeds"] == [0, 1]
    assert mine["sartaj->other"]["range"]["accuracy"] == pytest.approx(0.04)
    # the means: micdiffrep 0.72 -> 0.90, mocov2 0.75 -> 0.80: they cross where -0.03 + 0.13 * f = 0
    assert budget_curve.crossing(means, "sartaj->other", "accuracy") == pytest.approx(10 + 20 * 0.03 / 0.13)


def test_the_budget_curve_reuses_a_recorded_point_only_for_the_same_run_and_readout():
    budget_curve = pytest.importorskip("budget_curve")
    avgmax = {"pooling": "avgmax", "flip_average": False}
    old = {"method": "micdiffrep", "minutes": 30.0, "seed": 0, "steps": 6884}  # recorded before points named them
    new = {"method": "mocov2", "minutes": 30.0, "seed": 1, "steps": 5326, "run": "mocov2", "readout": avgmax}
    previous = [old, new]
    assert budget_curve.reusable_point(previous, "micdiffrep", 30.0, 0, "micdiffrep-small-power3", avgmax) is old
    assert budget_curve.reusable_point(previous, "micdiffrep", 30.0, 1, "micdiffrep-small-power3", avgmax) is None
    assert budget_curve.reusable_point(previous, "mocov2", 30.0, 1, "mocov2", avgmax) is new
    assert budget_curve.reusable_point(previous, "mocov2", 30.0, 1, "mocov2-lr3e-3", avgmax) is None  # another recipe
    assert budget_curve.reusable_point(previous, "mocov2", 30.0, 1, "mocov2", dict(avgmax, pooling="avg")) is None
    assert budget_curve.reusable_point(previous, "mocov2", 10.0, 1, "mocov2", avgmax) is None


def test_the_budget_curve_takes_points_recorded_in_another_results_file(tmp_path, monkeypatch):
    """`--reuse_from`: a curve with more seeds takes the points another run of the script recorded (after those of
    OUTPUT.json), and refuses a file that is not there by its flag."""
    budget_curve = pytest.importorskip("budget_curve")

    def point(method, minutes, seed, accuracy):
        scores = {"accuracy": accuracy, "accuracy_deduplicated": accuracy - 0.1, "validation_accuracy": 0.95}
        return {"method": method, "minutes": minutes, "seed": seed, "steps": 10,
                "sartaj->other": scores, "other->sartaj": scores}

    output, seeds = tmp_path / "budget_curve", tmp_path / "seeds_30min.json"
    mine = [point(m, minutes, 0, 0.8) for m in ("micdiffrep", "mocov2") for minutes in (10.0, 30.0)]
    (tmp_path / "budget_curve.json").write_text(json.dumps({"points": mine}))
    theirs = [point("micdiffrep", 30.0, 0, 0.1), *(point(m, 30.0, 1, 0.7) for m in ("micdiffrep", "mocov2"))]
    seeds.write_text(json.dumps({"points": theirs}))
    argv = ["budget_curve.py", "--output", str(output), "--minutes", "10", "30", "--seeds", "0", "1",
            "--reuse_results", "--recorded_only"]
    monkeypatch.setattr(sys, "argv", argv + ["--reuse_from", str(seeds)])
    budget_curve.main()
    points = json.loads((tmp_path / "budget_curve.json").read_text())["points"]
    assert [(p["method"], p["minutes"], p["seed"]) for p in points] == [
        ("micdiffrep", 10.0, 0), ("mocov2", 10.0, 0), ("micdiffrep", 30.0, 0), ("mocov2", 30.0, 0),
        ("micdiffrep", 30.0, 1), ("mocov2", 30.0, 1)]  # 10 min, seed 1: recorded nowhere, left out
    assert points[2]["sartaj->other"]["accuracy"] == 0.8  # OUTPUT.json's own point first
    monkeypatch.setattr(sys, "argv", argv + ["--reuse_from", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit):
        budget_curve.main()


def test_a_new_seed_restores_the_calibration_of_the_file_its_seed_0_point_came_from(tmp_path, monkeypatch):
    """The measuring path of `main`: a seed recorded nowhere is pretrained with seed 0's calibration, restored from
    the results file (here a `--reuse_from` one) that recorded seed 0's point, and probed in both directions."""
    budget_curve = pytest.importorskip("budget_curve")
    avgmax = {"pooling": "avgmax", "flip_average": False}
    scores = {"accuracy": 0.8, "accuracy_deduplicated": 0.7, "validation_accuracy": 0.9}
    runs = {"micdiffrep": "micdiffrep-small-power3", "mocov2": "mocov2"}
    theirs = [{"method": m, "minutes": 10.0, "seed": 0, "steps": 100 + i, "run": run, "readout": avgmax,
               "sartaj->other": scores, "other->sartaj": scores} for i, (m, run) in enumerate(runs.items())]
    (tmp_path / "seeds.json").write_text(json.dumps({"points": theirs}))
    restored, pretrained = [], []

    class Bench:
        def __init__(self, *args, **kwargs):
            pass

        def split(self, direction):
            return direction

    def probe(features, bench, split, config):
        accuracy = 0.6 if split == "sartaj->other" else 0.5
        return {"msfa": {"test": {"all": {"accuracy": accuracy}, "deduplicated": {"accuracy": accuracy - 0.1}},
                         "validation_accuracy": 0.9}}

    monkeypatch.setattr(budget_curve, "Benchmark", Bench)
    monkeypatch.setattr(budget_curve, "restore_calibration",
                        lambda method, name, *args: restored.append((method, name, args[-4], args[-1])))
    monkeypatch.setattr(budget_curve, "pretrain_for_budget", lambda method, minutes, work_dir, data_dir, resolution,
                        seed, **recipe: pretrained.append((method, seed)) or {"output_dir": method,
                                                                            "summary": {"global_step": 100}})
    monkeypatch.setattr(budget_curve, "load_extractor", lambda method, output_dir: None)
    monkeypatch.setattr(budget_curve, "cached_extract", lambda *args: ("features",))
    monkeypatch.setattr(budget_curve, "probe_protocol", probe)
    monkeypatch.setattr(sys, "argv", ["budget_curve.py", "--output", str(tmp_path / "curve"), "--minutes", "10",
                                      "--seeds", "0", "1", "--reuse_results", "--reuse_from",
                                      str(tmp_path / "seeds.json")])
    budget_curve.main()
    assert pretrained == [("micdiffrep", 1), ("mocov2", 1)]  # seed 0 reused, seed 1 measured
    assert restored == [("micdiffrep", "micdiffrep-small-power3", 100, str(tmp_path / "seeds.json")),
                        ("mocov2", "mocov2", 101, str(tmp_path / "seeds.json"))]
    points = json.loads((tmp_path / "curve.json").read_text())["points"]
    assert [(p["method"], p["seed"]) for p in points] == [("micdiffrep", 0), ("mocov2", 0), ("micdiffrep", 1),
                                                          ("mocov2", 1)]
    assert points[2]["other->sartaj"] == {"accuracy": 0.5, "accuracy_deduplicated": 0.4, "validation_accuracy": 0.9}


def test_the_budget_curve_checks_the_target_against_the_best_baseline_on_the_means(tmp_path):
    budget_curve = pytest.importorskip("budget_curve")

    def point(method, seed, accuracy):
        scores = {"accuracy": accuracy, "accuracy_deduplicated": accuracy - 0.1, "validation_accuracy": 0.95}
        return {"method": method, "minutes": 30, "seed": seed, "steps": 10,
                "sartaj->other": scores, "other->sartaj": scores}

    points = [point("micdiffrep", 0, 0.90), point("micdiffrep", 1, 0.86), point("mocov2", 0, 0.85),
              point("mocov2", 1, 0.85), point("byol", 0, 0.83), point("byol", 1, 0.89)]
    gap = budget_curve.target_gaps(budget_curve.mean_points(points))[30]["other->sartaj"]["accuracy_deduplicated"]
    # the means: micdiffrep 0.78, byol 0.76 (its seed 0 alone would have lost to MoCo v2's 0.75)
    assert gap["baseline"] == "byol" and gap["points"] == pytest.approx(2.0) and gap["met"]
    assert budget_curve.crossing(budget_curve.mean_points(points), "sartaj->other", "accuracy",
                                 "byol") == "MicDiffRep ahead at every budget measured"
    result = dict(budget_curve.summarise(points), command="python benchmarks/budget_curve.py", note="",
                  environment={"processor": "cpu", "cpu_count": 2, "torch": "2"}, image="seeds.png")
    result = json.loads(json.dumps(result))  # re-rendered from the results file
    text = budget_curve.markdown(result)
    assert "![budget curve](seeds.png)" in text and "Means over seeds 0, 1" in text
    assert "| MicDiffRep-MS | 30 | 0, 1 | 0.880 ±2.0 (0.780 ±2.0) |" in text
    # sartaj->other all: 0.88 against BYOL's 0.86 and MoCo v2's 0.85; other->sartaj the same numbers
    # ± sqrt(s1^2/2 + s2^2/2) with s1 = 0.04/sqrt(2), s2 = 0.06/sqrt(2): 3.6 points
    assert "| 30 | +2.0 ±3.6 (BYOL) met | +2.0 ±3.6 (BYOL) met | +2.0 ±3.6 (BYOL) met | +2.0 ±3.6 (BYOL) met |" in text
    assert "standard error of the difference" in text and "What was tried" not in text
    # validation 0.95 everywhere: MicDiffRep's test mean 0.88 drops 7.0 points from it, BYOL's 0.86 9.0
    assert "| MicDiffRep-MS | 30 | 0.950 | 0.880 | 7.0 | 0.950 | 0.880 | 7.0 |" in text
    assert "| BYOL | 30 | 0.950 | 0.860 | 9.0 |" in text
    result["targets"]["30"]["sartaj->other"]["accuracy"].update(points=1.968, met=False)
    text = budget_curve.markdown(result)  # a miss never reads as the margin: +1.97, not +2.0
    assert "| 30 | +1.97 ±3.6 (BYOL) **missed** | +2.0 ±3.6 (BYOL) met |" in text and "What was tried" in text

    budget_curve.plot(points, str(tmp_path / "seeds.png"))  # one budget: a column of points per method
    assert (tmp_path / "seeds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_all_test_images_split_into_the_duplicated_and_deduplicated_ones():
    mirror_invariance = pytest.importorskip("mirror_invariance")

    def point(method, seed, all_accuracy, dedup_accuracy):
        scores = {"accuracy": all_accuracy, "accuracy_deduplicated": dedup_accuracy}
        return {"method": method, "minutes": 30, "seed": seed, "sartaj->other": scores, "other->sartaj": scores}

    sizes = {"test": 100, "duplicated": 80, "deduplicated": 20, "mirror_only": 70}
    composition = {"sartaj->other": sizes, "other->sartaj": sizes}
    # seed 0: 90 right of 100, 10 of the 20 de-duplicated -> 80 of the 80 duplicated; seed 1: 60 of 80
    points = [point("micdiffrep", 0, 0.90, 0.5), point("micdiffrep", 1, 0.70, 0.5), point("mocov2", 0, 0.8, 0.0)]
    table = mirror_invariance.split_recorded_points(points, composition)
    mine = table["micdiffrep"]["other->sartaj"]
    assert mine["duplicated_per_seed"] == pytest.approx([1.0, 0.75])
    assert (mine["all"], mine["deduplicated"], mine["duplicated"]) == pytest.approx((0.8, 0.5, 0.875))
    assert table["mocov2"]["sartaj->other"]["duplicated"] == pytest.approx(1.0) and "byol" not in table


def test_the_mirror_check_trains_nothing_and_names_the_command_that_would(tmp_path):
    mirror_invariance = pytest.importorskip("mirror_invariance")
    # The command named trains the recorded steps (the recorded points' calibration) into a results file of its
    # own: without --reuse_results and --output it had recalibrated and replaced the committed budget curve
    with pytest.raises(FileNotFoundError, match=r"budget_curve.py --reuse_results --reuse_from points.json --data_dir "
                                                r"data --minutes 30 --seeds 3 --methods mocov2 --work_dir .* --output"):
        mirror_invariance.run_folder("mocov2", 30.0, 3, str(tmp_path), "data", "points.json")
    run = tmp_path / "micdiffrep-small-power3-30min"
    run.mkdir()
    (run / "pretraining_summary.json").write_text('{"stop_reason": "interrupted", "global_step": 24}')
    with pytest.raises(FileNotFoundError, match="not a finished run: train it \\(or finish it\\)"):  # was used
        mirror_invariance.run_folder("micdiffrep", 30.0, 0, str(tmp_path), "data", "points.json")
    (run / "pretraining_summary.json").write_text('{"stop_reason": "max_train_steps"}')
    assert mirror_invariance.run_folder("micdiffrep", 30.0, 0, str(tmp_path), "data", "points.json") == str(run)


def test_the_mirror_check_reuses_its_probes_and_splits_new_points_without_the_data(tmp_path, monkeypatch):
    mirror_invariance = pytest.importorskip("mirror_invariance")
    sizes = {"test": 100, "duplicated": 80, "deduplicated": 20, "mirror_only": 70}
    scores = {"validation": 0.9, "validation_mirrored": 0.85, "test": 0.8, "test_deduplicated": 0.6}
    measured_on = {"processor": "the measuring machine", "cpu_count": 2, "torch": "2.0"}
    previous = {"minutes": 30.0, "seed": 3, "composition": {"sartaj->other": sizes, "other->sartaj": sizes},
                "probed": {"mocov2": {"default": {"sartaj->other": scores, "other->sartaj": scores}}},
                "environment": measured_on}
    (tmp_path / "mirror.json").write_text(json.dumps(previous))
    accuracies = {"accuracy": 0.9, "accuracy_deduplicated": 0.5}
    points = [{"method": "mocov2", "minutes": 30.0, "seed": seed, "sartaj->other": accuracies,
               "other->sartaj": accuracies} for seed in (0, 4)]
    (tmp_path / "points.json").write_text(json.dumps({"points": points}))
    monkeypatch.setattr(mirror_invariance, "Benchmark", None)  # reading the data would fail
    monkeypatch.setattr(sys, "argv", ["mirror_invariance.py", "--reuse_results", "--seed", "3", "--methods", "mocov2",
                                      "--points", str(tmp_path / "points.json"), "--output", str(tmp_path / "mirror"),
                                      "--work_dir", str(tmp_path / "nothing")])
    mirror_invariance.main()
    result = json.loads((tmp_path / "mirror.json").read_text())
    assert result["probed"] == previous["probed"] and result["recorded"]["mocov2"]["seeds"] == [0, 4]
    assert result["recorded"]["mocov2"]["other->sartaj"]["duplicated"] == pytest.approx(1.0)
    assert "means of seeds 0, 4" in (tmp_path / "mirror.md").read_text()
    # probes recorded before flip averaging shared its noise keep saying how they were measured
    assert result["flip_noise"] == "mirrored" and "noise and all" in (tmp_path / "mirror.md").read_text()
    assert result["environment"] == measured_on  # nothing measured here: not this machine's versions


def test_the_budget_curve_rewrites_recorded_points_only_without_the_data(tmp_path, monkeypatch):
    budget_curve = pytest.importorskip("budget_curve")
    avgmax = {"pooling": "avgmax", "flip_average": False}
    scores = {"accuracy": 0.85, "accuracy_deduplicated": 0.7, "validation_accuracy": 0.9}
    points = [{"method": method, "minutes": 30.0, "seed": seed, "steps": 10, "run": run, "readout": avgmax,
               "sartaj->other": scores, "other->sartaj": scores}
              for method, run in (("micdiffrep", "micdiffrep-small-power3"), ("mocov2", "mocov2")) for seed in (0, 1)]
    output = tmp_path / "seeds"
    measured_on = {"processor": "the measuring machine", "cpu_count": 2, "torch": "2.0"}
    (tmp_path / "seeds.json").write_text(json.dumps({"points": points[:3], "environment": measured_on,
                                                     "command": "python benchmarks/budget_curve.py --seeds 0 1"}))
    # (MoCo v2's seed 1 was not run)
    monkeypatch.setattr(budget_curve, "Benchmark", None)  # reading the data would fail
    monkeypatch.setattr(sys, "argv", ["budget_curve.py", "--reuse_results", "--recorded_only", "--minutes", "30",
                                      "--seeds", "0", "1", "--output", str(output), "--note", "stopped part-way"])
    budget_curve.main()
    result = json.loads((tmp_path / "seeds.json").read_text())
    assert [(p["method"], p["seed"]) for p in result["points"]] == [("micdiffrep", 0), ("mocov2", 0), ("micdiffrep", 1)]
    assert result["note"] == "stopped part-way" and (tmp_path / "seeds.png").is_file()
    # nothing was measured here: the results keep the machine and versions the points were measured with
    assert result["environment"] == measured_on
    assert "Machine: the measuring machine, 2 CPUs, no GPU; torch 2.0" in (tmp_path / "seeds.md").read_text()
    # and the command that measured them, the re-render naming itself apart (it replaced the measuring command)
    assert result["command"] == "python benchmarks/budget_curve.py --seeds 0 1"
    assert "--recorded_only" in result["rendered_by"] and "Rendered again from the recorded `.json`" in (
        tmp_path / "seeds.md").read_text()
    # re-rendered without --note, the recorded note stays (it was dropped)
    monkeypatch.setattr(sys, "argv", ["budget_curve.py", "--reuse_results", "--recorded_only", "--minutes", "30",
                                      "--seeds", "0", "1", "--output", str(output)])
    budget_curve.main()
    result = json.loads((tmp_path / "seeds.json").read_text())
    assert result["note"] == "stopped part-way"
    monkeypatch.setattr(sys, "argv", ["budget_curve.py", "--recorded_only"])
    with pytest.raises(SystemExit):
        budget_curve.parse_args()
    # A re-render with a smaller grid deleted the points outside it from the only record of them
    monkeypatch.setattr(sys, "argv", ["budget_curve.py", "--reuse_results", "--recorded_only", "--minutes", "30",
                                      "--output", str(output), "--note", "again"])
    with pytest.raises(SystemExit, match=r"would drop 1 recorded point\(s\) .* \(e.g. micdiffrep, 30 min, seed 1\)"):
        budget_curve.main()
    assert json.loads((tmp_path / "seeds.json").read_text()) == result


def test_a_run_that_would_drop_recorded_results_is_refused_before_any_work(tmp_path, monkeypatch):
    """Without --reuse_results (or with other settings), a run replaced the recorded points or rows of OUTPUT.json,
    by default the committed ones, after its first new point: a smoke run left 1 of 24 points."""
    budget_curve = pytest.importorskip("budget_curve")
    ablations = pytest.importorskip("ablations")
    scores = {"accuracy": 0.85, "accuracy_deduplicated": 0.7, "validation_accuracy": 0.9}
    points = [{"method": method, "minutes": minutes, "seed": 0, "steps": 10, "sartaj->other": scores,
               "other->sartaj": scores} for method in ("micdiffrep", "mocov2") for minutes in (10.0, 30.0)]
    (tmp_path / "curve.json").write_text(json.dumps({"points": points}))
    monkeypatch.setattr(budget_curve, "Benchmark", None)  # reading the data (the work) would fail
    monkeypatch.setattr(budget_curve, "pretrain_for_budget", None)
    for extra in ([], ["--reuse_results", "--minutes", "30"]):  # none kept; the 10-minute points dropped
        monkeypatch.setattr(sys, "argv", ["budget_curve.py", "--output", str(tmp_path / "curve"), *extra])
        with pytest.raises(SystemExit, match=r"curve.json holds 4 recorded points, of which this run would keep "
                                             rf"{2 if extra else 0} \(--reuse_results keeps .*--overwrite_output"):
            budget_curve.main()
    assert json.loads((tmp_path / "curve.json").read_text())["points"] == points  # nothing was written
    monkeypatch.setattr(sys, "argv", ["budget_curve.py", "--output", str(tmp_path / "curve"), "--reuse_results"])
    budget_curve.main()  # every point kept: nothing to measure, nothing refused

    rows = [{"recipe": "a", "flags": [], "readout": "sweep 10-250"}] * 3
    (tmp_path / "abl.json").write_text(json.dumps({"proxy_minutes": 8.0, "resolution": 64, "rows": rows}))
    args = argparse.Namespace(reuse_results=True, output=str(tmp_path / "abl"), proxy_minutes=8.0, resolution=64,
                              unet="base", max_images=None)
    assert ablations.kept_rows(args) == 3
    assert ablations.kept_rows(argparse.Namespace(**{**vars(args), "proxy_minutes": 0.05})) == 0
    assert ablations.kept_rows(argparse.Namespace(**{**vars(args), "reuse_results": False})) == 0
    # A search of fewer levers writes only the rows it reaches: the others' recorded rows would go
    monkeypatch.setattr(ablations, "Ablation", None)  # the search (the work) would fail
    monkeypatch.setattr(sys, "argv", ["ablations.py", "--output", str(tmp_path / "abl"), "--reuse_results",
                                      "--levers", list(ablations.LEVERS)[0]])
    with pytest.raises(SystemExit, match="abl.json holds rows of levers this run leaves out .* would drop"):
        ablations.main()
    from common import check_recorded_results

    with pytest.raises(SystemExit, match="abl.json holds 3 recorded rows, of which this run would keep 0"):
        check_recorded_results(str(tmp_path / "abl"), overwrite=False, kept=0, reusable=True)
    check_recorded_results(str(tmp_path / "abl"), overwrite=True)
    (tmp_path / "leakage.json").write_text("{}")
    with pytest.raises(SystemExit, match="leakage.json holds recorded results, of which this run would keep 0: "
                                         "give another --output"):
        check_recorded_results(str(tmp_path / "leakage"), overwrite=False)


def test_bad_benchmark_flags_fail_before_the_work(tmp_path, monkeypatch, capsys):
    """--timesteps 5000 and a missing --clip_model failed after hours of pretraining, --unet bogus after the data was
    read, each with a traceback."""
    brain_tumor_mri = pytest.importorskip("brain_tumor_mri")
    for flags, message in ((["--timesteps", "10", "5000"], "--timesteps 5000: read-out timesteps must be in"),
                           (["--clip_model", str(tmp_path / "none")], "is not a folder: give a local CLIPVisionModel"),
                           (["--unet", "bogus"], "'bogus' is neither a UNet preset"),
                           (["--resolution", "0"], "--resolution")):
        monkeypatch.setattr(sys, "argv", ["brain_tumor_mri.py", "--output", str(tmp_path / "out"), *flags])
        with pytest.raises(SystemExit) as error:
            brain_tumor_mri.parse_args()
        assert error.value.code == 2 and message in capsys.readouterr().err


def test_a_smoke_runs_points_and_rows_are_not_reused_as_the_real_ones(tmp_path):
    """`--max_images` points of the budget curve, and `--unet tiny --max_images` rows of the ablations, were reused by
    the full run with --reuse_results."""
    budget_curve = pytest.importorskip("budget_curve")
    avgmax = {"pooling": "avgmax", "flip_average": False}
    smoke = {"method": "mocov2", "minutes": 1.0, "seed": 0, "run": "mocov2", "readout": avgmax, "max_images": 200}
    assert budget_curve.reusable_point([smoke], "mocov2", 1.0, 0, "mocov2", avgmax) is None
    assert budget_curve.reusable_point([smoke], "mocov2", 1.0, 0, "mocov2", avgmax, 200) is smoke
    recorded = {"proxy_minutes": 8.0, "resolution": 64, "rows": [{"readout": "sweep 10-250"}]}  # written before
    (tmp_path / "abl.json").write_text(json.dumps(recorded))  # the UNet and images were recorded: the defaults
    args = argparse.Namespace(reuse_results=True, output=str(tmp_path / "abl"), proxy_minutes=8.0, resolution=64,
                              unet="base", max_images=None, remeasure=[])
    assert ablations.reusable_rows(args) == recorded["rows"]
    assert ablations.reusable_rows(argparse.Namespace(**{**vars(args), "unet": "tiny", "max_images": 200})) == []



REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_METHODS = {"MicDiffRep-MS (default recipe)": "micdiffrep", "MoCo v2": "mocov2", "BYOL": "byol"}


def readme_table_rows(heading_line: str):
    """`{first cell: [(accuracy, dedup accuracy) per direction]}` of the README table right below `heading_line`."""
    with open(os.path.join(REPO, "README.md")) as f:
        lines = f.read().split(heading_line, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        pairs = [re.fullmatch(r"\**([\d.]+)\** \(\**([\d.]+)\**\)", cell) for cell in cells[1:3]]
        rows[cells[0]] = [(float(m[1]), float(m[2])) if m else None for m in pairs]
    return rows


def test_the_readmes_six_seed_table_is_the_results_files():
    with open(os.path.join(REPO, "benchmarks", "results", "seeds_30min.json")) as f:
        means = {point["method"]: point for point in json.load(f)["means"] if point["minutes"] == 30}
    rows = readme_table_rows("**On six seeds of each method**")
    assert set(rows) == set(README_METHODS)
    for name, method in README_METHODS.items():
        assert len(means[method]["seeds"]) == 6
        for cells, direction in zip(rows[name], ("sartaj->other", "other->sartaj")):
            recorded = means[method][direction]
            assert cells == (round(recorded["accuracy"], 3), round(recorded["accuracy_deduplicated"], 3)), name


def test_render_only_writes_the_results_file_again_from_its_json_and_says_so(tmp_path, monkeypatch):
    """A change to how the results are described (the transductive pretraining) had no way into the results file
    short of a rerun of hours."""
    brain_tumor_mri = pytest.importorskip("brain_tumor_mri")
    shutil.copy(os.path.join(REPO, "benchmarks", "results", "brain_tumor_mri.json"), tmp_path / "out.json")
    monkeypatch.setattr(sys, "argv", ["brain_tumor_mri.py", "--output", str(tmp_path / "out"), "--render_only"])
    brain_tumor_mri.main()
    rendered = (tmp_path / "out.md").read_text()
    with open(os.path.join(REPO, "benchmarks", "results", "brain_tumor_mri.md")) as f:
        committed = f.read()
    assert "Rendered again from the recorded `.json` (no figure measured anew)" in rendered
    assert "the test images of every protocol included (transductive" in rendered
    # the committed file is what the script writes (but for the command that rendered it)
    assert rendered.split("\n")[6:] == committed.split("\n")[6:]


def test_the_readmes_one_seed_table_is_the_results_files():
    with open(os.path.join(REPO, "benchmarks", "results", "brain_tumor_mri.json")) as f:
        results = {(row["method"], row["direction"]): row for row in json.load(f)["results"]
                   if row["protocol"] == "cross-source"}
    rows = readme_table_rows("### Against the baselines at equal budget")
    names = {"MicDiffRep-MS (default recipe)": "micdiffrep-ms", "MicDiffRep-SL-best": "micdiffrep-sl-best",
             "MoCo v2": "baseline-mocov2", "BYOL": "baseline-byol", "MAE (its own optimiser)": "baseline-mae"}
    for name, method in names.items():
        for cells, direction in zip(rows[name], ("sartaj->other", "other->sartaj")):
            row = results[(method, direction)]
            assert cells == (round(row["accuracy"], 3), round(row["accuracy_deduplicated"], 3)), name


def test_the_readmes_validation_test_agreement_is_the_results_files():
    """The README quoted the Spearman agreement of 25 recipe rows after the results file had 27."""
    with open(os.path.join(REPO, "benchmarks", "results", "ablations.json")) as f:
        rows = json.load(f)["rows"]
    recipes = next(line for line in ablations.validation_test_agreement(rows) if line.startswith("| recipes"))
    n, so, so_dedup, os_, os_dedup = [cell.strip() for cell in recipes.strip("|").split("|")][1:]
    with open(os.path.join(REPO, "README.md")) as f:
        readme = " ".join(f.read().split())
    assert (f"over the {n} recipe rows (one read-out) it does, {so} / {os_} on all test images sartaj->other / "
            f"other->sartaj ({so_dedup} / {os_dedup} de-duplicated)") in readme


def test_the_readmes_speed_figures_are_the_throughput_and_profile_files():
    """The throughput figures and the profile shares were typed into the README and `throughput.py`."""
    results = os.path.join(REPO, "benchmarks", "results")
    with open(os.path.join(results, "throughput.json")) as f:
        result = json.load(f)
    with open(os.path.join(results, "profile.json")) as f:
        profile = json.load(f)
    rows = {row["name"].split(" (")[0]: row for row in result["rows"]}
    ours = rows["pretraining, mic-diffrep loop"]["images_per_second"]
    ours_flops = rows["pretraining, mic-diffrep loop"]["flops_per_second"]
    plain = rows["pretraining, plain fp32 loop"]["images_per_second"]
    extraction = {row["batch_size"]: row["images_per_second"] for row in result["rows"] if "batch_size" in row}
    generation = rows["DDIM-50 generation"]["seconds_per_image"]
    eager = rows["bare training step, eager"]["images_per_second"]
    compiled = rows["bare training step, torch.compile"]["images_per_second"]
    convolution = [part["categories"]["convolution"] for part in profile["parts"].values()]
    paper_images = 200 * 5708 * (112 / 64) ** 2  # the paper's schedule in 64 px images
    with open(os.path.join(REPO, "README.md")) as f:
        readme = " ".join(f.read().split())
    for quoted in [f"{ours:.1f} images/s ({ours / plain:.2f}x a plain fp32 loop decoding JPEGs on the fly, {plain:.1f})",
                   f"{extraction[16]:.0f} images/s, all blocks, one timestep ({extraction[128]:.0f} at batch 128)",
                   f"{generation:.2f} s per image",
                   f"Convolutions take {min(convolution):.0f}-{max(convolution):.0f}% of the time in all three",
                   f"the loop runs at {100 * ours_flops / result['peak_flops']['bf16']:.0f}% of the CPU's bf16 matmul peak",
                   f"({compiled:.1f} vs {eager:.1f} images/s)",
                   f"`base` UNet (`--model_config_name_or_path base`) about {ours:.0f} images/s",
                   f"about {paper_images / plain / 3600:.0f} hours in fp32 on 2 CPU cores "
                   f"({paper_images / ours / 3600:.0f} hours in bf16)"]:
        assert quoted in readme
    throughput = pytest.importorskip("throughput")
    with open(os.path.join(results, "throughput.md")) as f:
        assert f.read() == throughput.markdown(result, profile)  # rendered from the two files, nothing typed


def test_image_sources_say_what_is_missing(tmp_path):
    # The Kaggle download has no sources.csv: the scripts raised a bare FileNotFoundError / KeyError
    common = pytest.importorskip("common")
    image = str(tmp_path / "Training" / "glioma" / "a.jpg")
    with pytest.raises(FileNotFoundError, match="the Kaggle download does not hold it"):
        common.image_sources(str(tmp_path), [image])
    (tmp_path / "sources.csv").write_text("file,label,source\nTraining/glioma/b.jpg,glioma,sartaj\n")
    with pytest.raises(ValueError, match=r"no row for 1 image\(s\), e.g. \['Training/glioma/a.jpg'\]"):
        common.image_sources(str(tmp_path), [image])
    assert common.image_sources(str(tmp_path), [str(tmp_path / "Training" / "glioma" / "b.jpg")]).tolist() == [
        "sartaj"]


def test_benchmark_flags_refuse_what_would_run_something_else(monkeypatch, capsys, tmp_path):
    """`--max_images 0` took every image and `-5` all but five, `--minutes 0` trained one step, `--seeds 0 0 0`
    counted three seeds; a missing data folder ended in a 14-line traceback; an unwritable `--output` failed only
    when the results were written, at the end."""
    common = pytest.importorskip("common")
    budget_curve = pytest.importorskip("budget_curve")
    for argv, message in ((["--max_images", "0"], "--max_images: must be at least 1"),
                          (["--max_images", "-5"], "--max_images: must be at least 1"),
                          (["--minutes", "0"], "--minutes: must be above 0"),
                          (["--seeds", "0", "0"], "--seeds 0 0: each seed once")):
        monkeypatch.setattr(sys, "argv", ["budget_curve.py", *argv])
        with pytest.raises(SystemExit):
            budget_curve.parse_args()
        assert message in capsys.readouterr().err

    # Where the results go is checked before hours of work, not when they are written at the end.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for argv, message in ((["--output", str(blocker / "curve")], f"--output: cannot write into {blocker}"),
                          (["--output", str(tmp_path)], f"--output: {tmp_path} is a folder"),
                          (["--work_dir", str(blocker / "runs")], f"--work_dir: cannot write into {blocker / 'runs'}")):
        monkeypatch.setattr(sys, "argv", ["budget_curve.py", *argv])
        with pytest.raises(SystemExit):
            budget_curve.parse_args()
        assert message in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["budget_curve.py", "--output", str(tmp_path / "new" / "curve"),
                                      "--work_dir", str(tmp_path / "runs")])
    args = budget_curve.parse_args()
    assert (args.output, args.work_dir) == (str(tmp_path / "new" / "curve"), str(tmp_path / "runs"))
    assert os.listdir(tmp_path / "new") == [] and os.listdir(tmp_path / "runs") == []  # made, and left empty

    def missing():
        raise FileNotFoundError("Data folder '/nowhere/Training' does not exist.")

    monkeypatch.setattr(sys, "argv", ["benchmarks/budget_curve.py"])
    with pytest.raises(SystemExit, match=r"^budget_curve.py: error: Data folder '/nowhere/Training' does not exist.$"):
        common.run_main(missing)


def test_the_budget_check_measures_every_method_interleaved_and_times_its_recorded_steps(tmp_path, monkeypatch):
    """The equal budgets rest on calibrations of different sessions: the check measures the methods back to back
    and says how long each one's recorded steps take at those speeds, against MicDiffRep's."""
    budget_check = pytest.importorskip("budget_check")
    speeds = {"micdiffrep": 4.0, "mocov2": 5.0, "byol": 1.0}
    order = []

    def measure(method, name, work_dir, argv):
        order.append(method)
        return {"steps_per_second": speeds[method], "images_per_step": 32.0, "calibration_seconds": [1.0, 2.0]}

    monkeypatch.setattr(budget_check, "measure_throughput", measure)
    points = tmp_path / "points.json"
    points.write_text(json.dumps({"points": [
        {"method": method, "minutes": 30.0, "seed": seed, "steps": steps}
        for seed in (0, 1) for method, steps in (("micdiffrep", 7200), ("mocov2", 4500), ("byol", 1800))]}))
    monkeypatch.setattr(sys, "argv", ["budget_check.py", "--points", str(points), "--work_dir", str(tmp_path),
                                      "--output", str(tmp_path / "check"), "--rounds", "2"])
    budget_check.main()
    assert order == ["micdiffrep", "mocov2", "byol"] * 2  # interleaved, so drift hits each method alike
    rows = json.loads((tmp_path / "check.json").read_text())["rows"]
    assert rows["micdiffrep"]["minutes_here"] == pytest.approx(30.0)  # 7200 steps at 4 steps/s
    assert rows["mocov2"]["share_of_micdiffrep_time"] == pytest.approx(0.5)  # 4500 steps at 5/s: 15 minutes
    assert rows["mocov2"]["steps_for_equal_time"] == 9000
    assert rows["byol"]["share_of_micdiffrep_time"] == pytest.approx(1.0)
    assert "| MoCo v2 | 5.00, 5.00 | 5.00 | 160 | 4500 | 15.0 | 0.50 | 9000 |" in (tmp_path / "check.md").read_text()
