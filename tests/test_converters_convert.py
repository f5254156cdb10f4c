"""End to end: a synthetic nnU-Net folder, a MONAI bundle and a bare checkpoint convert, save and reload."""

import argparse
import json

import numpy as np
import pytest

from converters import cli
from converters.convert import convert
from converters._testing import randomize_

torch = pytest.importorskip("torch")


def _nnunet_folder(tmp_path):
  pytest.importorskip("dynamic_network_architectures")
  from dynamic_network_architectures.architectures.unet import PlainConvUNet
  arch_kwargs = {"n_stages": 3, "features_per_stage": [2, 4, 4], "conv_op": "torch.nn.modules.conv.Conv2d",
                 "kernel_sizes": [[3, 3], [3, 3], [3, 3]], "strides": [[1, 1], [2, 2], [2, 2]],
                 "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2], "conv_bias": True,
                 "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                 "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                 "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
  plans = {"dataset_name": "Dataset999_Toy", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1],
           "foreground_intensity_properties_per_channel": {"0": {"mean": 50.0, "std": 20.0, "percentile_00_5": -10.0,
                                                                 "percentile_99_5": 200.0}},
           "configurations": {
               "2d": {"data_identifier": "nnUNetPlans_2d", "patch_size": [16, 16], "spacing": [1.0, 1.0],
                      "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
                      "architecture": {"network_class_name":
                                       "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                       "arch_kwargs": dict(arch_kwargs, features_per_stage=[8, 8, 8]),
                                       "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}},
               "2d_small": {"inherits_from": "2d", "architecture": {
                   "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                   "arch_kwargs": arch_kwargs, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op",
                                                                       "nonlin"]}}}}
  dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
             "numTraining": 3, "file_ending": ".nii.gz"}
  net = PlainConvUNet(1, 3, [2, 4, 4], torch.nn.Conv2d, 3, [1, 2, 2], 2, 3, 2, True, torch.nn.InstanceNorm2d,
                      {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU, {"inplace": True},
                      deep_supervision=True)
  randomize_(net, seed=11)
  folder = tmp_path / "Dataset999_Toy" / "nnUNetTrainer__nnUNetPlans__2d_small"
  (folder / "fold_0").mkdir(parents=True)
  (folder / "plans.json").write_text(json.dumps(plans))
  (folder / "dataset.json").write_text(json.dumps(dataset))
  torch.save({"network_weights": net.state_dict(), "optimizer_state": {"state": {}, "param_groups": []},
              "grad_scaler_state": None, "logging": {"train_losses": [np.float64(0.5)], "ema_fg_dice": [np.float32(.1)]},
              "_best_ema": np.float64(0.1), "current_epoch": 1,
              "init_args": {"plans": plans, "configuration": "2d_small", "fold": 0, "dataset_json": dataset,
                            "device": torch.device("cpu")},
              "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1)},
             folder / "fold_0" / "checkpoint_final.pth")
  net.decoder.deep_supervision = False
  return folder, net


def _logits(torch_net, x_nchw):
  with torch.no_grad():
    return torch_net(torch.from_numpy(x_nchw)).numpy()


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


def test_bare_checkpoint_and_cli(tmp_path, capsys):
  pytest.importorskip("monai")
  from scribblejax.models.store import load_model
  kwargs, net = _basic_unet()
  torch.save(net.state_dict(), tmp_path / "w.pth")
  parser = argparse.ArgumentParser()
  cli.add_parser(parser.add_subparsers())
  args = parser.parse_args(["convert", str(tmp_path / "w.pth"), "--out", str(tmp_path / "m"),
                            "--arch", "monai.networks.nets.BasicUNet", "--kwargs", json.dumps(kwargs),
                            "--normalize", '{"kind": "zscore"}'])
  assert args.func(args) == 0
  model, info = load_model(tmp_path / "m")
  assert info.family == "monai.BasicUNet" and info.normalization in ({"kind": "zscore"}, [{"kind": "zscore"}])
  x = np.random.default_rng(1).standard_normal((1, 1, 33, 35)).astype(np.float32)
  got = np.moveaxis(np.asarray(model(np.moveaxis(x, 1, -1))), -1, 1)
  assert np.max(np.abs(got - _logits(net, x))) < 1e-4
  # Bad input: one-line error, non-zero exit.
  capsys.readouterr()
  args = parser.parse_args(["convert", str(tmp_path / "w.pth"), "--out", str(tmp_path / "m2"),
                            "--arch", "monai.networks.nets.Nope", "--kwargs", "{}"])
  assert cli.run(args) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("scribblejax convert: error:") and "\n" not in err
  args = parser.parse_args(["convert", str(tmp_path / "w.pth"), "--out", str(tmp_path / "m3")])
  assert cli.run(args) == 1


def test_monai_bundle(tmp_path):
  pytest.importorskip("monai")
  from scribblejax.models.store import load_model
  kwargs, net = _basic_unet()
  (tmp_path / "bundle" / "configs").mkdir(parents=True)
  (tmp_path / "bundle" / "models").mkdir()
  config = {"num_classes": 3, "network_def": {"_target_": "BasicUNet", "spatial_dims": 2, "in_channels": 1,
                                              "out_channels": "@num_classes", "features": kwargs["features"]}}
  (tmp_path / "bundle" / "configs" / "inference.json").write_text(json.dumps(config))
  torch.save(net.state_dict(), tmp_path / "bundle" / "models" / "model.pt")
  model, info = load_model(convert(tmp_path / "bundle", tmp_path / "out"))
  assert info.kwargs["out_channels"] == 3
  x = np.random.default_rng(2).standard_normal((1, 1, 32, 32)).astype(np.float32)
  got = np.moveaxis(np.asarray(model(np.moveaxis(x, 1, -1))), -1, 1)
  assert np.max(np.abs(got - _logits(net, x))) < 1e-4


def _nnunet_folder_3d(tmp_path, transpose_forward, labels=None, use_mask_for_norm=False):
  """A 3-D nnU-Net trained-model folder (z-score normalisation) with the given axis order."""
  pytest.importorskip("dynamic_network_architectures")
  from dynamic_network_architectures.architectures.unet import PlainConvUNet
  arch_kwargs = {"n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
                 "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]],
                 "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1], "conv_bias": True,
                 "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                 "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                 "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
  plans = {"dataset_name": "Dataset998_Axes", "plans_name": "nnUNetPlans", "transpose_forward": transpose_forward,
           "foreground_intensity_properties_per_channel": {},
           "configurations": {"3d_fullres": {
               "data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [8, 8, 8], "spacing": [3.0, 1.0, 1.0],
               "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [use_mask_for_norm],
               "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                "arch_kwargs": arch_kwargs,
                                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}}}
  dataset = {"channel_names": {"0": "MRI"}, "labels": labels or {"background": 0, "organ": 1}, "file_ending": ".nii.gz"}
  net = PlainConvUNet(1, 2, [4, 8], torch.nn.Conv3d, 3, [1, 2], [1, 1], 2, [1], True, torch.nn.InstanceNorm3d,
                      {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU, {"inplace": True})
  randomize_(net, seed=5)
  folder = tmp_path / "Dataset998_Axes" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
  (folder / "fold_0").mkdir(parents=True)
  (folder / "plans.json").write_text(json.dumps(plans))
  (folder / "dataset.json").write_text(json.dumps(dataset))
  torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer"},
             folder / "fold_0" / "checkpoint_final.pth")
  return folder, net.eval()


@pytest.mark.parametrize("transpose_forward", [[0, 1, 2], [2, 0, 1]])
def test_nnunet_model_reads_a_nifti_volume_in_nnunets_axis_order(tmp_path, transpose_forward, capsys):
  import nibabel as nib

  from scribblejax.cli import main
  folder, net = _nnunet_folder_3d(tmp_path, transpose_forward)
  out = convert(folder, tmp_path / "converted")
  volume = np.random.default_rng(3).normal(size=(8, 12, 16)).astype(np.float32)       # (i, j, k)
  volume += np.linspace(-2, 2, 16)[None, None, :]
  nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 3.0, 1.0])), tmp_path / "vol.nii.gz")
  assert main(["predict", "--model", str(out), "--image", str(tmp_path / "vol.nii.gz"),
               "--out", str(tmp_path / "seg.nii.gz"), "--quiet"]) == 0, capsys.readouterr().err
  got = np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
  # What nnU-Net computes: SimpleITK's (k, j, i) array, transpose_forward, z-score, the network, and back.
  as_nnunet = volume.transpose(2, 1, 0).transpose(transpose_forward)
  x = (as_nnunet - as_nnunet.mean()) / as_nnunet.std()
  want = _logits(net, x[None, None]).argmax(1)[0].transpose(np.argsort(transpose_forward)).transpose(2, 1, 0)
  assert 0.2 < want.mean() < 0.8                                   # both classes: a real comparison
  assert (got == want).mean() > 0.995, (got == want).mean()
  plain = _logits(net, ((volume - volume.mean()) / volume.std())[None, None]).argmax(1)[0]
  assert (plain != want).mean() > 0.05                              # the axis order matters here
  report = json.loads((tmp_path / "seg.report.json").read_text())
  assert any("axes in the order" in note for note in report["notes"])
  # Marks drawn in the file's (i, j, k) space land on the same voxels of the refined segmentation.
  spots = {1: tuple(np.argwhere(got == 0)[5]), 255: tuple(np.argwhere(got == 1)[7])}
  marks = np.zeros(volume.shape, np.uint8)
  for value, spot in spots.items():
    marks[spot] = value
  nib.save(nib.Nifti1Image(marks, np.diag([1.0, 1.0, 3.0, 1.0])), tmp_path / "marks.nii.gz")
  assert main(["refine", "--model", str(out), "--image", str(tmp_path / "vol.nii.gz"), "--marks",
               str(tmp_path / "marks.nii.gz"), "--out", str(tmp_path / "refined.nii.gz"), "--steps", "300",
               "--lr", "0.05", "--alpha", "0.01", "--layers", "3", "--quiet"]) == 0, capsys.readouterr().err
  refined = np.asarray(nib.load(tmp_path / "refined.nii.gz").dataobj)
  assert refined[spots[1]] == 1 and refined[spots[255]] == 0


