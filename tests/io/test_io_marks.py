"""Tests for scribblejax.io.marks_files: label maps, LabelMe JSON and 3D Slicer segmentations as mark maps."""

import base64
import io

import nibabel as nib
import numpy as np
import pytest
import tifffile
from file_builders import write_dicom_series, write_labelme, write_slicer_segmentation
from PIL import Image as PILImage

from scribblejax.io import read_image, read_labelme, read_marks, read_marks_file
from scribblejax.io.overlay import marked_slices, save_overlay

AFFINE = np.array([[0.0, -1.2, 0.0, 10.0], [1.1, 0.0, 0.0, -20.0], [0.0, 0.0, 2.5, 30.0], [0, 0, 0, 1]])
NAMES = ("background", "nucleus", "border")


@pytest.fixture()
def png(tmp_path):
  """A 20 x 30 grey PNG image (rows x columns)."""
  PILImage.fromarray(np.arange(600, dtype=np.uint8).reshape(20, 30)).save(tmp_path / "img.png")
  return read_image(tmp_path / "img.png").geometry


@pytest.fixture()
def nifti(tmp_path):
  """A 12 x 10 x 4 NIfTI volume with a permuted, anisotropic affine."""
  nib.save(nib.Nifti1Image(np.zeros((12, 10, 4), np.float32), AFFINE), str(tmp_path / "img.nii.gz"))
  return read_image(tmp_path / "img.nii.gz").geometry


def _pixels(marks, label):
  return {tuple(int(v) for v in p) for p in np.argwhere(marks == label)}


# ----------------------------------------------------------------------------------------------
# Label maps


def test_label_map_default_and_custom_values(tmp_path, png):
  values = np.zeros((20, 30), np.uint8)
  values[1, 2], values[3, 4], values[5, 6] = 1, 2, 255
  PILImage.fromarray(values).save(tmp_path / "m.png")
  marks = read_marks_file(tmp_path / "m.png", png, num_classes=3)
  assert _pixels(marks, 1) == {(1, 2)} and _pixels(marks, 2) == {(3, 4)} and _pixels(marks, 0) == {(5, 6)}
  assert (marks == -1).sum() == 600 - 3

  signed = np.full((20, 30), -1, np.int16)
  signed[7, 8], signed[9, 10] = 0, 2
  tifffile.imwrite(tmp_path / "m.tif", signed)
  marks = read_marks_file(tmp_path / "m.tif", png, num_classes=3, background_value=0, unmarked_value=-1)
  assert _pixels(marks, 0) == {(7, 8)} and _pixels(marks, 2) == {(9, 10)} and (marks >= 0).sum() == 2


def test_label_map_value_that_is_no_class_is_named(tmp_path, png):
  values = np.zeros((20, 30), np.uint8)
  values[0, 0] = 7
  PILImage.fromarray(values).save(tmp_path / "m.png")
  with pytest.raises(ValueError, match=r"m\.png holds value 7, which is not a class \(3 classes"):
    read_marks_file(tmp_path / "m.png", png, num_classes=3)
  PILImage.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "rgb.png")
  with pytest.raises(ValueError, match="3 channels"):
    read_marks_file(tmp_path / "rgb.png", png, num_classes=3)
  PILImage.fromarray(np.zeros((21, 30), np.uint8)).save(tmp_path / "big.png")
  with pytest.raises(ValueError, match=r"big\.png has shape \(21, 30\), but the image has shape \(20, 30\)"):
    read_marks_file(tmp_path / "big.png", png, num_classes=3)


