"""The graph-cut peer: hard marks, the unary-only limit, edges followed, 3D, exactness and energy descent."""

import itertools

import numpy as np
import pytest
from flax import nnx

pytest.importorskip("maxflow")

from scribblejax.research.graphcut import graph_cut, graph_cut_labels, graph_cut_method  # noqa: E402


def _energy(labels, probabilities, image, lam, sigma, eps=1e-4):
  """The CRF energy written out pair by pair, apart from the module's own (4-neighbourhood, 2D)."""
  unary = -np.log(np.clip(probabilities, eps, 1.0))
  energy = sum(unary[p + (labels[p],)] for p in np.ndindex(labels.shape))
  h, w = labels.shape
  for y, x in np.ndindex(labels.shape):
    for dy, dx in ((0, 1), (1, 0)):
      q = (y + dy, x + dx)
      if q[0] < h and q[1] < w and labels[y, x] != labels[q]:
        diff = float(np.sum((image[y, x] - image[q]) ** 2))
        energy += lam * np.exp(-diff / (2 * sigma**2))
  return float(energy)


def _random_problem(shape, k, seed, marked_fraction=0.05):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=shape + (2,))
  logits = rng.normal(size=shape + (k,)) * 1.5
  probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  marks = np.where(rng.random(shape) < marked_fraction, rng.integers(0, k, shape), -1).astype(np.int32)
  return image, probabilities, marks


@pytest.mark.parametrize("k", [2, 3])
def test_marked_pixels_keep_their_class_against_confident_unaries(k):
  image, probabilities, marks = _random_problem((20, 24), k, seed=1, marked_fraction=0.1)
  # The network is sure of the class one above each mark: the marks must win anyway.
  wrong = np.where(marks >= 0, (marks + 1) % k, np.argmax(probabilities, -1))
  probabilities = np.where(np.eye(k)[wrong] > 0, 0.999, 0.001 / (k - 1))
  labels = graph_cut_labels(image, probabilities, marks, lam=3.0)
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(labels[marks >= 0], marks[marks >= 0])


@pytest.mark.parametrize("k", [2, 4])
def test_without_a_boundary_term_unmarked_pixels_take_the_most_probable_class(k):
  image, probabilities, marks = _random_problem((15, 17), k, seed=2)
  labels = graph_cut_labels(image, probabilities, marks, lam=0.0)
  free = marks < 0
  np.testing.assert_array_equal(labels[free], np.argmax(probabilities, -1)[free])
  np.testing.assert_array_equal(labels[~free], marks[~free])


def test_cut_follows_a_step_edge_when_the_network_is_uninformative():
  image = np.zeros((24, 30, 1))
  image[:, 13:] = 1.0
  image += np.random.default_rng(0).normal(scale=0.02, size=image.shape)
  probabilities = np.full((24, 30, 2), 0.5)
  marks = np.full((24, 30), -1, np.int32)
  marks[12, 3] = 0
  marks[5, 25] = 1
  labels = graph_cut_labels(image, probabilities, marks, lam=1.0)
  expected = np.zeros((24, 30), np.int32)
  expected[:, 13:] = 1
  np.testing.assert_array_equal(labels, expected)


def test_three_classes_follow_two_step_edges_with_an_explicit_sigma():
  image = np.zeros((16, 30, 3))
  image[:, 10:20] = (1.0, 0.0, 0.5)
  image[:, 20:] = (0.0, 1.0, 0.0)
  probabilities = np.full((16, 30, 3), 1 / 3)
  marks = np.full((16, 30), -1, np.int32)
  marks[8, 2], marks[3, 15], marks[12, 27] = 0, 1, 2
  labels = graph_cut_labels(image, probabilities, marks, lam=1.0, sigma=0.1)
  expected = np.repeat(np.repeat(np.arange(3), 10)[None], 16, 0)
  np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize("connectivity", [1, 3])
def test_3d_cut_finds_a_bright_box_from_two_seeds(connectivity):
  image = np.zeros((12, 14, 10))
  image[3:9, 4:11, 2:8] = 1.0
  probabilities = np.full((12, 14, 10, 2), 0.5)
  marks = np.full((12, 14, 10), -1, np.int32)
  marks[6, 5:10, 5] = 1  # short scribbles, as a user would draw (a single voxel is cheap to cut around)
  marks[0, :, 0] = 0
  labels = graph_cut_labels(image, probabilities, marks, lam=1.0, connectivity=connectivity)
  np.testing.assert_array_equal(labels, (image > 0.5).astype(np.int32))


