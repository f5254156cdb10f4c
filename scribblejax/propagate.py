"""Marks propagated through image edges together with a network's probabilities.

A random walker with a prior (Grady, "Multilabel random walker image segmentation using prior
models", CVPR 2005): for each class s it finds the probability field x_s that minimises

    sum_{edges pq} w_pq (x_s[p] - x_s[q])^2  +  strength * sum_p (x_s[p] - prior_s[p])^2

with x_s fixed to 1 on the pixels marked s and to 0 on the pixels marked otherwise. The edge weights
``w_pq = exp(-beta * |I_p - I_q|^2 / mean |I_p - I_q|^2)`` are close to 1 inside a region of even
intensity and close to 0 across an edge. So a mark spreads along its region, through weak edges but
not across strong ones, and over a distance of about ``1 / sqrt(strength)`` pixels where the region
is even; beyond that, and across edges, the prior (the network's softmax) decides. Every marked pixel
keeps its label, and where no mark reaches, the network's prediction is kept: the result follows
the marks and the image where the marks say something, and the network elsewhere.

Each class's field solves one sparse, symmetric positive definite system (the graph Laplacian of
the unmarked pixels plus ``strength`` on its diagonal), by conjugate gradients with a Jacobi
preconditioner; the fields of all classes share the matrix.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy import sparse
from scipy.sparse import linalg as sparse_linalg

from scribblejax._checks import is_number


@dataclasses.dataclass(frozen=True)
class PropagateConfig:
  """Settings of :func:`propagate_marks` (immutable, hashable).

  Attributes:
    strength: weight of the prior (the network's probabilities) against the edges; smaller values
      let a mark spread farther along an even region (about ``1 / sqrt(strength)`` pixels). 0 turns
      the prior off (a plain random walker: then at least two classes must be marked).
    beta: how sharply an intensity step cuts an edge (in units of the image's mean squared step).
    tolerance: relative residual at which the conjugate gradients stop.
    max_iterations: the most conjugate-gradient iterations per class.
  """
  strength: float = 0.01
  beta: float = 4.0
  tolerance: float = 1e-4
  max_iterations: int = 500

  def __post_init__(self):
    for name in ("strength", "beta", "tolerance"):
      value = getattr(self, name)
      if not is_number(value) or not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not isinstance(self.max_iterations, (int, np.integer)) or self.max_iterations < 1:
      raise ValueError(f"max_iterations must be a positive integer, got {self.max_iterations!r}")


def edge_weights(image: np.ndarray, beta: float) -> list[np.ndarray]:
  """Weights of the edges between neighbours along each spatial axis.

  Args:
    image: ``float[*spatial, channels]``.
    beta: edge sharpness, in units of the mean squared intensity step.

  Returns:
    One array per spatial axis d, of the image's spatial shape less one along d: the weight of the
    edge between a pixel and its next neighbour along d.
  """
  image = np.asarray(image, np.float64)
  steps = [np.sum(np.diff(image, axis=d) ** 2, axis=-1) for d in range(image.ndim - 1)]
  scale = np.mean(np.concatenate([s.ravel() for s in steps])) if steps else 0.0
  scale = scale if scale > 0 else 1.0
  return [np.exp(-beta * s / scale) for s in steps]


def _laplacian(shape: tuple[int, ...], weights: list[np.ndarray]) -> sparse.csr_matrix:
  """The graph Laplacian of the grid with ``weights`` (as from :func:`edge_weights`)."""
  index = np.arange(int(np.prod(shape))).reshape(shape)
  rows, cols, vals = [], [], []
  for d, w in enumerate(weights):
    head = index[tuple(slice(0, -1) if a == d else slice(None) for a in range(len(shape)))].ravel()
    tail = index[tuple(slice(1, None) if a == d else slice(None) for a in range(len(shape)))].ravel()
    rows += [head, tail]
    cols += [tail, head]
    vals += [w.ravel(), w.ravel()]
  n = index.size
  if not rows:
    return sparse.csr_matrix((n, n))
  adjacency = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
  degree = np.asarray(adjacency.sum(axis=1)).ravel()
  return (sparse.diags(degree) - adjacency).tocsr()


def _check(image: np.ndarray, prior: np.ndarray, marks: np.ndarray) -> None:
  if marks.shape != image.shape[:-1]:
    raise ValueError(f"marks of shape {marks.shape} do not match the image's spatial shape {image.shape[:-1]}")
  if prior.shape[:-1] != marks.shape:
    raise ValueError(f"probabilities of shape {prior.shape} are not [*{marks.shape}, classes]")
  if marks.size and marks.max() >= prior.shape[-1]:
    raise ValueError(f"marks hold label {int(marks.max())}, but there are {prior.shape[-1]} classes")
  if marks.size and marks.min() < -1:
    raise ValueError(f"marks hold {int(marks.min())}; unmarked is -1 and classes are >= 0")
  if not (np.all(np.isfinite(image)) and np.all(np.isfinite(prior))):
    raise ValueError("the image and the probabilities must be finite")


def propagate_marks(image: Any, probabilities: Any, marks: Any,
                    config: PropagateConfig = PropagateConfig()) -> tuple[np.ndarray, np.ndarray]:
  """Spreads ``marks`` along the image's regions, with ``probabilities`` as the prior elsewhere.

  Args:
    image: ``float[*spatial, channels]`` (normalised as the network reads it).
    probabilities: ``float[*spatial, classes]``, e.g. a network's softmax; rows need not sum to 1.
    marks: ``int[*spatial]``, -1 unmarked, k = class k.
    config: a :class:`PropagateConfig`.

  Returns:
    ``(labels, fields)``: ``int32[*spatial]`` labels, equal to the marks on every marked pixel, and
    the ``float32[*spatial, classes]`` fields whose argmax they are.

  Raises:
    ValueError: shapes that do not match, labels outside the classes, non-finite inputs, or no prior
      (``strength == 0``) with fewer than two classes marked.
  """
  image = np.asarray(image, np.float64)
  prior = np.asarray(probabilities, np.float64)
  marks = np.asarray(marks)
  _check(image, prior, marks)
  shape, classes = marks.shape, prior.shape[-1]
  marked = (marks >= 0).ravel()
  if config.strength == 0 and len(np.unique(marks[marks >= 0])) < 2:
    raise ValueError("without a prior (strength 0) at least two classes must be marked")
  fields = prior.reshape(-1, classes).copy()
  if marked.any():
    fields[marked] = np.eye(classes)[marks.ravel()[marked]]
  free = ~marked
  if free.any() and marked.any():
    fields[free] = _solve(_laplacian(shape, edge_weights(image, config.beta)), fields, prior.reshape(-1, classes),
                          marked, config)
  fields = fields.reshape(*shape, classes).astype(np.float32)
  labels = np.argmax(fields, axis=-1).astype(np.int32)
  return np.where(marks >= 0, marks, labels).astype(np.int32), fields


def _solve(laplacian: sparse.csr_matrix, fields: np.ndarray, prior: np.ndarray, marked: np.ndarray,
           config: PropagateConfig) -> np.ndarray:
  """The unmarked pixels' fields: ``(L_uu + strength I) x = strength prior_u - L_um x_m`` per class."""
  free = ~marked
  system = (laplacian[free][:, free] + config.strength * sparse.identity(int(free.sum()))).tocsr()
  coupling = laplacian[free][:, marked]
  diagonal = system.diagonal()
  diagonal = np.where(diagonal > 0, diagonal, 1.0)
  preconditioner = sparse_linalg.LinearOperator(system.shape, matvec=lambda v: v / diagonal)
  out = np.empty((int(free.sum()), fields.shape[1]))
  for s in range(fields.shape[1]):
    rhs = config.strength * prior[free, s] - coupling @ fields[marked, s]
    guess = prior[free, s]
    solution, _ = sparse_linalg.cg(system, rhs, x0=guess, rtol=config.tolerance, maxiter=config.max_iterations,
                                   M=preconditioner)
    out[:, s] = solution
  return out
