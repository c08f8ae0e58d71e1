"""Metrics and figures for the notebooks: computed once here, shown and logged there."""

from __future__ import annotations

import csv
from pathlib import Path

# No backend is chosen here: in a kernel pyplot takes Jupyter's inline backend, which gives a figure
# an image/png representation (forcing Agg left only "<Figure size ...>" text in notebooks);
# elsewhere matplotlib falls back to Agg by itself when there is no display.
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from . import calibration
from .data import NUM_CLASSES
from .outputs import atomic_path


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """counts[actual, predicted]."""
    return np.bincount(
        labels.astype(np.int64) * NUM_CLASSES + predictions.astype(np.int64),
        minlength=NUM_CLASSES * NUM_CLASSES,
    ).reshape(NUM_CLASSES, NUM_CLASSES)


def classification_metrics(labels: np.ndarray, predictions: np.ndarray) -> dict:
    """Accuracy and per-class precision and recall, as DVC- and MLflow-friendly flat numbers."""
    counts = confusion_matrix(labels, predictions)
    correct = np.diag(counts)
    predicted = counts.sum(axis=0)
    actual = counts.sum(axis=1)
    precision = np.divide(correct, predicted, out=np.zeros(NUM_CLASSES), where=predicted > 0)
    recall = correct / actual
    return {
        "accuracy": float(correct.sum() / counts.sum()),
        "errors": int(counts.sum() - correct.sum()),
        "precision": {str(digit): round(float(p), 6) for digit, p in enumerate(precision)},
        "recall": {str(digit): round(float(r), 6) for digit, r in enumerate(recall)},
    }


def headline(metrics: dict) -> dict:
    """The few numbers `dvc metrics show` and `dvc exp show` put in their columns."""
    return {"test_accuracy": metrics["accuracy"], "test_errors": metrics["errors"]}


def per_class_rows(labels: np.ndarray, predictions: np.ndarray) -> list[dict]:
    """Per digit: test images, errors, precision and recall; the rows of `dvc plots show`'s bar
    chart of errors (recall bars would all look alike, at 0.99)."""
    counts = confusion_matrix(labels, predictions)
    metrics = classification_metrics(labels, predictions)
    return [{"digit": digit, "images": int(counts[digit].sum()), "errors": int(counts[digit].sum() - counts[digit, digit]),
             "precision": metrics["precision"][str(digit)], "recall": metrics["recall"][str(digit)]}
            for digit in range(NUM_CLASSES)]


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """{'recall': {'3': 0.99}} -> {'recall_3': 0.99}, the shape mlflow.log_metrics takes."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, prefix=f"{name}_"))
        else:
            flat[name] = float(value)
    return flat


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows of equal keys as CSV: the tabular form `dvc plots` reads. Written whole or not at all."""
    with atomic_path(path) as temporary, temporary.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _unmanaged(figure: Figure) -> Figure:
    """Close the figure in pyplot: the notebook shows it once, as the cell's value (the inline
    backend would show it again at the cell's end), and pyplot does not keep every figure alive."""
    plt.close(figure)
    return figure


def save_figure(figure: Figure, path: Path) -> None:
    """A figure as an image file (format from the suffix), written whole or not at all."""
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100)


def digit_grid(images: np.ndarray, titles: list[str], columns: int = 10) -> Figure:
    """Images in a grid with a title above each; for samples and misclassified digits.

    Drawn as one picture with text on it rather than one axes per digit: a figure of 40 axes
    takes ~0.5 s to render, and it is rendered for every file it is saved to and for the notebook.
    """
    count, size = len(images), images.shape[-1]
    rows = max(1, -(-count // columns))
    cell_width, cell_height, title_band = size + 4, size + 12, 10  # pixels, at the digits' scale
    canvas = np.zeros((rows * cell_height, columns * cell_width), dtype=images.dtype)
    figure = plt.figure(figsize=(columns * 1.1, rows * 1.3))
    axis = figure.add_axes((0, 0, 1, 1))
    axis.axis("off")
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = row * cell_height + title_band, column * cell_width + 2
        canvas[top : top + size, left : left + size] = images[index]
        axis.text(left + size / 2, top - 1, titles[index], ha="center", va="bottom", fontsize=8)
    axis.imshow(canvas, cmap="gray_r", vmin=0, vmax=255, aspect="auto", interpolation="nearest")
    return _unmanaged(figure)


def learning_curves(history: list[dict]) -> Figure:
    """Loss and accuracy per epoch, training against validation."""
    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], "o-", label="train")
    loss_axis.plot(epochs, [row["val_loss"] for row in history], "o-", label="validation")
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    accuracy_axis.plot(epochs, [row["train_accuracy"] for row in history], "o-", label="train")
    accuracy_axis.plot(epochs, [row["val_accuracy"] for row in history], "o-", label="validation")
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    return _unmanaged(figure)


def confusion_figure(counts: np.ndarray) -> Figure:
    """Confusion matrix with a log colour scale, so that the rare errors stay visible."""
    figure, axis = plt.subplots(figsize=(6, 5))
    image = axis.imshow(np.log1p(counts), cmap="Blues")
    for actual in range(NUM_CLASSES):
        for predicted in range(NUM_CLASSES):
            value = counts[actual, predicted]
            if value:
                dark = image.norm(np.log1p(value)) > 0.5
                axis.text(predicted, actual, str(value), ha="center", va="center", fontsize=7,
                          color="white" if dark else "black")
    axis.set(xticks=range(NUM_CLASSES), yticks=range(NUM_CLASSES), xlabel="predicted",
             ylabel="actual", title="Confusion matrix (test set)")
    figure.tight_layout()
    return _unmanaged(figure)


def reliability_figure(curves: dict[str, np.ndarray], labels: np.ndarray) -> Figure:
    """Accuracy against confidence per bin, one line per set of probabilities (e.g. before and
    after the temperature); the diagonal is perfect calibration."""
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0, 1], [0, 1], "k:", label="calibrated")
    for name, probabilities in curves.items():
        count, mean_confidence, accuracy = calibration.confidence_bins(probabilities, labels)
        used = count > 0
        ece = calibration.expected_calibration_error(probabilities, labels)
        axis.plot(mean_confidence[used], accuracy[used], "o-", label=f"{name} (ECE {ece:.4f})")
    axis.set(xlabel="confidence (top probability)", ylabel="accuracy", title="Reliability (test set)",
             xlim=(0, 1), ylim=(0, 1))
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return _unmanaged(figure)
