"""nnU-Net v2 checkpoints and trained-model folders -> the Flax networks of :mod:`scribblejax.models.zoo.nnunet`.

:func:`architecture_kwargs` reads a plans configuration into the constructor arguments of
:class:`~scribblejax.models.zoo.nnunet.PlainConvUNet` or :class:`~scribblejax.models.zoo.nnunet.ResidualEncoderUNet`;
:func:`load_weights` moves a checkpoint's ``network_weights`` in (the deep-supervision heads are dropped).

:func:`load_trained_model_folder` rebuilds one from an nnU-Net trained-model folder::

  Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres/
    plans.json  dataset.json  fold_0/checkpoint_final.pth  fold_1/...

one fold, or several as a :class:`scribblejax.models.ensemble.Ensemble` whose logits are their mean
(``folds="cv"``: every numbered fold, what ``nnUNetv2_predict`` uses by default; fold names as its
``-f`` takes them, ``"all"`` being ``fold_all``).

An nnU-Net network reads a volume's axes in SimpleITK's order (the reverse of NIfTI's ``(i, j, k)``),
permuted by the plans' ``transpose_forward``. The converted model states that order in its metadata
(``input_axis_order``) and the command line applies it (and its inverse to the segmentation); a
library user calling ``predict`` or ``refine`` on an array gives it in that order
(:func:`scribblejax.pipeline.spec.input_axis_order` says which).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from scribblejax.convert.checkpoint import load_checkpoint
from scribblejax.convert.state_dict import (
  ConversionError,
  StateReader,
  assign,
  canonicalize,
  conv_kernel,
  conv_transpose_kernel,
  strip_wrappers,
)
from scribblejax.models.families import constructor

# the architectures, also importable from here as before they moved to the zoo
from scribblejax.models.zoo.nnunet import ConvNormAct, PlainConvUNet, ResidualEncoderUNet
from scribblejax.pipeline.spec import nnunet_axis_order

LayerPath = tuple[Any, ...]


# ----------------------------------------------------------------------------- plans -> kwargs

_NORMS = {"InstanceNorm": "instance", "BatchNorm": "batch", "GroupNorm": "group"}
_NONLINS = {
  "LeakyReLU": "leaky_relu",
  "ReLU": "relu",
  "PReLU": "prelu",
  "ELU": "elu",
  "GELU": "gelu",
  "Tanh": "tanh",
  "Sigmoid": "sigmoid",
}


def _class_name(name: str | None) -> str | None:
  return None if name is None else str(name).rsplit(".", 1)[-1]


def _norm_spec(norm_op: str | None, kwargs: Mapping | None) -> dict | None:
  name = _class_name(norm_op)
  if name is None:
    return None
  base = re.sub(r"[123]d$", "", name)
  if base not in _NORMS:
    raise ConversionError(f"unsupported nnU-Net norm_op {norm_op!r}")
  kwargs = dict(kwargs or {})
  spec = {"kind": _NORMS[base], "eps": float(kwargs.pop("eps", 1e-5))}
  if base == "GroupNorm":
    spec["groups"] = int(kwargs.pop("num_groups"))
    spec["affine"] = bool(kwargs.pop("affine", True))
  else:
    spec["affine"] = bool(kwargs.pop("affine", base != "InstanceNorm"))
  kwargs.pop("momentum", None)
  if base == "BatchNorm":
    if not kwargs.pop("track_running_stats", True):
      raise ConversionError("BatchNorm without running statistics is not supported")
  elif kwargs.pop("track_running_stats", False):
    raise ConversionError("InstanceNorm with track_running_stats=True is not supported")
  if kwargs:
    raise ConversionError(f"unsupported norm_op_kwargs {sorted(kwargs)} for {norm_op}")
  return spec


def _nonlin_spec(nonlin: str | None, kwargs: Mapping | None) -> dict | None:
  name = _class_name(nonlin)
  if name is None:
    return None
  if name not in _NONLINS:
    raise ConversionError(f"unsupported nnU-Net nonlin {nonlin!r}")
  kwargs = dict(kwargs or {})
  kwargs.pop("inplace", None)
  spec = {"kind": _NONLINS[name]}
  allowed = {
    "leaky_relu": {"negative_slope"},
    "prelu": {"num_parameters", "init"},
    "elu": {"alpha"},
    "gelu": {"approximate"},
  }.get(spec["kind"], set())
  if set(kwargs) - allowed:
    raise ConversionError(f"unsupported nonlin_kwargs {sorted(set(kwargs) - allowed)} for {nonlin}")
  return {**spec, **kwargs}


_PLAIN_ARCH_KEYS = {
  "n_stages",
  "features_per_stage",
  "conv_op",
  "kernel_sizes",
  "strides",
  "n_conv_per_stage",
  "n_conv_per_stage_decoder",
  "conv_bias",
  "norm_op",
  "norm_op_kwargs",
  "dropout_op",
  "dropout_op_kwargs",
  "nonlin",
  "nonlin_kwargs",
  "deep_supervision",
  "nonlin_first",
}
_RES_ARCH_KEYS = (_PLAIN_ARCH_KEYS - {"n_conv_per_stage", "nonlin_first"}) | {
  "n_blocks_per_stage",
  "block",
  "bottleneck_channels",
  "stem_channels",
}


def architecture_kwargs(
  configuration: Mapping[str, Any], input_channels: int, num_classes: int
) -> tuple[str, dict[str, Any]]:
  """Family name and JSON constructor kwargs from a resolved plans configuration.

  Reads the current ``architecture`` section (``network_class_name`` + ``arch_kwargs``) or the older
  ``UNet_class_name`` / ``pool_op_kernel_sizes`` fields.

  Raises:
    ConversionError: unknown network class or option.
  """
  if "architecture" in configuration:
    arch = configuration["architecture"]
    class_name = _class_name(arch["network_class_name"])
    kw = dict(arch["arch_kwargs"])
  elif "UNet_class_name" in configuration:
    class_name = configuration["UNet_class_name"]
    kernels = configuration["conv_kernel_sizes"]
    n = len(kernels)
    base, cap = configuration["UNet_base_num_features"], configuration["unet_max_num_features"]
    kw = {
      "n_stages": n,
      "features_per_stage": [min(base * 2**i, cap) for i in range(n)],
      "conv_op": f"torch.nn.Conv{len(kernels[0])}d",
      "kernel_sizes": kernels,
      "strides": configuration["pool_op_kernel_sizes"],
      "n_conv_per_stage_decoder": configuration["n_conv_per_stage_decoder"],
      "conv_bias": True,
      "norm_op": f"torch.nn.InstanceNorm{len(kernels[0])}d",
      "norm_op_kwargs": {"eps": 1e-5, "affine": True},
      "nonlin": "torch.nn.LeakyReLU",
      "nonlin_kwargs": {"inplace": True},
    }
    kw["n_conv_per_stage" if class_name == "PlainConvUNet" else "n_blocks_per_stage"] = configuration[
      "n_conv_per_stage_encoder"
    ]
  else:
    raise ConversionError("plans configuration has no 'architecture' section")
  allowed = {"PlainConvUNet": _PLAIN_ARCH_KEYS, "ResidualEncoderUNet": _RES_ARCH_KEYS}.get(class_name)
  if allowed is None:
    raise ConversionError(
      f"unsupported nnU-Net network class {class_name!r} (supported: PlainConvUNet, ResidualEncoderUNet)"
    )
  if set(kw) - allowed:
    raise ConversionError(f"unsupported {class_name} arch_kwargs: {sorted(set(kw) - allowed)}")
  conv_name = _class_name(kw["conv_op"])
  if conv_name not in ("Conv2d", "Conv3d"):
    raise ConversionError(f"unsupported conv_op {kw['conv_op']!r}")
  out = {
    "input_channels": int(input_channels),
    "num_classes": int(num_classes),
    "spatial_dims": int(conv_name[4]),
    "n_stages": int(kw["n_stages"]),
    "features_per_stage": kw["features_per_stage"],
    "kernel_sizes": kw["kernel_sizes"],
    "strides": kw["strides"],
    "n_conv_per_stage_decoder": kw["n_conv_per_stage_decoder"],
    "conv_bias": bool(kw.get("conv_bias", False)),
    "norm": _norm_spec(kw.get("norm_op"), kw.get("norm_op_kwargs")),
    "nonlin": _nonlin_spec(kw.get("nonlin"), kw.get("nonlin_kwargs")),
  }
  if class_name == "PlainConvUNet":
    out["n_conv_per_stage"] = kw["n_conv_per_stage"]
    out["nonlin_first"] = bool(kw.get("nonlin_first", False))
  else:
    out["n_blocks_per_stage"] = kw["n_blocks_per_stage"]
    block = _class_name(kw.get("block")) or "BasicBlockD"
    if block not in ("BasicBlockD", "BottleneckD"):
      raise ConversionError(f"unsupported residual block {kw.get('block')!r}")
    out["block"] = block
    out["bottleneck_channels"] = kw.get("bottleneck_channels")
    out["stem_channels"] = kw.get("stem_channels")
  return f"nnunet.{class_name}", _plain_json(out)


def _plain_json(value):
  """Tuples -> lists, numpy numbers -> Python numbers: a JSON-serialisable copy."""
  if isinstance(value, Mapping):
    return {str(k): _plain_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain_json(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


# ----------------------------------------------------------------------------- weights


def _canonical_key(key: str) -> str:
  """``decoder.encoder.X`` (the decoder's reference to the encoder) -> ``encoder.X``."""
  return key[len("decoder.") :] if key.startswith("decoder.encoder.") else key


def _drop_all_modules_aliases(state: Mapping[str, np.ndarray], *, source: str) -> dict[str, np.ndarray]:
  """Removes ``<block>.all_modules.<i>.<p>`` keys, each of which must equal ``<block>.<op>.<p>``.

  ``ConvDropoutNormReLU`` registers its conv, norm and nonlin twice (by name and inside the
  ``all_modules`` Sequential), so the state dict holds each tensor under both names.
  """
  out = {}
  for key, value in state.items():
    match = re.fullmatch(r"(.*)\.all_modules\.\d+\.(\w+)", key)
    if match is None:
      out[key] = value
      continue
    prefix, param = match.groups()
    twins = [f"{prefix}.{op}.{param}" for op in ("conv", "norm", "nonlin")]
    if not any(t in state and np.shape(state[t]) == np.shape(value) and np.array_equal(state[t], value) for t in twins):
      raise ConversionError(f"{source}: {key!r} is not a copy of any of {twins}")
  return out


def _conv_norm_act_values(
  reader: StateReader, torch_prefix: str, path: LayerPath, module: ConvNormAct, values: dict
) -> None:
  conv = module.conv
  values[(*path, "conv", "kernel")] = conv_kernel(reader.take(f"{torch_prefix}.conv.weight"))
  if conv.bias is not None:
    values[(*path, "conv", "bias")] = reader.take(f"{torch_prefix}.conv.bias")
  norm_values(reader, f"{torch_prefix}.norm", (*path, "norm"), module.norm, values)
  act_values(reader, f"{torch_prefix}.nonlin", (*path, "nonlin"), module.nonlin, values)


def norm_values(reader: StateReader, torch_prefix: str, path: LayerPath, norm, values: dict) -> None:
  """Moves a torch norm's ``weight``/``bias`` (and BatchNorm running stats) to ``values``."""
  if norm is None:
    return
  if getattr(norm, "scale", None) is not None:
    values[(*path, "scale")] = reader.take(f"{torch_prefix}.weight")
    values[(*path, "bias")] = reader.take(f"{torch_prefix}.bias")
  if hasattr(norm, "mean"):
    values[(*path, "mean")] = reader.take(f"{torch_prefix}.running_mean")
    values[(*path, "var")] = reader.take(f"{torch_prefix}.running_var")
    if f"{torch_prefix}.num_batches_tracked" in reader:
      reader.ignore(f"{torch_prefix}.num_batches_tracked")


def act_values(reader: StateReader, torch_key_prefix: str, path: LayerPath, act, values: dict) -> None:
  """Moves a PReLU's ``weight`` to ``values`` (other activations hold nothing)."""
  if act is not None and act.weight is not None:
    values[(*path, "weight")] = reader.take(f"{torch_key_prefix}.weight")


def load_weights(
  model: PlainConvUNet | ResidualEncoderUNet, state: Mapping[str, Any], *, source: str = "checkpoint"
) -> None:
  """Loads an nnU-Net ``network_weights`` state dict into ``model`` strictly (in place).

  Args:
    model: a freshly built model.
    state: the torch state dict (NumPy arrays).
    source: name used in error messages.

  Raises:
    ConversionError: a key is missing, unexpected or of the wrong shape; aliases disagree.
  """
  state = canonicalize(strip_wrappers(state), _canonical_key, source=source)
  state = _drop_all_modules_aliases(state, source=source)
  reader = StateReader(state, source=source)
  values = reader.values()
  if isinstance(model, PlainConvUNet):
    for s, stage in enumerate(model.encoder["stages"]):
      for i, conv in enumerate(stage.convs):
        _conv_norm_act_values(
          reader, f"encoder.stages.{s}.0.convs.{i}", ("encoder", "stages", s, "convs", i), conv, values
        )
  else:
    _conv_norm_act_values(
      reader, "encoder.stem.convs.0", ("encoder", "stem", "convs", 0), model.encoder["stem"].convs[0], values
    )
    for s, stage in enumerate(model.encoder["stages"]):
      for b, block in enumerate(stage["blocks"]):
        t, p = f"encoder.stages.{s}.blocks.{b}", ("encoder", "stages", s, "blocks", b)
        for i, conv in enumerate(block.convs):
          _conv_norm_act_values(reader, f"{t}.conv{i + 1}", (*p, "convs", i), conv, values)
        if block.projection is not None:
          skip_index = 1 if block.pool is not None else 0
          _conv_norm_act_values(reader, f"{t}.skip.{skip_index}", (*p, "projection"), block.projection, values)
        act_values(reader, f"{t}.nonlin{len(block.convs)}", (*p, "nonlin"), block.nonlin, values)
  decoder = model.decoder
  for s, (up, stage) in enumerate(zip(decoder.transpconvs, decoder.stages)):
    values[("decoder", "transpconvs", s, "kernel")] = conv_transpose_kernel(
      reader.take(f"decoder.transpconvs.{s}.weight")
    )
    if up.bias is not None:
      values[("decoder", "transpconvs", s, "bias")] = reader.take(f"decoder.transpconvs.{s}.bias")
    for i, conv in enumerate(stage.convs):
      _conv_norm_act_values(reader, f"decoder.stages.{s}.convs.{i}", ("decoder", "stages", s, "convs", i), conv, values)
  last = len(decoder.stages) - 1
  values[("decoder", "seg_layer", "kernel")] = conv_kernel(reader.take(f"decoder.seg_layers.{last}.weight"))
  values[("decoder", "seg_layer", "bias")] = reader.take(f"decoder.seg_layers.{last}.bias")
  reader.ignore_matching(r"decoder\.seg_layers\.\d+\.(weight|bias)")  # deep-supervision heads
  reader.finish()
  assign(model, values, source=source)


# ----------------------------------------------------------------------------- trained-model folder


def resolve_configuration(plans: Mapping[str, Any], name: str) -> dict[str, Any]:
  """A plans configuration with ``inherits_from`` resolved (child keys override the parent's)."""
  configurations = plans.get("configurations", {})
  seen = []
  while True:
    if name not in configurations:
      raise ConversionError(f"plans have no configuration {name!r} (have {sorted(configurations)})")
    if name in seen:
      raise ConversionError(f"plans configurations inherit in a cycle: {seen + [name]}")
    seen.append(name)
    parent = configurations[name].get("inherits_from")
    if parent is None:
      break
    name = parent
  resolved: dict[str, Any] = {}
  for name in reversed(seen):
    resolved.update(configurations[name])
  resolved.pop("inherits_from", None)
  return resolved


_SCHEMES = {
  "ZScoreNormalization",
  "CTNormalization",
  "NoNormalization",
  "RescaleTo01Normalization",
  "RGBTo0_1Normalization",
}


def resampling_metadata(configuration: Mapping[str, Any]) -> dict[str, Any]:
  """``metadata.resampling`` of a converted model: how images go to the plans' spacing and logits come
  back (:class:`scribblejax.pipeline.resampling.ResampleScheme`; nnU-Net's defaults where the plans say nothing).

  Raises:
    ConversionError: the plans use another resampling function or options this one does not know.
  """
  from scribblejax.pipeline.resampling import IMAGE, LOGITS, ResampleScheme

  known = {"resample_data_or_seg_to_shape", None}
  for key in ("resampling_fn_data", "resampling_fn_probabilities"):
    if configuration.get(key) not in known:
      raise ConversionError(
        f"the plans' {key} is {configuration.get(key)!r}; only nnU-Net's default "
        "resample_data_or_seg_to_shape is supported"
      )
  try:
    image = ResampleScheme.from_nnunet(configuration.get("resampling_fn_data_kwargs"), IMAGE)
    logits = ResampleScheme.from_nnunet(configuration.get("resampling_fn_probabilities_kwargs"), LOGITS)
  except ValueError as err:
    raise ConversionError(f"the plans' resampling options: {err}") from None
  return {"image": image.to_json(), "logits": logits.to_json()}


def normalization_spec(plans: Mapping[str, Any], configuration: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The intensity normalisation nnU-Net applies, one spec per input channel.

  ``ZScoreNormalization`` -> per-image z-score; ``CTNormalization`` -> clip to the foreground
  0.5/99.5 percentiles then z-score with the foreground mean/std; ``NoNormalization`` -> none;
  ``RescaleTo01Normalization`` -> min-max; ``RGBTo0_1Normalization`` -> scale by 1/255.
  ``use_mask_for_norm`` (a z-score over the image's non-zero region only, which nnU-Net uses when
  cropping to that region shrank the images) -> ``{"kind": "zscore", "mask": "nonzero"}``. nnU-Net
  also crops each image to that region before the network; the converted model sees the whole image.
  """
  specs = []
  properties = plans.get("foreground_intensity_properties_per_channel", {})
  masked = configuration.get("use_mask_for_norm") or []
  for c, scheme in enumerate(configuration.get("normalization_schemes", [])):
    if scheme not in _SCHEMES:
      raise ConversionError(f"unsupported nnU-Net normalization scheme {scheme!r}")
    if scheme == "ZScoreNormalization":
      specs.append({"kind": "zscore", "mask": "nonzero"} if c < len(masked) and masked[c] else {"kind": "zscore"})
    elif scheme == "CTNormalization":
      p = properties.get(str(c)) or properties.get(c)
      if p is None:
        raise ConversionError(f"plans lack foreground intensity properties for channel {c}")
      specs.append(
        {
          "kind": "ct",
          "lower": float(p["percentile_00_5"]),
          "upper": float(p["percentile_99_5"]),
          "mean": float(p["mean"]),
          "std": float(p["std"]),
        }
      )
    elif scheme == "NoNormalization":
      specs.append({"kind": "none"})
    elif scheme == "RescaleTo01Normalization":
      specs.append({"kind": "minmax"})
    else:
      specs.append({"kind": "scale", "factor": 1.0 / 255.0})
  return specs


def _read_json(path: Path) -> dict:
  try:
    value = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ConversionError(f"cannot read {path}: {e}") from None
  if not isinstance(value, dict):
    raise ConversionError(f"{path} holds a JSON {type(value).__name__}, not an object")
  return value


def _is_region(value: Any) -> bool:
  return isinstance(value, (list, tuple)) and len(value) > 1


def _label_value(name: str, value: Any) -> int:
  """A label's integer value (a one-element list is its element, as nnU-Net reads it)."""
  if isinstance(value, (list, tuple)) and len(value) == 1:
    value = value[0]
  if isinstance(value, bool) or not isinstance(value, int):
    raise ConversionError(f"label {name!r} maps to {value!r}, not an integer label value")
  return value


def _regions(dataset: Mapping[str, Any], labels: Mapping[str, Any]) -> tuple[list[str], dict]:
  """A region-based dataset's class names and the metadata of its regions, as nnU-Net's LabelManager
  reads them: every label entry but ``ignore`` and the background is a region (an output channel, in
  the file's order), and region ``i`` writes class ``regions_class_order[i]`` where no later region
  is on. Class 0 is the background's name; class ``order[i]`` is region ``i``'s name, followed by
  "excluding" and the later regions that share labels with it."""
  from scribblejax.models.regions import check_order

  names, sets = [], []
  background = "background"
  for name, value in labels.items():
    if name == "ignore":
      continue
    values = [_label_value(name, v) for v in value] if isinstance(value, (list, tuple)) else [_label_value(name, value)]
    if set(values) == {0}:
      background = name
      continue
    names.append(name)
    sets.append(sorted(set(values)))
  order = dataset.get("regions_class_order")
  if order is None:
    raise ConversionError("dataset.json has region labels (lists of label values) but no regions_class_order")
  if not isinstance(order, (list, tuple)) or len(order) != len(names):
    raise ConversionError(
      f"dataset.json's regions_class_order must list one class per region ({len(names)}: "
      f"{', '.join(names)}), got {order!r}"
    )
  try:
    order = list(check_order(order))
  except ValueError as err:
    raise ConversionError(f"dataset.json: {err}") from None

  # class order[j] is written where region j is on and no later region is: "j excluding the later
  # regions that share its labels" (BraTS: whole tumour excluding tumour core, enhancing tumour = edema)
  def written(j: int) -> str:
    later = [names[i] for i in range(j + 1, len(names)) if set(sets[i]) & set(sets[j])]
    return names[j] + (f" excluding {', '.join(later)}" if later else "")

  class_names = [background] + [written(order.index(c)) for c in range(1, len(order) + 1)]
  return class_names, {"names": names, "labels": sets, "class_order": order}


def _class_names(dataset: Mapping[str, Any]) -> tuple[list[str], dict | None]:
  """The class names in value order, and for a region-based dataset its regions (see :func:`_regions`)."""
  labels = dataset.get("labels")
  if not labels or not isinstance(labels, Mapping):
    raise ConversionError(f'dataset.json needs "labels", an object mapping names to values, got {labels!r}')
  if any(_is_region(v) for k, v in labels.items() if k != "ignore"):
    return _regions(dataset, labels)
  if "ignore" in labels:
    # nnU-Net's sparse-annotation label: the highest value, never predicted (no output channel).
    ignore = labels["ignore"]
    others = [_label_value(k, v) for k, v in labels.items() if k != "ignore"]
    if not isinstance(ignore, int) or any(v >= ignore for v in others):
      raise ConversionError(f"dataset.json's 'ignore' label must be the highest integer label, got {ignore!r}")
    labels = {k: v for k, v in labels.items() if k != "ignore"}
  by_value = {}
  for name, value in labels.items():
    by_value[_label_value(name, value)] = name
  if sorted(by_value) != list(range(len(by_value))):
    raise ConversionError(f"dataset.json labels are not 0..n-1: {sorted(by_value)}")
  return [by_value[i] for i in range(len(by_value))], None


def available_folds(folder: Path) -> list[str]:
  """The names ``k`` of the folder's ``fold_<k>`` directories, numbered ones first in numeric order."""
  names = [p.name[len("fold_") :] for p in Path(folder).glob("fold_*") if p.is_dir()]
  return sorted(names, key=lambda n: (not numbered_fold(n), int(n) if numbered_fold(n) else 0, n))


def numbered_fold(name: str) -> bool:
  """Whether ``fold_<name>`` is a cross-validation fold (``0``, ``1``, ...; not ``all``)."""
  return name.isascii() and name.isdigit()


def fold_names(folder: Path, folds: Any = None) -> list[str]:
  """The folds to load: ``None``: the first (``fold_0`` when present); ``"cv"``: every numbered fold
  (the cross-validation folds, ``nnUNetv2_predict``'s default set); a fold as ``nnUNetv2_predict -f``
  names it (``3``, or ``"all"`` for ``fold_all``); or a list of folds.

  Raises:
    ConversionError: no such fold, a repeated fold, or no folds at all.
  """
  present = available_folds(folder)
  if folds is None:
    if not present:
      raise ConversionError(f"{folder} has no fold_* directory")
    return present[:1]
  if isinstance(folds, str) and folds == "cv":
    numbered = [n for n in present if numbered_fold(n)]
    if not numbered:
      raise ConversionError(f"{folder} has no numbered fold_<k> directory (nnU-Net's cross-validation folds)")
    return numbered
  chosen = [folds] if isinstance(folds, (int, str)) else list(folds)
  names = [str(f) for f in chosen]
  if not names:
    raise ConversionError("no fold chosen")
  if len(set(names)) != len(names):
    raise ConversionError(f"a fold is named twice: {names}")
  bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_.-]+", n) or n in (".", "..")]
  if bad:
    raise ConversionError(
      f"fold names are folder suffixes (fold_<name>) of letters, digits, '_', '.' and '-', got {bad[0]!r}"
    )
  for name in names:
    if not (Path(folder) / f"fold_{name}").is_dir():
      raise ConversionError(f"{folder} has no fold_{name} (its folds: {', '.join(present) or 'none'})")
  return names


def find_checkpoint(folder: Path, fold: str | int | None = None) -> Path:
  """``fold_<k>/checkpoint_final.pth`` (or ``checkpoint_best.pth``) of the requested or first fold."""
  folds = [Path(folder) / f"fold_{fold_names(folder, None if fold is None else [fold])[0]}"]
  for name in ("checkpoint_final.pth", "checkpoint_best.pth"):
    path = folds[0] / name
    if path.is_file():
      return path
  raise ConversionError(f"{folds[0]} has no checkpoint_final.pth or checkpoint_best.pth")


def _fold_checkpoint(folder: Path, fold: str) -> tuple[Path, Mapping]:
  path = find_checkpoint(folder, fold)
  checkpoint = load_checkpoint(path)
  if not isinstance(checkpoint, Mapping) or "network_weights" not in checkpoint:
    raise ConversionError(f"{path} has no 'network_weights'")
  return path, checkpoint


def load_trained_model_folder(
  folder, *, fold: str | int | None = None, folds: Any = None, rngs: nnx.Rngs | None = None
) -> tuple[nnx.Module, dict[str, Any]]:
  """Rebuilds the network of an nnU-Net v2 trained-model folder, with its weights.

  Args:
    folder: the folder holding ``plans.json``, ``dataset.json`` and ``fold_*/``.
    fold: one fold to load (default: the first, ``fold_0`` when present).
    folds: instead of ``fold``: ``"cv"`` (every numbered fold, ``nnUNetv2_predict``'s default) or a
      list of folds (``"all"`` is ``fold_all``, as for ``nnUNetv2_predict -f``). Several folds make
      one :class:`scribblejax.models.ensemble.Ensemble` (family ``scribblejax.models.Ensemble``) whose logits
      are the folds' mean, as nnU-Net averages them.
    rngs: random generators for construction (weights are then overwritten).

  Returns:
    ``(model, info)``; ``info`` has ``family``, ``kwargs`` (JSON), ``normalization`` (one spec per
    channel), ``class_names``, ``configuration`` and ``metadata`` (``folds``: the folds loaded,
    ``available_folds``: the folder's).

  Raises:
    ConversionError: missing files or folds, unsupported architecture or mismatching weights.
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise ConversionError(f"nnU-Net folder {folder} does not exist")
  if fold is not None and folds is not None:
    raise ConversionError("pass fold or folds, not both")
  names = fold_names(folder, folds if folds is not None else fold)
  checkpoint_path, checkpoint = _fold_checkpoint(folder, names[0])
  init_args = checkpoint.get("init_args") or {}
  plans = _read_json(folder / "plans.json") if (folder / "plans.json").is_file() else init_args.get("plans")
  dataset = (
    _read_json(folder / "dataset.json") if (folder / "dataset.json").is_file() else init_args.get("dataset_json")
  )
  if plans is None or dataset is None:
    raise ConversionError(f"{folder} lacks plans.json / dataset.json and the checkpoint does not carry them")
  config_name = init_args.get("configuration")
  if config_name is None:
    parts = folder.name.split("__")
    if len(parts) != 3:
      raise ConversionError(f"cannot tell the configuration of {folder} (expected Trainer__Plans__Configuration)")
    config_name = parts[2]
  if not isinstance(plans, Mapping) or not isinstance(dataset, Mapping):
    raise ConversionError(f"{folder}: plans and dataset.json must be JSON objects")
  configuration = resolve_configuration(plans, config_name)
  if configuration.get("previous_stage"):
    raise ConversionError(
      f"{config_name!r} is a cascade stage: its network also reads the segmentation of the "
      f"{configuration['previous_stage']!r} stage as input channels, which scribblejax cannot "
      f"supply; convert the {configuration['previous_stage']!r} or 3d_fullres folder instead"
    )
  channels = dataset.get("channel_names") or dataset.get("modality")
  if not channels or not isinstance(channels, Mapping):
    raise ConversionError("dataset.json has no channel_names (an object of channel index -> name)")
  class_names, regions = _class_names(dataset)
  outputs = len(class_names) if regions is None else len(regions["class_order"])
  try:
    family, kwargs = architecture_kwargs(configuration, len(channels), outputs)
  except (KeyError, TypeError, AttributeError, ValueError) as err:
    if isinstance(err, ConversionError):
      raise
    raise ConversionError(
      f"{folder}: the plans' configuration {config_name!r} lacks or mangles an architecture "
      f"field ({type(err).__name__}: {err})"
    ) from None
  members, paths = [], []
  for k, name in enumerate(names):
    path, weights = (checkpoint_path, checkpoint) if k == 0 else _fold_checkpoint(folder, name)
    member = constructor(family)(**kwargs, rngs=rngs or nnx.Rngs(0))
    load_weights(member, weights["network_weights"], source=str(path))
    members.append(member)
    paths.append(str(path))
    del weights
  model, member_family = members[0], family
  if len(members) > 1:
    from scribblejax.models.ensemble import Ensemble

    family, kwargs = "scribblejax.Ensemble", {"family": member_family, "kwargs": kwargs, "members": len(members)}
    model = Ensemble.of(members, member_family)
  if regions is not None:
    from scribblejax.models.regions import Regions

    family, kwargs = "scribblejax.Regions", {"family": family, "kwargs": kwargs, "order": regions["class_order"]}
    model = Regions.of(model, regions["class_order"], kwargs["family"])
  info = {
    "family": family,
    "kwargs": kwargs,
    "normalization": normalization_spec(plans, configuration),
    "class_names": class_names,
    "configuration": config_name,
    "metadata": {
      "source": "nnunetv2",
      "folder": str(folder),
      "checkpoint": paths[0],
      "folds": names,
      "checkpoints": paths,
      "available_folds": available_folds(folder),
      "configuration": config_name,
      "trainer": checkpoint.get("trainer_name"),
      "patch_size": configuration.get("patch_size"),
      "spacing": configuration.get("spacing"),
      "resampling": resampling_metadata(configuration),
      "crop_to_nonzero": True,
      "mirroring_axes": _plain_json(checkpoint.get("inference_allowed_mirroring_axes")),
      "transpose_forward": plans.get("transpose_forward"),
      "input_axis_order": nnunet_axis_order(plans.get("transpose_forward")),
      "channel_names": _plain_json(channels),
    },
  }
  if regions is not None:
    info["metadata"]["regions"] = regions
  return model, _plain_json(info)
