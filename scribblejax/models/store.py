"""Save and load models: a folder with ``model.json`` (architecture, normalisation, classes) and an
orbax checkpoint of the model's state.

Loading never imports code named by the file: the family must be one of
:data:`scribblejax.models.families.FAMILIES`, a fixed table of known constructors, each called as
``Cls(**kwargs, rngs=nnx.Rngs(0))``.

Layout::

    DIR/model.json     {"format": "scribblejax-model", "version": 1, "family": ..., "kwargs": {...},
                        "normalization": ..., "class_names": [...], "metadata": {...}}
    DIR/state/         orbax checkpoint of nnx.state(model) as a plain nested dict

Writes are atomic: everything goes to a temporary sibling folder that is renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

# the registry of families (re-exported: older code imports FAMILIES and build_model from here)
from scribblejax.models.families import FAMILIES, abstract_model, build_model

__all__ = [
  "FAMILIES",
  "FORMAT",
  "VERSION",
  "WEIGHTS_DIR",
  "ModelInfo",
  "build_model",
  "builtin_models",
  "check_replaceable",
  "load_model",
  "read_info",
  "resolve_model_path",
  "save_model",
]

FORMAT = "scribblejax-model"
VERSION = 1

# Built-in models shipped inside the package: name -> folder under scribblejax/weights/.
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


class ModelInfo(NamedTuple):
  """What ``model.json`` says about a stored model."""

  family: str
  kwargs: dict
  normalization: Any
  class_names: tuple[str, ...] | None
  metadata: dict
  path: str


def builtin_models() -> tuple[str, ...]:
  """Names of the models shipped with the package."""
  if not WEIGHTS_DIR.is_dir():
    return ()
  return tuple(sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / "model.json").is_file()))


def _to_plain(state: nnx.State) -> dict:
  return jax.tree.map(np.asarray, nnx.to_pure_dict(state))


def _atomic_dir(directory: Path):
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
  os.chmod(tmp, 0o755)
  return tmp


def save_model(
  directory: str | os.PathLike,
  model: nnx.Module,
  *,
  family: str,
  kwargs: dict,
  normalization: Any = None,
  class_names: list[str] | None = None,
  metadata: dict | None = None,
  overwrite: bool = False,
) -> Path:
  """Writes ``model`` to ``directory`` atomically.

  Args:
    directory: the folder to create.
    model: the model; its state must match ``build_model(family, kwargs)``.
    family: a key of :data:`scribblejax.models.families.FAMILIES`.
    kwargs: JSON-serialisable constructor arguments.
    normalization: a spec for :func:`scribblejax.pipeline.normalization.normalize` (``None``: no normalisation).
    class_names: one name per output class.
    metadata: anything JSON-serialisable (training command, scores, provenance).
    overwrite: replace an existing model folder (one holding only ``model.json`` and ``state``).

  Returns:
    The folder's path.

  Raises:
    ValueError: the folder exists (without ``overwrite``), or exists and is not a model folder or holds
      other files (with it), or the model does not match ``family`` and ``kwargs``.
  """
  import orbax.checkpoint as ocp

  from scribblejax.pipeline.normalization import check_spec

  directory = Path(directory).resolve()
  if directory.exists() and not overwrite:
    raise ValueError(
      f"{directory} already exists (overwrite=True, or --overwrite on the command line, replaces a model folder)"
    )
  if directory.exists():
    check_replaceable(directory)
  reference = abstract_model(family, kwargs)
  want = jax.tree.map(lambda x: tuple(x.shape), nnx.to_pure_dict(nnx.state(reference)))
  state = _to_plain(nnx.state(model))
  if jax.tree.map(np.shape, state) != want:
    raise ValueError(f"the model's state does not match family {family!r} built with {kwargs}")
  config = {
    "format": FORMAT,
    "version": VERSION,
    "family": family,
    "kwargs": kwargs,
    "normalization": check_spec(normalization),
    "class_names": list(class_names) if class_names else None,
    "metadata": metadata or {},
  }
  text = json.dumps(config, indent=2, sort_keys=True)
  tmp = _atomic_dir(directory)
  try:
    (tmp / "model.json").write_text(text)
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(tmp / "state", state)
    _replace_dir(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


_MODEL_ENTRIES = {"model.json", "state"}


def check_replaceable(directory: Path) -> None:
  """Refuses to replace anything but a model folder that holds nothing else (``overwrite=True`` must not
  delete a checkpoint being converted, or a user's other files).

  Raises:
    ValueError: ``directory`` is not a folder, not a model folder, or holds other files too.
  """
  if not directory.is_dir():
    raise ValueError(f"{directory} exists and is not a folder; refusing to replace it with a model")
  entries = {p.name for p in directory.iterdir()}
  try:
    is_model = json.loads((directory / "model.json").read_text()).get("format") == FORMAT
  except (OSError, ValueError, AttributeError):
    is_model = False
  if not is_model:
    raise ValueError(
      f"{directory} exists and is not a {FORMAT} folder (no model.json of that format); "
      "refusing to replace it: choose another output folder"
    )
  others = sorted(entries - _MODEL_ENTRIES)
  if others:
    raise ValueError(
      f"{directory} is a model folder but also holds {others[:5]}; refusing to replace it and "
      "delete them: move them out or choose another output folder"
    )


def _replace_dir(new: Path, directory: Path) -> None:
  """Moves ``new`` to ``directory``: the old folder is renamed aside first and deleted only once the new
  one is in place, so an interruption leaves one of the two whole."""
  if not directory.exists():
    os.replace(new, directory)
    return
  old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
  os.rmdir(old)
  os.replace(directory, old)
  try:
    os.replace(new, directory)
  except BaseException:
    os.replace(old, directory)
    raise
  shutil.rmtree(old, ignore_errors=True)


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
  """A built-in model's folder, or the given folder; ``ValueError`` if neither exists."""
  path = Path(name_or_path)
  if (path / "model.json").is_file():
    return path
  if str(name_or_path) in builtin_models():
    return WEIGHTS_DIR / str(name_or_path)
  raise ValueError(
    f"no model at {str(name_or_path)!r}: not a folder with model.json, nor a built-in model "
    f"({', '.join(builtin_models()) or 'none shipped'})"
  )


def read_info(name_or_path: str | os.PathLike) -> ModelInfo:
  """Reads ``model.json`` of a stored or built-in model."""
  path = resolve_model_path(name_or_path)
  try:
    config = json.loads((path / "model.json").read_text())
  except (OSError, json.JSONDecodeError) as err:
    raise ValueError(f"cannot read {path / 'model.json'}: {err}") from err
  if not isinstance(config, dict) or config.get("format") != FORMAT or config.get("version") != VERSION:
    raise ValueError(f"{path / 'model.json'} is not a {FORMAT} v{VERSION} file")
  if not isinstance(config.get("family"), str) or not isinstance(config.get("kwargs"), dict):
    raise ValueError(f'{path / "model.json"} needs a "family" (a string) and "kwargs" (an object)')
  names = config.get("class_names")
  if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
    raise ValueError(f'{path / "model.json"}: "class_names" must be a list of names, got {names!r}')
  metadata = config.get("metadata", {})
  if metadata is None:
    metadata = {}
  if not isinstance(metadata, dict):
    raise ValueError(f'{path / "model.json"}: "metadata" must be an object, got {type(metadata).__name__}')
  for key in ("refine", "resampling", "regions"):
    if metadata.get(key) is not None and not isinstance(metadata[key], dict):
      raise ValueError(f'{path / "model.json"}: "metadata.{key}" must be an object, got {type(metadata[key]).__name__}')
  return ModelInfo(
    config["family"],
    config["kwargs"],
    config.get("normalization"),
    tuple(names) if names else None,
    metadata,
    str(path),
  )


def _dotted(tree: Any) -> dict[str, tuple[int, ...]]:
  """``{"decoder.0.conv.kernel": shape}`` of a nested dict of arrays (or of array metadata)."""

  def name(path):
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)

  return {name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


class _Mismatch(ValueError):
  """Stored weights that do not fit ``model.json``'s architecture."""


def _check_stored(info: ModelInfo, want: dict[str, tuple[int, ...]], have: dict[str, tuple[int, ...]]) -> None:
  """Refuses stored weights whose names or shapes are not those of ``model.json``'s architecture."""
  built = f"{info.family} built with {info.kwargs} (model.json)"
  extra, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
  if extra or missing:
    parts = ([f"unknown parameters {extra[:5]}{' ...' if len(extra) > 5 else ''}"] if extra else []) + (
      [f"no {missing[:5]}{' ...' if len(missing) > 5 else ''}"] if missing else []
    )
    raise _Mismatch(f"the weights in {info.path} do not match {built}: they hold {' and '.join(parts)}")
  for name in sorted(want):
    if have[name] != want[name]:
      raise _Mismatch(
        f"the weights in {info.path} do not match model.json: parameter {name} has shape "
        f"{have[name]}, but {built} has {want[name]}"
      )


def load_model(name_or_path: str | os.PathLike) -> tuple[nnx.Module, ModelInfo]:
  """Loads a stored or built-in model.

  Returns:
    ``(model, info)``.

  Raises:
    ValueError: missing folder, unknown family, or a checkpoint that does not match the architecture.
  """
  import orbax.checkpoint as ocp

  info = read_info(name_or_path)
  model = abstract_model(info.family, info.kwargs)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(nnx.state(model)))
  want = _dotted(abstract)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      stored = checkpointer.metadata(Path(info.path).resolve() / "state")
      _check_stored(info, want, _dotted(getattr(stored, "item_metadata", stored)))
      restored = checkpointer.restore(Path(info.path).resolve() / "state", abstract)
  except _Mismatch:
    raise
  except Exception as err:
    raise ValueError(f"cannot restore the weights in {info.path}: {err}") from err
  _check_stored(info, want, _dotted(restored))
  bad = [
    jax.tree_util.keystr(path)
    for path, x in jax.tree_util.tree_flatten_with_path(restored)[0]
    if np.issubdtype(np.asarray(x).dtype, np.floating) and not np.all(np.isfinite(np.asarray(x)))
  ]
  if bad:
    raise ValueError(
      f"the weights in {info.path} hold NaN or Inf values ({len(bad)} array(s), e.g. {bad[0]}): "
      "the network would give no meaningful segmentation"
    )
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, jax.tree.map(np.asarray, restored))
  nnx.update(model, state)
  if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.split(model)[1:])):
    model = build_model(info.family, info.kwargs)  # arrays held outside Variables: build concretely
    nnx.update(model, state)
  return model, info
