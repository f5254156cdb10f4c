"""Intensity normalisation as the model expects it, stored with the model as a small spec dict.

Specs (a single dict for all channels, or a list with one dict per input channel):

* ``{"kind": "none"}``: feed the image as it is.
* ``{"kind": "zscore"}``: per-image mean and standard deviation; or with fixed ``"mean"`` and ``"std"``.
  ``"mask": "nonzero"`` (nnU-Net's ``use_mask_for_norm``): the statistics of, and the scaling of, only
  the pixels inside the image's non-zero region (non-zero in any channel, holes filled); the pixels
  outside it keep their value (0).
* ``{"kind": "ct", "lower": l, "upper": u, "mean": m, "std": s}``: clip to [l, u], then z-score with the
  fixed mean and std (nnU-Net's CTNormalization).
* ``{"kind": "minmax"}``: rescale the image's own range to [0, 1].
* ``{"kind": "scale", "factor": f}``: multiply (nnU-Net's RGBTo01 is ``factor = 1/255``).
* ``{"kind": "percentile", "lower": 0.5, "upper": 99.5}``: map the image's percentiles to [0, 1], clipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

KINDS = ("none", "zscore", "ct", "minmax", "scale", "percentile")
_EPS = 1e-8


def check_spec(spec: Any) -> list[dict] | dict:
  """Validates a normalisation spec; returns it as plain dicts. Raises ``ValueError`` if unknown."""
  if spec is None:
    return {"kind": "none"}
  if isinstance(spec, Mapping):
    kind = spec.get("kind")
    if kind not in KINDS:
      raise ValueError(f"unknown normalisation kind {kind!r}; expected one of {KINDS}")
    required = {"ct": ("lower", "upper", "mean", "std"), "scale": ("factor",)}.get(kind, ())
    missing = [k for k in required if k not in spec]
    if missing:
      raise ValueError(f"normalisation {kind!r} needs {missing}")
    allowed = {"kind", "mean", "std", "lower", "upper", "factor", "mask"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
      raise ValueError(f"normalisation spec has unknown keys {unknown}")
    _check_values(kind, spec)
    return dict(spec)
  if isinstance(spec, Sequence) and not isinstance(spec, str):
    return [check_spec(s) for s in spec]
  raise ValueError(f"a normalisation spec is a dict or a list of dicts, got {type(spec).__name__}")


def _number(kind: str, key: str, value: Any) -> float:
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"normalisation {kind!r}: {key} must be a number, got {value!r}") from None
  if not np.isfinite(number):
    raise ValueError(f"normalisation {kind!r}: {key} must be finite, got {value!r}")
  return number


def _check_values(kind: str, spec: Mapping) -> None:
  """Refuses values that would give a constant, binarised or blown-up image instead of an error."""
  values = {
    k: _number(kind, k, spec[k]) for k in ("mean", "std", "lower", "upper", "factor") if spec.get(k) is not None
  }
  if spec.get("mask") is not None and (kind != "zscore" or spec["mask"] != "nonzero"):
    raise ValueError(
      f"normalisation {kind!r}: mask {spec['mask']!r} is not supported; only 'zscore' takes a mask, and only 'nonzero'"
    )
  if "std" in values and values["std"] <= 0:
    raise ValueError(f"normalisation {kind!r}: std must be positive, got {spec['std']!r}")
  if kind == "percentile":
    lower, upper = values.get("lower", 0.5), values.get("upper", 99.5)
    if not 0 <= lower < upper <= 100:
      raise ValueError(f"normalisation 'percentile' needs 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
  elif kind == "ct" and not values["lower"] < values["upper"]:
    raise ValueError(f"normalisation 'ct' needs lower < upper, got lower={values['lower']}, upper={values['upper']}")
  if kind == "scale" and values["factor"] == 0:
    raise ValueError("normalisation 'scale': factor 0 would make every image 0")


def _one(channel: np.ndarray, spec: Mapping, nonzero: np.ndarray | None = None) -> np.ndarray:
  x = channel.astype(np.float32)
  kind = spec["kind"]
  if kind == "none":
    return x
  if kind == "zscore" and spec.get("mask") == "nonzero":
    out = x.copy()
    if nonzero.any():
      out[nonzero] = _one(x[nonzero], {k: v for k, v in spec.items() if k != "mask"})
    return out
  if kind == "zscore":
    mean = spec.get("mean", None)
    std = spec.get("std", None)
    mean = float(x.mean()) if mean is None else float(mean)
    std = float(x.std()) if std is None else float(std)
    return (x - mean) / max(std, _EPS)
  if kind == "ct":
    x = np.clip(x, spec["lower"], spec["upper"])
    return (x - spec["mean"]) / max(float(spec["std"]), _EPS)
  if kind == "minmax":
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / max(hi - lo, _EPS)
  if kind == "scale":
    return x * float(spec["factor"])
  lo, hi = np.percentile(x, [spec.get("lower", 0.5), spec.get("upper", 99.5)])
  return np.clip((x - lo) / max(float(hi - lo), _EPS), 0.0, 1.0)


def normalize(image: np.ndarray, spec: Any, *, spatial_dims: int | None = None) -> np.ndarray:
  """Normalises a channels-last image ``[*spatial, C]`` per ``spec``; returns a new float32 array.

  Each channel is normalised over the whole image, so the last axis must be the channel axis. An
  image without one (``[H, W]`` or ``[D, H, W]``) needs ``spatial_dims`` to say so: a 3D volume
  ``[D, H, W]`` would otherwise be read as a 2D image of ``W`` channels, which cannot be detected.

  Args:
    image: ``[*spatial, C]``, or ``[*spatial]`` with ``spatial_dims`` given; not modified.
    spec: a spec dict, a list of ``C`` spec dicts, or ``None`` (no normalisation).
    spatial_dims: 2 or 3, to check the image's rank and accept one without a channel axis (which is
      then normalised as one channel, and returned without one).

  Returns:
    ``float32`` of the image's shape.

  Raises:
    ValueError: an unknown or meaningless spec, an image of two axes without ``spatial_dims``, or an
      image whose rank fits neither ``spatial_dims`` nor ``spatial_dims + 1``.
  """
  spec = check_spec(spec)
  image = np.asarray(image)
  if spatial_dims is not None:
    if spatial_dims not in (2, 3):
      raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if image.ndim == spatial_dims:
      return normalize(image[..., None], spec)[..., 0]
    if image.ndim != spatial_dims + 1:
      raise ValueError(
        f"a {spatial_dims}D image has {spatial_dims} axes, or {spatial_dims + 1} with "
        f"channels last; got shape {image.shape}"
      )
  elif image.ndim < 3:
    raise ValueError(
      f"normalize reads the last axis as channels, and an image of shape {image.shape} "
      "has no spatial axes besides it; add a channel axis (image[..., None]) or pass "
      "spatial_dims=2"
    )
  if isinstance(spec, list):
    if len(spec) != image.shape[-1]:
      raise ValueError(f"normalisation lists {len(spec)} channels but the image has {image.shape[-1]}")
    specs = spec
  else:
    specs = [spec] * image.shape[-1]
  nonzero = nonzero_mask(image) if any(s.get("mask") == "nonzero" for s in specs) else None
  return np.stack([_one(image[..., c], s, nonzero) for c, s in enumerate(specs)], axis=-1)


def nonzero_mask(image: np.ndarray) -> np.ndarray:
  """nnU-Net's non-zero mask of an image ``[*spatial, C]``: where any channel is non-zero, holes filled
  (``nnunetv2.preprocessing.cropping.cropping.create_nonzero_mask``)."""
  from scipy import ndimage

  return ndimage.binary_fill_holes(np.any(np.asarray(image) != 0, axis=-1))
