"""End to end: a synthetic nnU-Net folder, a MONAI bundle and a bare checkpoint convert, save and reload."""

import argparse
import itertools
import json

import numpy as np
import pytest
from torch_builders import randomize_

from scribblejax.cli import convert as cli
from scribblejax.convert.folder import convert

torch = pytest.importorskip("torch")


def _nnunet_folder(tmp_path):
  pytest.importorskip("dynamic_network_architectures")
  from dynamic_network_architectures.architectures.unet import PlainConvUNet

  arch_kwargs = {
    "n_stages": 3,
    "features_per_stage": [2, 4, 4],
    "conv_op": "torch.nn.modules.conv.Conv2d",
    "kernel_sizes": [[3, 3], [3, 3], [3, 3]],
    "strides": [[1, 1], [2, 2], [2, 2]],
    "n_conv_per_stage": [2, 2, 2],
    "n_conv_per_stage_decoder": [2, 2],
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
  }
  plans = {
    "dataset_name": "Dataset999_Toy",
    "plans_name": "nnUNetPlans",
    "transpose_forward": [0, 1],
    "foreground_intensity_properties_per_channel": {
      "0": {"mean": 50.0, "std": 20.0, "percentile_00_5": -10.0, "percentile_99_5": 200.0}
    },
    "configurations": {
      "2d": {
        "data_identifier": "nnUNetPlans_2d",
        "patch_size": [16, 16],
        "spacing": [1.0, 1.0],
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "architecture": {
          "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
          "arch_kwargs": dict(arch_kwargs, features_per_stage=[8, 8, 8]),
          "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
      },
      "2d_small": {
        "inherits_from": "2d",
        "architecture": {
          "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
          "arch_kwargs": arch_kwargs,
          "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
      },
    },
  }
  dataset = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "liver": 1, "tumour": 2},
    "numTraining": 3,
    "file_ending": ".nii.gz",
  }
  net = PlainConvUNet(
    1,
    3,
    [2, 4, 4],
    torch.nn.Conv2d,
    3,
    [1, 2, 2],
    2,
    3,
    2,
    True,
    torch.nn.InstanceNorm2d,
    {"eps": 1e-5, "affine": True},
    None,
    None,
    torch.nn.LeakyReLU,
    {"inplace": True},
    deep_supervision=True,
  )
  randomize_(net, seed=11)
  folder = tmp_path / "Dataset999_Toy" / "nnUNetTrainer__nnUNetPlans__2d_small"
  (folder / "fold_0").mkdir(parents=True)
  (folder / "plans.json").write_text(json.dumps(plans))
  (folder / "dataset.json").write_text(json.dumps(dataset))
  torch.save(
    {
      "network_weights": net.state_dict(),
      "optimizer_state": {"state": {}, "param_groups": []},
      "grad_scaler_state": None,
      "logging": {"train_losses": [np.float64(0.5)], "ema_fg_dice": [np.float32(0.1)]},
      "_best_ema": np.float64(0.1),
      "current_epoch": 1,
      "init_args": {
        "plans": plans,
        "configuration": "2d_small",
        "fold": 0,
        "dataset_json": dataset,
        "device": torch.device("cpu"),
      },
      "trainer_name": "nnUNetTrainer",
      "inference_allowed_mirroring_axes": (0, 1),
    },
    folder / "fold_0" / "checkpoint_final.pth",
  )
  net.decoder.deep_supervision = False
  return folder, net


def _logits(torch_net, x_nchw):
  with torch.no_grad():
    return torch_net(torch.from_numpy(x_nchw)).numpy()


@pytest.mark.slow
def test_nnunet_folder_round_trip(tmp_path):
  from scribblejax.models.store import load_model

  folder, net = _nnunet_folder(tmp_path)
  out = convert(folder, tmp_path / "converted")
  model, info = load_model(out)
  assert info.family == "nnunet.PlainConvUNet" and info.class_names == ("background", "liver", "tumour")
  norm = info.normalization
  norm = norm[0] if isinstance(norm, list) else norm
  assert norm == {"kind": "ct", "lower": -10.0, "upper": 200.0, "mean": 50.0, "std": 20.0}
  x = np.random.default_rng(0).standard_normal((2, 1, 16, 24)).astype(np.float32)
  got = np.moveaxis(np.asarray(model(np.moveaxis(x, 1, -1))), -1, 1)
  assert np.max(np.abs(got - _logits(net, x))) < 1e-4
  model.layer_order()


def _basic_unet():
  from monai.networks.nets import BasicUNet

  kwargs = {"spatial_dims": 2, "in_channels": 1, "out_channels": 3, "features": [4, 4, 4, 4, 4, 4]}
  return kwargs, randomize_(BasicUNet(**kwargs), seed=2)


def _add_fold(folder, net, name, seed):
  import copy

  other = copy.deepcopy(net)
  randomize_(other, seed=seed)
  (folder / f"fold_{name}").mkdir()
  torch.save(
    {
      "network_weights": other.state_dict(),
      "trainer_name": "nnUNetTrainer",
      "inference_allowed_mirroring_axes": (0, 1),
    },
    folder / f"fold_{name}" / "checkpoint_final.pth",
  )
  return other.eval()


