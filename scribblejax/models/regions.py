"""Region-based networks read as classes: nnU-Net's region-based training (BraTS and the like).

A region-based network has one sigmoid output per region, and regions may overlap (BraTS: whole
tumour, tumour core, enhancing tumour, nested). nnU-Net turns region logits ``z`` into a label map by
writing, for each region ``i`` in turn, its class ``order[i]`` wherever ``sigmoid(z_i) > 0.5``, so a
voxel's class is that of the **last** region (in ``order``) whose logit is positive, or background
(``regions_class_order``; :func:`region_labels`).

The refinement needs class scores whose largest is that class, for its cross-entropy and its stop
test. :func:`region_scores` gives them exactly: with ``m_j`` the largest logit of the regions after
``j``, region ``j``'s class scores ``min(z_j, -m_j)`` (positive only when ``z_j > 0`` and every later
logit is negative), and background scores ``-max_i z_i``. Each voxel's largest score is the class
nnU-Net writes (ties, at logits of exactly 0, aside); raising a class's score means raising its
region's logit or lowering a later region's, which is how a mark moves the decision.

:class:`Regions` wraps a network so that its output is these scores: every function of the library
treats it as a network of ``len(order) + 1`` classes. The command line's pipeline (patches, mirroring,
resampling) blends and resamples the raw region logits, as nnU-Net does, and reads classes at the end.

Example:
  >>> model = Regions.of(net, order=(1, 2, 3))       # net: 3 region logits, BraTS-style
  >>> split = sj.split_params(model, sj.last_layers(3))
  >>> sj.refine(split, image, marks)                    # marks: classes 0..3
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scribblejax._checks import is_integer


def check_order(order: Sequence[int]) -> tuple[int, ...]:
  """``order`` as a tuple: the class each region writes, a permutation of ``1..len(order)``.

  Raises:
    ValueError: not a permutation of ``1..n`` (a class written by two regions, or never written).
  """
  if isinstance(order, (str, bytes)) or not isinstance(order, Sequence) or not order:
    raise ValueError(f"the regions' class order must be a non-empty list of classes, got {order!r}")
  if not all(is_integer(c) for c in order) or sorted(int(c) for c in order) != list(range(1, len(order) + 1)):
    raise ValueError(
      f"the regions' class order must list each of the classes 1..{len(order)} once (one per region), got {list(order)}"
    )
  return tuple(int(c) for c in order)


def region_scores(logits: jax.Array, order: Sequence[int]) -> jax.Array:
  """Class scores ``[..., n + 1]`` of region logits ``[..., n]`` whose argmax is nnU-Net's label map.

  Args:
    logits: region logits, regions on the last axis, in the order of ``order``.
    order: the class each region writes (:func:`check_order`).

  Returns:
    Scores of the classes 0..n: background ``-max_i z_i``; class ``order[j]``: ``min(z_j, -m_j)``
    with ``m_j`` the largest logit of the regions after ``j`` (``z_j`` for the last region).
  """
  order = check_order(order)
  n = len(order)
  if logits.shape[-1] != n:
    raise ValueError(f"{n} regions in the class order, but the network gives {logits.shape[-1]} outputs")
  # m_j: the largest logit after region j (-inf after the last), by a reversed running maximum
  flipped = jnp.flip(logits, axis=-1)
  after = jnp.flip(jax.lax.cummax(flipped, axis=flipped.ndim - 1), axis=-1)
  later = jnp.concatenate([after[..., 1:], jnp.full_like(logits[..., :1], -jnp.inf)], axis=-1)
  per_region = jnp.minimum(logits, -later)
  background = -after[..., :1]
  classes = jnp.argsort(jnp.asarray(order))  # class c = 1..n is written by region classes[c - 1]
  return jnp.concatenate([background, per_region[..., classes]], axis=-1)


def region_labels(logits: np.ndarray, order: Sequence[int]) -> np.ndarray:
  """nnU-Net's label map of region logits ``[..., n]``: ``order[i]`` wherever ``sigmoid(z_i) > 0.5``,
  regions in turn (later ones overwrite), else 0."""
  order = check_order(order)
  logits = np.asarray(logits)
  if logits.shape[-1] != len(order):
    raise ValueError(f"{len(order)} regions in the class order, but the logits have {logits.shape[-1]}")
  labels = np.zeros(logits.shape[:-1], np.int32)
  for i, c in enumerate(order):
    labels[logits[..., i] > 0] = c
  return labels


class Regions(nnx.Module):
  """A region-based network whose output is class scores (:func:`region_scores`).

  Built like any stored family (``Regions(family=..., kwargs=..., order=[...], rngs=...)``) or from a
  network with :meth:`of`.

  Attributes:
    net: the network giving one logit per region.
    order: the class each region writes (nnU-Net's ``regions_class_order``).
    family: the network's family (a key of :data:`scribblejax.models.families.FAMILIES`).
    spatial_dims, in_channels: the network's own (``None`` where it states none).
    num_classes: ``len(order) + 1``.
  """

  def __init__(
    self,
    family: str = "",
    kwargs: dict | None = None,
    order: Sequence[int] = (),
    *,
    rngs: nnx.Rngs | None = None,
    net: nnx.Module | None = None,
  ):
    from scribblejax.models.families import build_model

    del rngs  # the network is built from its own family's seed (its weights are loaded over it)
    self.order = check_order(order)
    if net is None:
      if family == "scribblejax.Regions":
        raise ValueError("a Regions network cannot wrap another Regions network")
      net = build_model(family, kwargs or {})
    outputs = getattr(net, "num_classes", None)
    if outputs is not None and outputs != len(self.order):
      raise ValueError(f"the network gives {outputs} outputs but the class order names {len(self.order)} regions")
    self.net = net
    self.family = family
    self.spatial_dims = getattr(net, "spatial_dims", None)
    self.in_channels = getattr(net, "in_channels", None)
    self.num_classes = len(self.order) + 1

  @classmethod
  def of(cls, net: nnx.Module, order: Sequence[int], family: str = "") -> Regions:
    """A network of region logits read as classes."""
    return cls(family, order=order, net=net)

  def layer_order(self) -> list[tuple]:
    """The network's layers (stated by its family), under ``net``.

    Raises:
      NotImplementedError: the network states none (:func:`scribblejax.models.ordering` then traces the
        forward pass, given an example input).
    """
    from scribblejax.models.ordering import check_layer_order

    stated = getattr(self.net, "layer_order", None)
    if not callable(stated):
      raise NotImplementedError(f"{type(self.net).__name__} states no layer order")
    return [("net", *path) for path in check_layer_order(self.net, stated())]

  def __call__(self, x: jax.Array) -> jax.Array:
    return region_scores(self.net(x), self.order)
