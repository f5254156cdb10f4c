"""The command line as a user drives it, on the DSB nuclei image: predict, refine with LabelMe and 3D Slicer
marks, sessions with undo, info, and every kind of bad input.

Three tests run the installed ``scribblejax`` command in a subprocess (predict, a session undo, a bad input:
exit status, stdout/stderr, a fresh process); the rest call ``scribblejax.cli.main(argv)`` in-process, the same
entry point with the same exit codes, so that one compilation of the refinement is shared between tests.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import tifffile
from file_builders import write_dicom_series, write_labelme, write_slicer_segmentation
from flax import nnx
from PIL import Image as PILImage
from scipy import ndimage

import scribblejax as sj
from scribblejax.cli import main
from scribblejax.cli.refine import summary as refine_summary
from scribblejax.io import read_image, session_store
from scribblejax.refinement.merge import REASONS
from scribblejax.research import data, metrics
from scribblejax.research.train import TrainConfig, train_segmenter

NORM = {"kind": "percentile", "lower": 1.0, "upper": 99.8}
CROP = (slice(0, 96), slice(384, 480))  # from the DSB test columns (not trained on)
KWARGS = dict(spatial_dims=2, in_channels=1, num_classes=2, channels=[8, 16])
# Refinement settings (explicit, so that the tests do not depend on the library defaults).
KNOBS = ["--preset", "paper", "--steps", "300", "--lr", "0.05", "--momentum", "0.9", "--alpha", "0.01", "--layers", "5"]
AFFINE = np.array([[0.0, -0.6, 0.05, 12.0], [0.55, 0.0, 0.0, -40.0], [0.0, 0.02, 3.0, 7.5], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A small U-Net trained for 30 steps on the DSB training columns, saved as a model folder."""
  ds = data.nuclei2d("binary")
  model = sj.UNet(**KWARGS, rngs=nnx.Rngs(0))
  train_segmenter(
    model,
    sj.normalize(ds.image, NORM)[ds.train],
    ds.labels[ds.train],
    TrainConfig(steps=30, crop=48, batch_size=2),
    progress=False,
  )
  path = tmp_path_factory.mktemp("models") / "nuclei"
  sj.save_model(
    path, model, family="scribblejax.UNet", kwargs=KWARGS, normalization=NORM, class_names=["background", "nucleus"]
  )
  return path


@pytest.fixture(scope="module")
def crop(model_dir):
  """The crop (uint16), its true labels, and the network's own labels on it."""
  image, instances = data.nuclei_instances()
  image, truth = image[CROP], (instances[CROP] > 0).astype(np.int32)
  model, info = sj.load_model(model_dir)
  split = sj.split_params(model, sj.last_layers(1))
  network = np.asarray(np.argmax(sj.predict(split, sj.normalize(image[..., None], info.normalization)), -1))
  return image, truth, network