def test_nifti_marks_flipped_permuted_or_shifted_land_on_the_same_voxels(tmp_path, nifti):
  values = np.zeros((12, 10, 4), np.float32)  # float label maps are common in NIfTI
  values[1, 2, 3], values[11, 0, 0] = 1, 255
  # The same marks stored with axes swapped and the first axis flipped, in a matching affine.
  stored = np.flip(np.transpose(values, (1, 0, 2)), axis=1)
  to_file = np.array([[0, -1, 0, 11], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])  # file index -> image index
  nib.save(nib.Nifti1Image(stored, AFFINE @ to_file), str(tmp_path / "m.nii.gz"))
  marks = read_marks_file(tmp_path / "m.nii.gz", nifti, num_classes=2)
  assert _pixels(marks, 1) == {(1, 2, 3)} and _pixels(marks, 0) == {(11, 0, 0)}

  # A crop whose origin lies two voxels into the image (whole-voxel shift).
  shift = np.eye(4)
  shift[:3, 3] = (2, 0, 1)
  crop = np.zeros((3, 3, 2), np.uint8)
  crop[0, 0, 0] = 1
  nib.save(nib.Nifti1Image(crop, AFFINE @ shift), str(tmp_path / "crop.nii.gz"))
  assert _pixels(read_marks_file(tmp_path / "crop.nii.gz", nifti, num_classes=2), 1) == {(2, 0, 1)}


def test_nifti_marks_on_another_grid_state_both_geometries(tmp_path, nifti):
  half = np.eye(4)
  half[0, 3] = 0.5
  nib.save(nib.Nifti1Image(np.ones((12, 10, 4), np.uint8), AFFINE @ half), str(tmp_path / "half.nii.gz"))
  with pytest.raises(
    ValueError,
    match=r"does not lie on the image's voxel grid: marks have shape \(12, 10, 4\).*"
    r"origin.*the image has shape \(12, 10, 4\)",
  ):
    read_marks_file(tmp_path / "half.nii.gz", nifti, num_classes=2)
  coarse = AFFINE.copy()
  coarse[:3, :3] *= 2
  nib.save(nib.Nifti1Image(np.ones((6, 5, 2), np.uint8), coarse), str(tmp_path / "coarse.nii.gz"))
  with pytest.raises(ValueError, match="spacing"):
    read_marks_file(tmp_path / "coarse.nii.gz", nifti, num_classes=2)
  big = np.zeros((14, 10, 4), np.uint8)
  big[13, 0, 0] = 1
  nib.save(nib.Nifti1Image(big, AFFINE), str(tmp_path / "big.nii.gz"))
  with pytest.raises(ValueError, match="1 of its 1 marked pixels fall outside the image"):
    read_marks_file(tmp_path / "big.nii.gz", nifti, num_classes=2)


def test_medical_label_map_for_a_raster_image_is_transposed(tmp_path, png):
  values = np.zeros((30, 20), np.uint8)  # (x, y), as ITK-based tools store a 20 x 30 image
  values[29, 0] = 1
  nib.save(nib.Nifti1Image(values, np.eye(4)), str(tmp_path / "m.nii.gz"))
  assert _pixels(read_marks_file(tmp_path / "m.nii.gz", png, num_classes=2), 1) == {(0, 29)}


# ----------------------------------------------------------------------------------------------
# LabelMe


def test_labelme_every_shape_kind(tmp_path, png):
  shapes = [
    {"label": "nucleus", "points": [[2.5, 3.5]], "shape_type": "point"},  # pixel (3, 2)
    {"label": "border", "points": [[0.2, 19.9], [29.9, 19.9]], "shape_type": "line"},  # row 19
    {"label": "background", "points": [[10.5, 10.5], [12.5, 10.5]], "shape_type": "circle"},
    {"label": "nucleus", "points": [[20, 2], [24, 2], [24, 6], [20, 6]], "shape_type": "polygon"},
    {"label": "background", "points": [[25, 12], [28, 15]], "shape_type": "rectangle"},
  ]
  write_labelme(tmp_path / "m.json", shapes, 20, 30)
  marks = read_labelme(tmp_path / "m.json", png, num_classes=3, class_names=NAMES, radius=0)
  assert (3, 2) in _pixels(marks, 1)
  assert _pixels(marks, 2) == {(19, c) for c in range(30)}
  circle = {(r, c) for r in range(20) for c in range(30) if (r - 10) ** 2 + (c - 10) ** 2 <= 4}
  polygon = {(r, c) for r in range(2, 6) for c in range(20, 24)}  # pixel centres inside [20, 24) x [2, 6)
  rectangle = {(r, c) for r in range(12, 15) for c in range(25, 28)}  # class 0 rectangles are filled
  assert _pixels(marks, 0) == circle | rectangle
  assert _pixels(marks, 1) == {(3, 2)} | polygon