def test_nnunet_masked_normalisation_and_ignore_label_convert(tmp_path):
  from scribblejax.models.store import load_model
  folder, _ = _nnunet_folder_3d(tmp_path, [0, 1, 2], labels={"background": 0, "organ": 1, "ignore": 2},
                                use_mask_for_norm=True)
  _, info = load_model(convert(folder, tmp_path / "converted"))   # was: refused (3 labels, 2 outputs)
  assert info.class_names == ("background", "organ")
  norm = info.normalization[0] if isinstance(info.normalization, list) else info.normalization
  assert norm == {"kind": "zscore", "mask": "nonzero"}                # was: a plain z-score, silently


def test_malformed_nnunet_folders_give_messages(tmp_path):
  folder, _ = _nnunet_folder_3d(tmp_path, [0, 1, 2])
  plans = json.loads((folder / "plans.json").read_text())
  broken = json.loads(json.dumps(plans))
  del broken["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["n_conv_per_stage"]
  (folder / "plans.json").write_text(json.dumps(broken))
  with pytest.raises(ValueError, match="lacks or mangles an architecture field .*n_conv_per_stage"):
    convert(folder, tmp_path / "a")                          # was: KeyError
  (folder / "plans.json").write_text(json.dumps([plans]))
  with pytest.raises(ValueError, match="plans.json holds a JSON list, not an object"):
    convert(folder, tmp_path / "b")                          # was: AttributeError
  (folder / "plans.json").write_text(json.dumps(plans))
  dataset = json.loads((folder / "dataset.json").read_text())
  (folder / "dataset.json").write_text(json.dumps({**dataset, "labels": ["background", "organ"]}))
  with pytest.raises(ValueError, match="labels.*an object mapping names to values"):
    convert(folder, tmp_path / "c")                          # was: AttributeError


def test_converted_model_json_states_the_constructor_defaults(tmp_path):
  pytest.importorskip("monai")
  from monai.networks.nets import BasicUNet

  from scribblejax.io.workflow import spec_from_info
  from scribblejax.models.store import load_model
  given = {"spatial_dims": 2, "out_channels": 3, "features": [4, 4, 4, 4, 4, 4]}   # in_channels left at 1
  torch.save(randomize_(BasicUNet(**given), seed=4).state_dict(), tmp_path / "w.pth")
  out = convert(tmp_path / "w.pth", tmp_path / "m", arch="monai.networks.nets.BasicUNet", kwargs=given)
  model, info = load_model(out)
  assert info.kwargs["in_channels"] == 1 and info.kwargs["upsample"] == "deconv"
  assert {k: info.kwargs[k] for k in given} == given
  assert tuple(spec_from_info(info)) == (2, 1, 3)          # what the command line adapts images to


def test_a_volume_the_network_cannot_take_is_padded_and_cropped_back(tmp_path, capsys):
  import nibabel as nib

  from scribblejax.cli import main
  folder, net = _nnunet_folder_3d(tmp_path, [0, 1, 2])
  out = convert(folder, tmp_path / "converted")
  volume = np.random.default_rng(4).normal(size=(9, 12, 7)).astype(np.float32)       # odd: stride 2 refuses it
  volume += np.linspace(-2, 2, 9)[:, None, None]
  nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "odd.nii.gz")
  assert main(["predict", "--model", str(out), "--image", str(tmp_path / "odd.nii.gz"),
               "--out", str(tmp_path / "seg.nii.gz"), "--quiet"]) == 0, capsys.readouterr().err
  got = np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
  assert got.shape == volume.shape
  # nnU-Net: (k, j, i) order, z-score, zero padding to even sizes (half before, half after), crop back.
  x = volume.transpose(2, 1, 0)
  x = (x - x.mean()) / x.std()
  padded = np.pad(x, ((0, 1), (0, 0), (0, 1)))                    # 7 -> 8, 12, 9 -> 10: (0, 1) each
  want = _logits(net, padded[None, None]).argmax(1)[0][:7, :, :9].transpose(2, 1, 0)
  assert 0.2 < want.mean() < 0.8 and (got == want).mean() > 0.995, (got == want).mean()
  report = json.loads((tmp_path / "seg.report.json").read_text())
  assert any("padded the image from (7, 12, 9) to (8, 12, 10)" in note for note in report["notes"])
  marks = np.zeros(volume.shape, np.uint8)
  spot = tuple(np.argwhere(got == 0)[3])
  marks[spot] = 1
  nib.save(nib.Nifti1Image(marks, np.eye(4)), tmp_path / "marks.nii.gz")
  assert main(["refine", "--model", str(out), "--image", str(tmp_path / "odd.nii.gz"), "--marks",
               str(tmp_path / "marks.nii.gz"), "--out", str(tmp_path / "refined.nii.gz"), "--steps", "300",
               "--lr", "0.05", "--alpha", "0.01", "--layers", "3", "--region-growing", "0.5", "--quiet"]) == 0
  assert np.asarray(nib.load(tmp_path / "refined.nii.gz").dataobj)[spot] == 1
