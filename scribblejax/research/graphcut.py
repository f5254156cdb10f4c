"""A graph-cut peer: the network's probabilities, the marks and the image's edges in one CRF.

This is the correction step of MONAI Label's scribbles apps: a conditional random field whose
energy over a labelling ``L`` is

  ``E(L) = sum_p D_p(L_p) + sum_{(p,q) neighbours} w_pq [L_p != L_q]``

with

* unary terms ``D_p(k) = -log(max(P_pk, eps))`` from the network's softmax probabilities ``P``;
* the marks as hard constraints: a marked pixel keeps its mark's class (any other class costs more
  than any labelling could save);
* contrast-sensitive Potts pairwise terms on image edges (Boykov and Jolly, ICCV 2001):
  ``w_pq = lam * exp(-||I_p - I_q||^2 / (2 sigma^2)) / dist(p, q)``, where ``||.||^2`` sums the
  squared differences over the image's channels, so a boundary is cheap where the image has an edge.

Two classes are solved exactly by one minimum cut; more classes by alpha-expansion (Boykov, Veksler
and Zabih, PAMI 2001): repeated binary cuts, each letting every pixel keep its class or switch to
one class alpha, built as in Kolmogorov and Zabih (PAMI 2004). Each move never raises the energy
and the result lies within a factor of two of the optimum for Potts terms. The cuts run on the
maintained max-flow library PyMaxflow (``pip install 'scribblejax[test]'`` or ``pip install
PyMaxflow``).

Example:
  >>> labels = graph_cut_labels(image, probabilities, marks, lam=1.0)
  >>> method = graph_cut_method(model, lam=2.0, sigma=None)   # for scribblejax.research.evaluate.run_case
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from scribblejax.research.baselines import Method

DEFAULT_LAM = 1.0
DEFAULT_EPS = 1e-4
MAX_SWEEPS = 10  # alpha-expansion: most passes over all classes (it usually settles in two or three)


def _maxflow():
  try:
    import maxflow
  except ImportError as err:
    raise ImportError(
      "the graph-cut method needs PyMaxflow: pip install 'scribblejax[test]' (or pip install PyMaxflow)"
    ) from err
  return maxflow


# ---------------------------------------------------------------------------------------------
# The CRF's terms
# ---------------------------------------------------------------------------------------------


def neighbour_offsets(ndim: int, connectivity: int = 1) -> list[tuple[int, ...]]:
  """One offset of every neighbour pair: the lexicographically positive half of the neighbourhood.

  Args:
    ndim: the number of spatial axes.
    connectivity: how many axes a neighbour may differ along (1: 4/6-neighbourhood; ``ndim``: 8/26).

  Returns:
    Offsets such as ``[(0, 1), (1, 0)]`` for ``ndim=2, connectivity=1``.
  """
  if not 1 <= connectivity <= ndim:
    raise ValueError(f"connectivity must lie in 1..{ndim}, got {connectivity!r}")
  offsets = []
  for d in itertools.product((-1, 0, 1), repeat=ndim):
    nonzero = [x for x in d if x]
    if 0 < len(nonzero) <= connectivity and nonzero[0] > 0:
      offsets.append(d)
  return offsets


def _pair_slices(shape: tuple[int, ...], offset: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
  """Index of the pixels ``p`` whose neighbour ``p + offset`` lies inside, and of those neighbours."""
  here = tuple(slice(max(0, -d), n - max(0, d)) for n, d in zip(shape, offset))
  there = tuple(slice(max(0, d), n - max(0, -d)) for n, d in zip(shape, offset))
  return here, there


def _squared_differences(image: np.ndarray, offsets: list[tuple[int, ...]]) -> list[np.ndarray]:
  """For each offset, ``||I_p - I_{p+offset}||^2`` (summed over channels) at the pixels ``p`` that have
  that neighbour: ``float64[*valid]``."""
  out = []
  for d in offsets:
    here, there = _pair_slices(image.shape[:-1], d)
    out.append(np.sum((image[here] - image[there]) ** 2, axis=-1))
  return out


def estimate_sigma(image: np.ndarray, connectivity: int = 1) -> float:
  """The contrast scale ``sigma`` from the image itself: the root mean square neighbour difference.

  With this choice ``exp(-||I_p - I_q||^2 / (2 sigma^2))`` is about ``exp(-1/2)`` for a typical
  neighbour difference (the rule GrabCut uses for its ``beta``), so the weights adapt to the image's
  scale. A constant image gives 1.

  Args:
    image: ``[*spatial, C]``.
    connectivity: as in :func:`neighbour_offsets`.
  """
  image = np.asarray(image, np.float64)
  diffs = _squared_differences(image, neighbour_offsets(image.ndim - 1, connectivity))
  count = sum(d.size for d in diffs)
  mean = sum(float(d.sum()) for d in diffs) / max(count, 1)
  return float(np.sqrt(mean)) if mean > 0 else 1.0


def pairwise_weights(
  image: np.ndarray, *, lam: float, sigma: float | None = None, connectivity: int = 1
) -> tuple[list[tuple[int, ...]], list[np.ndarray]]:
  """The contrast-sensitive Potts weights ``w_pq`` of every neighbour pair.

  Args:
    image: ``[*spatial, C]``.
    lam: the weight of the boundary term against the unary terms (0: none).
    sigma: the contrast scale in image units; ``None`` estimates it (:func:`estimate_sigma`).
    connectivity: as in :func:`neighbour_offsets`.

  Returns:
    ``(offsets, weights)``: ``weights[i]`` is ``float64[*spatial]`` holding at ``p`` the weight of the
    pair ``(p, p + offsets[i])``, and 0 where that neighbour lies outside the image.
  """
  image = np.asarray(image, np.float64)
  spatial = image.shape[:-1]
  offsets = neighbour_offsets(len(spatial), connectivity)
  if sigma is None:
    sigma = estimate_sigma(image, connectivity)
  weights = []
  for d, diff in zip(offsets, _squared_differences(image, offsets)):
    w = np.zeros(spatial, np.float64)
    here, _ = _pair_slices(spatial, d)
    w[here] = lam * np.exp(-diff / (2.0 * sigma**2)) / np.sqrt(sum(x * x for x in d))
    weights.append(w)
  return offsets, weights


def unary_terms(probabilities: np.ndarray, eps: float = DEFAULT_EPS) -> np.ndarray:
  """``D_p(k) = -log(max(P_pk, eps))``: ``float64[*spatial, K]``, each between 0 and ``-log(eps)``."""
  return -np.log(np.clip(np.asarray(probabilities, np.float64), eps, 1.0))


def potts_energy(
  labels: np.ndarray, unaries: np.ndarray, offsets: list[tuple[int, ...]], weights: list[np.ndarray]
) -> float:
  """``E(L)`` of a labelling without its hard constraints (see the module docstring)."""
  labels = np.asarray(labels)
  energy = float(np.take_along_axis(unaries, labels[..., None], -1).sum())
  for d, w in zip(offsets, weights):
    here, there = _pair_slices(labels.shape, d)
    energy += float(w[here][labels[here] != labels[there]].sum())
  return energy


# ---------------------------------------------------------------------------------------------
# Alpha-expansion
# ---------------------------------------------------------------------------------------------


def _structure(offset: tuple[int, ...]) -> np.ndarray:
  """A ``3 x ... x 3`` PyMaxflow structure with one edge, to ``p + offset``."""
  s = np.zeros((3,) * len(offset))
  s[tuple(1 + d for d in offset)] = 1.0
  return s


def expansion_move(
  labels: np.ndarray,
  alpha: int,
  unaries: np.ndarray,
  offsets: list[tuple[int, ...]],
  weights: list[np.ndarray],
  marks: np.ndarray,
) -> np.ndarray:
  """The labelling of least energy among those where each pixel keeps its class or takes ``alpha``.

  Each pixel is a binary variable ``x_p`` (1: take ``alpha``; the sink side of the cut). A pair term
  ``E(x_p, x_q)`` with values ``A, B, C, D`` at ``(0,0), (0,1), (1,0), (1,1)`` is written as
  ``A + (C - A) x_p + (D - C) x_q + (B + C - A - D) (1 - x_p) x_q``: two unary parts and one arc
  ``p -> q`` of capacity ``B + C - A - D``, which is >= 0 for Potts terms (Kolmogorov and Zabih). Marked
  pixels are tied to their class by a terminal link heavier than anything moving them could save.

  Args:
    labels: ``int[*spatial]``, the current labelling; marked pixels hold their marks.
    alpha: the class to expand.
    unaries: ``float64[*spatial, K]``.
    offsets, weights: from :func:`pairwise_weights`.
    marks: ``int[*spatial]``, -1 unmarked.

  Returns:
    The new ``int32[*spatial]`` labelling.
  """
  maxflow = _maxflow()
  shape = labels.shape
  cost1 = unaries[..., alpha].copy()  # cost of x_p = 1
  cost0 = np.take_along_axis(unaries, labels[..., None], -1)[..., 0]  # cost of x_p = 0
  graph = maxflow.Graph[float]()
  nodes = graph.add_grid_nodes(shape)
  incident = np.zeros(shape)  # capacity of the arcs at p
  for d, w in zip(offsets, weights):
    here, there = _pair_slices(shape, d)
    lp, lq, wpq = labels[here], labels[there], w[here]
    a = wpq * (lp != lq)
    b = wpq * (lp != alpha)
    c = wpq * (lq != alpha)  # E(1, 0); E(1, 1) = 0
    cost1[here] += c - a
    cost1[there] -= c
    arc = np.zeros(shape)
    arc[here] = b + c - a
    graph.add_grid_edges(nodes, weights=arc, structure=_structure(d), symmetric=False)
    incident[here] += arc[here]
    incident[there] += arc[here]
  low = np.minimum(cost0, cost1)
  cost0, cost1 = cost0 - low, cost1 - low
  heavy = 1.0 + float(np.max(cost0 + cost1 + incident))  # more than moving one pixel can save
  marked = marks >= 0
  cost0 = np.where(marked & (marks == alpha), heavy, cost0)
  cost1 = np.where(marked & (marks != alpha), heavy, cost1)
  graph.add_grid_tedges(nodes, cost1, cost0)  # source arc cut when x_p = 1, sink arc when x_p = 0
  graph.maxflow()
  take = graph.get_grid_segments(nodes)
  return np.where(take, alpha, labels).astype(np.int32)


class GraphCutResult(NamedTuple):
  """A graph cut's labelling and how it was reached."""

  labels: np.ndarray  # int32[*spatial]
  energy: float  # E(labels) without the hard constraints (which it satisfies)
  sweeps: int  # passes of alpha-expansion over all classes (1 for two classes: one exact cut)


