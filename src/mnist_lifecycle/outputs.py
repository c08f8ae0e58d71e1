"""Stage outputs are written whole or not at all.

A process killed mid-write (kill -9, out of memory, power loss) must not leave a truncated file
that the next notebook, DVC or a person could take for a result. Each output is written under a
temporary name beside it, `.<stem>.partial<suffix>`, and renamed over the target once complete:
a rename within a directory is atomic. The temporary name is fixed, so what a killed writer left
is overwritten by the next write of the same output; one writer per output at a time, as in a
DVC stage.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path


def partial_path(path: Path) -> Path:
    """The temporary name `path` is written under; it keeps the suffix (np.save, savefig use it)."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield the temporary name to write; it replaces `path` when the block completes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_path(path)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_json(path: Path, value) -> None:
    """`value` as indented JSON with a final newline (what DVC metrics and people read)."""
    write_text(path, json.dumps(value, indent=2) + "\n")
