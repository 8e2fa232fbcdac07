"""PNG figures of results: accuracy against timestep (paper Fig. 4) and confusion matrices."""

from typing import List, Optional, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_timestep(single_layer: Sequence[dict], msfa_per_timestep: Sequence[dict], path: str,
                              title: str = "Linear-probe accuracy against timestep") -> None:
    """One curve per layer (crosses) plus MSFA over all layers (circles), test accuracy against timestep."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    layers = list(dict.fromkeys(row["layer"] for row in single_layer))
    cmap = plt.get_cmap("viridis", max(2, len(layers)))
    for i, layer in enumerate(layers):
        rows = sorted((r for r in single_layer if r["layer"] == layer), key=lambda r: r["timestep"])
        ax.plot([r["timestep"] for r in rows], [r["test_accuracy"] for r in rows], "x--", color=cmap(i),
                label=layer, linewidth=1)
    rows = sorted(msfa_per_timestep, key=lambda r: r["timestep"])
    ax.plot([r["timestep"] for r in rows], [r["test_accuracy"] for r in rows], "o-", color="crimson",
            label="MSFA (all layers)", linewidth=2)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], label_names: List[str], path: str,
                          title: Optional[str] = None) -> None:
    """Counts with row-normalised colours: rows are true classes, columns predictions."""
    plt = _pyplot()
    counts = np.asarray(matrix)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(label_names)), label_names, rotation=30, ha="right")
    ax.set_yticks(range(len(label_names)), label_names)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