def _check_inputs(image, probabilities, marks):
  marks = np.asarray(marks)
  probabilities = np.asarray(probabilities, np.float64)
  image = np.asarray(image, np.float64)
  if image.ndim == marks.ndim:
    image = image[..., None]
  if marks.ndim not in (2, 3):
    raise ValueError(f"marks must be 2D or 3D, got shape {marks.shape}")
  if image.shape[:-1] != marks.shape or probabilities.shape[:-1] != marks.shape:
    raise ValueError(
      f"image {image.shape}, probabilities {probabilities.shape} and marks {marks.shape} disagree on the spatial shape"
    )
  if marks.dtype.kind not in "iu":
    raise ValueError(f"marks must be integers (-1 unmarked), got dtype {marks.dtype}")
  k = probabilities.shape[-1]
  if k < 2:
    raise ValueError(f"probabilities need at least two classes, got {k}")
  if marks.size and (marks.min() < -1 or marks.max() >= k):
    raise ValueError(f"mark values must lie in -1..{k - 1}, got {int(marks.min())}..{int(marks.max())}")
  if not (np.all(np.isfinite(image)) and np.all(np.isfinite(probabilities))):
    raise ValueError("the image and the probabilities must be finite")
  return image, probabilities, marks.astype(np.int32)


def graph_cut(
  image: Any,
  probabilities: Any,
  marks: Any,
  *,
  lam: float = DEFAULT_LAM,
  sigma: float | None = None,
  eps: float = DEFAULT_EPS,
  connectivity: int = 1,
  max_sweeps: int = MAX_SWEEPS,
) -> GraphCutResult:
  """:func:`graph_cut_labels` with the labelling's energy and the number of sweeps."""
  image, probabilities, marks = _check_inputs(image, probabilities, marks)
  if not (np.isfinite(lam) and lam >= 0):
    raise ValueError(f"lam must be finite and >= 0, got {lam!r}")
  if sigma is not None and not (np.isfinite(sigma) and sigma > 0):
    raise ValueError(f"sigma must be finite and > 0 (or None to estimate it), got {sigma!r}")
  if not 0 < eps < 1:
    raise ValueError(f"eps must lie in (0, 1), got {eps!r}")
  unaries = unary_terms(probabilities, eps)
  offsets, weights = pairwise_weights(image, lam=lam, sigma=sigma, connectivity=connectivity)
  k = unaries.shape[-1]
  marked = marks >= 0
  if k == 2:  # from all-0, one expansion of class 1 lets every free pixel take either class: exact
    labels = expansion_move(np.where(marked, marks, 0).astype(np.int32), 1, unaries, offsets, weights, marks)
    return GraphCutResult(labels, potts_energy(labels, unaries, offsets, weights), 1)
  labels = np.where(marked, marks, np.argmin(unaries, -1)).astype(np.int32)
  energy = potts_energy(labels, unaries, offsets, weights)
  sweeps = 0
  while sweeps < max_sweeps:
    sweeps += 1
    improved = False
    for alpha in range(k):
      moved = expansion_move(labels, alpha, unaries, offsets, weights, marks)
      moved_energy = potts_energy(moved, unaries, offsets, weights)
      if moved_energy < energy - 1e-9 * max(1.0, abs(energy)):
        labels, energy, improved = moved, moved_energy, True
    if not improved:
      break
  return GraphCutResult(labels, energy, sweeps)