@pytest.mark.slow
def test_nnunet_folds_average_as_nnunet_does_and_refine_together(tmp_path, capsys):
  # nnUNetv2_predict averages the logits of every fold it is given (by default the cross-validation
  # folds 0..4); --folds cv converts them into one Ensemble whose last layers are every fold's.
  import jax

  import scribblejax as sj
  from scribblejax.models.store import load_model

  folder, net = _nnunet_folder(tmp_path)
  fold1 = _add_fold(folder, net, "1", seed=12)
  fold_all = _add_fold(folder, net, "all", seed=13)
  x = np.random.default_rng(2).standard_normal((2, 1, 16, 24)).astype(np.float32)
  ours = lambda model: np.moveaxis(np.asarray(model(np.moveaxis(x, 1, -1))), -1, 1)
  parser = argparse.ArgumentParser()
  cli.add_parser(parser.add_subparsers())
  args = parser.parse_args(["convert", str(folder), "--out", str(tmp_path / "cv"), "--folds", "cv"])
  assert cli.run(args) == 0
  assert "note:" not in capsys.readouterr().err  # fold_all is not a cross-validation fold
  model, info = load_model(tmp_path / "cv")
  assert info.family == "scribblejax.Ensemble" and info.kwargs["members"] == 2
  assert info.metadata["folds"] == ["0", "1"] and info.metadata["available_folds"] == ["0", "1", "all"]
  want = (_logits(net, x) + _logits(fold1, x)) / 2
  assert np.max(np.abs(ours(model) - want)) < 1e-4
  assert np.max(np.abs(ours(model.member(1)) - _logits(fold1, x))) < 1e-4
  # nnU-Net's -f names: "all" is fold_all
  single, info = load_model(convert(folder, tmp_path / "all", folds=["all"]))
  assert info.family == "nnunet.PlainConvUNet" and info.metadata["folds"] == ["all"]
  assert np.max(np.abs(ours(single) - _logits(fold_all, x))) < 1e-4
  # by default the first fold, with a note naming the others ("²" is a digit to str.isdigit, not a fold number)
  (folder / "fold_²").mkdir()
  notes = []
  first, info = load_model(convert(folder, tmp_path / "first", log=notes.append))
  assert info.metadata["folds"] == ["0"] and np.max(np.abs(ours(first) - _logits(net, x))) < 1e-4
  assert notes and "also holds cross-validation fold(s) 1 " in notes[0] and "--folds cv" in notes[0]
  # a class appended to every fold's head (nnU-Net's seg_layer): the segmentation stays the folds' own
  from scribblejax.models.surgery import add_classes

  grown = ours(add_classes(model, 1))
  assert grown.shape[1] == 4 and np.array_equal(grown.argmax(1), ours(model).argmax(1))
  # refinement tunes the last layers of both folds against their mean
  split = sj.split_params(model, sj.last_layers(2))
  assert all(leaf.shape[0] == 2 for leaf in jax.tree.leaves(split.tunable))
  image = np.moveaxis(x[0], 0, -1)
  labels = np.asarray(sj.predict(split, image)).argmax(-1)
  marks = np.full(labels.shape, -1, np.int32)
  marks[4, 5], marks[11, 17] = (labels[4, 5] + 1) % 3, (labels[11, 17] + 2) % 3
  result = sj.refine(split, image, marks, sj.RefineConfig.paper(max_steps=200, learning_rate=0.5))
  assert bool(result.satisfied)
  for before, after in zip(jax.tree.leaves(split.tunable), jax.tree.leaves(result.tunable)):
    assert all(float(np.abs(np.asarray(after[k]) - np.asarray(before[k])).max()) > 0 for k in range(2))
  # bad folds: one line each
  for folds, message in (
    (["7"], r"has no fold_7 \(its folds: 0, 1, all, ²\)"),
    (["1", "1"], "a fold is named twice"),
    (["../x"], r"fold names are folder suffixes \(fold_<name>\).*got '\.\./x'"),
  ):
    with pytest.raises(ValueError, match=message):
      convert(folder, tmp_path / "bad", folds=folds)
  capsys.readouterr()
  args = parser.parse_args(["convert", str(folder), "--out", str(tmp_path / "bad"), "--folds", "0,,1"])
  assert cli.run(args) == 1 and "--folds must be cv or fold names" in capsys.readouterr().err
  assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_bare_checkpoint_and_cli(tmp_path, capsys):
  pytest.importorskip("monai")
  from scribblejax.models.store import load_model

  kwargs, net = _basic_unet()
  torch.save(net.state_dict(), tmp_path / "w.pth")
  parser = argparse.ArgumentParser()
  cli.add_parser(parser.add_subparsers())
  args = parser.parse_args(
    [
      "convert",
      str(tmp_path / "w.pth"),
      "--out",
      str(tmp_path / "m"),
      "--arch",
      "monai.networks.nets.BasicUNet",
      "--kwargs",
      json.dumps(kwargs),
      "--normalize",
      '{"kind": "zscore"}',
    ]
  )
  assert args.func(args) == 0
  model, info = load_model(tmp_path / "m")
  assert info.family == "monai.BasicUNet" and info.normalization in ({"kind": "zscore"}, [{"kind": "zscore"}])
  x = np.random.default_rng(1).standard_normal((1, 1, 33, 35)).astype(np.float32)
  got = np.moveaxis(np.asarray(model(np.moveaxis(x, 1, -1))), -1, 1)
  assert np.max(np.abs(got - _logits(net, x))) < 1e-4
  # Bad input: one-line error, non-zero exit.
  capsys.readouterr()
  args = parser.parse_args(
    [
      "convert",
      str(tmp_path / "w.pth"),
      "--out",
      str(tmp_path / "m2"),
      "--arch",
      "monai.networks.nets.Nope",
      "--kwargs",
      "{}",
    ]
  )
  assert cli.run(args) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("scribblejax convert: error:") and "\n" not in err
  args = parser.parse_args(["convert", str(tmp_path / "w.pth"), "--out", str(tmp_path / "m3")])
  assert cli.run(args) == 1


@pytest.mark.slow
def test_monai_bundle(tmp_path):
  pytest.importorskip("monai")
  from scribblejax.models.store import load_model

  kwargs, net = _basic_unet()
  (tmp_path / "bundle" / "configs").mkdir(parents=True)
  (tmp_path / "bundle" / "models").mkdir()
  config = {
    "num_classes": 3,
    "network_def": {
      "_target_": "BasicUNet",
      "spatial_dims": 2,
      "in_channels": 1,
      "out_channels": "@num_classes",
      "features": kwargs["features"],
    },
  }
  (tmp_path / "bundle" / "configs" / "inference.json").write_text(json.dumps(config))
  torch.save(net.state_dict(), tmp_path / "bundle" / "models" / "model.pt")
  model, info = load_model(convert(tmp_path / "bundle", tmp_path / "out"))
  assert info.kwargs["out_channels"] == 3
  x = np.random.default_rng(2).standard_normal((1, 1, 32, 32)).astype(np.float32)
  got = np.moveaxis(np.asarray(model(np.moveaxis(x, 1, -1))), -1, 1)
  assert np.max(np.abs(got - _logits(net, x))) < 1e-4


