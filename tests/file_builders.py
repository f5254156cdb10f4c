"""Builders of real files for tests: a DICOM series, a 3D Slicer segmentation, a LabelMe file, a small model.

The files follow the formats' own conventions (DICOM patient LPS coordinates, Slicer's header keys,
LabelMe's ``(x, y)`` points), so that the readers are tested against what the tools write.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def write_dicom_series(
  folder: str | os.PathLike,
  volume: np.ndarray,
  *,
  pixel_spacing=(0.8, 0.7),
  slice_step: Sequence[float] = (0.0, 0.0, 2.0),
  origin: Sequence[float] = (-40.0, -30.0, 10.0),
  orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
  rescale=(1.0, -1024.0),
  shuffle: bool = True,
) -> np.ndarray:
  """Writes ``volume`` (``int[cols, rows, slices]``, stored values) as a CT series, one file per slice.

  Args:
    folder: created if missing.
    volume: stored pixel values, axes (column, row, slice).
    pixel_spacing: DICOM PixelSpacing (between rows, between columns), mm.
    slice_step: LPS offset from one slice to the next, mm.
    origin: LPS ImagePositionPatient of the first slice.
    orientation: ImageOrientationPatient (row direction, column direction).
    rescale: (RescaleSlope, RescaleIntercept).
    shuffle: write the slices under names in a scrambled order (readers must sort by position).

  Returns:
    The expected RAS+ affine of the volume's (column, row, slice) index.
  """
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  cols, rows, slices = volume.shape
  series, study = generate_uid(), generate_uid()
  names = np.random.default_rng(0).permutation(slices) if shuffle else np.arange(slices)
  iop = np.asarray(orientation, float)
  for k in range(slices):
    position = np.asarray(origin, float) + k * np.asarray(slice_step, float)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series, study
    ds.PatientName, ds.PatientID = "Test^Phantom", "0"
    ds.InstanceNumber = k + 1
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [float(pixel_spacing[0]), float(pixel_spacing[1])]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.SliceThickness = float(np.linalg.norm(slice_step))
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = float(rescale[0]), float(rescale[1])
    ds.PixelData = np.ascontiguousarray(volume[:, :, k].T.astype(np.int16)).tobytes()
    ds.save_as(str(folder / f"IM{int(names[k]):04d}.dcm"), enforce_file_format=True)
  lps = np.eye(4)
  lps[:3, 0] = iop[:3] * pixel_spacing[1]
  lps[:3, 1] = iop[3:] * pixel_spacing[0]
  lps[:3, 2] = slice_step
  lps[:3, 3] = origin
  return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def write_slicer_segmentation(
  path: str | os.PathLike,
  layers: np.ndarray,
  segments: Sequence[dict],
  *,
  affine_ras: np.ndarray,
  extent_offset: Sequence[int] = (0, 0, 0),
) -> None:
  """Writes a ``.seg.nrrd`` the way 3D Slicer does (LPS space, ``SegmentN_*`` keys, extent offset).

  Args:
    path: the file.
    layers: ``uint8[layers, i, j, k]`` (or ``[i, j, k]`` for one layer), already cropped to the extent.
    segments: dicts with ``name``, ``label_value`` and ``layer``, in Slicer's order.
    affine_ras: RAS+ affine of the *cropped* array's first voxel and axes.
    extent_offset: index of the cropped array's first voxel in the reference image.
  """
  import nrrd

  lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
  data = np.asarray(layers, np.uint8)
  directions = lps[:3, :3].T
  header: dict[str, Any] = {
    "space": "left-posterior-superior",
    "space origin": lps[:3, 3],
    "encoding": "gzip",
    "Segmentation_MasterRepresentation": "Binary labelmap",
    "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
    "Segmentation_ReferenceImageExtentOffset": " ".join(str(int(v)) for v in extent_offset),
  }
  if data.ndim == 4:
    header["kinds"] = ["list", "domain", "domain", "domain"]
    header["space directions"] = np.vstack([np.full((1, 3), np.nan), directions])
  else:
    header["kinds"] = ["domain"] * 3
    header["space directions"] = directions
  for n, seg in enumerate(segments):
    header[f"Segment{n}_ID"] = f"Segment_{n + 1}"
    header[f"Segment{n}_Name"] = seg["name"]
    header[f"Segment{n}_LabelValue"] = str(seg["label_value"])
    header[f"Segment{n}_Layer"] = str(seg["layer"])
    header[f"Segment{n}_Color"] = "0.5 0.5 0.5"
  nrrd.write(str(path), data, header, index_order="F")


def write_labelme(
  path: str | os.PathLike, shapes: Sequence[dict], height: int, width: int, image_path: str = "image.png"
) -> None:
  """Writes a LabelMe 5 file; each shape is ``{"label", "points": [[x, y], ...], "shape_type"}``."""
  doc = {
    "version": "5.4.1",
    "flags": {},
    "imagePath": image_path,
    "imageData": None,
    "imageHeight": height,
    "imageWidth": width,
    "shapes": [
      {
        "label": s["label"],
        "points": s["points"],
        "group_id": None,
        "description": "",
        "shape_type": s.get("shape_type", "polygon"),
        "flags": {},
        "mask": s.get("mask"),
      }
      for s in shapes
    ],
  }
  Path(path).write_text(json.dumps(doc, indent=1))