def graph_cut_labels(
  image: Any,
  probabilities: Any,
  marks: Any,
  *,
  lam: float = DEFAULT_LAM,
  sigma: float | None = None,
  eps: float = DEFAULT_EPS,
  connectivity: int = 1,
) -> np.ndarray:
  """The labelling of (near-)least CRF energy that honours every mark (see the module docstring).

  Args:
    image: ``[*spatial, C]`` or ``[*spatial]``, 2D or 3D: the image whose edges the boundary follows
      (as the network sees it, i.e. normalised).
    probabilities: ``float[*spatial, K]``, the network's softmax probabilities (K >= 2).
    marks: ``int[*spatial]``, -1 unmarked, k = class k.
    lam: the weight of the boundary term (0: each unmarked pixel takes its most probable class).
    sigma: the contrast scale in image units; ``None`` estimates it from the image
      (:func:`estimate_sigma`).
    eps: probabilities are clipped to at least ``eps`` before the log.
    connectivity: 1 for the 4/6-neighbourhood, the number of spatial axes for the 8/26-neighbourhood.

  Returns:
    ``int32[*spatial]``: exact for two classes, an alpha-expansion local minimum for more.

  Raises:
    ValueError: shapes that disagree, marks outside ``-1..K-1``, non-finite inputs or bad settings.
    ImportError: PyMaxflow is not installed.
  """
  return graph_cut(image, probabilities, marks, lam=lam, sigma=sigma, eps=eps, connectivity=connectivity).labels


