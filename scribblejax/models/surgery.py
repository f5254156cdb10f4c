"""Model surgery: change a trained network's head without training it.

* :func:`add_classes` appends output classes to the final convolution, each starting below the
  background, so structures the network never learnt can be marked and refined in;
* :func:`suppress_class` lowers one class's head bias so the network misses that class entirely
  (with :func:`scribblejax.research.evaluate.suppression_amount`, the smallest lowering that does so
  on one image): a controlled
  "missed class" for the correction benchmark.

Each returns a new model; the one given is not modified. Ensembles change every member.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from scribblejax._checks import is_finite_number
from scribblejax.models.ordering import layer_order


def _final_layer(model: nnx.Module, example: Any) -> tuple[nnx.Module, str, nnx.Module]:
  """(parent module, attribute or index, the final layer module) of the model's last layer."""
  order = layer_order(model, example)
  path = tuple(order[-1])
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  key = path[-1]
  layer = parent[key] if isinstance(key, int) else getattr(parent, key)
  return parent, key, layer


def _members(model: nnx.Module, what: str = "this change"):
  """For an :class:`scribblejax.models.ensemble.Ensemble`, a function applying a change to every member
  and building the changed ensemble; ``None`` for any other model.

  Raises:
    ValueError: a region-based network (:class:`scribblejax.models.Regions`), whose head gives regions, not classes.
  """
  from scribblejax.models.ensemble import Ensemble
  from scribblejax.models.regions import Regions

  if isinstance(model, Regions):
    raise ValueError(
      f"{what} needs a head of classes; this region-based network's head gives one logit per region "
      "(nnU-Net's regions_class_order)"
    )
  if not isinstance(model, Ensemble):
    return None
  return lambda change: Ensemble.of([change(model.member(i)) for i in range(model.members)], model.family)


def _check_finite(value: Any, what: str) -> None:
  if not is_finite_number(value):
    raise ValueError(f"{what} must be a finite number, got {value!r}")


def add_classes(model: nnx.Module, k: int, *, margin: float = 4.0, example: Any = None) -> nnx.Module:
  """A copy of ``model`` with ``k`` output classes appended to its final convolution.

  Each new channel starts as a copy of the background channel (class 0) with its bias lowered by
  ``margin``: its logit is ``background - margin`` everywhere, so the new class is never predicted
  and the initial segmentation is exactly the model's own; marking the new class then moves it
  through the tunable layers (the head must be among them). Works for any model whose last layer
  (in :func:`scribblejax.models.ordering` order) is a convolution or linear layer over the channel axis
  with a bias: ``nnx.Conv``, ``nnx.Linear``, or any layer with ``kernel`` (outputs last) and ``bias``
  parameters and no feature groups (the imported networks' ``Conv``: nnU-Net's ``seg_layer``, MONAI's
  ``final_conv``); ``num_classes`` attributes are updated when present, and every member of an
  :class:`scribblejax.models.Ensemble` changes.

  Args:
    model: a Flax NNX segmentation model (not modified).
    k: number of classes to append (>= 1).
    margin: how far below the background logit the new logits start.
    example: an example batched input, for models without a ``layer_order`` method.

  Returns:
    The new model.

  Raises:
    ValueError: ``k < 1`` or the last layer is not a convolution/linear head.
  """
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
    raise ValueError(f"the number of classes to add must be a positive integer, got {k!r}")
  _check_finite(margin, "margin")
  members = _members(model, "add_classes")
  if members is not None:
    return members(lambda net: add_classes(net, k, margin=margin, example=example))
  new = nnx.clone(model)
  parent, key, layer = _final_layer(new, example)
  kernel_param, bias_param = getattr(layer, "kernel", None), getattr(layer, "bias", None)
  if not isinstance(kernel_param, nnx.Param) or (
    isinstance(bias_param, nnx.Param) and bias_param.shape != kernel_param.shape[-1:]
  ):
    raise ValueError(
      f"add_classes needs a final convolution or linear head (a kernel with the outputs last); "
      f"the last layer is {type(layer).__name__}"
    )
  if getattr(layer, "groups", 1) != 1 or getattr(layer, "feature_group_count", 1) != 1:
    raise ValueError("add_classes needs a head without feature groups")
  kernel = layer.kernel[...]
  extra = jnp.repeat(kernel[..., :1], k, axis=-1)
  layer.kernel = nnx.Param(jnp.concatenate([kernel, extra], axis=-1))
  if getattr(layer, "bias", None) is not None:
    bias = layer.bias[...]
    layer.bias = nnx.Param(jnp.concatenate([bias, jnp.repeat(bias[:1] - margin, k)]))
  else:
    raise ValueError("add_classes needs a head with a bias (to start the new classes below background)")
  if hasattr(layer, "out_features"):
    layer.out_features = int(layer.out_features) + int(k)
  if hasattr(layer, "kernel_shape"):
    layer.kernel_shape = tuple(layer.kernel.shape)
  if getattr(layer, "mask", None) is not None:
    raise ValueError("add_classes does not support masked convolutions")
  if hasattr(new, "num_classes"):
    new.num_classes = int(new.num_classes) + int(k)
  del parent, key
  return new


def suppress_class(model: nnx.Module, c: int, *, amount: float, example: Any = None) -> nnx.Module:
  """A copy of ``model`` whose final-layer bias of class ``c`` is lowered by ``amount``.

  With ``amount`` from :func:`scribblejax.research.evaluate.suppression_amount` the copy never predicts
  class ``c`` on that image: a controlled way to produce "the network missed this class entirely",
  stated as such wherever it is used. The refinement's proximal term then anchors to the lowered bias.
  """
  _check_finite(amount, "amount")
  members = _members(model, "suppress_class")
  if members is not None:
    return members(lambda net: suppress_class(net, c, amount=amount, example=example))
  new = nnx.clone(model)
  _, _, layer = _final_layer(new, example)
  bias = getattr(layer, "bias", None)
  if bias is None:
    raise ValueError("suppress_class needs a final layer with a bias")
  if not 0 <= c < bias.shape[0]:
    raise ValueError(f"class {c} is out of range for a head with {bias.shape[0]} classes")
  layer.bias = nnx.Param(jnp.asarray(bias[...]).at[c].add(-amount))
  return new
