"""Classification metrics as `evaluate.Metric` modules shipped in the package (no Hub download, works offline).

```python
>>> from mic_diffrep.reporting import classification_report
>>> classification_report([0, 1, 1, 2], [0, 1, 2, 2], label_names=["a", "b", "c"])["accuracy"]
0.75

```
"""

from typing import Dict, List, Optional, Sequence

import datasets
import evaluate
import numpy as np


_FEATURES = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})


def _confusion(predictions, references, num_labels: int) -> np.ndarray:
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(matrix, (np.asarray(references, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return matrix


def _num_labels(predictions, references, num_labels: Optional[int]) -> int:
    """The number of classes: `num_labels`, or one past the largest index seen. Indices must lie in [0, num_labels):
    numpy would count a -1 (`datasets.ClassLabel`'s missing label) as the last class."""
    values = np.concatenate([np.asarray(predictions, dtype=np.int64).ravel(),
                             np.asarray(references, dtype=np.int64).ravel()])
    seen = int(values.max(initial=-1)) + 1
    if (values < 0).any() or (num_labels is not None and seen > num_labels):
        bad = sorted({int(v) for v in values if v < 0 or (num_labels is not None and v >= num_labels)})
        bound = f"[0, {num_labels})" if num_labels is not None else "0 or above"
        raise ValueError(f"Predictions and references must be class indices {bound}, got {bad}; drop the examples "
                         f"without a label (-1 in datasets, -100 as an ignore index) first.")
    return max(seen, num_labels or 0)


class Accuracy(evaluate.Metric):
    """Fraction of predictions equal to the references (NaN without examples, as every metric here)."""

    def _info(self):
        return evaluate.MetricInfo(description="Accuracy", citation="", inputs_description="class indices",
                                   features=_FEATURES)

    def _compute(self, predictions, references, num_labels: Optional[int] = None):
        _num_labels(predictions, references, num_labels)  # class indices, checked as the other metrics check them
        if len(references) == 0:  # undefined, as every score here without examples (not numpy's warning)
            return {"accuracy": float("nan")}
        return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}


class MacroF1(evaluate.Metric):
    """F1 score averaged over classes with equal weight (classes absent from both inputs are ignored; NaN without
    examples)."""

    def _info(self):
        return evaluate.MetricInfo(description="Macro-averaged F1", citation="", inputs_description="class indices",
                                   features=_FEATURES)

    def _compute(self, predictions, references, num_labels: Optional[int] = None):
        matrix = _confusion(predictions, references, _num_labels(predictions, references, num_labels))
        true_positive = np.diag(matrix).astype(np.float64)
        support, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
        present = (support + predicted) > 0
        denominator = support + predicted
        f1 = np.divide(2 * true_positive, denominator, out=np.zeros_like(true_positive), where=denominator > 0)
        return {"macro_f1": float(f1[present].mean()) if present.any() else float("nan")}  # no examples: undefined


class PerClassRecall(evaluate.Metric):
    """Recall (sensitivity) of every class: the fraction of its images predicted as it (NaN without images)."""

    def _info(self):
        return evaluate.MetricInfo(description="Per-class recall", citation="", inputs_description="class indices",
                                   features=_FEATURES)

    def _compute(self, predictions, references, num_labels: Optional[int] = None):
        matrix = _confusion(predictions, references, _num_labels(predictions, references, num_labels))
        support = matrix.sum(axis=1)
        recall = [float(matrix[i, i] / support[i]) if support[i] else float("nan") for i in range(len(matrix))]
        return {"per_class_recall": recall}


class ConfusionMatrix(evaluate.Metric):
    """Counts: rows are true classes, columns predicted classes."""

    def _info(self):
        return evaluate.MetricInfo(description="Confusion matrix", citation="", inputs_description="class indices",
                                   features=_FEATURES)

    def _compute(self, predictions, references, num_labels: Optional[int] = None):
        matrix = _confusion(predictions, references, _num_labels(predictions, references, num_labels))
        return {"confusion_matrix": matrix.tolist()}


def classification_report(predictions: Sequence[int], references: Sequence[int],
                          label_names: Optional[List[str]] = None) -> Dict:
    """Accuracy, macro F1, per-class recall (by label name) and the confusion matrix, through the metric modules."""
    num_labels = len(label_names) if label_names else None
    predictions, references = [int(p) for p in predictions], [int(r) for r in references]
    if num_labels is not None and any(not 0 <= v < num_labels for v in predictions + references):
        raise ValueError(f"Predictions and references must be class indices in [0, {num_labels}) for the "
                         f"{num_labels} `label_names`, got {sorted(set(predictions + references))}.")
    report = {}
    report.update(Accuracy(keep_in_memory=True).compute(predictions=predictions, references=references))
    for metric in (MacroF1, PerClassRecall, ConfusionMatrix):
        report.update(metric(keep_in_memory=True).compute(predictions=predictions, references=references,
                                                          num_labels=num_labels))
    names = label_names or [str(i) for i in range(len(report["per_class_recall"]))]
    report["per_class_recall"] = {names[i]: value for i, value in enumerate(report["per_class_recall"])}
    report["num_examples"] = len(references)
    return report