def test_labelme_rectangle_box_or_fill_points_and_mask(tmp_path, png):
  shapes = [{"label": "nucleus", "points": [[9, 4], [19, 14]], "shape_type": "rectangle"}]
  write_labelme(tmp_path / "box.json", shapes, 20, 30)
  box = read_labelme(tmp_path / "box.json", png, num_classes=3, class_names=NAMES)
  assert _pixels(box, 1) == {(r, c) for r in range(6, 11) for c in range(11, 16)}  # core: half of 10 x 10
  assert (3, 12) in _pixels(box, 0) and (4, 12) not in _pixels(box, 0)  # ring just outside
  fill = read_labelme(tmp_path / "box.json", png, num_classes=3, class_names=NAMES, rectangle="fill")
  assert _pixels(fill, 1) == {(r, c) for r in range(4, 14) for c in range(9, 19)} and (fill == 0).sum() == 0

  buffer = io.BytesIO()
  PILImage.fromarray(np.array([[1, 0], [1, 1]], np.uint8) * 255).save(buffer, format="PNG")
  shapes = [
    {"label": "1", "points": [[1.5, 1.5], [4.5, 4.5]], "shape_type": "points"},
    {
      "label": "2",
      "points": [[5, 6], [6, 7]],
      "shape_type": "mask",
      "mask": base64.b64encode(buffer.getvalue()).decode(),
    },
  ]
  write_labelme(tmp_path / "pm.json", shapes, 20, 30)
  marks = read_labelme(tmp_path / "pm.json", png, num_classes=3, radius=0)  # no names: indices
  assert _pixels(marks, 1) == {(1, 1), (4, 4)} and _pixels(marks, 2) == {(6, 5), (7, 5), (7, 6)}


def test_labelme_errors_name_the_problem(tmp_path, png, nifti):
  write_labelme(tmp_path / "m.json", [{"label": "tumour", "points": [[1, 1]], "shape_type": "point"}], 20, 30)
  with pytest.raises(
    ValueError,
    match=r"shapes\[0\]: label 'tumour' is not a class \(classes: background, "
    r"nucleus, border\)",
  ):
    read_labelme(tmp_path / "m.json", png, num_classes=3, class_names=NAMES)
  write_labelme(tmp_path / "m.json", [{"label": "Nucleus", "points": [[1, 1]], "shape_type": "point"}], 20, 30)
  assert _pixels(read_labelme(tmp_path / "m.json", png, num_classes=3, class_names=NAMES, radius=0), 1) == {(1, 1)}
  write_labelme(tmp_path / "m.json", [{"label": "nucleus", "points": [[1, 1]], "shape_type": "point"}], 20, 30)
  with pytest.raises(ValueError, match="no class names are known; pass --classes"):
    read_labelme(tmp_path / "m.json", png, num_classes=3)
  write_labelme(tmp_path / "m.json", [{"label": "1", "points": [[1, 1]], "shape_type": "point"}], 25, 30)
  with pytest.raises(ValueError, match=r"drawn on an image of 25 x 30 pixels .* but the image is 20 x 30"):
    read_labelme(tmp_path / "m.json", png, num_classes=3)
  write_labelme(tmp_path / "m.json", [{"label": "1", "points": [[1, 1], [2, 2]], "shape_type": "cuboid"}], 20, 30)
  with pytest.raises(ValueError, match="shape_type 'cuboid' is not supported"):
    read_labelme(tmp_path / "m.json", png, num_classes=3)
  with pytest.raises(ValueError, match="are 2-D, but the image has spatial shape"):
    read_labelme(tmp_path / "m.json", nifti, num_classes=3)
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"cannot read .*bad\.json as LabelMe JSON"):
    read_labelme(tmp_path / "bad.json", png, num_classes=3)
  # a shape that marks nothing is named as the file names it: its index among the shapes, x/y points
  write_labelme(
    tmp_path / "m.json",
    [
      {"label": "1", "points": [[3, 3], [5, 5]], "shape_type": "points"},
      {"label": "1", "points": [[10.1, 10.1], [20.9, 10.2], [20.9, 10.3]], "shape_type": "polygon"},
    ],
    20,
    30,
  )
  with pytest.raises(
    ValueError,
    match=r"shapes\[1\] \(a polygon labelled '1', points \[x, y\] \[\[10.1, 10.1\], "
    r".*marks no pixel of the 20 x 30 image \(no pixel centre lies inside it\)",
  ):
    read_labelme(tmp_path / "m.json", png, num_classes=3)
  buffer = io.BytesIO()
  PILImage.fromarray(np.full((4, 4), 255, np.uint8)).save(buffer, format="PNG")
  for corner in ([5, 25], [35, 5]):  # a mask starting below or right of the image
    write_labelme(
      tmp_path / "m.json",
      [
        {
          "label": "1",
          "points": [corner, [corner[0] + 3, corner[1] + 3]],
          "shape_type": "mask",
          "mask": base64.b64encode(buffer.getvalue()).decode(),
        }
      ],
      20,
      30,
    )
    with pytest.raises(ValueError, match=r"shapes\[0\]: its mask \(4 x 4 pixels from .*\) marks no pixel"):
      read_labelme(tmp_path / "m.json", png, num_classes=3)
  # a line to a far-off point is drawn where it crosses the image (no memory blow-up)
  write_labelme(tmp_path / "m.json", [{"label": "1", "points": [[0.5, 5.5], [1e9, 5.5]], "shape_type": "line"}], 20, 30)
  assert _pixels(read_labelme(tmp_path / "m.json", png, num_classes=3, radius=0), 1) == {(5, c) for c in range(30)}


