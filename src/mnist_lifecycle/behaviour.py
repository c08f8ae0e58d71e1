"""Behavioural checks: does the model keep its answer when a digit looks a little different, as
real digits do (shifted 1-2 pixels, slightly rotated, thicker or thinner strokes), and is it unsure
when there is no digit (a blank image) or the image is inverted (a black digit on white)?

`measure` gives the numbers (evaluate logs and shows them); the promotion gate compares them with
the thresholds of params/register.yaml (`min_*_agreement`, `max_*_confidence`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

SHIFTS = [(dy, dx) for d in (1, 2) for dy, dx in ((d, 0), (-d, 0), (0, d), (0, -d))]  # pixels
ROTATIONS = (-10, 10)  # degrees
STROKE_SIZE = (2, 2)  # grey dilation (thicker) and erosion (thinner) over 2x2 pixels
IMAGES = 2000  # the first test images: enough for an agreement to +-1%, in a few seconds


def shifted(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    return ndimage.shift(images, (0, dy, dx), order=0, cval=0)


def rotated(images: np.ndarray, degrees: float) -> np.ndarray:
    turned = ndimage.rotate(images.astype(np.float32), degrees, axes=(2, 1), reshape=False, order=1, cval=0)
    return np.clip(np.rint(turned), 0, 255).astype(np.uint8)


def strokes(images: np.ndarray, thicker: bool) -> np.ndarray:
    operation = ndimage.grey_dilation if thicker else ndimage.grey_erosion
    return operation(images, size=(1, *STROKE_SIZE))


def measure(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> dict[str, float]:
    """The behavioural metrics of a model; `predict` maps grey-level images (uint8 N x 28 x 28) to
    class probabilities. Agreements are the fraction of images whose predicted digit stays the
    same, averaged over the variations; confidences the mean top probability."""
    images = images[:IMAGES]
    reference = predict(images).argmax(1)

    def agreement(variants: list[np.ndarray]) -> float:
        return float(np.mean([(predict(v).argmax(1) == reference).mean() for v in variants]))

    return {
        "shift_agreement": agreement([shifted(images, dy, dx) for dy, dx in SHIFTS]),
        "rotation_agreement": agreement([rotated(images, degrees) for degrees in ROTATIONS]),
        "stroke_agreement": agreement([strokes(images, thicker) for thicker in (True, False)]),
        "blank_confidence": float(predict(np.zeros((1, *images.shape[1:]), dtype=np.uint8)).max()),
        "inverted_confidence": float(predict(255 - images).max(1).mean()),
    }
