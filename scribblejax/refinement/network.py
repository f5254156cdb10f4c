"""The network as a function of its tunable weights: the forward pass, its trunk and its tail.

:func:`forward` runs a split's model on one image. :func:`trunk_residuals` computes, once per
interaction, the values of the frozen trunk that the tunable tail reads, and :func:`logits` runs the
tail alone on them (or the whole forward pass without them), with the backend's rewrites
(:mod:`scribblejax.refinement.trunk` does the unzipping). :class:`GraphKey` makes a model's
graphdef cheap to use as a static argument of the compiled programs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from scribblejax.refinement import backend as backend_lib
from scribblejax.refinement import trunk as trunk_lib


class GraphKey:
  """A model's graphdef with its hash computed once.

  ``jax.jit`` hashes its static arguments at every call, and hashing an ``nnx`` graphdef walks the
  whole model in Python (milliseconds for a U-Net, several times per interaction). Compiled functions
  here take this key instead; :func:`forward` unwraps it.
  """

  __slots__ = ("graphdef", "_hash")

  def __init__(self, graphdef: Any):
    self.graphdef = graphdef
    self._hash = hash(graphdef)

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other: Any) -> bool:
    return self is other or (
      isinstance(other, GraphKey) and self._hash == other._hash and self.graphdef == other.graphdef
    )

  def __repr__(self) -> str:
    return f"GraphKey({self.graphdef!r})"


_graph_keys: dict[int, GraphKey] = {}


def graph_key(graphdef: Any) -> GraphKey:
  """The :class:`GraphKey` of ``graphdef``, the same object for the same graphdef object."""
  if isinstance(graphdef, GraphKey):
    return graphdef
  key = _graph_keys.get(id(graphdef))
  if key is None or key.graphdef is not graphdef:
    if len(_graph_keys) >= 256:
      _graph_keys.clear()
    key = _graph_keys[id(graphdef)] = GraphKey(graphdef)
  return key


def forward(graphdef: Any, tunable: Any, frozen: Any, image: jax.Array, compute_dtype: Any = None) -> jax.Array:
  """Logits ``f32[*spatial, classes]`` of one unbatched image ``[*spatial, channels]``.

  With ``compute_dtype`` (e.g. ``"bfloat16"``) every floating-point parameter and the image are cast
  to it first, so the network computes in that dtype; gradients still reach the float32 parameters.

  Raises:
    ValueError: the model returns something other than one array.
  """
  if compute_dtype is not None:
    dtype = jnp.dtype(compute_dtype)
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x
    tunable, frozen, image = jax.tree.map(cast, (tunable, frozen, image))
  model = nnx.merge(graphdef.graphdef if isinstance(graphdef, GraphKey) else graphdef, tunable, frozen)
  out = model(image[None])
  if not isinstance(out, jax.Array):
    raise ValueError(
      f"the model returns a {type(out).__name__}; refinement needs one array of logits "
      "[batch, *spatial, classes] (wrap the model to return its segmentation output)"
    )
  return out[0].astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Forward:
  """:func:`forward` bound to a graphdef and a compute dtype: ``Forward(graphdef)(tunable, frozen, image)``.

  Hashable, so :func:`scribblejax.refinement.trunk.partition` caches its plan under it.
  """

  graphdef: Any
  compute_dtype: str | None = None

  def __call__(self, tunable, frozen, image):
    return forward(self.graphdef, tunable, frozen, image, self.compute_dtype)


def trunk_residuals(
  graphdef, tunable, frozen, image, compute_dtype: str | None = None, conv_backend: str = "auto"
) -> list:
  """The frozen trunk's values that the tunable tail reads (once per interaction)."""
  return trunk_lib.partition(
    Forward(graphdef, compute_dtype), tunable, frozen, image, rewrites=backend_lib.default_rewrites(conv_backend)
  ).trunk(frozen, image)


def logits(
  graphdef, tunable, frozen, image, residuals: list | None, backend: backend_lib.Backend, remat: bool = False
) -> jax.Array:
  """The forward pass: the tail alone on the trunk's ``residuals`` when given, else all of it.

  ``remat`` rematerialises layer by layer in the tail (:func:`scribblejax.refinement.trunk.partition`),
  or around the whole forward pass without residuals.
  """
  fn = Forward(graphdef, backend.compute_dtype)
  if residuals is None:
    return (jax.checkpoint(fn) if remat else fn)(tunable, frozen, image)
  return trunk_lib.partition(fn, tunable, frozen, image, rewrites=backend_lib.tail_rewrites(backend), remat=remat).tail(
    tunable, residuals
  )
