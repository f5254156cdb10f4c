"""Resampling to a model's spacing and sliding-window inference, against nnU-Net's rules written out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.ndimage import map_coordinates
from skimage.transform import resize

import scribblejax as sj
from scribblejax.pipeline import resampling as rs
from scribblejax.pipeline import sliding_window as sw
from scribblejax.refinement import drivers


def _nnunet_separate_z(data, new_shape, axis, order, order_z):
  """nnU-Net's resample_data_or_seg for one channel with do_separate_z, as its source spells it."""
  plane = [n for a, n in enumerate(new_shape) if a != axis]
  slices = [
    resize(np.take(data, i, axis=axis), plane, order, mode="edge", anti_aliasing=False) for i in range(data.shape[axis])
  ]
  stacked = np.stack(slices, axis)
  if stacked.shape[axis] == new_shape[axis]:
    return stacked
  scales = [o / n for o, n in zip(stacked.shape, new_shape)]
  grid = np.mgrid[tuple(slice(0, n) for n in new_shape)]
  coords = np.array([s * (g + 0.5) - 0.5 for s, g in zip(scales, grid)])
  return map_coordinates(stacked, coords, order=order_z, mode="nearest")


@pytest.mark.parametrize(
  "spacing, target, separate",
  [
    ((2.5, 0.9, 0.9), (2.0, 1.0, 1.0), None),  # nearly isotropic: one 3-D cubic resize
    ((3.0, 0.5, 0.5), (3.0, 1.0, 1.0), 0),  # anisotropic source: in-plane cubic, z untouched
    ((0.6, 4.0, 0.7), (1.0, 2.5, 1.0), 1),  # coarse axis 1, resized along it by nearest
    ((1.0, 1.0, 1.0), (4.0, 1.0, 1.0), 0),  # anisotropic target decides
  ],
)
def test_resample_follows_nnunet(spacing, target, separate):
  data = np.random.default_rng(0).normal(size=(9, 10, 11, 2)).astype(np.float32)
  shape = rs.resampled_shape(data.shape[:-1], spacing, target)
  assert shape == tuple(int(round(s / t * n)) for n, s, t in zip(data.shape[:-1], spacing, target))
  assert rs.separate_axis(spacing, target) == separate
  got = rs.resample(data, shape, spacing, target)
  assert got.shape == (*shape, 2) and got.dtype == np.float32
  for c in range(2):
    x = data[..., c].astype(np.float64)
    want = (
      resize(x, shape, 3, mode="edge", anti_aliasing=False)
      if separate is None
      else _nnunet_separate_z(x, shape, separate, 3, 0)
    )
    np.testing.assert_allclose(got[..., c], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(rs.resample(data, data.shape[:-1], spacing, target), data)  # same shape: as is
  with pytest.raises(ValueError, match="positive finite"):
    rs.resampled_shape((4, 4), (1.0, 0.0), (1.0, 1.0))
  with pytest.raises(ValueError, match="spline order"):
    rs.ResampleScheme(order=7)


def test_marks_survive_a_coarser_grid_and_map_back_to_the_same_places():
  marks = np.full((40, 41), -1, np.int32)
  marks[12, 3:38] = 1  # a one-pixel scribble between sampled rows
  marks[30, 20] = 0
  coarse, lost = rs.resample_label_map(marks, (10, 13))
  assert lost == 0 and set(np.unique(coarse)) == {-1, 0, 1}
  nearest = marks[
    np.ix_(
      *[np.clip(np.floor((np.arange(m) + 0.5) * (n / m)), 0, n - 1).astype(int) for n, m in zip(marks.shape, (10, 13))]
    )
  ]
  assert (nearest == 1).sum() == 0  # plain nearest-neighbour sampling drops the scribble
  crossed = {int(np.floor((c + 0.5) * 13 / 41)) for c in range(3, 38)}
  assert len(crossed) == 11 and set(np.argwhere(coarse == 1)[:, 1]) == crossed  # every column it crosses keeps it
  fine, _ = rs.resample_label_map(coarse, marks.shape)
  assert fine[12, 20] == 1 and fine[30, 20] == 0
  clash = np.full((4, 4), -1, np.int32)
  clash[0, 0], clash[0, 1] = 1, 2
  _, lost = rs.resample_label_map(clash, (1, 1))
  assert lost == 1


def test_window_starts_and_weights_follow_nnunet():
  assert sw.window_starts(110, 64, 0.5) == [0, 23, 46]  # the example in nnU-Net's source
  assert sw.window_starts(64, 64) == [0] and sw.window_starts(65, 64) == [0, 1]
  assert sw.window_starts(5, 1) == [0, 1, 2, 3, 4]  # one slice at a time: each slice once
  assert sw.window_starts(300, 64, 1e-9) == list(range(237))  # a tiny step: every start once, quickly
  with pytest.raises(ValueError, match="shorter than the patch"):
    sw.window_starts(10, 16)
  weights = sw.gaussian_importance((8, 9))
  assert weights.max() == 1.0 and weights.min() > 0 and weights[4, 4] == 1.0
  assert sw.pad_to_patch((5, 20), (8, 8)) == ((1, 2), (0, 0))


class _Pointwise(nnx.Module):
  def __init__(self):
    self.conv = nnx.Conv(2, 3, (1, 1), rngs=nnx.Rngs(0))

  def __call__(self, x):
    return self.conv(x)


def test_sliding_window_blends_to_the_whole_image_for_a_pointwise_network():
  split = sj.split_params(_Pointwise(), sj.params.by_regex("conv/.*"))
  image = np.random.default_rng(1).normal(size=(13, 21, 2)).astype(np.float32)
  whole = np.asarray(sj.predict(split, image))
  got = sw.sliding_window_logits(split, image, (8, 8))
  np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-5)
  small = sw.sliding_window_logits(split, image[:5], (8, 8))  # padded to the patch, cropped back
  np.testing.assert_allclose(small, whole[:5], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_several_weight_sets_in_one_pass_equal_one_pass_each(monkeypatch):
  # each patch's frozen trunk is computed once and the tail runs per set of weights: the same logits
  net = sj.UNet(spatial_dims=2, in_channels=1, num_classes=3, channels=(4, 8), rngs=nnx.Rngs(5))
  split = sj.split_params(net, sj.last_layers(2))
  image = np.random.default_rng(3).normal(size=(20, 26, 1)).astype(np.float32)
  other = jax.tree.map(lambda w: w * 1.3 + 0.01, split.tunable)
  calls, forward = [], []
  program = drivers.predict_program
  monkeypatch.setattr(drivers, "predict_program", lambda *a, **k: forward.append(1) or program(*a, **k))
  both = sw.sliding_window_logits_of(split, image, (8, 8), [None, other], progress=lambda d, n: calls.append((d, n)))
  assert len(forward) == 2 * len(calls)  # per patch the tail twice, and nothing else (no keep term's targets)
  one = [sw.sliding_window_logits(split, image, (8, 8)), sw.sliding_window_logits(split, image, (8, 8), other)]
  for got, want in zip(both, one):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.abs(one[0] - one[1]).max() > 1e-3 and calls[-1][0] == calls[-1][1] == len(calls)
  with pytest.raises(ValueError, match="no tunable weights"):
    sw.sliding_window_logits_of(split, image, (8, 8), [])


@pytest.mark.slow
def test_patch_blend_gives_the_sliding_window_logits_at_every_marked_voxel():
  net = sj.UNet(spatial_dims=2, in_channels=1, num_classes=2, channels=(4, 8), rngs=nnx.Rngs(0))
  split = sj.split_params(net, sj.last_layers(2))
  image = np.random.default_rng(2).normal(size=(20, 28, 1)).astype(np.float32)
  full = sw.sliding_window_logits(split, image, (8, 8))
  marks = np.full(image.shape[:-1], -1, np.int32)
  marks[3, 25], marks[5, 27], marks[9, 20] = 1, 0, 1
  starts = sw.marked_windows(marks, (8, 8))
  brute = [(a, b) for a in sw.window_starts(20, 8) for b in sw.window_starts(28, 8)]
  assert list(starts) == [s for s in brute if (marks[s[0] : s[0] + 8, s[1] : s[1] + 8] >= 0).any()]
  region, relative = sw.windows_region(starts, (8, 8))
  blend = sw.PatchBlend(net, relative, (8, 8), 1)
  got = np.asarray(blend(image[region][None]))[0]
  marked = marks[region] >= 0
  np.testing.assert_allclose(got[marked], full[region][marked], rtol=1e-5, atol=1e-5)
  assert [p[0] for p in blend.layer_order()] == ["net"] * len(net.layer_order())


@pytest.mark.slow
def test_mirrored_network_is_the_mean_over_flips_and_refines_as_one_network():
  net = sj.UNet(spatial_dims=2, in_channels=1, num_classes=2, channels=(4, 8), rngs=nnx.Rngs(3))
  assert sw.mirror_combinations((0, 1)) == ((0,), (1,), (0, 1))
  mirrored = sw.Mirrored(net, (0, 1), (8, 12, 1))
  x = np.random.default_rng(4).normal(size=(2, 8, 12, 1)).astype(np.float32)
  flips = [(), (1,), (2,), (1, 2)]
  want = sum(np.flip(np.asarray(net(np.flip(x, f).copy())), f) for f in flips) / 4
  np.testing.assert_allclose(np.asarray(mirrored(x)), want, rtol=1e-5, atol=1e-5)
  assert mirrored.layer_order() == [("net", *p) for p in net.layer_order()]
  split = sj.split_params(mirrored, sj.last_layers(2))
  marks = np.full((8, 12), -1, np.int32)
  marks[2, 3], marks[6, 9] = 1, 0
  result = sj.refine(split, x[0], marks, sj.RefineConfig.paper(max_steps=200, learning_rate=0.05))
  assert bool(result.satisfied)
  for bad in ((2,), (0, 0), ()):
    with pytest.raises(ValueError, match="mirroring axes must be distinct spatial axes 0..1"):
      sw.Mirrored(net, bad, (8, 12, 1))


def test_a_stack_of_slices_a_strided_2d_network_refuses_is_padded_in_plane(tmp_path):
  import tifffile

  from scribblejax.app import run_predict
  from scribblejax.convert.monai_nets import UNet

  kwargs = dict(spatial_dims=2, in_channels=1, out_channels=2, channels=[4, 8, 16], strides=[2, 2], num_res_units=0)
  sj.save_model(tmp_path / "m", UNet(**kwargs, rngs=nnx.Rngs(0)), family="monai.UNet", kwargs=kwargs)
  stack = np.random.default_rng(0).random((3, 45, 45)).astype(np.float32)  # 45: stride 2 twice refuses it
  tifffile.imwrite(tmp_path / "one.tif", stack[1])
  tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
  calls = []
  report = run_predict(
    str(tmp_path / "m"),
    str(tmp_path / "stack.tif"),
    str(tmp_path / "stack_seg.tif"),
    overlay=False,
    progress=lambda done, total: calls.append((done, total)),
  )
  assert calls == [(1, 3), (2, 3), (3, 3)]  # one whole slice at a time
  assert any("from (3, 45, 45) to (3, 48, 48)" in n for n in report["notes"])  # was: the network's own error
  run_predict(str(tmp_path / "m"), str(tmp_path / "one.tif"), str(tmp_path / "one_seg.tif"), overlay=False)
  np.testing.assert_array_equal(
    tifffile.imread(tmp_path / "stack_seg.tif")[1], tifffile.imread(tmp_path / "one_seg.tif")
  )


def test_mirroring_axes_come_from_the_model_or_are_refused_by_name():
  from scribblejax.pipeline import mirroring_axes

  assert mirroring_axes({}, 3) == (0, 1, 2) and mirroring_axes({"mirroring_axes": [1, 2]}, 3) == (1, 2)
  with pytest.raises(ValueError, match="allows no mirroring"):
    mirroring_axes({"mirroring_axes": None}, 3)
  for bad in ([True], [3], "0"):
    with pytest.raises(ValueError, match="must list spatial axes 0..2"):
      mirroring_axes({"mirroring_axes": bad}, 3)


@pytest.mark.slow
def test_patch_blend_in_batches_gives_the_same_logits_and_refinement_in_less_memory():
  # Many marked patches run one batch after another (lax.map), each rematerialised: same logits and
  # refinement; XLA's own analysis of the compiled loop shows the memory drop; the frozen trunk is
  # still computed once per interaction (scribblejax.refinement.trunk unzips the map).
  net = sj.UNet(spatial_dims=2, in_channels=1, num_classes=3, channels=(4, 8), rngs=nnx.Rngs(0))
  image = np.random.default_rng(3).normal(size=(48, 48, 1)).astype(np.float32)
  marks = np.full(image.shape[:-1], -1, np.int32)
  marks[24, 3:45], marks[3, 3], marks[45, 45] = 2, 1, 0
  starts = sw.marked_windows(marks, (24, 24))
  assert len(starts) == 7
  example = jax.ShapeDtypeStruct((1, *image.shape), jnp.float32)
  splits = {
    chunk: sj.split_params(sw.PatchBlend(net, starts, (24, 24), 1, chunk=chunk), sj.last_layers(3), example=example)
    for chunk in (None, 1, 4)
  }
  assert sw.PatchBlend(net, starts, (24, 24), 1, chunk=7).chunk is None  # one batch holds them all
  config = sj.RefineConfig.paper(max_steps=8, early_stop=False, learning_rate=0.05, driver="loop")
  logits, refined, memory = {}, {}, {}
  for chunk, split in splits.items():
    logits[chunk] = np.asarray(
      jax.jit(sj.refinement.forward, static_argnums=0)(split.graphdef, split.tunable, split.frozen, image)
    )
    if chunk != 4:  # 8 steps of SGD through the cached trunk: the same gradients at every step
      refined[chunk] = np.asarray(sj.refine(split, image, marks, config).logits)
      memory[chunk] = sj.refinement.memory_analysis(split, image, marks, config)["peak_bytes"]
  for chunk in (1, 4):  # 4: two batches of 4, the last filled up and cropped
    np.testing.assert_allclose(logits[chunk], logits[None], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(refined[1], refined[None], rtol=1e-4, atol=1e-4)
  assert memory[1] < 0.6 * memory[None], memory
  with pytest.raises(ValueError, match="patches per network call must be a positive integer or None, got 0"):
    sw.PatchBlend(net, starts, (24, 24), 1, chunk=0)


def test_patch_chunk_keeps_a_voxel_budget():
  assert sj.pipeline.patch_chunk((128, 128, 128)) == 1 and sj.pipeline.patch_chunk((64, 64, 64), passes=2) == 4
  assert sj.pipeline.patch_chunk((512, 512)) == 8 and sj.pipeline.patch_chunk((64, 64), voxels=100) == 1
  with pytest.raises(ValueError, match="passes and voxels must be positive integers"):
    sj.pipeline.patch_chunk((8, 8), passes=0)


def _marked(shape, spots):
  marks = np.full(shape, -1, np.int32)
  for spot, label in spots:
    marks[spot] = label
  return marks


@pytest.mark.slow
def test_marked_patches_blend_the_sliding_window_logits_at_the_marks_and_refine_as_patch_blend():
  net = sj.UNet(spatial_dims=2, in_channels=1, num_classes=3, channels=(4, 8), rngs=nnx.Rngs(7))
  image = np.random.default_rng(4).normal(size=(20, 28, 1)).astype(np.float32)
  marks = _marked((20, 28), [((3, 25), 1), ((5, 27), 0), ((9, 20), 2), ((12, 5), 1), ((15, 14), 2)])
  full = sw.sliding_window_logits(sj.split_params(net, sj.last_layers(2)), image, (8, 8))
  stacked, stacked_marks, kwargs = sw.marked_patches(image, marks, (8, 8))
  starts = kwargs.pop("starts")
  assert starts == sw.marked_windows(marks, (8, 8)) and kwargs["patches"] >= len(starts)
  voxels = np.argwhere(marks >= 0)
  assert sorted(stacked_marks[stacked_marks >= 0]) == sorted(marks[marks >= 0])
  for chunk in (None, 2):
    out = np.asarray(sw.MarkedPatches(net, (8, 8), 1, chunk=chunk, **kwargs)(stacked[None]))[0]
    at = out.reshape(-1, 3)[kwargs["writes"][: len(voxels)]]
    np.testing.assert_allclose(at, full[tuple(voxels.T)], atol=1e-5)
    assert np.count_nonzero(out.reshape(-1, 3).any(-1)) <= len(voxels)  # 0 away from the marks
  # the refinement on them is the refinement on the blended region (PatchBlend): same loss, same steps
  config = sj.RefineConfig.paper(max_steps=40, learning_rate=0.05)
  mp = sj.split_params(sw.MarkedPatches(net, (8, 8), 1, **kwargs), sj.last_layers(2))
  region, relative = sw.windows_region(starts, (8, 8))
  pb = sj.split_params(sw.PatchBlend(net, relative, (8, 8), 1), sj.last_layers(2))
  a = sj.refine(mp, stacked, stacked_marks, config)
  b = sj.refine(pb, image[region], marks[region], config)
  assert int(a.num_steps) == int(b.num_steps) and bool(a.satisfied) == bool(b.satisfied)
  for x, y in zip(jax.tree.leaves(a.tunable), jax.tree.leaves(b.tunable)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4)


@pytest.mark.parametrize(
  "shape, patch, first, second",
  [
    ((40, 40), 16, [((3, 3), 1), ((4, 30), 0)], [((30, 33), 1), ((36, 3), 0)]),  # 1 + 2 patches each
    # nnU-Net's rounded strides: a voxel may lie in 3 patches along an axis, and only some voxels do
    ((23, 30), 8, [((9, 1), 1), ((9, 13), 0)], [((11, 9), 1), ((11, 10), 0)]),
  ],
)
@pytest.mark.slow
def test_marked_patches_elsewhere_reuse_the_compiled_loop(shape, patch, first, second):
  # The patches' places are frozen state: marks in other patches, of the same counts after rounding up,
  # compile nothing new (PatchBlend, whose starts are static, compiles every time).
  from scribblejax.app import compile_timer

  net = sj.UNet(spatial_dims=2, in_channels=1, num_classes=2, channels=(4, 8), rngs=nnx.Rngs(8))
  image = np.random.default_rng(5).normal(size=(*shape, 1)).astype(np.float32)
  config = sj.RefineConfig.paper(max_steps=3)
  seconds = []
  for spots in (first, second):
    stacked, stacked_marks, kwargs = sw.marked_patches(image, _marked(shape, spots), (patch, patch))
    kwargs.pop("starts")
    split = sj.split_params(sw.MarkedPatches(net, (patch, patch), 1, **kwargs), sj.last_layers(2))
    with compile_timer() as compiled:
      jax.block_until_ready(sj.refine(split, stacked, stacked_marks, config).logits)
    seconds.append(compiled[0])
  assert seconds[0] > 0 and seconds[1] == 0.0, seconds  # was: a second compile (reads' width changed)


def test_patch_buckets_add_less_than_half_the_work():
  sizes = [sw._patch_bucket(n, 1) for n in range(1, 200)]
  assert sizes[:9] == [1, 2, 3, 4, 6, 6, 8, 8, 12]
  assert all(n <= b < 1.5 * n or b == n for n, b in zip(range(1, 200), sizes))
  assert len(set(sizes)) == 16  # few sizes: few compiled loops


@pytest.mark.slow
@pytest.mark.parametrize("step", [0.25, 1.0])
def test_marked_patches_follow_any_step(step):
  net = sj.UNet(spatial_dims=2, in_channels=1, num_classes=2, channels=(4, 8), rngs=nnx.Rngs(9))
  image = np.random.default_rng(6).normal(size=(24, 32, 1)).astype(np.float32)
  marks = _marked((24, 32), [((0, 0), 1), ((11, 13), 0), ((23, 31), 1), ((12, 16), 1)])
  full = sw.sliding_window_logits(sj.split_params(net, sj.last_layers(2)), image, (8, 8), step=step)
  stacked, _, kwargs = sw.marked_patches(image, marks, (8, 8), step)
  kwargs.pop("starts")
  voxels = np.argwhere(marks >= 0)
  out = np.asarray(sw.MarkedPatches(net, (8, 8), 1, **kwargs)(stacked[None]))[0].reshape(-1, 2)
  np.testing.assert_allclose(out[kwargs["writes"][: len(voxels)]], full[tuple(voxels.T)], atol=1e-5)
  assert kwargs["reads"].shape[1] == (16 if step == 0.25 else 1)  # from the grid, not the marks


@pytest.mark.parametrize(
  "old,new,spacing,target",
  [
    ((9, 11), (5, 6), (1.0, 1.0), (1.8, 1.8)),  # coarser model grid
    ((6, 7), (11, 13), (1.0, 1.0), (0.55, 0.55)),  # finer
    ((12, 10, 4), (6, 5, 6), (0.5, 0.5, 3.0), (1.0, 1.0, 2.0)),  # anisotropic: the coarse axis on its own
  ],
)
def test_covered_marks_honoured_on_the_model_grid_are_honoured_after_the_way_back(old, new, spacing, target):
  rng = np.random.default_rng(len(old) + old[0])
  marks = np.full(old, -1, np.int32)
  marks[tuple(np.array([0, n // 2, n - 1]) for n in old)] = [1, 2, 1]  # apart: no voxel read for two marks
  nearest, _ = rs.resample_label_map(marks, new)
  axis = rs.separate_axis(target, spacing, rs.LOGITS)  # the way back: model spacing -> image spacing
  orders = tuple(rs.LOGITS.order_z if a == axis else rs.LOGITS.order for a in range(len(old)))
  covered = rs.cover_label_map(marks, nearest, orders)
  assert (covered[nearest >= 0] == nearest[nearest >= 0]).all() and (covered >= 0).sum() >= (nearest >= 0).sum()
  assert (covered >= 0).sum() > (nearest >= 0).sum() or new[0] > old[0]  # a finer grid: its nearest voxels do
  # logits that honour every covered voxel by a small margin, and strongly favour class 0 everywhere else
  logits = rng.normal(size=(*new, 3)) * 0.1
  logits[..., 0] += 10.0
  logits[covered >= 0, :] = -1.0
  logits[np.nonzero(covered >= 0) + (covered[covered >= 0],)] = 1.0
  back = rs.resample(logits, old, target, spacing, rs.LOGITS).argmax(-1)
  np.testing.assert_array_equal(back[marks >= 0], marks[marks >= 0])
  with pytest.raises(ValueError, match="one order, 0 or 1, per axis"):
    rs.cover_label_map(marks, nearest, (3,) * len(old))