def _nnunet_folder_3d(
  tmp_path,
  transpose_forward,
  labels=None,
  use_mask_for_norm=False,
  spacing=(3.0, 1.0, 1.0),
  patch_size=(8, 8, 8),
  mirroring_axes=None,
  dataset_extra=None,
):
  """A 3-D nnU-Net trained-model folder (z-score normalisation) with the given axis order, spacing
  (in the network's axis order) and patch size; two output channels."""
  pytest.importorskip("dynamic_network_architectures")
  from dynamic_network_architectures.architectures.unet import PlainConvUNet

  arch_kwargs = {
    "n_stages": 2,
    "features_per_stage": [4, 8],
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [2, 2, 2]],
    "n_conv_per_stage": [1, 1],
    "n_conv_per_stage_decoder": [1],
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
  }
  plans = {
    "dataset_name": "Dataset998_Axes",
    "plans_name": "nnUNetPlans",
    "transpose_forward": transpose_forward,
    "foreground_intensity_properties_per_channel": {},
    "configurations": {
      "3d_fullres": {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "patch_size": list(patch_size),
        "spacing": list(spacing),
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [use_mask_for_norm],
        "architecture": {
          "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
          "arch_kwargs": arch_kwargs,
          "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
      }
    },
  }
  dataset = {
    "channel_names": {"0": "MRI"},
    "labels": labels or {"background": 0, "organ": 1},
    "file_ending": ".nii.gz",
    **(dataset_extra or {}),
  }
  net = PlainConvUNet(
    1,
    2,
    [4, 8],
    torch.nn.Conv3d,
    3,
    [1, 2],
    [1, 1],
    2,
    [1],
    True,
    torch.nn.InstanceNorm3d,
    {"eps": 1e-5, "affine": True},
    None,
    None,
    torch.nn.LeakyReLU,
    {"inplace": True},
  )
  randomize_(net, seed=5)
  folder = tmp_path / "Dataset998_Axes" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
  (folder / "fold_0").mkdir(parents=True)
  (folder / "plans.json").write_text(json.dumps(plans))
  (folder / "dataset.json").write_text(json.dumps(dataset))
  checkpoint = {"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer"}
  if mirroring_axes is not None:
    checkpoint["inference_allowed_mirroring_axes"] = tuple(mirroring_axes)
  torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
  return folder, net.eval()


def _mirrored_logits(net, x_nchw, mirror_axes):
  """nnU-Net's _internal_maybe_mirror_and_predict: the mean over the input flipped along every
  non-empty combination of the spatial axes, and unflipped."""
  import itertools

  total = _logits(net, x_nchw)
  combos = [c for k in range(1, len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, k)]
  for axes in combos:
    flip = tuple(a + 2 for a in axes)
    total = total + np.flip(_logits(net, np.ascontiguousarray(np.flip(x_nchw, flip))), flip)
  return total / (len(combos) + 1)


def _nnunet_sliding_window(net, x, patch, step=0.5, mirror_axes=None):
  """nnU-Net's predict_sliding_window_return_logits, written out from its description: zero padding to
  the patch (half before), patches at most step * patch apart, logits weighted by a Gaussian (sigma
  patch / 8, peak 1, no zeros), divided by the summed weights, cropped back. ``x``: [*spatial] float."""
  from scipy.ndimage import gaussian_filter

  pad = [((max(p - n, 0)) // 2, max(p - n, 0) - max(p - n, 0) // 2) for n, p in zip(x.shape, patch)]
  padded = np.pad(x, pad)
  starts = []
  for n, p in zip(padded.shape, patch):
    count = int(np.ceil((n - p) / (p * step))) + 1
    stride = (n - p) / (count - 1) if count > 1 else 0
    starts.append([int(np.round(stride * i)) for i in range(count)])
  impulse = np.zeros(patch)
  impulse[tuple(p // 2 for p in patch)] = 1
  gauss = gaussian_filter(impulse, [p / 8 for p in patch], 0, mode="constant", cval=0)
  gauss = gauss / gauss.max()
  gauss[gauss == 0] = gauss[gauss > 0].min()
  total, weight = None, np.zeros(padded.shape)
  for corner in itertools.product(*starts):
    window = tuple(slice(a, a + p) for a, p in zip(corner, patch))
    one = np.ascontiguousarray(padded[window], np.float32)[None, None]
    logits = (_logits(net, one) if mirror_axes is None else _mirrored_logits(net, one, mirror_axes))[0]
    if total is None:
      total = np.zeros((logits.shape[0], *padded.shape))
    total[(slice(None), *window)] += logits * gauss
    weight[window] += gauss
  total /= weight
  return total[(slice(None), *[slice(lo, n - hi) for (lo, hi), n in zip(pad, padded.shape)])]


@pytest.mark.slow
@pytest.mark.parametrize("transpose_forward", [[0, 1, 2], [2, 0, 1]])
def test_nnunet_model_reads_a_nifti_volume_in_nnunets_axis_order(tmp_path, transpose_forward, capsys):
  import nibabel as nib

  from scribblejax.cli import main

  # The plans' spacing is in the network's order: SimpleITK's (3, 1, 1) permuted by transpose_forward.
  folder, net = _nnunet_folder_3d(tmp_path, transpose_forward, spacing=[(3.0, 1.0, 1.0)[a] for a in transpose_forward])
  out = convert(folder, tmp_path / "converted")
  volume = np.random.default_rng(3).normal(size=(8, 12, 16)).astype(np.float32)  # (i, j, k)
  volume += np.linspace(-2, 2, 16)[None, None, :]
  nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 3.0, 1.0])), tmp_path / "vol.nii.gz")
  assert (
    main(
      [
        "predict",
        "--model",
        str(out),
        "--image",
        str(tmp_path / "vol.nii.gz"),
        "--out",
        str(tmp_path / "seg.nii.gz"),
        "--quiet",
      ]
    )
    == 0
  ), capsys.readouterr().err
  got = np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
  # What nnU-Net computes: SimpleITK's (k, j, i) array, transpose_forward, z-score, the network patch by
  # patch (8^3 patches over a 16 x 12 x 8 volume), and back.
  as_nnunet = volume.transpose(2, 1, 0).transpose(transpose_forward)
  x = (as_nnunet - as_nnunet.mean()) / as_nnunet.std()
  want = _nnunet_sliding_window(net, x, (8, 8, 8)).argmax(0)
  want = want.transpose(np.argsort(transpose_forward)).transpose(2, 1, 0)
  assert 0.2 < want.mean() < 0.8  # both classes: a real comparison
  assert (got == want).mean() > 0.995, (got == want).mean()
  plain = _nnunet_sliding_window(net, (volume - volume.mean()) / volume.std(), (8, 8, 8)).argmax(0)
  assert (plain != want).mean() > 0.05  # the axis order matters here
  whole = _logits(net, x[None, None]).argmax(1)[0].transpose(np.argsort(transpose_forward)).transpose(2, 1, 0)
  assert (whole != want).mean() > 0.02  # and so do the patches
  report = json.loads((tmp_path / "seg.report.json").read_text())
  assert any("axes in the order" in note for note in report["notes"])
  # Marks drawn in the file's (i, j, k) space land on the same voxels of the refined segmentation.
  spots = {1: tuple(np.argwhere(got == 0)[5]), 255: tuple(np.argwhere(got == 1)[7])}
  marks = np.zeros(volume.shape, np.uint8)
  for value, spot in spots.items():
    marks[spot] = value
  nib.save(nib.Nifti1Image(marks, np.diag([1.0, 1.0, 3.0, 1.0])), tmp_path / "marks.nii.gz")
  assert (
    main(
      [
        "refine",
        "--model",
        str(out),
        "--image",
        str(tmp_path / "vol.nii.gz"),
        "--marks",
        str(tmp_path / "marks.nii.gz"),
        "--out",
        str(tmp_path / "refined.nii.gz"),
        "--steps",
        "300",
        "--lr",
        "0.05",
        "--alpha",
        "0.01",
        "--layers",
        "3",
        "--quiet",
      ]
    )
    == 0
  ), capsys.readouterr().err
  refined = np.asarray(nib.load(tmp_path / "refined.nii.gz").dataobj)
  assert refined[spots[1]] == 1 and refined[spots[255]] == 0


@pytest.mark.slow
def test_an_ensemble_of_folds_predicts_and_refines_on_the_command_line(tmp_path, capsys):
  # Two folds on a volume through nnU-Net's pipeline (patches, mirroring): the prediction is the mean
  # of both folds' sliding windows, and a refinement round honours its marks with both folds tuned.
  import nibabel as nib

  from scribblejax.cli import main

  folder, net = _nnunet_folder_3d(tmp_path, [0, 1, 2], spacing=(1.0, 1.0, 1.0), mirroring_axes=(0, 1, 2))
  fold1 = _add_fold(folder, net, "1", seed=25)
  out = convert(folder, tmp_path / "cv", folds="cv")
  volume = np.random.default_rng(4).normal(size=(12, 10, 8)).astype(np.float32) + np.linspace(-2, 2, 8)
  nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "vol.nii.gz")
  assert (
    main(
      [
        "predict",
        "--model",
        str(out),
        "--image",
        str(tmp_path / "vol.nii.gz"),
        "--out",
        str(tmp_path / "seg.nii.gz"),
        "--mirror",
        "--quiet",
      ]
    )
    == 0
  ), capsys.readouterr().err
  got = np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
  as_nnunet = volume.transpose(2, 1, 0)
  x = (as_nnunet - as_nnunet.mean()) / as_nnunet.std()
  folds = [_nnunet_sliding_window(n, x, (8, 8, 8), mirror_axes=(0, 1, 2)) for n in (net, fold1)]
  want = ((folds[0] + folds[1]) / 2).argmax(0).transpose(2, 1, 0)
  assert 0.1 < want.mean() < 0.9 and (folds[0].argmax(0) != folds[1].argmax(0)).mean() > 0.05
  assert (got == want).mean() > 0.995, (got == want).mean()
  spots = {1: tuple(np.argwhere(got == 0)[3]), 255: tuple(np.argwhere(got == 1)[4])}
  marks = np.zeros(volume.shape, np.uint8)
  for value, spot in spots.items():
    marks[spot] = value
  nib.save(nib.Nifti1Image(marks, np.eye(4)), tmp_path / "marks.nii.gz")
  assert (
    main(
      [
        "refine",
        "--model",
        str(out),
        "--image",
        str(tmp_path / "vol.nii.gz"),
        "--marks",
        str(tmp_path / "marks.nii.gz"),
        "--out",
        str(tmp_path / "refined.nii.gz"),
        "--steps",
        "300",
        "--lr",
        "0.05",
        "--alpha",
        "0.01",
        "--layers",
        "2",
        "--mirror",
        "--json",
      ]
    )
    == 0
  )
  report = json.loads(capsys.readouterr().out)
  assert report["satisfied"] and report["marks_honoured"] == 1.0
  refined = np.asarray(nib.load(tmp_path / "refined.nii.gz").dataobj)
  assert refined[spots[1]] == 1 and refined[spots[255]] == 0
  assert main(["info", str(out)]) == 0
  assert "ensemble: 2 networks of nnunet.PlainConvUNet (folds 0, 1), logits averaged" in capsys.readouterr().out


