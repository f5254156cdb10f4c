"""One call from a PyTorch artefact to a scribblejax model folder.

``convert(src, out_dir)`` accepts

* an nnU-Net v2 trained-model folder (``plans.json``, ``dataset.json``, ``fold_*/checkpoint_final.pth``):
  architecture, classes and intensity normalisation come from the folder; one fold, or several
  averaged as one ensemble (``folds="cv"``: every cross-validation fold, as ``nnUNetv2_predict``);
* a MONAI bundle folder (``configs/inference.json`` with a literal ``network_def`` + ``models/model.pt``);
* a bare checkpoint (``.pth``/``.pt``/``.safetensors``/``.npz`` state dict) with ``arch`` named as the
  original library names it (``monai.networks.nets.BasicUNet``, ``segmentation_models_pytorch.Unet``) and its
  constructor ``kwargs``.

The result is written with :func:`scribblejax.models.store.save_model` and loads with ``load_model``.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flax import nnx

from scribblejax.convert import nnunet
from scribblejax.convert.checkpoint import load_checkpoint
from scribblejax.convert.state_dict import ConversionError
from scribblejax.models.families import SOURCES, Family

# the original class paths a bare checkpoint or a MONAI bundle may name (the registry's sources)
SUPPORTED_ARCHS = tuple(sorted(SOURCES))


def _state_dict(obj: Any, source: str) -> Mapping[str, Any]:
  """The state dict inside a loaded checkpoint (bare, or under ``state_dict``/``model``/``network_weights``)."""
  if isinstance(obj, Mapping):
    for key in ("state_dict", "model", "network_weights", "model_state_dict"):
      if key in obj and isinstance(obj[key], Mapping):
        return obj[key]
    if all(isinstance(k, str) for k in obj) and obj:
      return obj
  raise ConversionError(f"{source} does not hold a state dict")


def _family(arch: str) -> Family:
  if arch not in SOURCES:
    raise ConversionError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
  return SOURCES[arch]


def _convert_state(arch: str, kwargs: Mapping[str, Any], state: Mapping[str, Any], source: str):
  family = _family(arch)
  try:
    model = family.constructor()(**kwargs, rngs=nnx.Rngs(0))
  except TypeError as e:
    raise ConversionError(f"{arch} does not accept {dict(kwargs)}: {e}") from None
  family.load_weights()(model, state, source=source)
  return family.name, model


def _plain(value: Any) -> bool:
  """A JSON value: scalars, lists/tuples and string-keyed dicts of them (MONAI's ``("GROUP", {...})``)."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return True
  if isinstance(value, dict):
    return all(isinstance(k, str) and _plain(v) for k, v in value.items())
  return isinstance(value, (list, tuple)) and all(_plain(v) for v in value)


def _as_json(value: Any) -> Any:
  """A :func:`_plain` value with its tuples as lists."""
  if isinstance(value, dict):
    return {k: _as_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_as_json(v) for v in value]
  return value


def resolved_kwargs(arch: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """``kwargs`` with the constructor's defaults for every argument not given (those that are plain JSON
  values), so that ``model.json`` states the whole architecture: the input's spatial dimensions and
  channels included, which the command line reads to adapt images."""
  out = dict(kwargs)
  for name, param in inspect.signature(_family(arch).constructor().__init__).parameters.items():
    if name in out or name in ("self", "rngs") or param.default is inspect.Parameter.empty or not _plain(param.default):
      continue
    out[name] = _as_json(param.default)
  return out


def _resolve_refs(value, config: Mapping[str, Any]):
  """Resolves MONAI bundle ``"@name"`` references to literal top-level values; refuses expressions."""
  if isinstance(value, str) and value.startswith("@"):
    target = config.get(value[1:])
    if target is None:
      raise ConversionError(f"bundle reference {value!r} does not resolve to a top-level value")
    return _resolve_refs(target, config)
  if isinstance(value, str) and value.startswith(("$", "%")):
    raise ConversionError(f"bundle network_def uses an expression {value!r}; pass --arch/--kwargs instead")
  if isinstance(value, Mapping):
    return {k: _resolve_refs(v, config) for k, v in value.items()}
  if isinstance(value, list):
    return [_resolve_refs(v, config) for v in value]
  return value


def _bundle(src: Path) -> tuple[str, dict, Path]:
  config_path = src / "configs" / "inference.json"
  try:
    config = json.loads(config_path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ConversionError(f"cannot read {config_path}: {e}") from None
  if not isinstance(config, Mapping):
    raise ConversionError(f"{config_path} holds a JSON {type(config).__name__}, not an object")
  network = config.get("network_def")
  if not isinstance(network, Mapping) or "_target_" not in network:
    raise ConversionError(f"{config_path} has no network_def with a _target_")
  network = _resolve_refs(dict(network), config)
  target = network.pop("_target_")
  arch = target if "." in target else f"monai.networks.nets.{target}"
  for key in [k for k in network if k.startswith("_")]:
    raise ConversionError(f"{config_path}: network_def option {key!r} is not supported")
  weights = src / "models" / "model.pt"
  if not weights.is_file():
    candidates = sorted((src / "models").glob("*.pt")) + sorted((src / "models").glob("*.pth"))
    if not candidates:
      raise ConversionError(f"{src / 'models'} holds no model.pt")
    weights = candidates[0]
  return arch, network, weights


def convert(
  src: str | os.PathLike,
  out_dir: str | os.PathLike,
  *,
  arch: str | None = None,
  kwargs: Mapping[str, Any] | None = None,
  normalize: Any = None,
  overwrite: bool = False,
  folds: Any = None,
  log: Any = None,
) -> Path:
  """Converts a PyTorch segmentation network into a scribblejax model folder.

  Args:
    src: an nnU-Net trained-model folder, a MONAI bundle folder, or a checkpoint file.
    out_dir: the model folder to write.
    arch: for a checkpoint file, the original class path, e.g. ``"monai.networks.nets.BasicUNet"``.
    kwargs: for a checkpoint file, the original constructor arguments (JSON values).
    normalize: a normalisation spec (dict or one per channel). nnU-Net folders default to the plans'
      normalisation; everything else defaults to ``{"kind": "none"}`` (images fed as they are).
    overwrite: replace an existing ``out_dir``.
    folds: for an nnU-Net folder, the folds to convert (see :func:`scribblejax.convert.nnunet.fold_names`;
      ``"cv"``: every numbered fold, averaged as ``nnUNetv2_predict`` averages them by default; default:
      the first fold).
    log: called with a note when an nnU-Net folder holds folds that were not converted.

  Returns:
    The written folder.

  Raises:
    ConversionError: unsupported or inconsistent input (a ``ValueError``).
    UnsafeCheckpointError: the checkpoint's pickle names a global outside the allow-list.
  """
  from scribblejax.models.store import save_model

  src = Path(src)
  if not src.exists():
    raise ConversionError(f"{src} does not exist")
  class_names, metadata = None, {"converted_from": str(src)}
  if src.is_dir() and ((src / "plans.json").is_file() or any(src.glob("fold_*"))):
    if arch is not None or kwargs:
      raise ConversionError("an nnU-Net folder carries its architecture; do not pass arch/kwargs")
    model, info = nnunet.load_trained_model_folder(src, folds=folds)
    converted = info["metadata"]["folds"]
    left = [f for f in info["metadata"]["available_folds"] if nnunet.numbered_fold(f) and f not in converted]
    if left and log is not None:
      log(
        f"note: converted fold(s) {', '.join(converted)}; {src} also holds cross-validation "
        f"fold(s) {', '.join(left)} (nnUNetv2_predict averages all of them by default: --folds cv)"
      )
    family, model_kwargs, class_names = info["family"], info["kwargs"], info["class_names"]
    metadata.update(info["metadata"])
    normalization = normalize if normalize is not None else info["normalization"]
  elif folds is not None:
    raise ConversionError(f"folds apply to nnU-Net folders; {src} is not one")
  elif src.is_dir() and (src / "configs" / "inference.json").is_file():
    bundle_arch, bundle_kwargs, weights = _bundle(src)
    if arch is not None and arch != bundle_arch:
      raise ConversionError(f"bundle defines {bundle_arch}, not {arch}")
    model_kwargs = {**bundle_kwargs, **(kwargs or {})}
    family, model = _convert_state(
      bundle_arch, model_kwargs, _state_dict(load_checkpoint(weights), str(weights)), str(weights)
    )
    model_kwargs = resolved_kwargs(bundle_arch, model_kwargs)
    metadata.update({"source": "monai-bundle", "arch": bundle_arch})
    normalization = normalize
  elif src.is_file():
    if arch is None:
      raise ConversionError(
        f"{src} is a bare checkpoint: name its architecture (arch=...), one of {', '.join(SUPPORTED_ARCHS)}"
      )
    model_kwargs = dict(kwargs or {})
    family, model = _convert_state(arch, model_kwargs, _state_dict(load_checkpoint(src), str(src)), str(src))
    model_kwargs = resolved_kwargs(arch, model_kwargs)
    metadata.update({"source": "checkpoint", "arch": arch})
    normalization = normalize
  else:
    raise ConversionError(f"{src} is neither an nnU-Net folder, a MONAI bundle nor a checkpoint file")
  return save_model(
    out_dir,
    model,
    family=family,
    kwargs=model_kwargs,
    normalization=normalization,
    class_names=class_names,
    metadata=metadata,
    overwrite=overwrite,
  )
