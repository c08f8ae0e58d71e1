"""The promotion gate: does the challenger replace the champion? Decided on evidence, each check
named after its parameter in params/register.yaml (docs/promotion.md).

Both models are compared on the same test images: an exact McNemar test on the images where
exactly one of them is right (promote only if the challenger is better at significance `alpha`),
no digit's recall may drop by more than `max_recall_drop`, and budgets of latency per image and
size, and the behavioural checks of behaviour.py. The first registration (no champion) is checked
against the budgets and behaviour only.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from .data import NUM_CLASSES

# Latency is the fastest of several batches of this size: the same for both models, large enough
# that Python's per-call overhead does not dominate; the minimum, because on shared cores every
# slower time is another process's noise, not the model's.
LATENCY_BATCH = 100
LATENCY_REPEATS = 10


@dataclass(frozen=True)
class Check:
    """One check of the gate: its name (the parameter it compares against), what was measured,
    the threshold, and whether it passed."""

    name: str
    passed: bool
    value: float | None
    threshold: float
    detail: str


@dataclass(frozen=True)
class GateResult:
    checks: tuple[Check, ...]
    champion_accuracy: float | None
    challenger_accuracy: float

    @property
    def promoted(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def reason(self) -> str:
        failed = [check.detail for check in self.checks if not check.passed]
        if failed:
            return "refused: " + "; ".join(failed)
        if self.champion_accuracy is None:
            return "no champion yet; " + "; ".join(check.detail for check in self.checks)
        return "every check passed: " + "; ".join(check.detail for check in self.checks)

    def value(self, name: str) -> float | None:
        return next((check.value for check in self.checks if check.name == name), None)

    def as_dict(self) -> dict:
        return {check.name: {k: v for k, v in asdict(check).items() if k != "name"} for check in self.checks}


def mcnemar(labels: np.ndarray, challenger: np.ndarray, champion: np.ndarray) -> tuple[int, int, float]:
    """(images only the challenger gets right, images only the champion gets right, one-sided
    exact p-value that the challenger is not better). Under the null hypothesis each discordant
    image is a fair coin, hence a binomial test on the discordant pairs."""
    challenger_right, champion_right = challenger == labels, champion == labels
    only_challenger = int((challenger_right & ~champion_right).sum())
    only_champion = int((champion_right & ~challenger_right).sum())
    discordant = only_challenger + only_champion
    if discordant == 0:
        return 0, 0, 1.0  # identical answers: no evidence either way
    return only_challenger, only_champion, float(binomtest(only_challenger, discordant, 0.5,
                                                           alternative="greater").pvalue)


def recall(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Recall per digit (fraction of each digit's images predicted as it)."""
    actual = np.bincount(labels, minlength=NUM_CLASSES)
    right = np.bincount(labels[predictions == labels], minlength=NUM_CLASSES)
    return right / np.maximum(actual, 1)


def latencies_ms_per_image(models: dict, images: np.ndarray) -> dict[str, float]:
    """Milliseconds per image of each loaded model (name -> model), the fastest of LATENCY_REPEATS
    batches of LATENCY_BATCH images after a warm-up. Measured the same way for every model, in
    interleaved rounds, so that a burst of load on the shared cores slows all of them alike."""
    import torch

    from .model import predict_probabilities

    batch = torch.from_numpy(images[:LATENCY_BATCH].astype(np.float32))
    for loaded in models.values():
        for _ in range(2):  # warm-up: first-call allocations, kernel selection
            predict_probabilities(loaded, batch)
    timings = {name: [] for name in models}
    for _ in range(LATENCY_REPEATS):
        for name, loaded in models.items():
            started = time.perf_counter()
            predict_probabilities(loaded, batch)
            timings[name].append(time.perf_counter() - started)
    return {name: float(min(times) * 1000 / len(batch)) for name, times in timings.items()}


def directory_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


def behaviour_checks(params, behaviour: dict[str, float] | None) -> list[Check]:
    """The challenger's behavioural metrics (behaviour.measure, from evaluate) against the
    thresholds `min_<metric>` / `max_<metric>` of params; all fail if they were not measured."""
    checks = []
    for metric in ("shift_agreement", "rotation_agreement", "stroke_agreement", "blank_confidence",
                   "inverted_confidence"):
        bound = "min" if metric.endswith("agreement") else "max"
        name, threshold = f"{bound}_{metric}", getattr(params, f"{bound}_{metric}")
        value = (behaviour or {}).get(metric)
        if value is None:
            checks.append(Check(name, False, None, threshold, f"{metric} was not measured (run 03_evaluate)"))
            continue
        passed = value >= threshold if bound == "min" else value <= threshold
        checks.append(Check(name, passed, value, threshold,
                            f"{metric} {value:.4f} ({'at least' if bound == 'min' else 'at most'} {threshold})"))
    return checks


def gate(params, labels: np.ndarray, challenger: np.ndarray, champion: np.ndarray | None,
         challenger_latency_ms: float, challenger_mb: float, behaviour: dict[str, float] | None,
         champion_latency_ms: float | None = None) -> GateResult:
    """Every check of the gate; `params` is the register stage's RegisterParams, `challenger` and
    `champion` the two models' predicted digits on the test images `labels` (champion None when
    there is none), latency in milliseconds per image, size in MB, `behaviour` the challenger's
    behavioural metrics."""
    challenger_accuracy = float((challenger == labels).mean())
    checks = []
    champion_accuracy = None
    if champion is not None:
        champion_accuracy = float((champion == labels).mean())
        gain = challenger_accuracy - champion_accuracy
        checks.append(Check("min_improvement", gain > params.min_improvement, gain, params.min_improvement,
                            f"test accuracy {challenger_accuracy:.4f} vs champion's {champion_accuracy:.4f} "
                            f"(gain {gain:+.4f}, must exceed {params.min_improvement})"))
        only_challenger, only_champion, p_value = mcnemar(labels, challenger, champion)
        checks.append(Check("alpha", p_value < params.alpha, p_value, params.alpha,
                            f"McNemar exact p = {p_value:.4g} on {only_challenger} images only the challenger "
                            f"gets right vs {only_champion} only the champion does (must be < {params.alpha})"))
        drops = recall(labels, champion) - recall(labels, challenger)
        worst = int(np.argmax(drops))
        worse = [f"digit {d} ({drops[d]:.4f})" for d in range(NUM_CLASSES) if drops[d] > params.max_recall_drop]
        checks.append(Check("max_recall_drop", not worse, float(drops[worst]), params.max_recall_drop,
                            f"recall dropped by more than {params.max_recall_drop} for " + ", ".join(worse)
                            if worse else f"largest recall drop {drops[worst]:.4f} (digit {worst}), "
                            f"within {params.max_recall_drop}"))
    against = f" (champion {champion_latency_ms:.4f} ms)" if champion_latency_ms is not None else ""
    checks.append(Check("max_latency_ms", challenger_latency_ms <= params.max_latency_ms, challenger_latency_ms,
                        params.max_latency_ms, f"latency {challenger_latency_ms:.4f} ms per image{against}, "
                        f"budget {params.max_latency_ms} ms"))
    checks.append(Check("max_model_mb", challenger_mb <= params.max_model_mb, challenger_mb, params.max_model_mb,
                        f"model size {challenger_mb:.2f} MB, budget {params.max_model_mb} MB"))
    checks += behaviour_checks(params, behaviour)
    return GateResult(tuple(checks), champion_accuracy, challenger_accuracy)
