"""Flags on inputs outside what the model knows, added to answers as `warnings` (never refused).

MNIST digits are white ink (up to 255) on a black background (0): the input checks flag an image
that is blank (grey levels spanning less than BLANK_RANGE), apparently 0-1 scaled (every value
<= 1 but not all equal), or of inverted polarity (median above INVERTED_MEDIAN: the background is
most of the image). None of them flags any of MNIST's 70,000 real images (docs/serving.md).

Low confidence depends on the model, so its threshold is chosen per model on the validation split:
the SELECTION_RATE quantile of the top probability there (0.4% of validation images fall below
it), recorded on the registered version as the tag `min_confidence` by

    python -m mnist_lifecycle.guardrails --model-uri models:/mnist-digits/3 [--record]

The server uses that tag (or `--min-confidence`); without either, confidence is not checked.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

BLANK_RANGE = 32.0  # grey levels; MNIST's digits all span 0..>=128
INVERTED_MEDIAN = 127.5
SELECTION_RATE = 0.004  # of clean validation images flagged; the goal on test is <= 0.5%
MIN_CONFIDENCE_TAG = "min_confidence"

MESSAGES = {
    "blank": "the image is blank (all grey levels within {:g} of each other): it holds no digit",
    "scaled_0_1": "every value is <= 1: grey levels look 0-1 scaled; send 0-255 (they are not rescaled)",
    "inverted": "the background is light (median grey level above {:g}): MNIST digits are white ink on black",
    "low_confidence": "the top probability {:.3f} is below {:.3f}, the level chosen on the validation split",
}


def input_flags(pixels: np.ndarray) -> list[list[str]]:
    """The input checks' codes for each image of a float32 N x 28 x 28 batch of grey levels."""
    flat = pixels.reshape(len(pixels), -1)
    top, bottom = flat.max(axis=1), flat.min(axis=1)
    scaled = (top <= 1) & (top > bottom)
    blank = ~scaled & (top - bottom < BLANK_RANGE)
    inverted = ~blank & (np.median(flat, axis=1) > INVERTED_MEDIAN)
    return [[code for code, flagged in (("blank", b), ("scaled_0_1", s), ("inverted", i)) if flagged]
            for b, s, i in zip(blank, scaled, inverted)]


def warnings(pixels: np.ndarray, probabilities: np.ndarray, min_confidence: float | None) -> list[list[dict]]:
    """Per image, [{"code", "message"}] (empty for an image that looks like MNIST's)."""
    flags = input_flags(pixels)
    top = probabilities.max(axis=1)
    result = []
    for codes, confidence in zip(flags, top):
        found = [{"code": code, "message": MESSAGES[code].format(BLANK_RANGE if code == "blank" else INVERTED_MEDIAN)}
                 for code in codes]
        if min_confidence is not None and confidence < min_confidence:
            found.append({"code": "low_confidence",
                          "message": MESSAGES["low_confidence"].format(float(confidence), min_confidence)})
        result.append(found)
    return result


def choose_min_confidence(validation_probabilities: np.ndarray, rate: float = SELECTION_RATE) -> float:
    """The top-probability level below which `rate` of the validation images fall."""
    return float(np.quantile(validation_probabilities.max(axis=1), rate))


def main(argv: list[str] | None = None) -> int:
    import mlflow.pyfunc
    import torch
    from mlflow.tracking import MlflowClient

    from . import config, data
    from .paths import Layout
    from .registry import resolve

    parser = argparse.ArgumentParser(prog="python -m mnist_lifecycle.guardrails",
                                     description="Choose a model's low-confidence threshold on the validation split.")
    parser.add_argument("--model-uri", default="models:/mnist-digits@champion")
    parser.add_argument("--record", action="store_true", help=f"set the version's tag {MIN_CONFIDENCE_TAG}")
    args = parser.parse_args(argv)
    root = config.project_root()
    config.use_default_tracking_uri(root)
    module = mlflow.pyfunc.load_model(args.model_uri).get_raw_model()
    rates = {}
    with torch.inference_mode():
        split_probabilities = {split: module(torch.from_numpy(data.load_split(Layout.of(root).prepared, split)[0]
                                                               .astype(np.float32))).numpy() for split in ("val", "test")}
    threshold = choose_min_confidence(split_probabilities["val"])
    for split, probabilities in split_probabilities.items():
        rates[split] = float((probabilities.max(axis=1) < threshold).mean())
    print(f"{args.model_uri}: min_confidence {threshold:.4f}; flags {rates['val']:.2%} of validation and "
          f"{rates['test']:.2%} of test images")
    if args.record:
        if not args.model_uri.startswith("models:/"):
            print("error: --record needs a registered model URI", file=sys.stderr)
            return 1
        version = resolve(args.model_uri)
        MlflowClient().set_model_version_tag(version.name, version.version, MIN_CONFIDENCE_TAG, f"{threshold:.6f}")
        print(f"recorded on {version.name} version {version.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
