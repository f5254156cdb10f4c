"""Atomic file writes: everything goes to a temporary sibling that is renamed into place.

A reader never sees a half-written file, and a failed write leaves the old file (if any) intact.
The data reach the disk before the rename and the rename reaches the disk after it (``fsync`` of the
file, then of its folder where the system allows), so a crash or power cut leaves the old file or
the new one, never an empty one. Files get the usual permissions (``0o666`` less the process umask),
not ``mkstemp``'s ``0o600``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _default_mode() -> int:
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary path beside ``path`` (same suffix); on success renames it to ``path``.

  Example:
    >>> with atomic_path("out/figure.png") as tmp:
    ...   fig.savefig(tmp)
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix="".join(path.suffixes) or ".tmp", dir=path.parent)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, _default_mode())
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent, folder=True)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _fsync(path: str | os.PathLike, folder: bool = False) -> None:
  """Flushes ``path`` to the disk; a folder only where the system allows opening one (not Windows)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    if folder:
      return
    raise
  try:
    os.fsync(fd)
  except OSError:
    if not folder:
      raise
  finally:
    os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically."""
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` atomically."""
  write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any, default: Any = None) -> None:
  """Writes ``obj`` as indented JSON (with a final newline) atomically."""
  write_text(path, json.dumps(obj, indent=2, default=default) + "\n")
