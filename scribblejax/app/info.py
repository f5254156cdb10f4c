"""``info``: what a model is, what it takes, and its layers in forward order."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scribblejax.app.models import load_network, model_ref
from scribblejax.models.ensemble import Ensemble
from scribblejax.models.ordering import layer_order
from scribblejax.models.regions import Regions
from scribblejax.params import count_params
from scribblejax.pipeline.spec import pipeline_of


def _layers(model, order) -> list[dict]:
  """``[{"name": "a/b", "params": count}]`` per layer prefix."""
  flat = [(tuple(p), v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  layers = []
  for prefix in order:
    size = sum(
      int(np.prod(np.shape(v.get_value() if hasattr(v, "get_value") else v.value)))
      for p, v in flat
      if p[: len(prefix)] == prefix
    )
    layers.append({"name": "/".join(map(str, prefix)), "params": size})
  return layers


def describe_model(model: str) -> dict:
  """Classes, layers in forward order with parameter counts, and what the model expects as input.

  Raises:
    ValueError: no such model, or one that states no layer order and no input shape.
  """
  network = load_network(model)
  spec, info = network.spec, network.info
  example = None
  if not callable(getattr(network.model, "layer_order", None)):
    if spec.spatial_dims is None or spec.in_channels is None:
      raise ValueError(f"model {model} states no layer order, and its input shape is unknown")
    example = jax.ShapeDtypeStruct((1, *(32,) * spec.spatial_dims, spec.in_channels), jnp.float32)
  layers = _layers(network.model, layer_order(network.model, example))
  others = nnx.state(network.model, nnx.Not(nnx.Param))
  inner, regions = network.model, None
  if isinstance(inner, Regions):
    stated = (info.metadata or {}).get("regions") or {}
    regions = {"class_order": list(inner.order), "names": stated.get("names"), "labels": stated.get("labels")}
    inner = inner.net
  return {
    "model": model_ref(model),
    "family": info.family,
    "kwargs": info.kwargs,
    "classes": list(info.class_names) if info.class_names else None,
    "num_classes": spec.num_classes,
    "input": {
      "spatial_dims": spec.spatial_dims,
      "channels": spec.in_channels,
      "layout": "[*spatial, channels], channels last",
      "normalization": info.normalization,
    },
    "pipeline": pipeline_of(info.metadata),
    "layers": layers,
    "total_params": count_params(nnx.state(network.model, nnx.Param)),
    "members": inner.members if isinstance(inner, Ensemble) else None,
    "member_family": inner.family if isinstance(inner, Ensemble) else None,
    "regions": regions,
    "other_variables": count_params(others),
    "metadata": info.metadata,
  }
