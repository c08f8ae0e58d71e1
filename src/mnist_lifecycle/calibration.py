"""Calibration: a temperature fitted on the validation split, folded into the logged model
(model.ProbabilityModel), and the expected calibration error (its figure: evaluation.py)."""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

BINS = 15  # equal-width confidence bins, the usual choice for ECE
# The temperatures searched: far beyond what a classifier trained with label smoothing needs.
LOG_TEMPERATURE_RANGE = (math.log(0.05), math.log(20.0))


def logits_of(classifier, images: np.ndarray) -> np.ndarray:
    """The classifier's logits (before any temperature) on grey-level images."""
    import torch

    from .model import predict_probabilities

    classifier.eval()
    return predict_probabilities(classifier, torch.from_numpy(images)).numpy()


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(logits / T) (searched on
    log T, bounded): one number, so it cannot change which digit is predicted."""
    logits = logits.astype(np.float64)

    def nll(log_temperature: float) -> float:
        return -log_softmax(logits / math.exp(log_temperature), axis=1)[np.arange(len(labels)), labels].mean()

    found = minimize_scalar(nll, bounds=LOG_TEMPERATURE_RANGE, method="bounded")
    return float(math.exp(found.x))


def uncalibrated(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """The probabilities before the temperature: softmax(T log p) = softmax(logits), since log p
    is logits / T up to a constant per image."""
    scaled = temperature * np.log(np.clip(probabilities.astype(np.float64), 1e-30, None))
    return np.exp(log_softmax(scaled, axis=1))


def confidence_bins(probabilities: np.ndarray, labels: np.ndarray):
    """Per confidence bin: (images, mean confidence, accuracy)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    index = np.minimum((confidence * BINS).astype(int), BINS - 1)
    count = np.bincount(index, minlength=BINS)
    mean_confidence = np.bincount(index, weights=confidence, minlength=BINS) / np.maximum(count, 1)
    accuracy = np.bincount(index, weights=correct, minlength=BINS) / np.maximum(count, 1)
    return count, mean_confidence, accuracy


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean |accuracy - confidence| over BINS confidence bins, weighted by their images."""
    count, mean_confidence, accuracy = confidence_bins(probabilities, labels)
    return float((count * np.abs(accuracy - mean_confidence)).sum() / count.sum())