def test_two_classes_reach_the_brute_force_minimum():
  image, probabilities, marks = _random_problem((3, 4), 2, seed=3, marked_fraction=0.0)
  marks[0, 0], marks[2, 3] = 1, 0
  lam, sigma = 0.8, 1.5
  labels = graph_cut_labels(image, probabilities, marks, lam=lam, sigma=sigma)
  best = min(
    _energy(np.array(c).reshape(3, 4), probabilities, image, lam, sigma)
    for c in itertools.product((0, 1), repeat=12)
    if c[0] == 1 and c[-1] == 0
  )
  assert _energy(labels, probabilities, image, lam, sigma) == pytest.approx(best, rel=1e-9)


def test_alpha_expansion_lowers_the_energy_of_three_classes():
  rng = np.random.default_rng(4)
  image = np.zeros((18, 22, 1))
  image[5:14, 4:12] = 1.0
  image[:, 15:] = 2.0
  image += rng.normal(scale=0.3, size=image.shape)
  _, probabilities, marks = _random_problem((18, 22), 3, seed=5)
  lam, sigma = 1.5, 0.8
  start = np.where(marks >= 0, marks, np.argmax(probabilities, -1))
  result = graph_cut(image, probabilities, marks, lam=lam, sigma=sigma)
  before, after = (
    _energy(start, probabilities, image, lam, sigma),
    _energy(result.labels, probabilities, image, lam, sigma),
  )
  assert after < before - 1.0  # it moved, and downhill
  assert result.energy == pytest.approx(after, rel=1e-9)
  np.testing.assert_array_equal(result.labels[marks >= 0], marks[marks >= 0])
  assert result.sweeps >= 2  # it ran to a sweep without improvement


def test_inputs_are_checked():
  image, probabilities, marks = _random_problem((6, 7), 3, seed=7)
  with pytest.raises(ValueError, match="disagree"):
    graph_cut_labels(image[:5], probabilities, marks)
  with pytest.raises(ValueError, match="mark values"):
    graph_cut_labels(image, probabilities, np.full((6, 7), 3, np.int32))
  with pytest.raises(ValueError, match="lam"):
    graph_cut_labels(image, probabilities, marks, lam=-1.0)


def test_method_starts_from_the_network_and_cuts_with_every_mark():
  from scribblejax.models.unet import UNet

  model = UNet(spatial_dims=2, in_channels=1, num_classes=3, channels=[4, 8], rngs=nnx.Rngs(0))
  image = np.random.default_rng(8).normal(size=(16, 20, 1)).astype(np.float32)
  method = graph_cut_method(model, lam=1.0, sigma=None)
  assert method.name == "graph_cut"
  method.warmup(image)
  state = method.init(image)
  import jax

  from scribblejax.params import head, split_params
  from scribblejax.refinement import predict

  logits = np.asarray(predict(split_params(model, head()), image))
  np.testing.assert_array_equal(method.labels(state), np.argmax(logits, -1))
  np.testing.assert_allclose(state.probabilities, np.asarray(jax.nn.softmax(logits, -1)), atol=1e-6)
  marks = np.full((16, 20), -1, np.int32)
  marks[2:4, 2:9] = 2
  marks[10, 10:15] = 0
  state = method.update(state, marks)
  labels = method.labels(state)
  np.testing.assert_array_equal(labels, graph_cut_labels(image, state.probabilities, marks, lam=1.0))
  np.testing.assert_array_equal(labels[marks >= 0], marks[marks >= 0])
  assert method.info(state)["sweeps"] >= 1


def test_method_with_a_probabilities_function_and_an_initial_labelling():
  probabilities = np.zeros((8, 9, 2))
  probabilities[..., 0] = 0.9
  probabilities[..., 1] = 0.1
  method = graph_cut_method(
    lam=0.0, probabilities_fn=lambda image: probabilities, initial=lambda image: np.ones(image.shape[:-1], np.int32)
  )
  state = method.init(np.zeros((8, 9, 1)))
  assert (method.labels(state) == 1).all()
  marks = np.full((8, 9), -1, np.int32)
  marks[0, 0] = 1
  labels = method.labels(method.update(state, marks))
  assert labels[0, 0] == 1 and labels.sum() == 1
  with pytest.raises(ValueError, match="model or probabilities_fn"):
    graph_cut_method(lam=1.0)


def test_without_pymaxflow_the_error_names_the_extra(monkeypatch):
  import sys

  monkeypatch.setitem(sys.modules, "maxflow", None)  # makes `import maxflow` raise ImportError
  with pytest.raises(ImportError, match=r"scribblejax\[test\]"):
    graph_cut_method(lam=1.0, probabilities_fn=lambda image: image)
