"""The data layer on the real MNIST files: verification by content, and clear errors."""

import gzip
import shutil

import numpy as np
import pytest

from mnist_lifecycle import data


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory, mnist_source):
    raw = tmp_path_factory.mktemp("raw")
    data.fetch_raw(raw, mnist_source)
    return raw


def test_real_files_verify_and_decode(raw_dir):
    arrays = data.verify_raw(raw_dir)
    assert arrays[data.TRAIN_IMAGES.name].shape == (60000, 28, 28)
    assert arrays[data.TEST_IMAGES.name].shape == (10000, 28, 28)
    assert arrays[data.TRAIN_LABELS.name][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


def test_prepared_split_is_deterministic_and_disjoint(raw_dir, tmp_path):
    arrays = data.verify_raw(raw_dir)
    data.write_prepared(tmp_path / "a", arrays, val_size=5000, seed=0)
    data.write_prepared(tmp_path / "b", arrays, val_size=5000, seed=0)
    for split in data.SPLITS:
        assert data.dataset_digest(tmp_path / "a", split) == data.dataset_digest(tmp_path / "b", split)
    train, val = data.split_train_val(60000, 5000, seed=0)
    assert len(train) == 55000 and len(val) == 5000 and not set(train) & set(val)
    images, labels = data.load_split(tmp_path / "a", "val")
    assert images.dtype == np.uint8 and images.shape == (5000, 28, 28) and len(labels) == 5000


def corrupt_copy(raw_dir, tmp_path, name, transform):
    target = tmp_path / "raw"
    shutil.copytree(raw_dir, target)
    path = target / f"{name}.gz"
    content = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(transform(content)))
    return target, path


def test_flipped_byte_is_named(raw_dir, tmp_path):
    def flip(content):
        return content[:1000] + bytes([content[1000] ^ 0xFF]) + content[1001:]

    target, path = corrupt_copy(raw_dir, tmp_path, data.TEST_IMAGES.name, flip)
    with pytest.raises(data.DataError, match=str(path).replace(".", r"\.") + ".*corrupt"):
        data.verify_raw(target)


def test_truncated_and_non_gzip_files_are_named(raw_dir, tmp_path):
    target, path = corrupt_copy(raw_dir, tmp_path, data.TRAIN_LABELS.name, lambda c: c[:-10])
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte.gz"):
        data.verify_raw(target)
    with pytest.raises(data.DataError, match="truncated"):
        data.read_idx(path)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(data.DataError, match="not a readable gzip file"):
        data.verify_raw(target)


def test_missing_source_file_explains_what_is_needed(tmp_path):
    (tmp_path / "source").mkdir()
    with pytest.raises(data.DataError, match="missing.*MNIST_SOURCE_DIR"):
        data.fetch_raw(tmp_path / "raw", tmp_path / "source")


def test_source_dir_parameter_wins_over_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(data.SOURCE_DIR_ENV, "/from/env")
    assert data.resolve_source_dir(str(tmp_path)) == tmp_path.resolve()
    assert str(data.resolve_source_dir("")) == "/from/env"
    monkeypatch.delenv(data.SOURCE_DIR_ENV)
    assert data.resolve_source_dir("") is None