def test_nnunet_masked_normalisation_and_ignore_label_convert(tmp_path):
  from scribblejax.models.store import load_model

  folder, _ = _nnunet_folder_3d(
    tmp_path, [0, 1, 2], labels={"background": 0, "organ": 1, "ignore": 2}, use_mask_for_norm=True
  )
  _, info = load_model(convert(folder, tmp_path / "converted"))  # was: refused (3 labels, 2 outputs)
  assert info.class_names == ("background", "organ")
  norm = info.normalization[0] if isinstance(info.normalization, list) else info.normalization
  assert norm == {"kind": "zscore", "mask": "nonzero"}  # was: a plain z-score, silently


def test_malformed_nnunet_folders_give_messages(tmp_path):
  folder, _ = _nnunet_folder_3d(tmp_path, [0, 1, 2])
  plans = json.loads((folder / "plans.json").read_text())
  broken = json.loads(json.dumps(plans))
  del broken["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["n_conv_per_stage"]
  (folder / "plans.json").write_text(json.dumps(broken))
  with pytest.raises(ValueError, match="lacks or mangles an architecture field .*n_conv_per_stage"):
    convert(folder, tmp_path / "a")  # was: KeyError
  (folder / "plans.json").write_text(json.dumps([plans]))
  with pytest.raises(ValueError, match="plans.json holds a JSON list, not an object"):
    convert(folder, tmp_path / "b")  # was: AttributeError
  odd = json.loads(json.dumps(plans))
  odd["configurations"]["3d_fullres"]["resampling_fn_data"] = "resample_torch_fornnunet"
  (folder / "plans.json").write_text(json.dumps(odd))
  with pytest.raises(ValueError, match="resampling_fn_data is 'resample_torch_fornnunet'"):
    convert(folder, tmp_path / "d")  # would have resampled another way, silently
  odd["configurations"]["3d_fullres"]["resampling_fn_data"] = "resample_data_or_seg_to_shape"
  odd["configurations"]["3d_fullres"]["resampling_fn_data_kwargs"] = {"is_seg": False, "order": 9}
  (folder / "plans.json").write_text(json.dumps(odd))
  with pytest.raises(ValueError, match="resampling options.*spline order"):
    convert(folder, tmp_path / "e")
  (folder / "plans.json").write_text(json.dumps(plans))
  dataset = json.loads((folder / "dataset.json").read_text())
  (folder / "dataset.json").write_text(json.dumps({**dataset, "labels": ["background", "organ"]}))
  with pytest.raises(ValueError, match="labels.*an object mapping names to values"):
    convert(folder, tmp_path / "c")  # was: AttributeError


def test_converted_model_json_states_the_constructor_defaults(tmp_path):
  pytest.importorskip("monai")
  from monai.networks.nets import BasicUNet

  from scribblejax.models.store import load_model
  from scribblejax.pipeline.spec import spec_from_info

  given = {"spatial_dims": 2, "out_channels": 3, "features": [4, 4, 4, 4, 4, 4]}  # in_channels left at 1
  torch.save(randomize_(BasicUNet(**given), seed=4).state_dict(), tmp_path / "w.pth")
  out = convert(tmp_path / "w.pth", tmp_path / "m", arch="monai.networks.nets.BasicUNet", kwargs=given)
  model, info = load_model(out)
  assert info.kwargs["in_channels"] == 1 and info.kwargs["upsample"] == "deconv"
  assert {k: info.kwargs[k] for k in given} == given
  # defaults given as MONAI's (name, {arguments}) pairs are stated too, as JSON
  assert info.kwargs["act"] == ["LeakyReLU", {"negative_slope": 0.1, "inplace": True}]
  assert info.kwargs["norm"] == ["instance", {"affine": True}]
  assert tuple(spec_from_info(info)) == (2, 1, 3)  # what the command line adapts images to


def test_a_volume_the_network_cannot_take_is_padded_and_cropped_back(tmp_path, capsys):
  import nibabel as nib

  from scribblejax.cli import main

  folder, net = _nnunet_folder_3d(tmp_path, [0, 1, 2])
  out = convert(folder, tmp_path / "converted")
  volume = np.random.default_rng(4).normal(size=(9, 12, 7)).astype(np.float32)  # odd: stride 2 refuses it
  volume += np.linspace(-2, 2, 9)[:, None, None]
  affine = np.diag([1.0, 1.0, 3.0, 1.0])  # the model's spacing: no resampling
  nib.save(nib.Nifti1Image(volume, affine), tmp_path / "odd.nii.gz")
  x = volume.transpose(2, 1, 0)  # nnU-Net: (k, j, i) order, z-score
  x = (x - x.mean()) / x.std()
  for patch in ("auto", "whole"):
    assert (
      main(
        [
          "predict",
          "--model",
          str(out),
          "--image",
          str(tmp_path / "odd.nii.gz"),
          "--patch-size",
          patch,
          "--out",
          str(tmp_path / f"{patch}.nii.gz"),
          "--quiet",
        ]
      )
      == 0
    ), capsys.readouterr().err
    got = np.asarray(nib.load(tmp_path / f"{patch}.nii.gz").dataobj)
    assert got.shape == volume.shape
    notes = json.loads((tmp_path / f"{patch}.report.json").read_text())["notes"]
    if patch == "auto":  # nnU-Net: zero padding to the 8^3 patch (7 -> 8, half before), then patches
      want = _nnunet_sliding_window(net, x, (8, 8, 8)).argmax(0).transpose(2, 1, 0)
      assert any("from (7, 12, 9) with zeros" in n for n in notes) and any("4 patch(es)" in n for n in notes)
    else:  # the whole image: zero padding to even sizes (half before, half after), crop back
      padded = np.pad(x, ((0, 1), (0, 0), (0, 1)))  # 7 -> 8, 12, 9 -> 10: (0, 1) each
      want = _logits(net, padded[None, None]).argmax(1)[0][:7, :, :9].transpose(2, 1, 0)
      assert any("padded the image from (7, 12, 9) to (8, 12, 10)" in n for n in notes)
    assert 0.2 < want.mean() < 0.8 and (got == want).mean() > 0.995, (patch, (got == want).mean())
  got = np.asarray(nib.load(tmp_path / "auto.nii.gz").dataobj)
  marks = np.zeros(volume.shape, np.uint8)
  spot = tuple(np.argwhere(got == 0)[3])
  marks[spot] = 1
  nib.save(nib.Nifti1Image(marks, affine), tmp_path / "marks.nii.gz")
  assert (
    main(
      [
        "refine",
        "--model",
        str(out),
        "--image",
        str(tmp_path / "odd.nii.gz"),
        "--marks",
        str(tmp_path / "marks.nii.gz"),
        "--out",
        str(tmp_path / "refined.nii.gz"),
        "--steps",
        "300",
        "--lr",
        "0.05",
        "--alpha",
        "0.01",
        "--layers",
        "3",
        "--region-growing",
        "0.5",
        "--quiet",
      ]
    )
    == 0
  )
  assert np.asarray(nib.load(tmp_path / "refined.nii.gz").dataobj)[spot] == 1


@pytest.mark.slow
def test_an_image_at_another_spacing_is_resampled_as_nnunet_does(tmp_path, capsys):
  import nibabel as nib
  from skimage.transform import resize

  from scribblejax.cli import main
  from scribblejax.models.store import read_info

  folder, net = _nnunet_folder_3d(tmp_path, [0, 1, 2])  # the network's spacing: (3, 1, 1)
  out = convert(folder, tmp_path / "converted")
  assert read_info(out).metadata["resampling"] == {
    "image": {"order": 3, "order_z": 0, "force_separate_z": None, "anisotropy_threshold": 3.0},
    "logits": {"order": 1, "order_z": 0, "force_separate_z": None, "anisotropy_threshold": 3.0},
  }
  volume = np.random.default_rng(6).normal(size=(20, 18, 5)).astype(np.float32)  # (i, j, k)
  volume += np.linspace(-2, 2, 20)[:, None, None]
  nib.save(nib.Nifti1Image(volume, np.diag([0.5, 0.5, 3.0, 1.0])), tmp_path / "fine.nii.gz")  # half the voxel size
  assert (
    main(
      [
        "predict",
        "--model",
        str(out),
        "--image",
        str(tmp_path / "fine.nii.gz"),
        "--out",
        str(tmp_path / "seg.nii.gz"),
        "--quiet",
      ]
    )
    == 0
  ), capsys.readouterr().err
  got = np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
  # nnU-Net: (k, j, i) at spacing (3, 0.5, 0.5), z-score, then (anisotropic: in-plane only) cubic resize to
  # (5, 9, 10), patches, and the logits back by linear in-plane resize.
  x = volume.transpose(2, 1, 0).astype(np.float64)
  x = (x - x.mean()) / x.std()
  small = np.stack([resize(s, (9, 10), 3, mode="edge", anti_aliasing=False) for s in x])
  logits = _nnunet_sliding_window(net, small, (8, 8, 8))
  back = np.stack([np.stack([resize(s, (18, 20), 1, mode="edge", anti_aliasing=False) for s in c]) for c in logits])
  want = back.argmax(0).transpose(2, 1, 0)
  assert 0.05 < want.mean() < 0.95 and (got == want).mean() > 0.995, (got == want).mean()
  report = json.loads((tmp_path / "seg.report.json").read_text())
  assert any("resampled the image from spacing (3.0, 0.5, 0.5) ((5, 18, 20))" in n for n in report["notes"])
  assert (
    main(
      [
        "predict",
        "--model",
        str(out),
        "--image",
        str(tmp_path / "fine.nii.gz"),
        "--no-resample",
        "--out",
        str(tmp_path / "plain.nii.gz"),
        "--quiet",
      ]
    )
    == 0
  )
  plain = np.asarray(nib.load(tmp_path / "plain.nii.gz").dataobj)
  assert (plain != want).mean() > 0.05  # the spacing matters here
  # A one-voxel-wide scribble drawn at the fine spacing is honoured by the refined segmentation.
  marks = np.zeros(volume.shape, np.uint8)
  wrong = np.argwhere(got == 0)
  line = [tuple(v) for v in wrong[:4]]
  for v in line:
    marks[v] = 1
  nib.save(nib.Nifti1Image(marks, np.diag([0.5, 0.5, 3.0, 1.0])), tmp_path / "marks.nii.gz")
  session = tmp_path / "session"
  for round_, flags in ((1, []), (2, ["--continue-weights"])):
    assert (
      main(
        [
          "refine",
          "--model",
          str(out),
          "--image",
          str(tmp_path / "fine.nii.gz"),
          "--marks",
          str(tmp_path / "marks.nii.gz"),
          "--out",
          str(tmp_path / f"refined{round_}.nii.gz"),
          "--steps",
          "300",
          "--lr",
          "0.05",
          "--alpha",
          "0.01",
          "--layers",
          "3",
          "--session",
          str(session),
          *flags,
          "--quiet",
        ]
      )
      == 0
    ), capsys.readouterr().err
    report = json.loads((tmp_path / f"refined{round_}.report.json").read_text())
    assert report["satisfied"] and report["marks_honoured"] == 1.0 and report["round"] == round_
  refined = np.asarray(nib.load(tmp_path / "refined2.nii.gz").dataobj)
  assert all(refined[v] == 1 for v in line)


@pytest.mark.slow
def test_an_image_with_a_zero_border_is_cropped_to_its_non_zero_region_as_nnunet_does(tmp_path, capsys):
  import nibabel as nib

  from scribblejax.cli import main

  folder, net = _nnunet_folder_3d(tmp_path, [0, 1, 2])
  out = convert(folder, tmp_path / "converted")
  volume = np.zeros((14, 12, 10), np.float32)  # (i, j, k); zero outside a box
  rng = np.random.default_rng(7)
  volume[2:12, 1:11, 1:9] = rng.normal(size=(10, 10, 8)) + np.linspace(-2, 2, 10)[:, None, None] + 3.0
  affine = np.diag([1.0, 1.0, 3.0, 1.0])
  nib.save(nib.Nifti1Image(volume, affine), tmp_path / "box.nii.gz")
  assert (
    main(
      [
        "predict",
        "--model",
        str(out),
        "--image",
        str(tmp_path / "box.nii.gz"),
        "--out",
        str(tmp_path / "seg.nii.gz"),
        "--quiet",
      ]
    )
    == 0
  ), capsys.readouterr().err
  got = np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
  # nnU-Net: (k, j, i), crop to the non-zero box, z-score of the crop, patches; background outside.
  x = volume.transpose(2, 1, 0)[1:9, 1:11, 2:12]
  x = (x - x.mean()) / x.std()
  want = np.zeros((10, 12, 14), np.int64)
  want[1:9, 1:11, 2:12] = _nnunet_sliding_window(net, x, (8, 8, 8)).argmax(0)
  want = want.transpose(2, 1, 0)
  assert 0.05 < want.mean() < 0.95 and (got == want).mean() > 0.995, (got == want).mean()
  notes = json.loads((tmp_path / "seg.report.json").read_text())["notes"]
  assert any("cropped the image to its non-zero region [1:9, 1:11, 2:12]" in n for n in notes)
  assert (
    main(
      [
        "predict",
        "--model",
        str(out),
        "--image",
        str(tmp_path / "box.nii.gz"),
        "--no-crop",
        "--out",
        str(tmp_path / "whole.nii.gz"),
        "--quiet",
      ]
    )
    == 0
  )
  whole = np.asarray(nib.load(tmp_path / "whole.nii.gz").dataobj)
  assert (whole != want).mean() > 0.02
  # A foreground mark outside the region cannot be honoured there: refused by name, unless --no-crop.
  marks = np.zeros(volume.shape, np.uint8)
  marks[0, 0, 0] = 1
  nib.save(nib.Nifti1Image(marks, affine), tmp_path / "marks.nii.gz")
  args = [
    "refine",
    "--model",
    str(out),
    "--image",
    str(tmp_path / "box.nii.gz"),
    "--marks",
    str(tmp_path / "marks.nii.gz"),
    "--out",
    str(tmp_path / "refined.nii.gz"),
    "--steps",
    "200",
    "--lr",
    "0.05",
    "--layers",
    "3",
    "--quiet",
  ]
  capsys.readouterr()
  assert main(args) == 1
  assert "outside the image's non-zero region (1 voxel(s) of organ)" in capsys.readouterr().err
  assert main(args + ["--no-crop"]) == 0, capsys.readouterr().err
  assert np.asarray(nib.load(tmp_path / "refined.nii.gz").dataobj)[0, 0, 0] == 1
  # Background marks only outside it: honoured as they stand, nothing to refine (was: "no voxel is marked")
  marks[0, 0, 0] = 255
  nib.save(nib.Nifti1Image(marks, affine), tmp_path / "marks.nii.gz")
  assert main(args + ["--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["steps"] == 0 and report["marks_honoured"] == 1.0 and report["changed_pixels"] == 0
  np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "refined.nii.gz").dataobj), got)


