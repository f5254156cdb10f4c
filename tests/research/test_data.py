"""The vendored datasets: shapes, classes, disjoint fixed splits, and the derived MNI tissue label."""

import numpy as np
import pytest

from scribblejax.research import data


def _covered(index, shape):
  mask = np.zeros(shape, bool)
  mask[index] = True
  return mask


@pytest.fixture(scope="module")
def tissue2d():
  return data.tissue2d()


def test_nuclei2d_shapes_classes_and_split():
  ds = data.nuclei2d()
  assert ds.image.shape == (512, 512, 1) and ds.image.dtype == np.float32
  assert ds.labels.shape == (512, 512) and set(np.unique(ds.labels)) == {0, 1}
  assert ds.class_names == ("background", "nucleus") and not ds.stacked
  train, test = _covered(ds.train, ds.labels.shape), _covered(ds.test, ds.labels.shape)
  assert not (train & test).any() and (train | test).all()
  assert ds.image[ds.test].shape == (512, 128, 1)
  border = data.nuclei2d("border")
  assert set(np.unique(border.labels)) == {0, 1, 2}
  np.testing.assert_array_equal(border.labels > 0, ds.labels > 0)
  _, instances = data.nuclei_instances()
  assert instances.max() == 125 and len(np.unique(instances)) == 126
  with pytest.raises(ValueError, match="classes"):
    data.nuclei2d("instances")


def test_nuclei3d_shapes_and_split():
  ds = data.nuclei3d()
  assert ds.image.shape == (31, 61, 57, 1) and ds.labels.shape == (31, 61, 57)
  assert set(np.unique(ds.labels)) == {0, 1} and len(ds.spacing) == 3
  train, test = _covered(ds.train, ds.labels.shape), _covered(ds.test, ds.labels.shape)
  assert not (train & test).any() and (train | test).all()
  assert ds.labels[ds.test].any() and ds.labels[ds.train].any()
  assert data.nuclei3d_instances()[1].max() == 51


@pytest.mark.slow
def test_tissue2d_stack_split_and_affine(tissue2d):
  ds = tissue2d
  assert ds.stacked and ds.image.shape == (189, 197, 233, 1) and ds.labels.shape == (189, 197, 233)
  assert ds.class_names == ("background", "csf_other", "grey_matter", "white_matter")
  train = set(list(range(189))[ds.train[0]])
  test = set(list(range(189))[ds.test[0]])
  assert train.isdisjoint(test) and len(train) >= 80 and len(test) >= 40
  for part in (ds.train, ds.test):
    assert set(np.unique(ds.labels[part])) == {0, 1, 2, 3}
  # affine maps (z, x, y) stack indices to the world point of the volume's voxel (x, y, z)
  t1, _, _, affine = data.mni152()
  z, x, y = 120, 50, 70
  np.testing.assert_allclose(ds.affine @ [z, x, y, 1], affine @ [x, y, z, 1])
  assert ds.image[z, x, y, 0] == t1[x, y, z]
  assert "DERIVED" in ds.description


def _rule(t1_value, t1_max, gm_value, wm_value):
  """The data README's rule, written out for one voxel."""
  if t1_value / t1_max <= 0.2:
    return 0
  g, w = gm_value / 255.0, wm_value / 255.0
  scores = [1.0 - g - w, g, w]
  return 1 + scores.index(max(scores))


def test_derived_tissue_labels_follow_the_rule_voxel_by_voxel(tissue2d):
  t1, gm, wm, _ = data.mni152()
  assert t1.shape == gm.shape == wm.shape == (197, 233, 189)
  t1_max = float(t1.max())
  rng = np.random.default_rng(0)
  points = [tuple(int(rng.integers(0, s)) for s in t1.shape) for _ in range(300)]
  brain = np.argwhere(t1 > 0.2 * t1_max)
  points += [tuple(int(v) for v in brain[i]) for i in rng.integers(0, len(brain), 300)]
  seen = set()
  for x, y, z in points:
    want = _rule(float(t1[x, y, z]), t1_max, float(gm[x, y, z]), float(wm[x, y, z]))
    assert tissue2d.labels[z, x, y] == want, (x, y, z)
    seen.add(want)
  assert seen == {0, 1, 2, 3}


def test_tissue3d_downsampled_labels_and_split():
  ds = data.tissue3d()
  assert ds.image.shape == (66, 78, 63, 1) and ds.labels.shape == (66, 78, 63)
  assert ds.spacing == (3.0, 3.0, 3.0) and not ds.stacked
  train, test = _covered(ds.train, ds.labels.shape), _covered(ds.test, ds.labels.shape)
  assert not (train & test).any()
  assert set(np.unique(ds.labels[ds.test])) == {0, 1, 2, 3}
  t1, gm, wm, affine = data.mni152()
  np.testing.assert_allclose(ds.affine @ [0, 0, 0, 1], affine @ [1, 1, 1, 1])  # centre of the first block
  t1_max = float(ds.image.max())
  for i, j, k in [(20, 30, 40), (33, 39, 30), (10, 60, 20), (45, 20, 36), (30, 50, 45)]:
    block = np.s_[3 * i : 3 * i + 3, 3 * j : 3 * j + 3, 3 * k : 3 * k + 3]
    means = [float(v[block].astype(np.float64).mean()) for v in (t1, gm, wm)]
    assert ds.image[i, j, k, 0] == pytest.approx(means[0], rel=1e-5)
    assert ds.labels[i, j, k] == _rule(means[0], t1_max, means[1], means[2])
  with pytest.raises(ValueError, match="factor"):
    data.tissue3d(0)


def test_load_by_name():
  assert data.load("nuclei3d").labels.shape == (31, 61, 57)
  with pytest.raises(ValueError, match="unknown dataset"):
    data.load("mnist")