def _wrong_spots(truth, network, count=1):
  """Pixels (row, col) whose 3 x 3 neighbourhood the network gets wrong, per class: the corrections to make."""
  spots = {}
  for label in (0, 1):
    wrong = (truth == label) & (network != label)
    solid = np.ones_like(wrong)
    for dr in (-1, 0, 1):
      for dc in (-1, 0, 1):
        solid &= np.roll(np.roll(wrong, dr, 0), dc, 1)
    solid[[0, -1], :] = solid[:, [0, -1]] = False
    found = np.argwhere(solid)
    assert len(found) >= count, f"the network makes no solid error of class {label} on the crop"
    spots[label] = [tuple(int(v) for v in found[i * len(found) // count]) for i in range(count)]
  return spots


def _digest(path):
  return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _cli(*args, cwd=None, env=None):
  """Runs the installed ``scribblejax`` command (or ``python -m scribblejax.cli``); ``env`` adds variables."""
  script = Path(sys.executable).parent / "scribblejax"
  command = [str(script)] if script.exists() else [sys.executable, "-m", "scribblejax.cli"]
  return subprocess.run(
    command + [str(a) for a in args],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=cwd,
    env=None if env is None else {**os.environ, **env},
  )


def _no_temporaries(folder):
  assert not [p for p in os.listdir(folder) if p.startswith(".")], os.listdir(folder)


# ----------------------------------------------------------------------------------------------
# predict


@pytest.mark.slow
def test_predict_nifti_round_trip_keeps_affine_and_header(tmp_path, model_dir, crop):
  image, truth, network = crop
  src = nib.Nifti1Image(image.astype(np.int16)[:, :, None], AFFINE)
  src.header.set_qform(AFFINE, code=1)
  src.header.set_sform(AFFINE, code=2)
  src.header["descrip"] = b"DSB nuclei crop"
  src.header.set_xyzt_units("mm", "sec")
  nib.save(src, str(tmp_path / "img.nii.gz"))
  before = _digest(tmp_path / "img.nii.gz")

  proc = _cli("predict", "--model", model_dir, "--image", tmp_path / "img.nii.gz", "--out", tmp_path / "seg.nii.gz")
  assert proc.returncode == 0, proc.stderr
  assert "wrote" in proc.stdout and "predict" in proc.stderr  # summary on stdout, progress on stderr

  src, out = nib.load(str(tmp_path / "img.nii.gz")), nib.load(str(tmp_path / "seg.nii.gz"))
  np.testing.assert_allclose(out.affine, src.affine, atol=1e-6)
  for key in (
    "qform_code",
    "sform_code",
    "pixdim",
    "xyzt_units",
    "descrip",
    "quatern_b",
    "quatern_c",
    "quatern_d",
    "qoffset_x",
    "qoffset_y",
    "qoffset_z",
    "srow_x",
    "srow_y",
    "srow_z",
    "dim_info",
  ):
    np.testing.assert_array_equal(out.header[key], src.header[key], err_msg=key)
  assert out.shape == (96, 96, 1) and out.get_data_dtype() == np.uint8
  labels = np.asanyarray(out.dataobj)[:, :, 0]
  np.testing.assert_array_equal(labels, network)  # the model's own prediction
  assert metrics.mean_foreground_dice(labels, truth, 2) > 0.5  # and a meaningful one
  report = json.loads((tmp_path / "seg.report.json").read_text())
  assert report["image_format"] == "nifti" and report["out_format"] == "nifti" and report["device"]
  assert report["compile_seconds"] <= report["seconds"] + 1e-6
  assert report["notes"] == ["dropped length-1 axis [2] of the image for a 2-D model"]
  assert (tmp_path / "seg.overlay.png").stat().st_size > 0
  assert _digest(tmp_path / "img.nii.gz") == before
  _no_temporaries(tmp_path)


@pytest.mark.slow
def test_a_2d_model_segments_a_stack_slice_by_slice(tmp_path, model_dir, crop):
  # Was: refused ("the model takes 2-D images"). A TIFF stack goes slice by slice along its first axis,
  # normalised as one volume (here three copies: each slice normalises as the crop alone does).
  image, truth, network = crop
  tifffile.imwrite(tmp_path / "stack.tif", np.stack([image, image[::-1], image]), photometric="minisblack")
  proc = _cli(
    "predict", "--model", model_dir, "--image", tmp_path / "stack.tif", "--out", tmp_path / "seg.tif", "--json"
  )
  assert proc.returncode == 0, proc.stderr
  labels = tifffile.imread(tmp_path / "seg.tif")
  assert labels.shape == (3, 96, 96)
  np.testing.assert_array_equal(labels[0], network)
  np.testing.assert_array_equal(labels[2], network)
  model, info = sj.load_model(model_dir)  # the flipped slice, on its own
  flipped = sj.predict(
    sj.split_params(model, sj.last_layers(1)), sj.normalize(image[::-1, :, None], info.normalization)
  )
  np.testing.assert_array_equal(labels[1], np.argmax(np.asarray(flipped), -1))
  assert any(
    "slice by slice along the image's axis 0 (3 slices of (96, 96))" in n for n in json.loads(proc.stdout)["notes"]
  )


@pytest.mark.slow
def test_commands_keep_compiled_programs_on_disk(tmp_path, model_dir, crop):
  image = crop[0]
  tifffile.imwrite(tmp_path / "img.tif", image)
  cache = tmp_path / "cache"
  # every program is worth keeping here (JAX keeps only those that took a second or more to compile)
  env = {"SCRIBBLEJAX_COMPILATION_CACHE": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  outputs = []
  for run in range(2):
    proc = _cli(
      "predict", "--model", model_dir, "--image", tmp_path / "img.tif", "--out", tmp_path / f"s{run}.tif", env=env
    )
    assert proc.returncode == 0, proc.stderr
    outputs.append(tifffile.imread(tmp_path / f"s{run}.tif"))
    if run == 0:
      kept = sorted(p.name for p in cache.iterdir())
      assert kept, "nothing was written to the compilation cache"
  np.testing.assert_array_equal(outputs[1], outputs[0])  # the loaded programs compute the same
  np.testing.assert_array_equal(outputs[0], crop[2])
  assert sorted(p.name for p in cache.iterdir()) == kept  # same keys in a new process: they are hits
  # "0" leaves it off; a folder set in JAX's own configuration is kept
  from scribblejax import kernels

  off = _cli(
    "predict",
    "--model",
    model_dir,
    "--image",
    tmp_path / "img.tif",
    "--out",
    tmp_path / "s2.tif",
    env={
      **env,
      "SCRIBBLEJAX_COMPILATION_CACHE": "0",
      "XDG_CACHE_HOME": str(tmp_path / "xdg"),
      "SCRIBBLEJAX_KERNEL_CACHE": str(kernels._cache_dir()),
    },
  )  # the built kernels, where they are
  assert off.returncode == 0, off.stderr
  assert not (tmp_path / "xdg" / "scribblejax" / "jax").exists()
  script = "from scribblejax.cli import enable_compilation_cache as e; print(e())"
  for extra, expected in [
    (
      {"SCRIBBLEJAX_COMPILATION_CACHE": "", "XDG_CACHE_HOME": str(tmp_path / "x")},
      str(tmp_path / "x" / "scribblejax" / "jax"),
    ),
    ({"SCRIBBLEJAX_COMPILATION_CACHE": "", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "j")}, str(tmp_path / "j")),
  ]:
    proc = subprocess.run(
      [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env={**os.environ, **extra}
    )
    assert proc.stdout.strip() == expected, proc.stderr


# ----------------------------------------------------------------------------------------------
# refine


@pytest.mark.slow
def test_refine_labelme_two_labels_corrects_two_classes_in_one_round(tmp_path, model_dir, crop, capsys):
  image, truth, network = crop
  grey = np.round(image * (255.0 / image.max())).astype(np.uint8)
  PILImage.fromarray(grey).save(tmp_path / "img.png")
  spots = _wrong_spots(truth, network)
  (r1, c1), (r0, c0) = spots[1][0], spots[0][0]
  shapes = [
    {"label": "nucleus", "points": [[c1 + 0.5, r1 + 0.5]], "shape_type": "point"},
    {"label": "background", "points": [[c0 + 0.5, r0 + 0.5]], "shape_type": "point"},
  ]
  write_labelme(tmp_path / "marks.json", shapes, 96, 96, image_path="img.png")

  code = main(
    [
      "refine",
      "--model",
      str(model_dir),
      "--image",
      str(tmp_path / "img.png"),
      "--marks",
      str(tmp_path / "marks.json"),
      "--out",
      str(tmp_path / "refined.png"),
      *KNOBS,
      "--radius",
      "1",
      "--json",
    ]
  )
  out = capsys.readouterr()
  assert code == 0, out.err
  report = json.loads(out.out)
  assert report["satisfied"] and 0 < report["steps"] <= 300 and report["marks_honoured"] == 1.0
  assert report["settings"] == {
    "layers": 5,
    "max_steps": 300,
    "learning_rate": 0.05,
    "momentum": 0.9,
    "prox_weight": 0.01,
    "keep_weight": 0.0,
    "optimizer": "sgd",
    "progressive_merge": False,
    "merge_contrast": 0.1,
    "preset": "paper",
    "region_growing": None,
    "class_balance": False,
    "continue_weights": False,
    "check_every": 1,
    "compute_dtype": "float32",
    "remat": False,
    "conv_backend": "auto",
  }
  assert report["conv_backend"] == sj.kernels.resolve_conv_backend("auto")
  assert report["marked_pixels"] == {"background": 5, "nucleus": 5}  # radius 1: a 5-pixel cross each
  labels = np.asarray(PILImage.open(tmp_path / "refined.png"))
  for label, (r, c) in ((1, (r1, c1)), (0, (r0, c0))):
    assert network[r, c] != label and labels[r, c] == label  # both classes corrected
    assert all(labels[r + dr, c + dc] == label for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0)))
  assert json.loads((tmp_path / "refined.report.json").read_text())["steps"] == report["steps"]
  # without --json or --quiet: log lines and a progress bar of SGD steps on stderr, the summary on stdout
  code = main(
    [
      "refine",
      "--model",
      str(model_dir),
      "--image",
      str(tmp_path / "img.png"),
      "--marks",
      str(tmp_path / "marks.json"),
      "--out",
      str(tmp_path / "again.png"),
      *KNOBS,
      "--radius",
      "1",
    ]
  )
  out = capsys.readouterr()
  assert code == 0 and "wrote" in out.out
  assert "refining:" in out.err and "/300" in out.err, repr(out.err)


@pytest.mark.slow
def test_refine_with_patches_chosen_on_the_command_line_honours_the_marks(tmp_path, model_dir, crop, capsys):
  # Any model can run patch by patch (--patch-size); the loop runs the patches that hold marks, blended
  # as the sliding window blends them, so the written segmentation honours every mark.
  image, truth, network = crop
  tifffile.imwrite(tmp_path / "img.tif", image)
  spots = _wrong_spots(truth, network)
  marks = np.zeros((96, 96), np.uint8)
  (r1, c1), (r0, c0) = spots[1][0], spots[0][0]
  marks[r1, c1], marks[r0, c0] = 1, 255
  PILImage.fromarray(marks).save(tmp_path / "marks.png")
  code = main(
    [
      "refine",
      "--model",
      str(model_dir),
      "--image",
      str(tmp_path / "img.tif"),
      "--marks",
      str(tmp_path / "marks.png"),
      "--out",
      str(tmp_path / "refined.tif"),
      *KNOBS,
      "--patch-size",
      "64,64",
      "--json",
    ]
  )
  out = capsys.readouterr()
  assert code == 0, out.err
  report = json.loads(out.out)
  assert report["satisfied"] and report["marks_honoured"] == 1.0
  assert any("4 patch(es) of (64, 64)" in n for n in report["notes"])
  assert report["patches_per_call"] == report["refined_patches"] >= 2
  labels = tifffile.imread(tmp_path / "refined.tif")
  assert labels[r1, c1] == 1 and labels[r0, c0] == 0
  # one marked patch per network call, one after another: the same refinement; without --json, bars of
  # SGD steps and of the sliding window's patches on stderr
  code = main(
    [
      "refine",
      "--model",
      str(model_dir),
      "--image",
      str(tmp_path / "img.tif"),
      "--marks",
      str(tmp_path / "marks.png"),
      "--out",
      str(tmp_path / "one.tif"),
      *KNOBS,
      "--patch-size",
      "64,64",
      "--patch-batch",
      "1",
    ]
  )
  out = capsys.readouterr()
  assert code == 0, out.err
  assert "refining:" in out.err and "segmenting:" in out.err and "/4 [" in out.err, repr(out.err)
  one = json.loads((tmp_path / "one.report.json").read_text())
  assert one["patches_per_call"] == 1 and one["refined_patches"] == report["refined_patches"]
  assert one["satisfied"] and one["steps"] == report["steps"] and one["marks_honoured"] == 1.0
  assert (tifffile.imread(tmp_path / "one.tif") == labels).mean() > 0.999


def _at_spacing(model_dir, folder, spacing):
  """A copy of the model folder whose model.json states a voxel spacing."""
  import shutil

  shutil.copytree(model_dir, folder)
  doc = json.loads((folder / "model.json").read_text())
  doc["metadata"] = {**(doc.get("metadata") or {}), "spacing": spacing}
  (folder / "model.json").write_text(json.dumps(doc))
  return folder


@pytest.mark.slow
def test_on_a_coarser_model_grid_the_report_counts_marks_in_the_written_file(tmp_path, model_dir, crop, capsys):
  # A model stating a voxel spacing twice the image's: marks go to a coarser grid, the segmentation
  # comes back by resampling. marks_honoured is measured in the written file against the marks drawn,
  # and two marks of different classes in one model voxel are counted.
  image, truth, network = crop
  coarse = _at_spacing(model_dir, tmp_path / "coarse", [2.0, 2.0])
  tifffile.imwrite(tmp_path / "img.tif", image)
  spots = _wrong_spots(truth, network)
  marks = np.zeros((96, 96), np.uint8)
  marks[spots[1][0]] = 1
  (r, c) = spots[0][0]
  marks[r, c] = 255
  marks[r, c + 1 if c % 2 == 0 else c - 1] = 1  # the same 2 x 2 model voxel, another class
  PILImage.fromarray(marks).save(tmp_path / "marks.png")
  code = main(
    [
      "refine",
      "--model",
      str(coarse),
      "--image",
      str(tmp_path / "img.tif"),
      "--marks",
      str(tmp_path / "marks.png"),
      "--out",
      str(tmp_path / "refined.tif"),
      *KNOBS,
      "--json",
    ]
  )
  out = capsys.readouterr()
  assert code == 0, out.err
  report = json.loads(out.out)
  assert any("to the model's (2.0, 2.0) ((48, 48))" in n for n in report["notes"])
  assert report["clashing_marks"] == 1
  written = tifffile.imread(tmp_path / "refined.tif")
  drawn = np.where(marks == 255, 0, marks.astype(np.int64) - 1)  # 0 unmarked, 255 background
  drawn[marks == 0] = -1
  assert report["marks_honoured"] == float((written[drawn >= 0] == drawn[drawn >= 0]).mean())
  assert written[spots[1][0]] == 1 and report["satisfied"]  # away from the clash: honoured on the image's grid
  assert report["marked_pixels"] == {"background": 1, "nucleus": int((marks == 1).sum())}


def test_a_tiffs_print_resolution_is_not_a_spacing_to_resample_from(tmp_path, model_dir, crop, capsys):
  # nnU-Net reads a 2-D TIFF at spacing 1 whatever its resolution tags say (often 72 dots per inch)
  image = crop[0]
  unit = _at_spacing(model_dir, tmp_path / "unit", [1.0, 1.0])
  tifffile.imwrite(tmp_path / "plain.tif", image)
  tifffile.imwrite(tmp_path / "dpi.tif", image, resolution=(72, 72), resolutionunit=2)
  for name in ("plain", "dpi"):
    assert (
      main(
        [
          "predict",
          "--model",
          str(unit),
          "--image",
          str(tmp_path / f"{name}.tif"),
          "--out",
          str(tmp_path / f"{name}_seg.tif"),
          "--json",
        ]
      )
      == 0
    )
    report = json.loads(capsys.readouterr().out)
  assert any("pixel spacing as 1 for resampling" in n for n in report["notes"])  # was: resampled to 1 x 1
  np.testing.assert_array_equal(tifffile.imread(tmp_path / "dpi_seg.tif"), tifffile.imread(tmp_path / "plain_seg.tif"))


@pytest.mark.slow
def test_refine_reads_a_slicer_segmentation_on_an_nrrd_image(tmp_path, model_dir, crop, capsys):
  image, truth, network = crop
  # The crop as a 2-D NRRD in LPS space: axis 0 = rows, axis 1 = columns (any order works: geometry rules).
  header = {
    "space": "left-posterior-superior",
    "space directions": np.array([[0.0, 0.5, 0.0], [-0.5, 0.0, 0.0]]),
    "space origin": np.array([3.0, -4.0, 10.0]),
    "kinds": ["domain", "domain"],
    "encoding": "gzip",
  }
  nrrd.write(str(tmp_path / "img.nrrd"), image, header, index_order="F")
  geometry = read_image(tmp_path / "img.nrrd").geometry
  spots = _wrong_spots(truth, network)
  (r1, c1), (r0, c0) = spots[1][0], spots[0][0]
  lo = np.array([min(r1, r0) - 1, min(c1, c0) - 1, 0])
  extent = np.array([max(r1, r0) + 2, max(c1, c0) + 2, 1]) - lo
  layer = np.zeros(extent, np.uint8)
  layer[r1 - lo[0] - 1 : r1 - lo[0] + 2, c1 - lo[1] - 1 : c1 - lo[1] + 2, 0] = 1  # 'nucleus', label value 1
  layer[r0 - lo[0] - 1 : r0 - lo[0] + 2, c0 - lo[1] - 1 : c0 - lo[1] + 2, 0] = 7  # 'Background', label value 7
  affine = geometry.affine.copy()
  affine[:3, 3] = (geometry.affine @ np.r_[lo, 1])[:3]
  write_slicer_segmentation(
    tmp_path / "fix.seg.nrrd",
    layer,
    [dict(name="nucleus", label_value=1, layer=0), dict(name="Background", label_value=7, layer=0)],
    affine_ras=affine,
    extent_offset=lo,
  )

  code = main(
    [
      "refine",
      "--model",
      str(model_dir),
      "--image",
      str(tmp_path / "img.nrrd"),
      "--marks",
      str(tmp_path / "fix.seg.nrrd"),
      "--out",
      str(tmp_path / "seg.nrrd"),
      *KNOBS,
      "--quiet",
      "--compute-dtype",
      "bfloat16",
      "--remat",
      "--conv-backend",
      "xla",
    ]
  )
  assert code == 0, capsys.readouterr().err
  report = json.loads((tmp_path / "seg.report.json").read_text())
  assert report["settings"]["compute_dtype"] == "bfloat16" and report["settings"]["remat"] is True
  assert report["settings"]["conv_backend"] == report["conv_backend"] == "xla"
  labels, out_header = nrrd.read(str(tmp_path / "seg.nrrd"), index_order="F")
  assert labels.shape == (96, 96)
  np.testing.assert_allclose(out_header["space directions"], header["space directions"])
  np.testing.assert_allclose(out_header["space origin"], header["space origin"])
  assert (labels[r1 - 1 : r1 + 2, c1 - 1 : c1 + 2] == 1).all() and (labels[r0 - 1 : r0 + 2, c0 - 1 : c0 + 2] == 0).all()
  report = json.loads((tmp_path / "seg.report.json").read_text())
  assert report["marked_pixels"] == {"background": 9, "nucleus": 9} and report["satisfied"]


@pytest.mark.slow
def test_session_two_rounds_then_undo(tmp_path, model_dir, crop, capsys):
  image, truth, network = crop
  tifffile.imwrite(tmp_path / "img.tif", image)
  spots = _wrong_spots(truth, network)
  (r1, c1), (r0, c0) = spots[1][0], spots[0][0]
  first = np.zeros((96, 96), np.uint8)
  first[r1, c1] = 1  # round 1: a label map, "nucleus here"
  PILImage.fromarray(first).save(tmp_path / "round1.png")
  write_labelme(
    tmp_path / "round2.json", [{"label": "background", "points": [[c0 + 0.5, r0 + 0.5]], "shape_type": "point"}], 96, 96
  )
  session = tmp_path / "session"
  common = [
    "--model",
    str(model_dir),
    "--image",
    str(tmp_path / "img.tif"),
    "--session",
    str(session),
    *KNOBS,
    "--radius",
    "0",
    "--quiet",
  ]
  assert main(["refine", *common, "--marks", str(tmp_path / "round1.png"), "--out", str(tmp_path / "r1.tif")]) == 0
  assert main(["refine", *common, "--marks", str(tmp_path / "round2.json"), "--out", str(tmp_path / "r2.tif")]) == 0
  out1, out2 = tifffile.imread(tmp_path / "r1.tif"), tifffile.imread(tmp_path / "r2.tif")
  assert network[r1, c1] == 0 and out1[r1, c1] == 1
  assert out2[r1, c1] == 1 and out2[r0, c0] == 0 and network[r0, c0] == 1  # round 2 keeps round 1's marks
  doc = json.loads((session / "session.json").read_text())
  assert [r["round"] for r in doc["rounds"]] == [1, 2] and all(r["satisfied"] for r in doc["rounds"])
  assert json.loads((tmp_path / "r2.report.json").read_text())["marked_pixels"] == {"background": 1, "nucleus": 1}

  # Undo with new marks replaces the latest round: the same marks again give the same result.
  assert (
    main(["refine", *common, "--undo", "--marks", str(tmp_path / "round2.json"), "--out", str(tmp_path / "r2b.tif")])
    == 0
  )
  np.testing.assert_array_equal(tifffile.imread(tmp_path / "r2b.tif"), out2)
  rounds = json.loads((session / "session.json").read_text())["rounds"]
  replaced = rounds[-1]["file"]  # a new file: the undone one stayed until this round was saved
  assert len(rounds) == 2 and (session / replaced).exists() and not (session / "round-002.npz").exists()

  # Undo in a fresh process: no model run, the session's stored round-1 result comes back.
  proc = _cli("refine", "--session", session, "--undo", "--out", tmp_path / "undo1.tif")
  assert proc.returncode == 0, proc.stderr
  assert "undid round 2: 1 round(s) left" in proc.stdout
  np.testing.assert_array_equal(tifffile.imread(tmp_path / "undo1.tif"), out1)
  assert len(json.loads((session / "session.json").read_text())["rounds"]) == 1
  assert not (session / replaced).exists()

  # A new round after the undo accumulates over round 1 only; undoing everything gives the network's labels.
  assert main(["refine", "--session", str(session), "--undo", "--out", str(tmp_path / "undo0.tif"), "--quiet"]) == 0
  np.testing.assert_array_equal(tifffile.imread(tmp_path / "undo0.tif"), network)
  assert main(["refine", "--session", str(session), "--undo", "--quiet"]) == 1
  assert "nothing to undo" in capsys.readouterr().err
  # The session belongs to its image: another image is refused.
  tifffile.imwrite(tmp_path / "other.tif", image[::-1])
  assert (
    main(
      [
        "refine",
        *common[:2],
        "--image",
        str(tmp_path / "other.tif"),
        "--session",
        str(session),
        "--marks",
        str(tmp_path / "round1.png"),
        "--out",
        str(tmp_path / "x.tif"),
      ]
    )
    == 1
  )
  assert "is not the image of session" in capsys.readouterr().err
  _no_temporaries(tmp_path)


def test_take_shows_the_refined_networks_own_labels_and_the_session_goes_on_from_them(
  tmp_path, model_dir, crop, capsys
):
  image, truth, network = crop
  tifffile.imwrite(tmp_path / "img.tif", image)
  (r1, c1), (r0, c0) = _wrong_spots(truth, network)[1][0], _wrong_spots(truth, network)[0][0]
  marks = np.zeros((96, 96), np.uint8)
  marks[r1, c1] = 1  # "nucleus here", where the network says background
  PILImage.fromarray(marks).save(tmp_path / "m.png")
  second = np.zeros((96, 96), np.uint8)
  second[r0, c0] = 255  # "background here"
  PILImage.fromarray(second).save(tmp_path / "m2.png")
  # one step: the refined network cannot honour the mark yet, the merge writes it, so the two labels differ
  common = ["--model", str(model_dir), "--image", str(tmp_path / "img.tif"), "--steps", "1", "--quiet"]
  session = tmp_path / "s"
  assert (
    main(
      [
        "refine",
        *common,
        "--session",
        str(session),
        "--marks",
        str(tmp_path / "m.png"),
        "--out",
        str(tmp_path / "r1.tif"),
      ]
    )
    == 0
  )
  merged = tifffile.imread(tmp_path / "r1.tif")
  first_report = json.loads((tmp_path / "r1.report.json").read_text())
  differs = first_report["network_differs"]
  # the same round without the merge, in a session of its own: the refined network's own labels
  argv = [
    "refine",
    *common,
    "--no-progressive-merge",
    "--marks",
    str(tmp_path / "m.png"),
    "--out",
    str(tmp_path / "own.tif"),
  ]
  assert main(argv) == 0
  own = tifffile.imread(tmp_path / "own.tif")
  assert merged[r1, c1] == 1 and own[r1, c1] == 0 and differs == int((merged != own).sum()) > 0
  # a first round changes the network's segmentation: every changed pixel counted once, by why it changed
  changed = first_report["changed_this_round"]
  assert sum(changed.values()) == first_report["changed_pixels"] and changed["mark"] >= 1
  # the session keeps why: the stored reasons count the changed pixels as the report does
  reasons = session_store.reasons_of(
    session_store.round_arrays(session, session_store.load_session(session)["rounds"][0])
  )
  moved = merged != session_store.load_initial(session)
  assert {r: int(((reasons == i) & moved).sum()) for i, r in enumerate(REASONS[1:], 1)} == changed
  capsys.readouterr()
  # the round's report lists the largest regions where the two differ, each with a point inside it
  regions, count = ndimage.label(merged != own)
  sizes = sorted(np.bincount(regions.ravel())[1:].tolist(), reverse=True)
  listed = first_report["differences"]
  assert first_report["differences_with"] == "network" and [d["pixels"] for d in listed] == sizes[:5]
  assert all(merged[tuple(d["point"])] != own[tuple(d["point"])] for d in listed) and listed[0]["rank"] == 1
  named = f"the largest region {listed[0]['pixels']} pixel(s) at ({', '.join(map(str, listed[0]['point']))})"
  assert named in refine_summary(first_report) and "(--take network [--regions 1])" in refine_summary(first_report)

  take = ["refine", "--session", str(session), "--take"]
  assert main([*take, "network", "--out", str(tmp_path / "n.tif")]) == 0
  assert "round 1 now shows the refined network's own labels" in capsys.readouterr().out
  np.testing.assert_array_equal(tifffile.imread(tmp_path / "n.tif"), own)
  report = json.loads((tmp_path / "n.report.json").read_text())
  # the network's own shown whole: the regions where the merge differs, for --take merged --regions
  assert report["differences_with"] == "merged" and [d["pixels"] for d in report["differences"]] == sizes[:5]
  assert (report["take"], report["was"], report["changed_pixels"], report["marks_honoured"]) == (
    "network",
    "merged",
    differs,
    0.0,
  )
  # the next round starts from the labels taken: as in a session whose first round ran without the merge
  second_round = ["--marks", str(tmp_path / "m2.png"), "--out"]
  assert main(["refine", *common, "--session", str(session), *second_round, str(tmp_path / "r2.tif")]) == 0
  # a later round counts its changes against the segmentation it started from (changed_pixels: against W's)
  second_changed = json.loads((tmp_path / "r2.report.json").read_text())["changed_this_round"]
  assert sum(second_changed.values()) == int((tifffile.imread(tmp_path / "r2.tif") != own).sum()) > 0
  nomerge = ["--session", str(tmp_path / "s_own"), "--marks", str(tmp_path / "m.png")]
  assert main(["refine", *common, *nomerge, "--no-progressive-merge", "--out", str(tmp_path / "o1.tif")]) == 0
  own_doc = session_store.load_session(tmp_path / "s_own")  # without the merge: no reasons kept
  assert session_store.reasons_of(session_store.round_arrays(tmp_path / "s_own", own_doc["rounds"][0])) is None
  assert main(["refine", *common, "--session", str(tmp_path / "s_own"), *second_round, str(tmp_path / "o2.tif")]) == 0
  np.testing.assert_array_equal(tifffile.imread(tmp_path / "r2.tif"), tifffile.imread(tmp_path / "o2.tif"))
  # a later round's undo comes back to the labels taken, and taking the merge back restores the round exactly
  assert main(["refine", "--session", str(session), "--undo", "--out", str(tmp_path / "u.tif"), "--quiet"]) == 0
  np.testing.assert_array_equal(tifffile.imread(tmp_path / "u.tif"), own)
  assert main([*take, "merged", "--out", str(tmp_path / "m.tif"), "--quiet"]) == 0
  np.testing.assert_array_equal(tifffile.imread(tmp_path / "m.tif"), merged)
  assert json.loads((tmp_path / "m.report.json").read_text())["marks_honoured"] == 1.0
  # region by region: the refined network's own labels only in the region of difference --where points at
  regions, count = ndimage.label(merged != own)
  pointer = np.zeros((96, 96), np.uint8)
  pointer[r1, c1] = 3  # any class: only which pixels are marked counts
  PILImage.fromarray(pointer).save(tmp_path / "w.png")
  capsys.readouterr()
  assert main([*take, "network", "--where", str(tmp_path / "w.png"), "--out", str(tmp_path / "w.tif")]) == 0
  region = regions == regions[r1, c1]
  np.testing.assert_array_equal(tifffile.imread(tmp_path / "w.tif"), np.where(region, own, merged))
  report = json.loads((tmp_path / "w.report.json").read_text())
  assert count > 1 and (report["shows"], report["changed_pixels"]) == ("mixed", int(region.sum()))
  assert "own labels in the regions pointed at (the rest as before)" in capsys.readouterr().out
  assert main([*take, "merged", "--where", str(tmp_path / "w.png"), "--out", str(tmp_path / "b.tif"), "--quiet"]) == 0
  np.testing.assert_array_equal(tifffile.imread(tmp_path / "b.tif"), merged)
  assert json.loads((tmp_path / "b.report.json").read_text())["shows"] == "merged"
  # by rank, as the round's report lists them: the second largest region only
  second = regions == regions[tuple(listed[1]["point"])]
  assert main([*take, "network", "--regions", "2", "--out", str(tmp_path / "k.tif")]) == 0
  np.testing.assert_array_equal(tifffile.imread(tmp_path / "k.tif"), np.where(second, own, merged))
  left = json.loads((tmp_path / "k.report.json").read_text())["differences"]
  assert [d["pixels"] for d in left] == (sizes[:1] + sizes[2:])[:5]
  assert f"the largest region left: {left[0]['pixels']} pixel(s) at" in (line := capsys.readouterr().out)
  assert "(--take network --regions 1)" in line
  assert main([*take, "network", "--regions", "1,1", "--out", str(tmp_path / "k2.tif"), "--quiet"]) == 0  # once
  largest = regions == regions[tuple(listed[0]["point"])]
  np.testing.assert_array_equal(tifffile.imread(tmp_path / "k2.tif"), np.where(second | largest, own, merged))
  assert main([*take, "network", "--quiet"]) == 0
  assert main([*take, "network", "--regions", "1"]) == 1  # the network's own, whole, is shown now
  assert "the segmentation shown is the refined network's own labels everywhere" in capsys.readouterr().err
  assert main([*take, "merged", "--quiet"]) == 0
  nowhere = np.zeros((96, 96), np.uint8)
  PILImage.fromarray(nowhere).save(tmp_path / "w0.png")
  agree = np.argwhere(merged == own)[0]
  nowhere[tuple(agree)] = 1
  PILImage.fromarray(nowhere).save(tmp_path / "w1.png")

  # refusals, each named
  for argv, message in [
    ([*take, "network", "--where", str(tmp_path / "w0.png")], "marks no pixel: it points at no region to take"),
    ([*take, "network", "--where", str(tmp_path / "w1.png")], "touch no region where the two segmentations differ"),
    (["refine", *common, "--session", str(session), "--where", str(tmp_path / "w.png")], "give it with --take"),
    ([*take, "network", "--regions", str(count + 1)], f"differ in {count} region(s) only"),
    ([*take, "network", "--regions", "1", "--where", str(tmp_path / "w.png")], "give one"),
    (["refine", "--session", str(session), "--regions", "1"], "give it with --take"),
    ([*take, "network", "--marks", str(tmp_path / "m.png")], "without --undo and --marks"),
    ([*take, "network", "--undo"], "without --undo and --marks"),
    (["refine", "--take", "network", *common[:4]], "--take needs --session"),
    ([*take, "network", "--steps", "5"], "takes no method settings: drop --steps"),
  ]:
    assert main(argv) == 1
    assert message in capsys.readouterr().err
  assert main(["refine", "--session", str(tmp_path / "s_own"), "--undo", "--quiet"]) == 0  # back to the no-merge round
  assert main(["refine", "--session", str(tmp_path / "s_own"), "--take", "merged"]) == 1
  assert "there is no merge to take" in capsys.readouterr().err
  assert main(["refine", "--session", str(tmp_path / "s_own"), "--take", "network", "--regions", "1"]) == 1
  assert "refined without the merge: it has one segmentation, no regions of difference" in capsys.readouterr().err
  rounds = json.loads((session / "session.json").read_text())["rounds"]
  with np.load(session / rounds[-1]["file"]) as data_:  # a round stored before both labels were kept
    old = {k: data_[k] for k in data_.files if k not in ("merged_labels", "network_labels", "taken")}
  np.savez_compressed(session / rounds[-1]["file"], **old)
  assert main([*take, "network"]) == 1
  assert "stored by an older scribblejax" in capsys.readouterr().err
  assert main(["refine", "--session", str(session), "--undo", "--quiet"]) == 0
  assert main([*take, "network"]) == 1
  assert "nothing to take" in capsys.readouterr().err
  _no_temporaries(tmp_path)


@pytest.mark.slow
def test_continue_weights_and_region_growing(tmp_path, model_dir, crop, capsys):
  image, truth, network = crop
  tifffile.imwrite(tmp_path / "img.tif", image)
  ((r1, c1),) = _wrong_spots(truth, network)[1]
  marks = np.zeros((96, 96), np.uint8)
  marks[r1, c1] = 1
  PILImage.fromarray(marks).save(tmp_path / "m.png")
  base = [
    "refine",
    "--model",
    str(model_dir),
    "--image",
    str(tmp_path / "img.tif"),
    "--marks",
    str(tmp_path / "m.png"),
    *KNOBS,
    "--quiet",
    "--json",
  ]
  reports = []
  for name, extra in (("a", []), ("b", ["--continue-weights"]), ("c", [])):
    assert main([*base, "--session", str(tmp_path / "s"), "--out", str(tmp_path / f"{name}.tif"), *extra]) == 0
    reports.append(json.loads(capsys.readouterr().out))
  # The same mark again: from round 1's weights it already holds (no step); from W it must be learnt again.
  assert reports[0]["steps"] > 0 and reports[1]["steps"] == 0 and reports[2]["steps"] == reports[0]["steps"]
  assert reports[1]["settings"]["continue_weights"] and all(r["satisfied"] for r in reports)
  other_layers = [a if a != "5" else "3" for a in base]  # KNOBS: --layers 5
  assert (
    main([*other_layers, "--session", str(tmp_path / "s"), "--out", str(tmp_path / "d.tif"), "--continue-weights"]) == 1
  )
  assert "--continue-weights needs the same --layers as the previous round" in capsys.readouterr().err

  assert main([*base, "--region-growing", "0.05", "--out", str(tmp_path / "g.tif")]) == 0
  grown = json.loads(capsys.readouterr().out)
  assert grown["grown_pixels"] > 0 and grown["settings"]["region_growing"] == 0.05
  assert grown["marked_pixels"] == {"nucleus": 1 + grown["grown_pixels"]} and grown["satisfied"]

  # In a session, growth from a later round neither replaces nor crosses the marks of earlier rounds.
  first = np.zeros((96, 96), np.uint8)
  first[:, 48] = 255  # round 1: a background line down the middle
  second = np.zeros((96, 96), np.uint8)
  second[10, 10] = 1  # round 2: one nucleus pixel left of it, grown
  PILImage.fromarray(first).save(tmp_path / "first.png")
  PILImage.fromarray(second).save(tmp_path / "second.png")
  session = [
    "refine",
    "--model",
    str(model_dir),
    "--image",
    str(tmp_path / "img.tif"),
    "--steps",
    "2",
    "--quiet",
    "--json",
    "--session",
    str(tmp_path / "grown"),
  ]
  for name, extra in (("first", []), ("second", ["--region-growing", "1e6"])):  # T = 1e6: any pixel joins
    assert (
      main([*session, "--marks", str(tmp_path / f"{name}.png"), "--out", str(tmp_path / f"{name}.tif"), *extra]) == 0
    )
    reports.append(json.loads(capsys.readouterr().out))
  session_marks = np.load(sorted((tmp_path / "grown").glob("round-*.npz"))[-1])["marks"]
  assert (session_marks[:, 48] == 0).all()  # round 1's line is intact
  assert (session_marks[:, :48] == 1).all() and (session_marks[:, 49:] == -1).all()
  assert reports[-1]["grown_pixels"] == 96 * 48 - 1
  assert reports[-1]["marked_pixels"] == {"background": 96, "nucleus": 96 * 48}
  # What earlier growth inferred is not the user's word: a later round's growth relabels it.
  third = np.zeros((96, 96), np.uint8)
  third[60, 20] = 255  # round 3: background, inside round 2's growth
  PILImage.fromarray(third).save(tmp_path / "third.png")
  assert (
    main(
      [
        *session,
        "--marks",
        str(tmp_path / "third.png"),
        "--out",
        str(tmp_path / "third.tif"),
        "--region-growing",
        "1e6",
      ]
    )
    == 0
  )
  session_marks = np.load(sorted((tmp_path / "grown").glob("round-*.npz"))[-1])["marks"]
  assert session_marks[10, 10] == 1  # drawn in round 2: kept
  left = session_marks[:, :48].copy()
  left[10, 10] = 0
  assert (left == 0).all()  # round 2's grown nucleus is background now
  assert (session_marks[:, 48] == 0).all() and (session_marks[:, 49:] == -1).all()  # the drawn line still walls
  # A round under other pipeline options would mix two pipelines' weights and segmentations: refused.
  assert (
    main(
      [
        *session,
        "--marks",
        str(tmp_path / "third.png"),
        "--out",
        str(tmp_path / "fourth.tif"),
        "--no-resample",
        "--patch-step",
        "0.25",
      ]
    )
    == 1
  )
  assert (
    "was refined with other pipeline options: --no-resample (True then, False now), --patch-step (0.5 then, 0.25 now)"
  ) in capsys.readouterr().err


@pytest.mark.slow
def test_refine_dicom_series_3d_with_slicer_marks_writes_nifti(tmp_path, capsys):
  """A CT series, a small 3-D U-Net (random weights: this checks the plumbing), Slicer marks, NIfTI out."""
  rng = np.random.default_rng(0)
  volume = (rng.normal(size=(24, 20, 8)) * 50 + 40).astype(np.int16)
  volume[5:12, 5:12, 2:6] += 300
  write_dicom_series(tmp_path / "ct", volume, slice_step=(0, 0, 2.5))
  kwargs = dict(spatial_dims=3, in_channels=1, num_classes=2, channels=[4])  # small: 3 layers
  sj.save_model(
    tmp_path / "m3d",
    sj.UNet(**kwargs, rngs=nnx.Rngs(0)),
    family="scribblejax.UNet",
    kwargs=kwargs,
    normalization={"kind": "ct", "lower": -1000, "upper": 1000, "mean": 0, "std": 300},
    class_names=["background", "lesion"],
  )
  geometry = read_image(tmp_path / "ct").geometry
  layer = np.zeros((3, 3, 2), np.uint8)
  layer[:, :, 0] = 1
  layer[1, 1, 1] = 2
  offset = np.array([6, 6, 3])
  affine = geometry.affine.copy()
  affine[:3, 3] = (geometry.affine @ np.r_[offset, 1])[:3]
  write_slicer_segmentation(
    tmp_path / "m.seg.nrrd",
    layer,
    [dict(name="lesion", label_value=1, layer=0), dict(name="background", label_value=2, layer=0)],
    affine_ras=affine,
    extent_offset=offset,
  )
  assert (
    main(
      [
        "refine",
        "--model",
        str(tmp_path / "m3d"),
        "--image",
        str(tmp_path / "ct"),
        "--marks",
        str(tmp_path / "m.seg.nrrd"),
        "--out",
        str(tmp_path / "seg.nii.gz"),
        *KNOBS,
        "--layers",
        "2",
        "--quiet",
      ]
    )
    == 0
  ), capsys.readouterr().err
  seg = read_image(tmp_path / "seg.nii.gz")
  np.testing.assert_allclose(seg.geometry.affine, geometry.affine, atol=1e-5)  # DICOM -> NIfTI, same world
  labels = seg.array[..., 0]
  assert (labels[6:9, 6:9, 3] == 1).all() and labels[7, 7, 4] == 0
  report = json.loads((tmp_path / "seg.report.json").read_text())
  assert report["satisfied"] and report["marked_pixels"] == {"background": 1, "lesion": 9}
  assert report["image_format"] == "dicom" and report["out_format"] == "nifti"
  with PILImage.open(tmp_path / "seg.overlay.png") as im:  # the two marked slices, one row each
    assert im.size[1] > im.size[0]


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the problem, exit status 1, inputs untouched.


@pytest.fixture()
def files(tmp_path, crop):
  image = crop[0]
  tifffile.imwrite(tmp_path / "img.tif", image)
  marks = np.zeros((96, 96), np.uint8)
  marks[5, 5] = 1
  PILImage.fromarray(marks).save(tmp_path / "marks.png")
  PILImage.fromarray(np.zeros((50, 50), np.uint8)).save(tmp_path / "small.png")
  write_labelme(tmp_path / "tumour.json", [{"label": "tumour", "points": [[3, 3]], "shape_type": "point"}], 96, 96)
  (tmp_path / "garbage.tif").write_bytes(b"not a tiff at all")
  nan = image.astype(np.float32)
  nan[7, 7] = np.nan
  tifffile.imwrite(tmp_path / "nan.tif", nan)
  (tmp_path / "folder.tif").mkdir()
  (tmp_path / "height.json").write_text(json.dumps({"shapes": [], "imageHeight": "abc", "imageWidth": 96}))
  return tmp_path


BAD_INPUTS = {
  "missing image": (["--image", "{d}/missing.tif"], r"cannot read \S*missing\.tif: no such file"),
  "unreadable image": (["--image", "{d}/garbage.tif"], r"cannot read \S*garbage\.tif as TIFF"),
  "missing marks": (["--marks", "{d}/nothing.png"], r"cannot read \S*nothing\.png: no such file"),
  "marks geometry": (
    ["--marks", "{d}/small.png"],
    r"small\.png has shape \(50, 50\), but the image has shape \(96, 96\)",
  ),
  "label name": (["--marks", "{d}/tumour.json"], r"label 'tumour' is not a class \(classes: background, nucleus\)"),
  "out is input": (["--out", "{d}/img.tif"], r"output \S*img\.tif is the input \S*img\.tif"),
  "out is marks": (["--out", "{d}/marks.png"], r"output \S*marks\.png is the input"),
  "missing model": (["--model", "{d}/no_such_model"], r"no model at '\S*no_such_model'"),
  "classes count": (["--classes", "a,b,c"], r"--classes lists 3 names, but the model predicts 2 classes"),
  "jpeg out": (["--out", "{d}/seg.jpg"], r"cannot write the segmentation of a tiff image as \S*seg\.jpg"),
  "bad steps": (["--steps", "-3"], r"max_steps must be a non-negative integer"),
  "merge contrast": (["--merge-contrast", "2"], r"merge_contrast is a score in \[-1, 1\]"),
  "nan image": (["--image", "{d}/nan.tif"], r"nan\.tif contains 1 NaN or Inf values"),
  "out is a folder": (["--out", "{d}/folder.tif"], r"output \S*folder\.tif is a folder"),
  "out under a file": (["--out", "{d}/img.tif/seg.tif"], r"cannot write \S*seg\.tif: \S*img\.tif is a file"),
  "labelme field": (["--marks", "{d}/height.json"], r"height\.json"),
  "patch size rank": (
    ["--patch-size", "8,8,8"],
    r"the patch size must be 2 positive integers for a 2-D model, "
    r"got \[8, 8, 8\]",
  ),
  "patch size text": (["--patch-size", "big"], r"--patch-size must be auto, whole or sizes like 96,96,96, got 'big'"),
  "patch step": (["--patch-step", "0"], r"sliding-window step must be in \(0, 1\]"),
  "patch batch": (["--patch-batch", "0"], r"the patches per network call must be a positive integer, got 0"),
  "patch batch text": (["--patch-batch", "all"], r"--patch-batch must be auto or a positive integer, got 'all'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_and_exit_1(case, files, model_dir, capsys):
  change, message = BAD_INPUTS[case]
  args = {
    "--model": str(model_dir),
    "--image": f"{files}/img.tif",
    "--marks": f"{files}/marks.png",
    "--out": f"{files}/seg.tif",
  }
  for flag, value in zip(change[::2], change[1::2]):
    args[flag] = value.format(d=files)
  before = {p.name: _digest(p) for p in files.iterdir() if p.is_file()}
  code = main(
    [
      "refine",
      *[x for kv in args.items() for x in kv],
      "--steps" if case != "bad steps" else "--lr",
      "5" if case != "bad steps" else "0.05",
      "--quiet",
    ]
  )
  err = capsys.readouterr().err
  assert code == 1
  assert err.count("\n") == 1 and err.startswith("scribblejax refine: error: "), err
  assert __import__("re").search(message, err), err
  assert {p.name: _digest(p) for p in files.iterdir() if p.is_file()} == before  # nothing written or changed


def test_multichannel_volumes_flags_and_damaged_sessions_are_refused(files, model_dir, crop, capsys):
  image = crop[0].astype(np.float32)
  nib.save(nib.Nifti1Image(np.stack([image, image], -1)[:, :, None], np.eye(4)), files / "two.nii.gz")
  assert (
    main(["predict", "--model", str(model_dir), "--image", f"{files}/two.nii.gz", "--out", f"{files}/s.nii.gz"]) == 1
  )  # was: the second volume dropped as "alpha"
  assert "the channels of a nifti image are separate volumes" in capsys.readouterr().err
  base = [
    "refine",
    "--model",
    str(model_dir),
    "--image",
    f"{files}/img.tif",
    "--marks",
    f"{files}/marks.png",
    "--steps",
    "5",
    "--quiet",
  ]
  assert main([*base, "--out", f"{files}/a.tif", "--continue-weights"]) == 1  # was: ignored, but reported
  assert "--continue-weights needs --session" in capsys.readouterr().err
  session = files / "session"
  assert main([*base, "--out", f"{files}/a.tif", "--session", str(session)]) == 0
  capsys.readouterr()
  for name, command, message in (
    ("round-001.npz", [*base, "--out", f"{files}/b.tif", "--session", str(session)], "cannot read session round"),
    ("initial.npz", ["refine", "--session", str(session), "--undo", "--quiet"], r"cannot read \S*initial\.npz"),
  ):
    (session / name).write_bytes((session / name).read_bytes()[:100])  # a truncated file
    assert main(command) == 1  # was: zipfile.BadZipFile
    assert __import__("re").search(message, capsys.readouterr().err)
  doc = json.loads((session / "session.json").read_text())
  (session / "session.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "image_digest"}))
  assert main([*base, "--out", f"{files}/b.tif", "--session", str(session)]) == 1
  assert "is damaged: it lacks ['image_digest']" in capsys.readouterr().err
  # a crafted round file name never reaches outside the folder (an undo would delete it); other
  # damage is named, not a traceback
  (files / "victim.txt").write_text("precious")
  for change, message in (
    (lambda d: d["rounds"][-1].update(file="../victim.txt"), "its rounds are not a list"),
    (lambda d: d["rounds"][-1].pop("round"), "its rounds are not a list"),
    (lambda d: d.update(model=5), "model must be text"),
    (lambda d: d.update(new_classes="mitosis"), "new_classes must be a list"),
  ):
    crafted = json.loads(json.dumps(doc))
    change(crafted)
    (session / "session.json").write_text(json.dumps(crafted))
    assert main(["refine", "--session", str(session), "--undo", "--quiet"]) == 1
    assert message in capsys.readouterr().err
  assert (files / "victim.txt").read_text() == "precious"


def test_an_interrupted_round_leaves_the_session_as_it_was(tmp_path, model_dir, crop, capsys, monkeypatch):
  from scribblejax.io import session_store

  image = crop[0]
  tifffile.imwrite(tmp_path / "img.tif", image)
  for name, spot in (("m1", (10, 10)), ("m2", (40, 40)), ("m3", (70, 20))):
    marks = np.zeros((96, 96), np.uint8)
    marks[spot] = 1
    PILImage.fromarray(marks).save(tmp_path / f"{name}.png")
  session = tmp_path / "s"
  run = lambda marks, *extra: main(
    [
      "refine",
      "--model",
      str(model_dir),
      "--image",
      str(tmp_path / "img.tif"),
      "--marks",
      str(tmp_path / f"{marks}.png"),
      "--out",
      str(tmp_path / "o.tif"),
      "--session",
      str(session),
      "--steps",
      "2",
      "--quiet",
      *extra,
    ]
  )
  save = session_store.save_session

  def killed(*args, **kwargs):
    raise ValueError("simulated kill before session.json")

  monkeypatch.setattr(session_store, "save_session", killed)
  assert run("m1") == 1  # the first round dies before its session.json
  monkeypatch.setattr(session_store, "save_session", save)
  assert run("m1") == 0 and run("m2") == 0  # was: "not empty and holds no session.json", for good
  before = {p.name: p.read_bytes() for p in session.iterdir()}
  monkeypatch.setattr(session_store, "save_session", killed)
  assert run("m3", "--undo") == 1  # an undo-and-redo round dies before its session.json
  monkeypatch.setattr(session_store, "save_session", save)
  doc = json.loads((session / "session.json").read_text())
  last = doc["rounds"][-1]
  assert (session / last["file"]).read_bytes() == before[last["file"]]  # was: overwritten by the new round
  assert run("m3", "--undo") == 0
  capsys.readouterr()


@pytest.mark.slow
def test_predict_bad_input_and_a_real_exit_status(files, model_dir, capsys):
  assert main(["predict", "--model", str(model_dir), "--image", f"{files}/img.tif", "--out", f"{files}/img.tif"]) == 1
  assert "is the input" in capsys.readouterr().err
  assert main(["predict", "--model", "nowhere", "--image", f"{files}/img.tif", "--out", f"{files}/s.tif"]) == 1
  assert "no model at 'nowhere'" in capsys.readouterr().err
  proc = _cli(
    "refine",
    "--model",
    model_dir,
    "--image",
    files / "missing.tif",
    "--marks",
    files / "marks.png",
    "--out",
    files / "seg.tif",
  )
  assert proc.returncode == 1 and proc.stdout == ""
  errors = [line for line in proc.stderr.splitlines() if "error" in line]
  assert errors == [f"scribblejax refine: error: cannot read {files}/missing.tif: no such file or folder"]
  assert proc.stderr.splitlines()[-1] == errors[0]


# ----------------------------------------------------------------------------------------------
# info and help


def test_info_lists_classes_layers_and_input(model_dir, capsys):
  assert main(["info", str(model_dir), "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  model, _ = sj.load_model(model_dir)
  assert [layer["name"] for layer in info["layers"]] == ["/".join(map(str, p)) for p in sj.models.layer_order(model)]
  assert info["layers"][-1]["name"] == "head" and info["layers"][-1]["params"] == 8 * 2 + 2
  assert (
    sum(layer["params"] for layer in info["layers"])
    == info["total_params"]
    == sj.params.count_params(nnx.state(model, nnx.Param))
  )
  assert info["classes"] == ["background", "nucleus"]
  assert (
    info["input"]["spatial_dims"] == 2 and info["input"]["channels"] == 1 and info["input"]["normalization"] == NORM
  )
  assert main(["info", str(model_dir)]) == 0
  text = capsys.readouterr().out
  assert "classes: background, nucleus" in text and "decoder/0/1" in text
  assert "pipeline: the file's own spacing; the whole image at once" in text
  assert main(["info", "no_such_model"]) == 1
  assert "no model at 'no_such_model'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["predict", "refine", "info"])
def test_help(command, capsys):
  with pytest.raises(SystemExit) as exit_info:
    main([command, "--help"])
  assert exit_info.value.code == 0
  assert "exit status: 0 success" in capsys.readouterr().out


@pytest.mark.slow
def test_a_new_class_is_appended_learnt_from_its_marks_and_kept_by_the_session(
  tmp_path, model_dir, crop, capsys, monkeypatch
):
  # A structure the network was never trained for: --new-class appends an output class to the head
  # (label-map value 2 after background and nucleus); the first segmentation is still the network's own.
  from scribblejax.app import refine_round

  merged_with = []  # the classes each round's merge lets past the protection of the network's sure pixels
  round_labels = refine_round.round_labels
  monkeypatch.setattr(
    refine_round,
    "round_labels",
    lambda *a, **k: merged_with.append(k.get("new_classes")) or round_labels(*a, **k),
  )
  image, truth, network = crop
  tifffile.imwrite(tmp_path / "img.tif", image)
  inside = np.argwhere(network == 1)
  spot = tuple(inside[len(inside) // 2])
  marks = np.zeros((96, 96), np.uint8)
  marks[spot] = 2
  marks[np.argwhere(network == 0)[0][0], np.argwhere(network == 0)[0][1]] = 255
  PILImage.fromarray(marks).save(tmp_path / "marks.png")
  session = tmp_path / "session"
  base = [
    "refine",
    "--model",
    str(model_dir),
    "--image",
    str(tmp_path / "img.tif"),
    *KNOBS,
    "--session",
    str(session),
    "--radius",
    "1",
    "--json",
  ]
  code = main(
    [*base, "--marks", str(tmp_path / "marks.png"), "--out", str(tmp_path / "r1.tif"), "--new-class", "mitosis"]
  )
  out = capsys.readouterr()
  assert code == 0, out.err
  report = json.loads(out.out)
  assert report["new_classes"] == ["mitosis"] and report["classes"] == ["background", "nucleus", "mitosis"]
  assert report["satisfied"] and report["marks_honoured"] == 1.0 and report["marked_pixels"]["mitosis"] == 1
  labels = tifffile.imread(tmp_path / "r1.tif")
  assert labels[spot] == 2 and (labels == 2).sum() < labels.size // 4
  assert not (np.load(session / "initial.npz")["labels"] == 2).any()  # the network's own segmentation
  # the session keeps the class: a second round names it by value without the flag, from the same weights
  marks2 = np.zeros((96, 96), np.uint8)
  other = tuple(inside[len(inside) // 3])
  marks2[other] = 2
  PILImage.fromarray(marks2).save(tmp_path / "marks2.png")
  code = main([*base, "--marks", str(tmp_path / "marks2.png"), "--out", str(tmp_path / "r2.tif"), "--continue-weights"])
  out = capsys.readouterr()
  assert code == 0, out.err
  assert json.loads(out.out)["new_classes"] == ["mitosis"]
  labels = tifffile.imread(tmp_path / "r2.tif")
  assert labels[spot] == 2 and labels[other] == 2
  assert merged_with == [(2,), (2,)]  # the appended class, in both rounds
  # refused by name: another new class in this session, a class the model has, a value beyond the classes
  for extra, message in (
    (["--new-class", "cyst"], "was started with new classes \\['mitosis'\\]"),
    (["--classes", "bg,mitosis"], "--new-class 'mitosis' is already a class of the model \\(bg, mitosis\\)"),
  ):
    assert main([*base, "--marks", str(tmp_path / "marks2.png"), "--out", str(tmp_path / "r3.tif"), *extra]) == 1
    assert __import__("re").search(message, capsys.readouterr().err)
  single = [
    "refine",
    "--model",
    str(model_dir),
    "--image",
    str(tmp_path / "img.tif"),
    "--marks",
    str(tmp_path / "marks.png"),
    "--out",
    str(tmp_path / "r4.tif"),
    "--steps",
    "5",
    "--quiet",
  ]
  for name, message in (
    ("nucleus", "--new-class 'nucleus' is already a class of the model"),
    ("Nucleus", "already a class of the model (background, nucleus); marks files match class names ignoring case"),
    ("2", "--new-class '2' is a number, which marks files read as a class index"),
  ):
    assert main([*single, "--new-class", name]) == 1
    assert message in capsys.readouterr().err
  assert main(single) == 1  # value 2 without the new class
  assert "holds value 2, which is not a class (2 classes" in capsys.readouterr().err
  assert not (tmp_path / "r3.tif").exists() and not (tmp_path / "r4.tif").exists()
