"""Intensity normalisation as the model expects it, stored with the model as a small spec dict.

Specs (a single dict for all channels, or a list with one dict per input channel):

* ``{"kind": "none"}``: feed the image as it is.
* ``{"kind": "zscore"}``: per-image mean and standard deviation; or with fixed ``"mean"`` and ``"std"``.
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
    allowed = {"kind", "mean", "std", "lower", "upper", "factor"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
      raise ValueError(f"normalisation spec has unknown keys {unknown}")
    return dict(spec)
  if isinstance(spec, Sequence) and not isinstance(spec, str):
    return [check_spec(s) for s in spec]
  raise ValueError(f"a normalisation spec is a dict or a list of dicts, got {type(spec).__name__}")


def _one(channel: np.ndarray, spec: Mapping) -> np.ndarray:
  x = channel.astype(np.float32)
  kind = spec["kind"]
  if kind == "none":
    return x
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


def normalize(image: np.ndarray, spec: Any) -> np.ndarray:
  """Normalises a channels-last image ``[*spatial, C]`` per ``spec``; returns a new float32 array.

  Args:
    image: ``[*spatial, C]``; not modified.
    spec: a spec dict, a list of ``C`` spec dicts, or ``None`` (no normalisation).

  Returns:
    ``float32[*spatial, C]``.
  """
  spec = check_spec(spec)
  image = np.asarray(image)
  if isinstance(spec, list):
    if len(spec) != image.shape[-1]:
      raise ValueError(f"normalisation lists {len(spec)} channels but the image has {image.shape[-1]}")
    specs = spec
  else:
    specs = [spec] * image.shape[-1]
  return np.stack([_one(image[..., c], s) for c, s in enumerate(specs)], axis=-1)