# ----------------------------------------------------------------------------------------------
# 3D Slicer


@pytest.fixture()
def dicom(tmp_path):
  volume = np.arange(8 * 6 * 5, dtype=np.int16).reshape(8, 6, 5)
  write_dicom_series(tmp_path / "ct", volume, orientation=(1, 0, 0, 0, 1, 0), slice_step=(0, 0, 2.0))
  return read_image(tmp_path / "ct").geometry


def _segmentation(path, geometry, offset):
  """Two layers cropped to a 3 x 3 x 2 extent at ``offset``: 'nucleus' (1) and 'Segment_2' (2) on layer 0,
  'background' (1) on layer 1."""
  layers = np.zeros((2, 3, 3, 2), np.uint8)
  layers[0, 0, 0, 0] = 1
  layers[0, 1, 1, 1] = 2
  layers[1, 2, 2, 1] = 1
  affine = geometry.affine.copy()
  affine[:3, 3] = (geometry.affine @ np.r_[offset, 1])[:3]
  segments = [
    dict(name="nucleus", label_value=1, layer=0),
    dict(name="Segment_2", label_value=2, layer=0),
    dict(name="Background", label_value=1, layer=1),
  ]
  write_slicer_segmentation(path, layers, segments, affine_ras=affine, extent_offset=offset)


def test_slicer_segmentation_lands_at_its_extent_offset(tmp_path, dicom):
  offset = np.array([4, 2, 1])
  _segmentation(tmp_path / "m.seg.nrrd", dicom, offset)
  marks = read_marks([tmp_path / "m.seg.nrrd"], dicom, num_classes=3, class_names=NAMES)
  assert _pixels(marks, 1) == {tuple(offset)}  # by name
  assert _pixels(marks, 2) == {tuple(offset + (1, 1, 1))}  # 'Segment_2': by label value
  assert _pixels(marks, 0) == {tuple(offset + (2, 2, 1))}  # 'Background' by name, any case
  assert (marks >= 0).sum() == 3


