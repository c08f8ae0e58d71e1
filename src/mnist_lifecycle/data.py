"""Obtaining, verifying, splitting and loading MNIST.

The raw data is the four original idx files, gzip-compressed. They are fetched from torchvision's
official mirrors, or copied from a local directory (for machines without internet), and then
verified by content: the SHA-256 of the decompressed bytes and the class counts. The prepared data
is plain `.npy` arrays of uint8 images and labels, which load in milliseconds with no per-sample
transforms.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .outputs import atomic_path

# Set this to a directory holding the four idx `.gz` files to skip the download.
SOURCE_DIR_ENV = "MNIST_SOURCE_DIR"
IMAGE_SIZE = 28
NUM_CLASSES = 10


@dataclass(frozen=True)
class IdxFile:
    name: str  # file name without the .gz suffix
    sha256: str  # of the decompressed bytes: recompressed copies stay valid
    class_counts: tuple[int, ...] | None = None  # for label files


TRAIN_IMAGES = IdxFile(
    "train-images-idx3-ubyte", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
)
TRAIN_LABELS = IdxFile(
    "train-labels-idx1-ubyte",
    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
)
TEST_IMAGES = IdxFile(
    "t10k-images-idx3-ubyte", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
)
TEST_LABELS = IdxFile(
    "t10k-labels-idx1-ubyte",
    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
)
IDX_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
SPLITS = ("train", "val", "test")


class DataError(RuntimeError):
    """The data is missing, corrupt or not MNIST; the message names the file."""


def resolve_source_dir(source_dir: str | None) -> Path | None:
    """The local source directory: the parameter if set, else $MNIST_SOURCE_DIR, else None (download)."""
    chosen = source_dir or os.environ.get(SOURCE_DIR_ENV) or None
    return Path(chosen).expanduser().resolve() if chosen else None


def fetch_raw(raw_dir: Path, source_dir: Path | None = None) -> None:
    """Put the four `.gz` files into `raw_dir`: copied from `source_dir`, or downloaded."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    for idx in IDX_FILES:
        target = raw_dir / f"{idx.name}.gz"
        if source_dir is None:
            _download(target)
            continue
        source = source_dir / target.name
        if not source.is_file():
            raise DataError(
                f"{source}: missing. The local MNIST source directory must hold the four idx .gz "
                f"files ({', '.join(i.name + '.gz' for i in IDX_FILES)}); unset {SOURCE_DIR_ENV} "
                "and prepare.source_dir to download them instead."
            )
        with atomic_path(target) as temporary:
            shutil.copyfile(source, temporary)


def _download(target: Path) -> None:
    from torchvision.datasets import MNIST
    from torchvision.datasets.utils import download_url

    errors = []
    for mirror in MNIST.mirrors:
        try:
            # No md5 here: content is verified after decompression by verify_raw.
            with atomic_path(target) as temporary:
                download_url(mirror + target.name, root=str(target.parent), filename=temporary.name)
            return
        except Exception as exc:  # noqa: BLE001 - try the next mirror, report all at the end
            errors.append(f"{mirror}: {exc}")
    raise DataError(
        f"{target.name}: download failed from every mirror ({'; '.join(errors)}). Without internet, "
        f"point {SOURCE_DIR_ENV} or prepare.source_dir at a directory holding the idx .gz files."
    )


def read_idx(path: Path) -> np.ndarray:
    """Decode one gzip-compressed idx file (unsigned bytes only, as MNIST uses)."""
    try:
        with gzip.open(path, "rb") as stream:
            raw = stream.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an idx file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(f"{path}: truncated or padded: header says shape {shape}, "
                        f"but it holds {len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def verify_raw(raw_dir: Path) -> dict[str, np.ndarray]:
    """Decode and check every raw file by content; returns the arrays by file name."""
    arrays = {}
    for idx in IDX_FILES:
        path = raw_dir / f"{idx.name}.gz"
        if not path.is_file():
            raise DataError(f"{path}: missing")
        try:
            with gzip.open(path, "rb") as stream:
                digest = hashlib.sha256(stream.read()).hexdigest()
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: not a readable gzip file ({exc})") from exc
        if digest != idx.sha256:
            raise DataError(f"{path}: content does not match MNIST (SHA-256 of the decompressed "
                            f"bytes is {digest}, expected {idx.sha256}); the file is corrupt")
        array = read_idx(path)
        if idx.class_counts is not None:
            counts = tuple(np.bincount(array, minlength=10).tolist())
            if counts != idx.class_counts:
                raise DataError(f"{path}: class counts {counts} differ from MNIST's {idx.class_counts}")
        arrays[idx.name] = array
    return arrays


def split_train_val(n_train: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic shuffled split of the training indices into (train, validation)."""
    if not 0 < val_size < n_train:
        raise ValueError(f"val_size must be between 1 and {n_train - 1}, got {val_size}")
    order = np.random.default_rng(seed).permutation(n_train)
    return np.sort(order[val_size:]), np.sort(order[:val_size])


def write_prepared(prepared_dir: Path, arrays: dict[str, np.ndarray], val_size: int, seed: int) -> None:
    """Write train/val/test images and labels as `.npy` (byte-for-byte reproducible)."""
    prepared_dir.mkdir(parents=True, exist_ok=True)
    train_idx, val_idx = split_train_val(len(arrays[TRAIN_LABELS.name]), val_size, seed)
    splits = {
        "train": (arrays[TRAIN_IMAGES.name][train_idx], arrays[TRAIN_LABELS.name][train_idx]),
        "val": (arrays[TRAIN_IMAGES.name][val_idx], arrays[TRAIN_LABELS.name][val_idx]),
        "test": (arrays[TEST_IMAGES.name], arrays[TEST_LABELS.name]),
    }
    for split, (images, labels) in splits.items():
        for kind, array in (("images", images), ("labels", labels)):
            with atomic_path(prepared_dir / f"{split}_{kind}.npy") as temporary:
                np.save(temporary, np.ascontiguousarray(array))


def load_split(prepared_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 28 x 28, labels uint8 N) of one prepared split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    paths = [prepared_dir / f"{split}_{kind}.npy" for kind in ("images", "labels")]
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: missing; run the prepare stage first (dvc repro prepare)")
    images, labels = (np.load(path) for path in paths)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DataError(f"{paths[0]}: shape {images.shape} does not match {len(labels)} labels of 28x28")
    return images, labels


def dataset_digest(prepared_dir: Path, split: str) -> str:
    """SHA-256 over a prepared split's files, to identify the exact data a run used."""
    digest = hashlib.sha256()
    for kind in ("images", "labels"):
        digest.update((prepared_dir / f"{split}_{kind}.npy").read_bytes())
    return digest.hexdigest()