# ---------------------------------------------------------------------------------------------
# As an interactive method
# ---------------------------------------------------------------------------------------------


class GraphCutState(NamedTuple):
  """State of the graph-cut method."""

  image: np.ndarray  # float32[*spatial, C]
  probabilities: np.ndarray  # float32[*spatial, K]: the network's softmax, computed once per image
  labels: np.ndarray  # int32[*spatial]: current segmentation
  energy: float | None  # E(labels) after the last cut (None before any)
  sweeps: int  # alpha-expansion sweeps of the last cut (0 before any)


def graph_cut_method(
  model: Any = None,
  *,
  lam: float = DEFAULT_LAM,
  sigma: float | None = None,
  probabilities_fn: Callable[[np.ndarray], Any] | None = None,
  initial: Callable[[np.ndarray], np.ndarray] | None = None,
  example: Any = None,
  eps: float = DEFAULT_EPS,
  connectivity: int = 1,
) -> Method:
  """MONAI Label's scribbles correction as a :class:`scribblejax.research.baselines.Method` named ``"graph_cut"``.

  ``init`` computes the network's softmax probabilities once per image; before any interaction the
  segmentation is the network's prediction (or ``initial(image)``). Each ``update`` runs
  :func:`graph_cut_labels` with every mark so far; the network is never changed.

  Args:
    model: the network, run with :func:`scribblejax.refinement.predict` (ignored when
      ``probabilities_fn`` is given).
    lam: the weight of the boundary term.
    sigma: the contrast scale in image units, or ``None`` to estimate it per image.
    probabilities_fn: ``image -> float[*spatial, K]`` softmax probabilities, instead of the model's
      prediction on the image (e.g. the model's pipeline of patches and resampling).
    initial: ``image -> int32[*spatial]``, the segmentation before any interaction (default: the
      most probable class).
    example: an example batched input, for a model that states no layer order.
    eps: probabilities are clipped to at least ``eps`` before the log.
    connectivity: 1 for the 4/6-neighbourhood, the number of spatial axes for the 8/26-neighbourhood.

  Raises:
    ValueError: neither a model nor ``probabilities_fn``.
    ImportError: PyMaxflow is not installed.
  """
  _maxflow()
  if model is None and probabilities_fn is None:
    raise ValueError("the graph-cut method needs the network's probabilities: give a model or probabilities_fn")
  if probabilities_fn is None:
    import jax

    from scribblejax.params import head, split_params
    from scribblejax.refinement import predict

    split = split_params(model, head(), example=example)

    def probabilities_fn(image):
      return jax.nn.softmax(predict(split, image), axis=-1)

  def probabilities_of(image):
    probabilities = np.asarray(probabilities_fn(image), np.float32)
    if probabilities.shape[:-1] != image.shape[:-1]:
      raise ValueError(f"probabilities of shape {probabilities.shape} do not match the image {image.shape}")
    return probabilities

  def init(image):
    image = np.asarray(image, np.float32)
    probabilities = probabilities_of(image)
    labels = np.argmax(probabilities, -1) if initial is None else initial(image)
    return GraphCutState(image, probabilities, np.asarray(labels, np.int32), None, 0)

  def update(state, marks):
    result = graph_cut(
      state.image, state.probabilities, marks, lam=lam, sigma=sigma, eps=eps, connectivity=connectivity
    )
    return state._replace(labels=result.labels, energy=result.energy, sweeps=result.sweeps)

  def warmup(image):
    probabilities_of(np.asarray(image, np.float32))

  return Method(
    "graph_cut", init, lambda s: s.labels, update, warmup, lambda s: {"sweeps": s.sweeps, "energy": s.energy}
  )