def test_slicer_segmentation_without_world_frame_uses_the_header_offset(tmp_path, dicom):
  tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, 6, 8), np.uint8))  # (z, y, x) of the same grid
  raster = read_image(tmp_path / "stack.tif").geometry
  _segmentation(tmp_path / "m.seg.nrrd", dicom, np.array([4, 2, 1]))
  marks = read_marks_file(tmp_path / "m.seg.nrrd", raster, num_classes=3, class_names=NAMES)
  assert _pixels(marks, 1) == {(1, 2, 4)} and _pixels(marks, 2) == {(2, 3, 5)}


def test_slicer_segment_that_is_no_class_and_non_segmentations(tmp_path, dicom):
  _segmentation(tmp_path / "m.seg.nrrd", dicom, np.array([0, 0, 0]))
  with pytest.raises(ValueError, match=r"segment 'Segment_2' \(label value 2\) is not a class"):
    read_marks_file(tmp_path / "m.seg.nrrd", dicom, num_classes=2, class_names=NAMES[:2])
  import nrrd

  nrrd.write(str(tmp_path / "plain.seg.nrrd"), np.zeros((8, 6, 5), np.uint8))
  with pytest.raises(ValueError, match="not a 3D Slicer segmentation"):
    read_marks_file(tmp_path / "plain.seg.nrrd", dicom, num_classes=3)


# ----------------------------------------------------------------------------------------------
# Several files; overlays


def test_files_accumulate_later_overrides(tmp_path, png):
  write_labelme(tmp_path / "a.json", [{"label": "1", "points": [[2, 2], [8, 2]], "shape_type": "line"}], 20, 30)
  values = np.zeros((20, 30), np.uint8)
  values[2, 5] = 255  # overrides the line's pixel (2, 5)
  PILImage.fromarray(values).save(tmp_path / "b.png")
  marks = read_marks([tmp_path / "a.json", tmp_path / "b.png"], png, num_classes=3, radius=0)
  assert _pixels(marks, 0) == {(2, 5)} and _pixels(marks, 1) == {(2, c) for c in range(2, 9)} - {(2, 5)}


def test_3d_overlay_shows_the_marked_slices(tmp_path, dicom):
  marks = np.full(dicom.shape, -1)
  marks[1, 1, 3] = 1
  marks[2:4, 1, 1] = 0
  assert marked_slices(marks, 2, 5, max_slices=4) == [1, 3]
  assert marked_slices(None, 2, 5, max_slices=4) == [2]
  image = np.random.default_rng(0).normal(size=dicom.shape + (1,))
  labels = (image[..., 0] > 0).astype(int)
  save_overlay(tmp_path / "o.png", image, dicom, labels, 1 - labels, marks)
  with PILImage.open(tmp_path / "o.png") as im:
    width, height = im.size
  assert height > width  # two slices: two rows of two panels


def test_overlay_of_a_flat_volume_many_classes_and_bad_maps(tmp_path, dicom):
  from scribblejax.io.images import Geometry
  from scribblejax.io.overlay import _palette

  flat = Geometry("nifti", (1, 24, 30), "ijk", (1.0, 1.0, 1.0), np.eye(4), None)
  rng = np.random.default_rng(1)
  image = rng.normal(size=(1, 24, 30, 1))
  labels = rng.integers(0, 23, size=(1, 24, 30))  # 23 classes: more than tab20 holds
  marks = np.full((1, 24, 30), -1)
  marks[0, 3, 3] = 22
  save_overlay(tmp_path / "flat.png", image, flat, labels, labels, marks)
  with PILImage.open(tmp_path / "flat.png") as im:
    width, height = im.size
  assert height > 100 and width > 2 * 100  # was: a 1 x 24 strip per panel (axis 2 squeezed)
  assert len({tuple(c) for c in _palette(23).colors}) >= 23  # every class its own colour
  with pytest.raises(ValueError, match="max_slices"):
    save_overlay(tmp_path / "x.png", image, flat, labels, max_slices=0)
  with pytest.raises(ValueError, match=r"before map has shape \(24, 30\)"):
    save_overlay(tmp_path / "x.png", image, flat, labels[0])