@pytest.mark.slow
def test_mirroring_averages_the_flipped_passes_as_nnunet_does(tmp_path, capsys):
  import nibabel as nib

  from scribblejax.cli import main

  folder, net = _nnunet_folder_3d(tmp_path, [0, 1, 2], mirroring_axes=(1, 2))
  out = convert(folder, tmp_path / "converted")
  volume = np.random.default_rng(8).normal(size=(12, 10, 8)).astype(np.float32) + np.linspace(-2, 2, 12)[:, None, None]
  affine = np.diag([1.0, 1.0, 3.0, 1.0])
  nib.save(nib.Nifti1Image(volume, affine), tmp_path / "vol.nii.gz")
  assert (
    main(
      [
        "predict",
        "--model",
        str(out),
        "--image",
        str(tmp_path / "vol.nii.gz"),
        "--mirror",
        "--out",
        str(tmp_path / "seg.nii.gz"),
        "--quiet",
      ]
    )
    == 0
  ), capsys.readouterr().err
  got = np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
  x = volume.transpose(2, 1, 0)
  x = (x - x.mean()) / x.std()
  want = _nnunet_sliding_window(net, x, (8, 8, 8), mirror_axes=(1, 2)).argmax(0).transpose(2, 1, 0)
  plain = _nnunet_sliding_window(net, x, (8, 8, 8)).argmax(0).transpose(2, 1, 0)
  assert 0.05 < want.mean() < 0.95 and (got == want).mean() > 0.995, (got == want).mean()
  assert (plain != want).mean() > 0.01  # the mirroring matters here
  notes = json.loads((tmp_path / "seg.report.json").read_text())["notes"]
  assert any("mirrored along the model's axes [1, 2]: 4 passes" in n for n in notes)
  capsys.readouterr()
  assert main(["info", str(out)]) == 0
  assert (
    'pipeline: axis order {"medical": [2, 1, 0], "raster": [0, 1, 2]}; crop to the non-zero region; '
    "spacing [3.0, 1.0, 1.0]; patches of [8, 8, 8]; --mirror along [1, 2]"
  ) in capsys.readouterr().out
  marks = np.zeros(volume.shape, np.uint8)
  spots = [tuple(v) for v in np.argwhere(got == 0)[:3]]
  for v in spots:
    marks[v] = 1
  nib.save(nib.Nifti1Image(marks, affine), tmp_path / "marks.nii.gz")
  assert (
    main(
      [
        "refine",
        "--model",
        str(out),
        "--image",
        str(tmp_path / "vol.nii.gz"),
        "--marks",
        str(tmp_path / "marks.nii.gz"),
        "--out",
        str(tmp_path / "refined.nii.gz"),
        "--steps",
        "300",
        "--lr",
        "0.05",
        "--alpha",
        "0.01",
        "--layers",
        "3",
        "--mirror",
        "--quiet",
      ]
    )
    == 0
  ), capsys.readouterr().err
  report = json.loads((tmp_path / "refined.report.json").read_text())
  assert report["satisfied"] and report["marks_honoured"] == 1.0
  refined = np.asarray(nib.load(tmp_path / "refined.nii.gz").dataobj)
  assert all(refined[v] == 1 for v in spots)
  # A checkpoint that allows no mirroring (nnU-Net's trainers without it) refuses --mirror by name.
  plain_folder, _ = _nnunet_folder_3d(tmp_path / "plain", [0, 1, 2])
  plain_out = convert(plain_folder, tmp_path / "plain_converted")
  capsys.readouterr()
  assert (
    main(
      [
        "predict",
        "--model",
        str(plain_out),
        "--image",
        str(tmp_path / "vol.nii.gz"),
        "--mirror",
        "--out",
        str(tmp_path / "no.nii.gz"),
        "--quiet",
      ]
    )
    == 1
  )
  assert "the model allows no mirroring" in capsys.readouterr().err


