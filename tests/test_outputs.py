"""Stage outputs are replaced whole or left as they were."""

import pytest

from mnist_lifecycle import outputs


def test_atomic_write_replaces_the_target_only_when_complete(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    outputs.write_text(target, "first")
    assert target.read_text() == "first"

    with pytest.raises(RuntimeError), outputs.atomic_path(target) as temporary:
        temporary.write_text("half of the second")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_a_partial_file_left_by_a_killed_writer_is_overwritten(tmp_path):
    target = tmp_path / "images.npy"
    outputs.partial_path(target).write_text("truncated")  # what a kill -9 mid-write leaves
    assert outputs.partial_path(target).name == ".images.partial.npy"  # keeps the suffix np.save needs
    outputs.write_text(target, "whole")
    assert target.read_text() == "whole"
    assert [p.name for p in tmp_path.iterdir()] == ["images.npy"]
