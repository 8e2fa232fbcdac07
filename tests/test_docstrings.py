"""The examples in the package's docstrings run and print what they say, as plain `doctest` (and so
`pytest --doctest-modules`) reads them: fenced as in transformers' docstrings, with a blank line before the closing
fence, which doctest would otherwise take as expected output."""

import doctest
import importlib
import os
import pkgutil

import pytest

import mic_diffrep


BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
# `mic_diffrep.pipelines` is installed from the top-level `pipelines/` folder: walked on its own.
MODULES = sorted([info.name for info in pkgutil.walk_packages(mic_diffrep.__path__, "mic_diffrep.")
                  if info.name != "mic_diffrep.__main__"]
                 + [info.name for info in pkgutil.walk_packages(mic_diffrep.pipelines.__path__, "mic_diffrep.pipelines.")])
# The benchmark scripts' helpers (imported as `test_benchmark_scripts.py` does; their `main` is not run).
SCRIPTS = sorted(name[:-3] for name in os.listdir(BENCHMARKS) if name.endswith(".py"))


def test_every_module_is_found():
    assert {"mic_diffrep.data.augmentations", "mic_diffrep.reporting.metrics", "mic_diffrep.training.arguments",
            "mic_diffrep.pipelines.pipeline_medical_image_classification"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES + [f"benchmarks/{name}" for name in SCRIPTS])
def test_docstring_examples(module, monkeypatch):
    if module.startswith("benchmarks/"):
        monkeypatch.syspath_prepend(BENCHMARKS)
        module = pytest.importorskip(module.split("/")[1])
    else:
        module = importlib.import_module(module)
    tests = [t for t in doctest.DocTestFinder().find(module) if t.examples]
    runner = doctest.DocTestRunner()  # doctest's defaults, as `pytest --doctest-modules` runs them
    report = []
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