@pytest.mark.slow
def test_a_2d_nnunet_segments_a_volume_slice_by_slice_as_nnunet_does(tmp_path, capsys):
  import nibabel as nib

  from scribblejax.cli import main

  folder, net = _nnunet_folder(tmp_path)  # 2-D: patch 16 x 16, spacing (1, 1), CT norm
  out = convert(folder, tmp_path / "converted")
  rng = np.random.default_rng(9)
  volume = (rng.normal(size=(24, 20, 3)) * 40 + np.linspace(-20, 150, 24)[:, None, None]).astype(np.float32)
  nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 2.5, 1.0])), tmp_path / "ct.nii.gz")
  assert (
    main(
      [
        "predict",
        "--model",
        str(out),
        "--image",
        str(tmp_path / "ct.nii.gz"),
        "--out",
        str(tmp_path / "seg.nii.gz"),
        "--quiet",
      ]
    )
    == 0
  ), capsys.readouterr().err
  got = np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
  # nnU-Net: SimpleITK's (k, j, i), CT normalisation of the whole volume, then each k slice (j, i) by a
  # 2-D sliding window of 16 x 16 patches.
  x = np.clip(volume.transpose(2, 1, 0), -10.0, 200.0)
  x = (x - 50.0) / 20.0
  logits = np.stack([_nnunet_sliding_window(net, s, (16, 16)) for s in x], axis=1)
  want = logits.argmax(0).transpose(2, 1, 0)
  assert len(np.unique(want)) == 3 and (got == want).mean() > 0.995, (got == want).mean()
  notes = json.loads((tmp_path / "seg.report.json").read_text())["notes"]
  assert any("slice by slice along the image's axis 2 (3 slices of (20, 24))" in n for n in notes)
  # Marks on two slices: the loop runs the marked slices' patches, and the written volume honours them.
  marks = np.zeros(volume.shape, np.uint8)
  spots = [tuple(np.argwhere((got == 0)[..., 0])[2]) + (0,), tuple(np.argwhere((got != 2)[..., 2])[5]) + (2,)]
  marks[spots[0]], marks[spots[1]] = 1, 2  # liver on slice 0, tumour on slice 2
  nib.save(nib.Nifti1Image(marks, np.diag([1.0, 1.0, 2.5, 1.0])), tmp_path / "marks.nii.gz")
  assert (
    main(
      [
        "refine",
        "--model",
        str(out),
        "--image",
        str(tmp_path / "ct.nii.gz"),
        "--marks",
        str(tmp_path / "marks.nii.gz"),
        "--out",
        str(tmp_path / "refined.nii.gz"),
        "--steps",
        "300",
        "--lr",
        "0.05",
        "--alpha",
        "0.01",
        "--layers",
        "3",
        "--quiet",
      ]
    )
    == 0
  ), capsys.readouterr().err
  report = json.loads((tmp_path / "refined.report.json").read_text())
  assert report["satisfied"] and report["marks_honoured"] == 1.0
  refined = np.asarray(nib.load(tmp_path / "refined.nii.gz").dataobj)
  assert refined[spots[0]] == 1 and refined[spots[1]] == 2


