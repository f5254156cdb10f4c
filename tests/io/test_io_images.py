"""Tests for scribblejax.io.images: every format read with its geometry, segmentations written back alike."""

import os

import nibabel as nib
import nrrd
import numpy as np
import pytest
import tifffile
from file_builders import write_dicom_series
from PIL import Image as PILImage

from scribblejax.io import image_digest, output_format, read_image, write_label_map
from scribblejax.research import data

# A non-trivial affine: axes permuted and flipped, anisotropic spacing, a small oblique tilt.
AFFINE = np.array([[0.0, -1.2, 0.1, 10.0], [1.1, 0.0, 0.0, -20.0], [0.0, 0.05, 2.5, 30.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def dsb():
  """A 64 x 48 crop of the DSB nuclei image (uint16) and its binary mask."""
  image, instances = data.nuclei_instances()
  return image[:64, 384:432], (instances[:64, 384:432] > 0).astype(np.int32)


def _nifti(path, array, affine=AFFINE):
  img = nib.Nifti1Image(array, affine)
  img.header.set_qform(affine, code=1)
  img.header.set_sform(affine, code=2)
  img.header["descrip"] = b"dsb crop"
  img.header.set_xyzt_units("mm", "sec")
  nib.save(img, str(path))
  return img


# ----------------------------------------------------------------------------------------------
# NIfTI


def test_nifti_2d_reads_as_ijk1_with_affine_and_writes_back_header(tmp_path, dsb):
  image, mask = dsb
  _nifti(tmp_path / "img.nii.gz", image)
  img = read_image(tmp_path / "img.nii.gz")
  assert img.family == "nifti" and img.array.shape == (64, 48, 1, 1) and img.array.dtype == np.uint16
  np.testing.assert_array_equal(img.array[:, :, 0, 0], image)
  np.testing.assert_allclose(img.geometry.affine, AFFINE, atol=1e-6)
  np.testing.assert_allclose(img.geometry.spacing, np.linalg.norm(AFFINE[:3, :3], axis=0), rtol=1e-6)
  assert img.geometry.origin == pytest.approx((10.0, -20.0, 30.0))

  write_label_map(tmp_path / "seg.nii.gz", mask[:, :, None], img.geometry)
  out = nib.load(str(tmp_path / "seg.nii.gz"))
  src = nib.load(str(tmp_path / "img.nii.gz"))
  assert out.shape == (64, 48)  # the file's own dimensionality is kept
  assert out.get_data_dtype() == np.uint8 and out.header.get_intent()[0] == "label"
  np.testing.assert_array_equal(np.asanyarray(out.dataobj), mask)
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
    "srow_x",
    "srow_y",
    "srow_z",
  ):
    np.testing.assert_array_equal(out.header[key], src.header[key], err_msg=key)
  np.testing.assert_allclose(out.affine, src.affine)


def test_nifti_4d_channels_go_last(tmp_path, dsb):
  image, _ = dsb
  vol = np.stack([image, image * 2], axis=-1)[:, :, None, :].astype(np.float32)  # [i, j, 1, 2]
  _nifti(tmp_path / "two.nii", vol)
  img = read_image(tmp_path / "two.nii")
  assert img.array.shape == (64, 48, 1, 2)
  np.testing.assert_array_equal(img.array[..., 1], 2 * img.array[..., 0])
  write_label_map(tmp_path / "seg.nii", np.ones((64, 48, 1), int), img.geometry)
  assert nib.load(str(tmp_path / "seg.nii")).shape == (64, 48, 1)


def test_nifti_scaling_is_applied(tmp_path, dsb):
  image, _ = dsb
  img = nib.Nifti1Image(image.astype(np.int16)[:, :, None], AFFINE)
  img.header.set_slope_inter(0.5, -3.0)
  nib.save(img, str(tmp_path / "scaled.nii.gz"))
  arr = read_image(tmp_path / "scaled.nii.gz").array[:, :, 0, 0]
  np.testing.assert_allclose(arr, image * 0.5 - 3.0)


# ----------------------------------------------------------------------------------------------
# NRRD


def _lps_header(directions, origin):
  return {
    "space": "left-posterior-superior",
    "space directions": np.asarray(directions, float),
    "space origin": np.asarray(origin, float),
    "kinds": ["domain"] * len(directions),
    "encoding": "gzip",
    "content": "dsb",
  }


def test_nrrd_lps_converted_to_ras_and_written_back(tmp_path, dsb):
  image, mask = dsb
  vol = np.stack([image] * 3, axis=-1)  # [i, j, k]
  directions = [[0.0, 0.8, 0.0], [-0.7, 0.0, 0.0], [0.0, 0.0, 1.5]]
  nrrd.write(str(tmp_path / "img.nrrd"), vol, _lps_header(directions, [5, 6, 7]), index_order="F")
  img = read_image(tmp_path / "img.nrrd")
  assert img.family == "nrrd" and img.array.shape == (64, 48, 3, 1)
  np.testing.assert_array_equal(img.array[..., 0], vol)
  lps_to_ras = np.diag([-1.0, -1.0, 1.0])
  np.testing.assert_allclose(img.geometry.affine[:3, :3], lps_to_ras @ np.array(directions).T)
  np.testing.assert_allclose(img.geometry.affine[:3, 3], [-5, -6, 7])

  labels = np.stack([mask, 1 - mask, mask], axis=-1)
  write_label_map(tmp_path / "seg.nrrd", labels, img.geometry)
  back, header = nrrd.read(str(tmp_path / "seg.nrrd"), index_order="F")
  np.testing.assert_array_equal(back, labels)
  assert header["space"] == "left-posterior-superior" and header["content"] == "dsb" and header["type"] == "uint8"
  np.testing.assert_allclose(header["space directions"], directions)
  np.testing.assert_allclose(header["space origin"], [5, 6, 7])


def test_nrrd_vector_axis_becomes_channels_and_2d_gets_a_k_axis(tmp_path, dsb):
  image, _ = dsb
  vec = np.stack([image, image + 1], axis=0)  # [2, i, j]: a 2-vector per pixel
  header = {
    "space": "right-anterior-superior",
    "kinds": ["vector", "domain", "domain"],
    "space directions": np.array([[np.nan] * 3, [0.5, 0, 0], [0, 0.5, 0]]),
    "space origin": np.zeros(3),
  }
  nrrd.write(str(tmp_path / "vec.nrrd"), vec, header, index_order="F")
  img = read_image(tmp_path / "vec.nrrd")
  assert img.array.shape == (64, 48, 1, 2)
  np.testing.assert_array_equal(img.array[:, :, 0, 1], image + 1)
  write_label_map(tmp_path / "seg.nrrd", np.zeros((64, 48, 1), int), img.geometry)
  back, h = nrrd.read(str(tmp_path / "seg.nrrd"), index_order="F")
  assert back.shape == (64, 48) and h["space"] == "right-anterior-superior"


def test_nifti_and_nrrd_convert_into_each_other_keeping_world_geometry(tmp_path, dsb):
  image, mask = dsb
  _nifti(tmp_path / "img.nii.gz", np.stack([image] * 2, -1))
  img = read_image(tmp_path / "img.nii.gz")
  write_label_map(tmp_path / "seg.nrrd", np.stack([mask] * 2, -1), img.geometry)
  back = read_image(tmp_path / "seg.nrrd")
  np.testing.assert_allclose(back.geometry.affine, img.geometry.affine, atol=1e-6)
  np.testing.assert_array_equal(back.array[..., 0], np.stack([mask] * 2, -1))


# ----------------------------------------------------------------------------------------------
# DICOM


@pytest.fixture()
def dicom_series(tmp_path, dsb):
  image, _ = dsb
  volume = np.stack([image[:40, :30].T + 10 * k for k in range(4)], axis=2).astype(np.int16)  # [30, 40, 4]
  affine = write_dicom_series(tmp_path / "series", volume, orientation=(0, 1, 0, 0, 0, -1), slice_step=(-2.0, 0.0, 0.0))
  return tmp_path / "series", volume, affine


def test_dicom_series_sorted_by_position_rescaled_with_affine(dicom_series):
  folder, volume, affine = dicom_series
  (folder / "notes.txt").write_text("not dicom")  # ignored
  img = read_image(folder)
  assert img.family == "dicom" and img.array.shape == (30, 40, 4, 1)
  np.testing.assert_array_equal(img.array[..., 0], volume.astype(np.int32) - 1024)
  np.testing.assert_allclose(img.geometry.affine, affine, atol=1e-6)
  assert img.geometry.describe().endswith("orientation PIR")
  one = read_image(sorted(folder.glob("*.dcm"))[0])
  assert one.array.shape == (30, 40, 1, 1)


def test_dicom_written_as_nifti_or_nrrd_in_the_same_world(tmp_path, dicom_series):
  folder, volume, affine = dicom_series
  img = read_image(folder)
  labels = (volume > volume.mean()).astype(np.int32)
  for name in ("seg.nii.gz", "seg.nrrd"):
    write_label_map(tmp_path / name, labels, img.geometry)
    back = read_image(tmp_path / name)
    np.testing.assert_allclose(back.geometry.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(back.array[..., 0], labels)
  with pytest.raises(ValueError, match="dicom image"):
    output_format(tmp_path / "seg.dcm", img.geometry)


def test_dicom_folder_with_two_series_is_refused(tmp_path, dicom_series):
  folder, volume, _ = dicom_series
  write_dicom_series(folder, volume[:, :, :2], shuffle=False)
  with pytest.raises(ValueError, match="2 DICOM series"):
    read_image(folder)


# ----------------------------------------------------------------------------------------------
# TIFF, PNG, JPEG


def test_tiff_2d_3d_and_rgb_keep_spacing(tmp_path, dsb):
  image, mask = dsb
  tifffile.imwrite(tmp_path / "a.tif", image, resolution=(4.0, 2.0), resolutionunit="CENTIMETER")
  img = read_image(tmp_path / "a.tif")
  assert img.array.shape == (64, 48, 1) and img.geometry.axes == "yx"
  assert img.geometry.spacing == pytest.approx((0.5, 0.25))
  write_label_map(tmp_path / "a_seg.tif", mask, img.geometry)
  back = read_image(tmp_path / "a_seg.tif")
  np.testing.assert_array_equal(back.array[..., 0], mask)
  assert back.geometry.spacing == pytest.approx((0.5, 0.25))

  stack = np.stack([image, image, image // 2])
  tifffile.imwrite(
    tmp_path / "z.tif",
    stack,
    imagej=True,
    resolution=(2.0, 2.0),
    metadata={"spacing": 3.0, "unit": "um", "axes": "ZYX"},
  )
  vol = read_image(tmp_path / "z.tif")
  assert vol.array.shape == (3, 64, 48, 1) and vol.geometry.axes == "zyx"
  assert vol.geometry.spacing == pytest.approx((3.0, 0.5, 0.5))
  write_label_map(tmp_path / "z_seg.tif", np.stack([mask] * 3), vol.geometry)
  back = read_image(tmp_path / "z_seg.tif")
  assert back.geometry.spacing == pytest.approx((3.0, 0.5, 0.5)) and back.geometry.header["unit"] == "um"
  with pytest.raises(ValueError, match="3-D segmentation"):
    write_label_map(tmp_path / "z_seg.png", np.stack([mask] * 3), vol.geometry)

  rgb = np.stack([image, image // 2, image // 3], axis=-1).astype(np.uint8)
  tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
  assert read_image(tmp_path / "rgb.tif").array.shape == (64, 48, 3)


def test_png_and_jpeg(tmp_path, dsb):
  image, mask = dsb
  grey = (image * (255.0 / image.max())).astype(np.uint8)
  PILImage.fromarray(grey).save(tmp_path / "g.png")
  PILImage.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "c.jpg", quality=95)
  png = read_image(tmp_path / "g.png")
  assert png.array.shape == (64, 48, 1) and png.array.dtype == np.uint8
  np.testing.assert_array_equal(png.array[..., 0], grey)
  jpg = read_image(tmp_path / "c.jpg")
  assert jpg.family == "jpeg" and jpg.array.shape == (64, 48, 3)
  # labels as a palette PNG: indices preserved and read back exactly
  labels = mask * 2
  write_label_map(tmp_path / "seg.png", labels, png.geometry)
  assert PILImage.open(tmp_path / "seg.png").mode == "P"
  np.testing.assert_array_equal(read_image(tmp_path / "seg.png", labels=True).array[..., 0], labels)
  write_label_map(tmp_path / "jseg.png", labels, jpg.geometry)  # JPEG input -> PNG output
  with pytest.raises(ValueError, match="lossy"):
    write_label_map(tmp_path / "jseg.jpg", labels, jpg.geometry)


def test_ome_tiff_physical_sizes_are_its_spacing_and_written_back(tmp_path):
  volume = np.arange(5 * 6 * 8, dtype=np.uint16).reshape(5, 6, 8)
  tifffile.imwrite(
    tmp_path / "v.ome.tif",
    volume,
    ome=True,
    metadata={"axes": "ZYX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.5, "PhysicalSizeZ": 2.0},
  )
  image = read_image(tmp_path / "v.ome.tif")
  np.testing.assert_array_equal(image.array[..., 0], volume)
  assert image.geometry.spacing == (2.0, 0.5, 0.25)
  write_label_map(tmp_path / "seg.tif", (volume % 3).astype(np.uint8), image.geometry)
  back = read_image(tmp_path / "seg.tif")
  assert back.geometry.spacing == (2.0, 0.5, 0.25) and back.geometry.header["unit"] == "micron"
  tifffile.imwrite(tmp_path / "p.ome.tif", volume[0], ome=True, metadata={"axes": "YX", "PhysicalSizeX": 0.3})
  assert read_image(tmp_path / "p.ome.tif").geometry.spacing == (1.0, 0.3)  # Y unstated: 1


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_is_applied_as_viewers_show_the_image(tmp_path, orientation):
  from PIL import ImageOps

  from scribblejax.io.images import exif_note

  raw = np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) % 251
  exif = PILImage.Exif()
  exif[0x0112] = orientation
  PILImage.fromarray(raw.astype(np.uint8)).save(tmp_path / "photo.png", exif=exif.tobytes())
  with PILImage.open(tmp_path / "photo.png") as im:
    shown = np.array(ImageOps.exif_transpose(im))
  assert not np.array_equal(shown, raw)
  image = read_image(tmp_path / "photo.png")
  np.testing.assert_array_equal(image.array[..., 0], shown)
  assert image.geometry.shape == shown.shape and "EXIF orientation" in exif_note(image.geometry)
  write_label_map(tmp_path / "seg.png", (shown > 100).astype(np.uint8), image.geometry)  # as shown, no tag
  np.testing.assert_array_equal(read_image(tmp_path / "seg.png", labels=True).array[..., 0], shown > 100)
  PILImage.fromarray(raw.astype(np.uint8)).save(tmp_path / "plain.png")
  assert exif_note(read_image(tmp_path / "plain.png").geometry) is None


# ----------------------------------------------------------------------------------------------
# Errors and helpers


def test_missing_unreadable_and_unsupported_files_name_the_path(tmp_path):
  with pytest.raises(ValueError, match=r"cannot read .*nope\.nii\.gz: no such file"):
    read_image(tmp_path / "nope.nii.gz")
  (tmp_path / "bad.nii.gz").write_bytes(b"this is not a nifti file")
  with pytest.raises(ValueError, match=r"cannot read .*bad\.nii\.gz as NIfTI"):
    read_image(tmp_path / "bad.nii.gz")
  (tmp_path / "bad.tif").write_bytes(b"garbage")
  with pytest.raises(ValueError, match=r"bad\.tif"):
    read_image(tmp_path / "bad.tif")
  (tmp_path / "x.xyz").write_bytes(b"?")
  with pytest.raises(ValueError, match="unsupported image format '.xyz'"):
    read_image(tmp_path / "x.xyz")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no DICOM image"):
    read_image(tmp_path / "empty")


def test_write_label_map_checks_and_is_atomic(tmp_path, dsb):
  image, mask = dsb
  tifffile.imwrite(tmp_path / "a.tif", image)
  geometry = read_image(tmp_path / "a.tif").geometry
  with pytest.raises(ValueError, match="shape"):
    write_label_map(tmp_path / "s.tif", mask[:10], geometry)
  with pytest.raises(ValueError, match="integers"):
    write_label_map(tmp_path / "s.tif", mask.astype(float), geometry)
  with pytest.raises(ValueError, match=r"use a file ending in \.tif, \.tiff, \.png"):
    write_label_map(tmp_path / "s.nii.gz", mask, geometry)
  write_label_map(tmp_path / "s.tif", mask, geometry)
  assert sorted(os.listdir(tmp_path)) == ["a.tif", "s.tif"]  # no temporary file left behind


def test_atomic_writes_reach_the_disk_before_and_after_the_rename(tmp_path, monkeypatch):
  # The data are flushed before the rename, the folder's entry after it: a crash leaves the old file
  # or the new one, never an empty new one.
  from scribblejax.io import fileio

  events = []
  real_fsync, real_replace = os.fsync, os.replace
  monkeypatch.setattr(
    os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1]
  )
  monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
  (tmp_path / "r.json").write_text("old")
  fileio.write_json(tmp_path / "r.json", {"a": 1})
  assert [e[0] for e in events] == ["fsync", "replace", "fsync"], events
  assert events[0][1].startswith(str(tmp_path / ".r.json.")) and events[2][1] == str(tmp_path)
  assert (tmp_path / "r.json").read_text() == '{\n  "a": 1\n}\n'


def test_image_digest_follows_values_not_names(tmp_path, dsb):
  image, _ = dsb
  tifffile.imwrite(tmp_path / "a.tif", image)
  tifffile.imwrite(tmp_path / "b.tif", image)
  tifffile.imwrite(tmp_path / "c.tif", image + 1)
  a, b, c = (image_digest(read_image(tmp_path / n)) for n in ("a.tif", "b.tif", "c.tif"))
  assert a == b != c


def test_complex_images_nhdr_outputs_and_dicom_without_rows_are_refused(tmp_path, dicom_series):
  tifffile.imwrite(tmp_path / "c.tif", (np.ones((8, 8)) + 1j).astype(np.complex64))
  with pytest.raises(ValueError, match=r"c\.tif holds complex64 values"):
    read_image(tmp_path / "c.tif")  # was: the imaginary part dropped silently
  _nifti(tmp_path / "c.nii.gz", (np.ones((8, 8, 1)) + 1j).astype(np.complex64))
  with pytest.raises(ValueError, match="complex64"):
    read_image(tmp_path / "c.nii.gz")
  geometry = read_image(sorted(dicom_series[0].glob("*.dcm"))[0]).geometry
  with pytest.raises(ValueError, match=r"\.nhdr header keeps its data in a second file"):
    output_format(tmp_path / "seg.nhdr", geometry)  # was: data in a hidden temporary file
  import pydicom

  path = sorted(dicom_series[0].glob("*.dcm"))[0]
  ds = pydicom.dcmread(path)
  del ds.Rows
  ds.save_as(tmp_path / "norows.dcm")
  with pytest.raises(ValueError, match=r"norows\.dcm: it has pixel data but no Rows"):
    read_image(tmp_path / "norows.dcm")  # was: AttributeError
