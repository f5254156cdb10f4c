"""Several networks of one architecture whose logits are averaged: nnU-Net's ensemble of its
cross-validation folds (``nnUNetv2_predict`` averages the logits of every fold it is given, by
default all five).

The members' parameters are stacked along a new first axis at the same paths as one member's, so
"the last l layers" of an :class:`Ensemble` are the last l layers of every member, and refinement
tunes them all against the averaged logits (the marks bind the ensemble's prediction, which is what
is written). Members run one after another on the same input.

Example:
  >>> ensemble = Ensemble.of([fold0, fold1, fold2])   # three networks of one architecture
  >>> split = sj.split_params(ensemble, sj.last_layers(3))   # the last 3 layers of each fold
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scribblejax._checks import is_integer


def _stack(states: Sequence[nnx.State]) -> nnx.State:
  return jax.tree.map(lambda *leaves: jnp.stack([jnp.asarray(x) for x in leaves]), *states)


def _sliced(graphdef, state: nnx.State, k: int) -> nnx.Module:
  """Member ``k`` of stacked parameters, as a network of its own."""
  return nnx.merge(graphdef, jax.tree.map(lambda x: x[k], state))


class Ensemble(nnx.Module):
  """The mean of the logits of ``members`` networks of one stored family.

  Built like any stored family (``Ensemble(family=..., kwargs=..., members=n, rngs=...)``, each
  member initialised from its own random stream), or from networks with :meth:`of`.

  Attributes:
    net: one member's structure holding every member's parameters, stacked along a new first axis.
    members: how many networks.
    family: the members' family (a key of :data:`scribblejax.models.families.FAMILIES`).
    spatial_dims, in_channels, num_classes: the members' own (``None`` where they state none).
  """

  def __init__(
    self,
    family: str = "",
    kwargs: dict | None = None,
    members: int | None = None,
    *,
    rngs: nnx.Rngs | None = None,
    nets: Sequence[nnx.Module] | None = None,
  ):
    from scribblejax.models.families import build_model

    del rngs  # each member draws from its own stream, so that members differ
    if nets is None:
      if family == "scribblejax.Ensemble":
        raise ValueError("an Ensemble's members cannot be ensembles")
      if not is_integer(members) or members < 1:
        raise ValueError(f"an Ensemble needs a positive number of members, got {members!r}")
      nets = [build_model(family, kwargs or {}, seed=k) for k in range(members)]
    self._set(list(nets), family)

  @classmethod
  def of(cls, nets: Sequence[nnx.Module], family: str = "") -> Ensemble:
    """An ensemble of existing networks (same structure and shapes).

    Raises:
      ValueError: no networks, or networks of different structures or shapes.
    """
    return cls(family, nets=nets)

  def _set(self, nets: list, family: str) -> None:
    if not nets:
      raise ValueError("an Ensemble needs at least one network")
    from scribblejax.models.regions import Regions

    if any(isinstance(net, Regions) for net in nets):
      raise ValueError(
        "an Ensemble averages its networks' outputs, and a Regions network's are class scores; "
        "nnU-Net averages the region logits first: "
        "Regions.of(Ensemble.of([r.net for r in nets]), order)"
      )
    graphdef, first = nnx.split(nets[0])
    states = [first]
    for k, net in enumerate(nets[1:], start=1):
      other_def, state = nnx.split(net)
      shapes = jax.tree.map(np.shape, state)
      if other_def != graphdef or shapes != jax.tree.map(np.shape, first):
        raise ValueError(f"network {k} of the ensemble differs in structure or shapes from network 0")
      states.append(state)
    self.net = nnx.merge(graphdef, _stack(states))
    self.members = len(nets)
    self.family = family
    for name in ("spatial_dims", "in_channels", "num_classes"):  # what the library reads off a network
      setattr(self, name, getattr(nets[0], name, None))

  def member(self, k: int) -> nnx.Module:
    """Member ``k`` as a network of its own (its parameters sliced out).

    Raises:
      ValueError: ``k`` is not one of ``0 .. members - 1``.
    """
    if not is_integer(k) or not 0 <= k < self.members:
      raise ValueError(f"the ensemble has members 0..{self.members - 1}, not {k!r}")
    return _sliced(*nnx.split(self.net), k)

  def layer_order(self) -> list[tuple]:
    """The members' layer order (stated by the member's family), under ``net``.

    Raises:
      NotImplementedError: the members state none (:func:`scribblejax.models.ordering` then traces the
        forward pass, given an example input).
    """
    from scribblejax.models.ordering import check_layer_order

    member = self.member(0)
    stated = getattr(member, "layer_order", None)
    if not callable(stated):
      raise NotImplementedError(f"{type(member).__name__} states no layer order")
    return [("net", *path) for path in check_layer_order(member, stated())]

  def __call__(self, x: jax.Array) -> jax.Array:
    graphdef, state = nnx.split(self.net)
    total = None
    for k in range(self.members):
      out = _sliced(graphdef, state, k)(x)
      total = out if total is None else total + out
    return total / self.members