def _region_labels_nnunet(logits_cxyz, order):
  """nnU-Net's LabelManager.convert_logits_to_segmentation for regions, written from its rule: sigmoid,
  then for each region in turn its class where the probability exceeds 0.5."""
  probabilities = 1 / (1 + np.exp(-logits_cxyz))
  seg = np.zeros(logits_cxyz.shape[1:], np.int32)
  for i, c in enumerate(order):
    seg[probabilities[i] > 0.5] = c
  return seg


@pytest.mark.slow
def test_a_region_based_nnunet_predicts_and_refines_as_classes(tmp_path, capsys):
  # BraTS-style nested regions: "organ" = labels {1, 2}, "core" = {2}. Region 0 (organ) writes 1 and
  # region 1 (core) writes 2 over it, where their sigmoids exceed 0.5.
  import nibabel as nib

  from scribblejax.cli import main
  from scribblejax.models.regions import Regions
  from scribblejax.models.store import load_model

  labels = {"background": 0, "organ": [1, 2], "core": [2]}
  folder, net = _nnunet_folder_3d(tmp_path, [0, 1, 2], labels=labels, dataset_extra={"regions_class_order": [1, 2]})
  volume = np.random.default_rng(3).normal(size=(16, 12, 8)).astype(np.float32)  # (i, j, k)
  volume += np.linspace(-3, 3, 16)[:, None, None]
  z = volume.transpose(2, 1, 0)
  z = (z - z.mean()) / z.std()
  # lower the organ's bias until about a third of the volume is background (the random network's is not)
  with torch.no_grad():
    net.decoder.seg_layers[-1].bias[0] -= float(np.quantile(_nnunet_sliding_window(net, z, (8, 8, 8))[0], 0.35))
  checkpoint = folder / "fold_0" / "checkpoint_final.pth"
  torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer"}, checkpoint)
  out = convert(folder, tmp_path / "converted")
  model, info = load_model(out)
  assert isinstance(model, Regions) and info.family == "scribblejax.Regions" and model.num_classes == 3
  assert info.class_names == ("background", "organ excluding core", "core")
  assert info.metadata["regions"] == {"names": ["organ", "core"], "labels": [[1, 2], [2]], "class_order": [1, 2]}
  # the library reads the network as 3 classes whose argmax is nnU-Net's label map
  x = np.random.default_rng(4).normal(size=(1, 1, 8, 16, 16)).astype(np.float32)
  scores = np.asarray(model(np.moveaxis(x, 1, -1)))[0]
  want = _region_labels_nnunet(_logits(net, x)[0], [1, 2])
  assert scores.shape == (8, 16, 16, 3) and (scores.argmax(-1) == want).mean() > 0.999
  # predict: nnU-Net's pipeline blends the region logits over the patches, then reads the classes
  nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 3.0, 1.0])), tmp_path / "vol.nii.gz")
  assert (
    main(
      [
        "predict",
        "--model",
        str(out),
        "--image",
        str(tmp_path / "vol.nii.gz"),
        "--out",
        str(tmp_path / "seg.nii.gz"),
        "--quiet",
      ]
    )
    == 0
  ), capsys.readouterr().err
  got = np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
  want = _region_labels_nnunet(_nnunet_sliding_window(net, z, (8, 8, 8)), [1, 2]).transpose(2, 1, 0)
  counts = np.bincount(want.ravel(), minlength=3)
  assert counts.min() > 0.02 * want.size, counts  # every class: a real comparison
  assert (got == want).mean() > 0.995, (got == want).mean()
  # refine: marks of each class where the network gives another are honoured
  marks = np.zeros(volume.shape, np.uint8)
  for c in range(3):
    wrong = np.argwhere(got != c)[:: max(1, int((got != c).sum()) // 3)][:3]
    for v in wrong:
      marks[tuple(v)] = 255 if c == 0 else c
  nib.save(nib.Nifti1Image(marks, np.diag([1.0, 1.0, 3.0, 1.0])), tmp_path / "marks.nii.gz")
  assert (
    main(
      [
        "refine",
        "--model",
        str(out),
        "--image",
        str(tmp_path / "vol.nii.gz"),
        "--marks",
        str(tmp_path / "marks.nii.gz"),
        "--out",
        str(tmp_path / "refined.nii.gz"),
        "--steps",
        "300",
        "--lr",
        "0.05",
        "--layers",
        "3",
        "--quiet",
      ]
    )
    == 0
  ), capsys.readouterr().err
  report = json.loads((tmp_path / "refined.report.json").read_text())
  assert report["satisfied"] and report["marks_honoured"] == 1.0, report
  assert report["marked_pixels"] == {
    "background": int((marks == 255).sum()),
    "organ excluding core": int((marks == 1).sum()),
    "core": int((marks == 2).sum()),
  }
  refined = np.asarray(nib.load(tmp_path / "refined.nii.gz").dataobj)
  drawn = np.where(marks == 255, 0, marks.astype(np.int64))
  assert (refined[marks > 0] == drawn[marks > 0]).all() and min(np.bincount(drawn[marks > 0], minlength=3)) >= 2
  # evaluate --image runs the same pipeline: Dice before any mark is that of predict's file
  from scribblejax.research.metrics import mean_foreground_dice

  truth = got.copy()
  truth[:6] = np.where(truth[:6] == 2, 1, truth[:6])
  nib.save(nib.Nifti1Image(truth.astype(np.uint8), np.diag([1.0, 1.0, 3.0, 1.0])), tmp_path / "truth.nii.gz")
  assert (
    main(
      [
        "evaluate",
        "--image",
        str(tmp_path / "vol.nii.gz"),
        "--label",
        str(tmp_path / "truth.nii.gz"),
        "--model",
        str(out),
        "--interactions",
        "1",
        "--steps",
        "100",
        "--lr",
        "0.05",
        "--layers",
        "3",
        "--out",
        str(tmp_path / "eval"),
      ]
    )
    == 0
  ), capsys.readouterr().err
  result = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert result["dice_per_interaction"][0] == pytest.approx(mean_foreground_dice(got, truth, 3))
  assert result["method_info"][0]["refined_patches"] >= 1 and result["method_info"][0]["marks_honoured"] > 0.9
  # a head of regions cannot take new classes
  assert (
    main(
      [
        "refine",
        "--model",
        str(out),
        "--image",
        str(tmp_path / "vol.nii.gz"),
        "--marks",
        str(tmp_path / "marks.nii.gz"),
        "--out",
        str(tmp_path / "new.nii.gz"),
        "--new-class",
        "edema",
        "--quiet",
      ]
    )
    == 1
  )
  assert "region-based network's head gives one logit per region" in capsys.readouterr().err


def test_a_cascade_stage_is_refused_by_name(tmp_path):
  from scribblejax.convert.state_dict import ConversionError

  folder, _ = _nnunet_folder_3d(tmp_path, [0, 1, 2])
  plans = json.loads((folder / "plans.json").read_text())
  plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
  (folder / "plans.json").write_text(json.dumps(plans))
  cascade = folder.parent / "nnUNetTrainer__nnUNetPlans__3d_cascade_fullres"
  folder.rename(cascade)
  with pytest.raises(
    ConversionError,
    match="'3d_cascade_fullres' is a cascade stage: its network also reads the segmentation of the '3d_lowres' stage",
  ):
    convert(cascade, tmp_path / "out")  # was: converted (a real cascade: a weight shape mismatch)
  assert not (tmp_path / "out").exists()


def test_malformed_region_based_datasets_give_messages(tmp_path):
  from scribblejax.convert.nnunet import _class_names
  from scribblejax.convert.state_dict import ConversionError

  regions = {"background": 0, "organ": [1, 2], "core": 2}
  with pytest.raises(ConversionError, match="no regions_class_order"):
    _class_names({"labels": regions})
  with pytest.raises(ConversionError, match="one class per region"):
    _class_names({"labels": regions, "regions_class_order": [1]})
  with pytest.raises(ConversionError, match="each of the classes 1..2 once"):
    _class_names({"labels": regions, "regions_class_order": [1, 1]})
  names, meta = _class_names({"labels": {**regions, "ignore": 3}, "regions_class_order": [2, 1]})
  assert names == ["background", "core", "organ excluding core"] and meta["class_order"] == [2, 1]
  brats = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
  assert _class_names({"labels": brats, "regions_class_order": [1, 2, 3]})[0] == [
    "background",
    "whole tumor excluding tumor core, enhancing tumor",
    "tumor core excluding enhancing tumor",
    "enhancing tumor",
  ]
  assert _class_names({"labels": {"background": 0, "organ": [1]}, "regions_class_order": [1]}) == (
    # one-element lists are labels, as nnU-Net reads them
    ["background", "organ"],
    None,
  )
