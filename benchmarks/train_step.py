"""Milliseconds per training step in float32 and in bfloat16 (params/train.yaml's `precision`), side by side.

    uv run python benchmarks/train_step.py [--set NAME=VALUE ...] [--steps 40] [--rounds 2]

One process, one batch of params/train.yaml's size, the model the parameters describe
(`model.DigitClassifier.of`), Adam as the train stage uses it; the two precisions alternate for
`--rounds` rounds so both see the same machine state. By default the accurate preset with
`hidden: 256` and `last_block_convs: 2`; `--set` changes any value of the preset. Prints the medians
and their ratio; no data is read (random grey levels: the arithmetic is the same).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mnist_lifecycle import config, model, presets, stage, training  # noqa: E402


def milliseconds_per_step(params: config.TrainParams, steps: int) -> float:
    torch.manual_seed(0)
    pixels = torch.rand(params.batch_size, 28, 28) * 255
    labels = torch.randint(0, 10, (params.batch_size,))
    classifier = model.DigitClassifier.of(params).train()
    optimizer = training.make_optimizer(classifier, params)
    generator = torch.Generator().manual_seed(0)

    def step():  # training.train's step, without its bookkeeping
        training.optimizer_step(classifier, optimizer, training.random_shift(pixels, params.augment_shift, generator),
                                labels, params)

    for _ in range(5):  # oneDNN builds its kernels on first use
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", type=stage.parse_override, default=[],
                        metavar="NAME=VALUE")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    base = presets.params(ROOT, "accurate", {"hidden": 256, "last_block_convs": 2, **dict(args.overrides)})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bfloat16 kernels: "
          f"{training.bfloat16_supported()}; {config.as_dict(base)}")
    times: dict[str, list[float]] = {precision: [] for precision in config.PRECISIONS}
    for _ in range(args.rounds):
        for precision in config.PRECISIONS:
            ms = milliseconds_per_step(config.validate("train", {**config.as_dict(base), "precision": precision}),
                                       args.steps)
            times[precision].append(ms)
            print(f"{precision}: {ms:.1f} ms per step", flush=True)
    medians = {p: statistics.median(t) for p, t in times.items()}
    print(f"medians: float32 {medians['float32']:.1f} ms, bfloat16 {medians['bfloat16']:.1f} ms: "
          f"bfloat16 at {medians['float32'] / medians['bfloat16']:.2f}x the speed")


if __name__ == "__main__":
    main()
