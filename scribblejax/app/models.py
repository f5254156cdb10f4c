"""Models by name or folder, as the use cases load them and as reports and sessions name them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from scribblejax.models.store import load_model, read_info, resolve_model_path
from scribblejax.pipeline.network import Network
from scribblejax.pipeline.spec import spec_of

Log = Callable[[str], None]


def silent(message: str) -> None:
  """A :data:`Log` that says nothing."""
  del message


def model_ref(model: str) -> str:
  """A model as stored in reports and sessions: a folder as an absolute path, a built-in by name."""
  path = resolve_model_path(model)
  return str(model) if not (Path(model) / "model.json").is_file() else str(path.resolve())


def load_network(model: str, log: Log = silent) -> Network:
  """A built-in model or a model folder, with its stored info and input spec.

  Raises:
    ValueError: no model by that name or in that folder, or one that cannot be read.
  """
  log(f"loading model {model}")
  net, info = load_model(model)
  return Network(net, info, spec_of(net, info))


__all__ = ["Log", "load_network", "model_ref", "read_info", "silent"]
