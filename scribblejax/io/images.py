"""Read images with their geometry; write segmentations back in the same geometry and format family.

Supported inputs (:func:`read_image`):

==========  ===========================  ======================================================
family      files                        array axes (``Image.array`` is ``[*spatial, C]``)
==========  ===========================  ======================================================
``nifti``   ``.nii``, ``.nii.gz``        ``(i, j, k)``: voxel index order of the file (nibabel).
``nrrd``    ``.nrrd``, ``.nhdr``         ``(i, j, k)``: the file's axis order (fastest first).
``dicom``   a file, or a series folder   ``(i, j, k)`` = (column, row, slice), as ITK / 3D Slicer
                                         index a series; slices sorted along the slice normal
                                         by ImagePositionPatient.
``tiff``    ``.tif``, ``.tiff``          ``(z, y, x)`` or ``(y, x)``: C order as stored.
``png``     ``.png``                     ``(y, x)`` = (row, column).
``jpeg``    ``.jpg``, ``.jpeg``          ``(y, x)``.
==========  ===========================  ======================================================

The *medical* families (NIfTI, NRRD, DICOM) always give three spatial axes (a 2-D file gets a
trailing axis of length 1) and an ``affine``: a 4 x 4 matrix mapping the array index
``(i, j, k, 1)`` to world coordinates in millimetres, RAS+ (x increases to the patient's right, y to
anterior, z to superior: nibabel's convention; NRRD and DICOM LPS coordinates are converted).
The *raster* families (TIFF, PNG, JPEG) have no world frame (``affine is None``); TIFF keeps its
pixel size (resolution tags, ImageJ ``spacing``, OME-XML ``PhysicalSize``) for writing back. A PNG or
JPEG with an EXIF orientation is read as viewers show it (the orientation applied).

Channels go last: a 4-D NIfTI's fourth axis, a non-spatial NRRD axis (``vector``, ``list``,
``RGB-color`` ...), TIFF ``C``/``S`` axes, RGB(A) pixels; a single-channel image gets ``C = 1``. Pixel
values keep their stored dtype (NIfTI ``scl_slope``/``scl_inter`` and DICOM rescale are applied, which
may give floats).

Segmentations (:func:`write_label_map`) are written in the input's family with its geometry:
NIfTI keeps the header (qform, sform, pixdim, units, description) with an integer data type and
intent ``label``; NRRD keeps space, directions and origin; TIFF keeps resolution and ImageJ
spacing; PNG is written as a palette image whose indices are the class labels. Inputs of a family
that cannot hold labels are written as another: DICOM -> NIfTI (or NRRD when the output path ends in
``.nrrd``; DICOM-SEG is not supported); JPEG (lossy) -> PNG or TIFF.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from scribblejax.io import fileio

MEDICAL = ("nifti", "nrrd", "dicom")
RASTER = ("tiff", "png", "jpeg")
FAMILIES = MEDICAL + RASTER

# Output families each input family may be written as (the first is the default).
OUTPUTS = {
  "nifti": ("nifti", "nrrd"),
  "nrrd": ("nrrd", "nifti"),
  "dicom": ("nifti", "nrrd"),
  "tiff": ("tiff", "png"),
  "png": ("png", "tiff"),
  "jpeg": ("png", "tiff"),
}
SUFFIXES = {
  "nifti": (".nii.gz", ".nii"),
  "nrrd": (".nrrd",),
  "tiff": (".tif", ".tiff"),
  "png": (".png",),
  "jpeg": (".jpg", ".jpeg"),
  "dicom": (".dcm",),
}
_READ_SUFFIXES = {
  ".nii.gz": "nifti",
  ".nii": "nifti",
  ".nrrd": "nrrd",
  ".nhdr": "nrrd",
  ".tif": "tiff",
  ".tiff": "tiff",
  ".png": "png",
  ".jpg": "jpeg",
  ".jpeg": "jpeg",
  ".dcm": "dicom",
  ".dicom": "dicom",
  ".ima": "dicom",
}

# NRRD world frames -> the diagonal that converts them to RAS+.
_NRRD_TO_RAS = {
  "left-posterior-superior": (-1, -1, 1),
  "right-anterior-superior": (1, 1, 1),
  "left-anterior-superior": (-1, 1, 1),
  "LPS": (-1, -1, 1),
  "RAS": (1, 1, 1),
  "LAS": (-1, 1, 1),
}
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)


class Geometry(NamedTuple):
  """Where an image's pixels lie, and what is needed to write a segmentation back like the input.

  Attributes:
    family: format family of the file: one of :data:`FAMILIES`.
    shape: the spatial shape, in the array's axis order.
    axes: the array's spatial axes: ``"ijk"`` (medical), ``"zyx"`` or ``"yx"`` (raster).
    spacing: pixel size along each array axis (mm for medical files; TIFF: as stored; PNG/JPEG: 1).
    affine: ``f64[4, 4]``, array index ``(i, j, k, 1)`` -> RAS+ millimetres; ``None`` for raster files.
    header: format-specific details kept for writing (a nibabel header, an NRRD header dict, TIFF
      resolution tags, a few DICOM tags; never patient data).
  """

  family: str
  shape: tuple[int, ...]
  axes: str
  spacing: tuple[float, ...]
  affine: np.ndarray | None
  header: Any

  @property
  def origin(self) -> tuple[float, ...] | None:
    """World (RAS+) position of the centre of pixel 0; ``None`` for raster files."""
    return None if self.affine is None else tuple(float(v) for v in self.affine[:3, 3])

  @property
  def direction(self) -> np.ndarray | None:
    """``f64[3, 3]``: column ``a`` is the unit RAS+ direction of array axis ``a``; ``None`` for raster."""
    if self.affine is None:
      return None
    lin = self.affine[:3, :3]
    return lin / np.maximum(np.linalg.norm(lin, axis=0), 1e-12)

  def describe(self) -> str:
    """A one-line summary: shape, spacing and (medical) origin and axis directions."""
    text = f"shape {self.shape}, spacing {tuple(round(s, 4) for s in self.spacing)}"
    if self.affine is not None:
      codes = "".join(_axis_code(self.affine[:3, a]) for a in range(3))
      text += f", origin {tuple(round(v, 3) for v in self.origin)}, orientation {codes}"
    return text


class Image(NamedTuple):
  """An image read from a file.

  Attributes:
    array: ``[*spatial, C]``, the stored values (see the module docstring for the axis order).
    geometry: a :class:`Geometry`.
    path: the file (or DICOM folder) it came from.
  """

  array: np.ndarray
  geometry: Geometry
  path: str

  @property
  def family(self) -> str:
    return self.geometry.family

  @property
  def spatial_shape(self) -> tuple[int, ...]:
    return tuple(self.array.shape[:-1])


def _axis_code(vector: np.ndarray) -> str:
  """The RAS letter an axis mostly points to: "R"/"L", "A"/"P", "S"/"I"."""
  axis = int(np.argmax(np.abs(vector)))
  return ("RL", "AP", "SI")[axis][0 if vector[axis] > 0 else 1]


# ----------------------------------------------------------------------------------------------
# Format detection and atomic writing.


def suffix_of(path: str | os.PathLike) -> str:
  """The image suffix of a path, in lower case: its longest known one (``.nii.gz``), else its last."""
  path = Path(path)
  name = path.name.lower()
  for suffix in sorted(_READ_SUFFIXES, key=len, reverse=True):
    if name.endswith(suffix):
      return suffix
  return path.suffix.lower()


def _is_dicom_file(path: Path) -> bool:
  try:
    with open(path, "rb") as f:
      return f.read(132)[128:132] == b"DICM"
  except OSError:
    return False


def format_of(path: str | os.PathLike) -> str:
  """The format family of an existing image file or DICOM folder.

  Raises:
    ValueError: the path does not exist or its format is not supported.
  """
  p = Path(path)
  if not p.exists():
    raise ValueError(f"cannot read {path}: no such file or folder")
  if p.is_dir():
    return "dicom"
  family = _READ_SUFFIXES.get(suffix_of(p))
  if family is None and _is_dicom_file(p):
    return "dicom"
  if family is None:
    raise ValueError(
      f"cannot read {path}: unsupported image format {suffix_of(p) or '(no suffix)'!r}; supported: "
      ".nii, .nii.gz, .nrrd, .nhdr, .tif, .tiff, .png, .jpg, .jpeg, DICOM files and series folders"
    )
  return family


def output_format(path: str | os.PathLike, geometry: Geometry) -> str:
  """The family a segmentation of an image with ``geometry`` is written as at ``path``.

  Raises:
    ValueError: the suffix is not one the input's family may be written as (e.g. JPEG, which is
      lossy, or a 3-D image as PNG), or is ``.nhdr`` (read, never written).
  """
  allowed = OUTPUTS[geometry.family]
  suffix = suffix_of(Path(path))
  if suffix == ".nhdr":
    raise ValueError(
      f"cannot write {path}: a .nhdr header keeps its data in a second file, which cannot be "
      "written atomically with it; write a .nrrd file (header and data in one)"
    )
  family = _READ_SUFFIXES.get(suffix)
  if family not in allowed:
    choices = ", ".join(s for f in allowed for s in SUFFIXES[f])
    why = " (JPEG is lossy and would change the labels)" if family == "jpeg" else ""
    raise ValueError(
      f"cannot write the segmentation of a {geometry.family} image as {path}{why}; use a file ending in {choices}"
    )
  if family == "png" and len([s for s in geometry.shape if s > 1]) > 2:
    raise ValueError(f"cannot write a 3-D segmentation of shape {geometry.shape} as PNG ({path}); use .tif")
  return family


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
  """Calls ``write(tmp)`` on a temporary sibling with the same suffix, then renames it to ``path``."""
  with fileio.atomic_path(path) as tmp:
    write(tmp)


def image_digest(image: Image) -> str:
  """SHA-256 of the image's values, shape and dtype (names the image in a session, not the file)."""
  h = hashlib.sha256()
  arr = np.ascontiguousarray(image.array)
  h.update(f"{arr.shape}{arr.dtype.str}".encode())
  h.update(arr.tobytes())
  return h.hexdigest()


def spacing_of(affine: np.ndarray) -> tuple[float, ...]:
  """The voxel spacing along each axis of a 4 x 4 affine (the lengths of its first three columns)."""
  return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))


def _medical(family: str, array: np.ndarray, affine: np.ndarray, header: Any, path: Path) -> Image:
  """Packs a medical image: ``array`` is ``[i, j, k, C]``."""
  affine = np.asarray(affine, np.float64)
  if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise ValueError(f"cannot read {path}: its orientation matrix is singular or not finite")
  geometry = Geometry(family, tuple(int(s) for s in array.shape[:3]), "ijk", spacing_of(affine), affine, header)
  return Image(array, geometry, str(path))


# ----------------------------------------------------------------------------------------------
# NIfTI (nibabel).


def _read_nifti(path: Path) -> Image:
  import nibabel as nib

  try:
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
  except Exception as err:  # nibabel raises many types for damaged files
    raise ValueError(f"cannot read {path} as NIfTI: {err}") from err
  shape = data.shape
  if data.ndim <= 3:
    data = data.reshape(shape + (1,) * (3 - data.ndim))[..., None]
  elif data.ndim == 5 and shape[3] == 1:  # NIfTI vector data: dim 5 holds the components
    data = data[:, :, :, 0, :]
  elif data.ndim != 4:
    raise ValueError(
      f"cannot read {path}: a {data.ndim}-D NIfTI of shape {shape} is not an image [i, j, k] or [i, j, k, channels]"
    )
  return _medical("nifti", np.asarray(data), img.affine, img.header.copy(), path)


def _write_nifti(tmp: str, labels: np.ndarray, geometry: Geometry) -> None:
  import nibabel as nib

  if geometry.family == "nifti":
    header = geometry.header.copy()
    file_shape = tuple(header.get_data_shape())
    spatial = file_shape[: min(len(file_shape), 3)]
    data = labels.reshape(spatial) if int(np.prod(spatial)) == labels.size else labels
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = klass(data, None, header)  # affine None: qform and sform stay exactly as in the header
  else:
    img = nib.Nifti1Image(labels, geometry.affine)
    img.header.set_qform(geometry.affine, code=1)
    img.header.set_sform(geometry.affine, code=1)
    img.header.set_xyzt_units("mm")
  img.set_data_dtype(labels.dtype)
  img.header.set_slope_inter(1.0, 0.0)
  img.header.set_intent("label")
  img.header["cal_min"], img.header["cal_max"] = 0, max(int(labels.max()), 1)
  nib.save(img, tmp)


# ----------------------------------------------------------------------------------------------
# NRRD (pynrrd).


def nrrd_geometry(header: dict, path: Path) -> tuple[list[int], np.ndarray]:
  """The spatial axes of an NRRD file and the 4 x 4 RAS+ affine of those axes (2-D padded to 3-D)."""
  dim = int(header["dimension"])
  kinds = header.get("kinds") or [None] * dim
  directions = header.get("space directions")
  if directions is not None:
    directions = np.asarray(directions, np.float64)
    spatial = [a for a in range(dim) if np.all(np.isfinite(directions[a]))]
  else:
    non_spatial = {
      "list",
      "vector",
      "point",
      "normal",
      "stub",
      "scalar",
      "complex",
      "2-vector",
      "3-color",
      "RGB-color",
      "HSV-color",
      "XYZ-color",
      "4-color",
      "RGBA-color",
      "3-vector",
      "3-gradient",
      "3-normal",
      "4-vector",
      "quaternion",
      "2D-symmetric-matrix",
      "2D-masked-symmetric-matrix",
      "2D-matrix",
      "2D-masked-matrix",
      "3D-symmetric-matrix",
      "3D-masked-symmetric-matrix",
      "3D-matrix",
      "3D-masked-matrix",
      "covariant-vector",
    }
    spatial = [a for a in range(dim) if kinds[a] not in non_spatial]
  if not 2 <= len(spatial) <= 3:
    raise ValueError(f"cannot read {path}: an NRRD image needs 2 or 3 spatial axes, found {len(spatial)}")
  affine = np.eye(4)
  if directions is not None:
    vectors = directions[spatial]  # one row per spatial axis, in the file's space
    width = vectors.shape[1]
    if width < 3:
      vectors = np.pad(vectors, ((0, 0), (0, 3 - width)))
    origin = np.zeros(3)
    if header.get("space origin") is not None:
      given = np.asarray(header["space origin"], np.float64)
      origin[: len(given)] = given
    space = header.get("space", "right-anterior-superior" if width == 3 else None)
    flip = np.array(_NRRD_TO_RAS.get(space, (1, 1, 1)), np.float64)
    affine[:3, : len(spatial)] = (vectors * flip).T
    affine[:3, 3] = origin * flip
  else:
    spacings = header.get("spacings")
    for n, a in enumerate(spatial):
      value = float(spacings[a]) if spacings is not None and np.isfinite(spacings[a]) else 1.0
      affine[n, n] = value
  if len(spatial) == 2:  # a 2-D image: the slice normal, unit length
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    affine[:3, 2] = normal / max(np.linalg.norm(normal), 1e-12)
  return spatial, affine


def _read_nrrd(path: Path) -> Image:
  import nrrd

  try:
    data, header = nrrd.read(str(path), index_order="F")
  except Exception as err:  # pynrrd raises NRRDError, OSError, ValueError ...
    raise ValueError(f"cannot read {path} as NRRD: {err}") from err
  spatial, affine = nrrd_geometry(header, path)
  others = [a for a in range(data.ndim) if a not in spatial]
  if len(others) > 1:
    raise ValueError(f"cannot read {path}: an NRRD image may have one non-spatial (channel) axis, found {len(others)}")
  arr = np.transpose(data, spatial + others)
  if len(others) == 0:
    arr = arr[..., None]
  if len(spatial) == 2:
    arr = arr[:, :, None, :]
  keep = {"nrrd": dict(header), "spatial_axes": spatial, "file_spatial_dims": len(spatial)}
  return _medical("nrrd", arr, affine, keep, path)


def _write_nrrd(tmp: str, labels: np.ndarray, geometry: Geometry) -> None:
  import nrrd

  if geometry.family == "nrrd":
    source = geometry.header["nrrd"]
    spatial = geometry.header["spatial_axes"]
    data = labels[:, :, 0] if geometry.header["file_spatial_dims"] == 2 else labels
    header = {"type": None, "dimension": data.ndim, "encoding": "gzip", "kinds": ["domain"] * data.ndim}
    for key in ("space", "space dimension", "space origin", "space units", "measurement frame", "content"):
      if key in source:
        header[key] = source[key]
    if source.get("space directions") is not None:
      header["space directions"] = np.asarray(source["space directions"], np.float64)[spatial]
    per_axis = ("spacings", "thicknesses", "axis mins", "axis maxs", "centerings", "labels", "units")
    for key in per_axis:
      value = source.get(key)
      if value is not None and len(value) == int(source["dimension"]):
        header[key] = [value[a] for a in spatial] if isinstance(value, list) else np.asarray(value)[spatial]
  else:
    data = labels
    lps = _LPS @ geometry.affine
    header = {
      "type": None,
      "dimension": 3,
      "space": "left-posterior-superior",
      "kinds": ["domain"] * 3,
      "space directions": lps[:3, :3].T,
      "space origin": lps[:3, 3],
      "encoding": "gzip",
    }
  header.pop("type")
  nrrd.write(tmp, np.asarray(data), header, index_order="F")


# ----------------------------------------------------------------------------------------------
# DICOM (pydicom).


def _dicom_files(path: Path) -> list:
  import pydicom
  from pydicom.errors import InvalidDicomError

  files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
  datasets = []
  for f in files:
    try:
      ds = pydicom.dcmread(str(f))
    except (InvalidDicomError, OSError):
      if not path.is_dir():
        raise ValueError(f"cannot read {path}: not a DICOM file") from None
      continue
    except Exception as err:  # pydicom raises assorted errors on damaged files
      raise ValueError(f"cannot read {f} as DICOM: {err}") from err
    if "PixelData" in ds:
      missing = [tag for tag in ("Rows", "Columns") if ds.get(tag) is None]
      if missing:
        raise ValueError(f"cannot read {f}: it has pixel data but no {' or '.join(missing)} (a damaged DICOM file)")
      datasets.append((f, ds))
  if not datasets:
    raise ValueError(f"cannot read {path}: no DICOM image found")
  series: dict[str, list] = {}
  for f, ds in datasets:
    series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
  if len(series) > 1:
    counts = ", ".join(f"{uid or '(no UID)'}: {len(v)} files" for uid, v in series.items())
    raise ValueError(
      f"cannot read {path}: the folder holds {len(series)} DICOM series ({counts}); point to a folder with one series"
    )
  return next(iter(series.values()))


def _pixels(f: Path, ds) -> np.ndarray:
  try:
    arr = ds.pixel_array
  except Exception as err:  # missing decoders for compressed transfer syntaxes, truncated data ...
    raise ValueError(f"cannot read the pixels of {f}: {err}") from err
  slope = float(ds.get("RescaleSlope", 1) or 1)
  intercept = float(ds.get("RescaleIntercept", 0) or 0)
  if slope != 1 or intercept != 0:
    if slope == int(slope) and intercept == int(intercept):
      arr = arr.astype(np.int32) * int(slope) + int(intercept)
    else:
      arr = arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)
  return arr


def _vec(value, n: int, what: str, f: Path) -> np.ndarray:
  try:
    out = np.asarray([float(v) for v in value], np.float64)
  except (TypeError, ValueError):
    out = np.zeros(0)
  if out.shape != (n,):
    raise ValueError(f"cannot read {f}: {what} must have {n} numbers, got {value!r}")
  return out


def _read_dicom(path: Path) -> Image:
  series = _dicom_files(path)
  first_file, first = series[0]
  frames = int(first.get("NumberOfFrames", 1) or 1)
  if len(series) == 1 and frames > 1:
    return _read_dicom_multiframe(path, first_file, first)
  orientations = {tuple(np.round(np.asarray(ds.get("ImageOrientationPatient", []), float), 4)) for _, ds in series}
  if len(orientations) > 1:
    raise ValueError(f"cannot read {path}: its slices have different orientations {sorted(orientations)}")
  sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in series}
  if len(sizes) > 1:
    raise ValueError(f"cannot read {path}: its slices have different sizes {sorted(sizes)}")
  geometric = all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for _, ds in series)
  if geometric:
    iop = _vec(first.ImageOrientationPatient, 6, "ImageOrientationPatient", first_file)
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    positions = [_vec(ds.ImagePositionPatient, 3, "ImagePositionPatient", f) for f, ds in series]
    along = np.array([p @ normal for p in positions])
    order = np.argsort(along, kind="stable")
    gaps = np.diff(along[order])
    if np.any(np.abs(gaps) < 1e-4):
      raise ValueError(
        f"cannot read {path}: several slices lie at the same position (several echoes, phases or series in one folder?)"
      )
  else:
    order = np.argsort([int(ds.get("InstanceNumber", i)) for i, (_, ds) in enumerate(series)], kind="stable")
  series = [series[i] for i in order]
  slices = [np.swapaxes(_pixels(f, ds), 0, 1) for f, ds in series]  # (rows, cols) -> (cols, rows)
  dtype = np.result_type(*slices)
  array = np.stack([s.astype(dtype) for s in slices], axis=2)
  if array.ndim == 3:
    array = array[..., None]
  pixel = [float(v) for v in first.get("PixelSpacing", [1.0, 1.0])]  # (between rows, between columns)
  affine = np.eye(4)
  if geometric:
    affine[:3, 0] = row_cos * pixel[1]
    affine[:3, 1] = col_cos * pixel[0]
    if len(series) > 1:
      affine[:3, 2] = (positions[order[-1]] - positions[order[0]]) / (len(series) - 1)
    else:
      affine[:3, 2] = normal * float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)) or 1.0)
    affine[:3, 3] = positions[order[0]]
    affine = _LPS @ affine  # DICOM patient coordinates are LPS
  else:
    affine[:3, :3] = np.diag([pixel[1], pixel[0], float(first.get("SliceThickness", 1.0) or 1.0)])
  header = {
    "Modality": str(first.get("Modality", "")),
    "SeriesInstanceUID": str(first.get("SeriesInstanceUID", "")),
    "files": len(series),
    "geometric": geometric,
  }
  return _medical("dicom", array, affine, header, path)


def _read_dicom_multiframe(path: Path, f: Path, ds) -> Image:
  pixels = _pixels(f, ds)  # (frames, rows, cols[, samples])
  array = np.moveaxis(np.swapaxes(pixels, 1, 2), 0, 2)  # (cols, rows, frames[, samples])
  if array.ndim == 3:
    array = array[..., None]
  affine = np.eye(4)
  try:
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = _vec(shared.PlaneOrientationSequence[0].ImageOrientationPatient, 6, "ImageOrientationPatient", f)
    pixel = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    positions = np.array(
      [
        _vec(g.PlanePositionSequence[0].ImagePositionPatient, 3, "ImagePositionPatient", f)
        for g in ds.PerFrameFunctionalGroupsSequence
      ]
    )
  except (AttributeError, IndexError, KeyError):
    geometric = False
  else:
    geometric = True
  if geometric:
    normal = np.cross(iop[:3], iop[3:])
    order = np.argsort(positions @ normal, kind="stable")
    array = array[:, :, order]
    positions = positions[order]
    affine[:3, 0] = iop[:3] * pixel[1]
    affine[:3, 1] = iop[3:] * pixel[0]
    affine[:3, 2] = (positions[-1] - positions[0]) / max(len(positions) - 1, 1) if len(positions) > 1 else normal
    affine[:3, 3] = positions[0]
    affine = _LPS @ affine
  header = {
    "Modality": str(ds.get("Modality", "")),
    "SeriesInstanceUID": str(ds.get("SeriesInstanceUID", "")),
    "files": 1,
    "geometric": geometric,
  }
  return _medical("dicom", array, affine, header, path)


# ----------------------------------------------------------------------------------------------
# TIFF (tifffile).


def _ome_sizes(xml: str | None) -> dict:
  """``{"X": .., "Y": .., "Z": .., "unit": ..}`` from an OME-XML's first ``Pixels`` element, for the
  sizes it states (positive numbers only)."""
  import xml.etree.ElementTree as ElementTree

  try:
    root = ElementTree.fromstring(xml or "")
  except ElementTree.ParseError:
    return {}
  pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
  out: dict = {}
  for axis in "XYZ" if pixels is not None else "":
    try:
      size = float(pixels.get(f"PhysicalSize{axis}", "nan"))
    except ValueError:
      continue
    if np.isfinite(size) and size > 0:
      out[axis] = size
      out.setdefault("unit", pixels.get(f"PhysicalSize{axis}Unit", "µm"))
  if "unit" in out:  # as ImageJ names it (its metadata is ASCII)
    unit = {"µm": "micron", "um": "micron"}.get(out["unit"], out["unit"])
    out["unit"] = unit if unit.isascii() else None
  return out


def _read_tiff(path: Path) -> Image:
  import tifffile

  try:
    with tifffile.TiffFile(str(path)) as tif:
      series = tif.series[0]
      data = series.asarray()
      axes = series.axes.upper()
      imagej = tif.imagej_metadata or {}
      ome = _ome_sizes(tif.ome_metadata) if tif.is_ome else {}
      page = tif.pages[0]
      tags = {t.name: t.value for t in page.tags.values() if t.name in ("XResolution", "YResolution", "ResolutionUnit")}
  except Exception as err:  # tifffile raises TiffFileError, ValueError, OSError ...
    raise ValueError(f"cannot read {path} as TIFF: {err}") from err
  # Drop axes of length 1 other than Y and X; channels (C, S) go last; one more axis is depth.
  keep = [a for a, (name, n) in enumerate(zip(axes, data.shape)) if n > 1 or name in "YX"]
  data = data.reshape([data.shape[a] for a in keep])
  axes = "".join(axes[a] for a in keep)
  channel = [a for a, name in enumerate(axes) if name in "CS"]
  depth = [a for a, name in enumerate(axes) if name not in "CSYX"]
  if len(channel) > 1 or len(depth) > 1 or "Y" not in axes or "X" not in axes:
    raise ValueError(f"cannot read {path}: TIFF axes {series.axes!r} are not an image (Z)YX with optional channels")
  order = depth + [axes.index("Y"), axes.index("X")] + channel
  array = np.transpose(data, order)
  if not channel:
    array = array[..., None]
  spacing_xy = []
  for tag in ("YResolution", "XResolution"):
    value = tags.get(tag)
    try:
      ppu = value[0] / value[1] if isinstance(value, tuple) else float(value)
    except (TypeError, ZeroDivisionError):
      ppu = 0.0
    spacing_xy.append(1.0 / ppu if ppu > 0 else 1.0)
  z_spacing = float(imagej.get("spacing", 1.0))
  if ome:  # OME-XML's physical sizes, where it states them
    spacing_xy = [ome.get("Y", spacing_xy[0]), ome.get("X", spacing_xy[1])]
    z_spacing = ome.get("Z", z_spacing)
    imagej = {**imagej, "unit": imagej.get("unit") or ome.get("unit")}
  spacing = ([z_spacing] if depth else []) + spacing_xy
  header = {
    "imagej": bool(imagej),
    "unit": imagej.get("unit"),
    "z_spacing": z_spacing,
    "resolution": (1.0 / spacing_xy[1], 1.0 / spacing_xy[0]),
    "resolutionunit": int(tags.get("ResolutionUnit", 1)),
  }
  geometry = Geometry(
    "tiff", tuple(int(s) for s in array.shape[:-1]), "zyx" if depth else "yx", tuple(spacing), None, header
  )
  return Image(array, geometry, str(path))


def _write_tiff(tmp: str, labels: np.ndarray, geometry: Geometry) -> None:
  import tifffile

  header = geometry.header if geometry.family == "tiff" else {}
  kwargs: dict[str, Any] = {}
  if header.get("resolution"):
    kwargs["resolution"] = header["resolution"]
    if header.get("resolutionunit", 1) in (2, 3):
      kwargs["resolutionunit"] = header["resolutionunit"]
  if labels.ndim == 3 or header.get("imagej"):
    metadata = {"axes": "ZYX" if labels.ndim == 3 else "YX"}
    if labels.ndim == 3:
      metadata["spacing"] = header.get("z_spacing", 1.0)
    if header.get("unit"):
      metadata["unit"] = header["unit"]
    kwargs.pop("resolutionunit", None)
    tifffile.imwrite(tmp, labels, imagej=True, metadata=metadata, **kwargs)
  else:
    tifffile.imwrite(tmp, labels, photometric="minisblack", **kwargs)


# ----------------------------------------------------------------------------------------------
# PNG / JPEG (Pillow).

_EXIF_ORIENTATION = 0x0112


def _read_raster(path: Path, family: str, labels: bool) -> Image:
  from PIL import Image as PILImage
  from PIL import ImageOps

  try:
    with PILImage.open(str(path)) as im:
      im.load()
      # as viewers and LabelMe show the image (LabelMe's points are in that orientation)
      orientation = int(im.getexif().get(_EXIF_ORIENTATION) or 1)
      if orientation != 1:
        im = ImageOps.exif_transpose(im)
      if im.mode == "P" and labels:
        data = np.array(im)  # palette indices are the labels
      elif im.mode in ("P", "PA"):
        data = np.array(im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB"))
      elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        data = np.array(im.convert("RGB"))
      elif im.mode == "1":
        data = np.array(im).astype(np.uint8)
      else:
        data = np.array(im)
  except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError ...
    raise ValueError(f"cannot read {path} as {family.upper()}: {err}") from err
  array = data[..., None] if data.ndim == 2 else data
  header = {"exif_orientation": orientation} if orientation != 1 else {}
  geometry = Geometry(family, tuple(int(s) for s in array.shape[:2]), "yx", (1.0, 1.0), None, header)
  return Image(array, geometry, str(path))


def exif_note(geometry: Geometry) -> str | None:
  """What reading did to a PNG or JPEG with an EXIF orientation, for reports; ``None`` otherwise."""
  orientation = geometry.header.get("exif_orientation") if isinstance(geometry.header, dict) else None
  if geometry.family not in ("png", "jpeg") or not orientation:
    return None
  return (
    f"applied the file's EXIF orientation ({orientation}): the image, its marks and the segmentation "
    "are in the orientation viewers and LabelMe show, not the file's stored pixel order"
  )


def _palette() -> list[int]:
  """A VOC-style palette: index 0 black, then well separated colours (bit-interleaved)."""
  out = []
  for i in range(256):
    r = g = b = 0
    c = i
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    out += [r, g, b]
  return out


def _write_png(tmp: str, labels: np.ndarray, geometry: Geometry) -> None:
  from PIL import Image as PILImage

  plane = labels.reshape([s for s in labels.shape if s > 1] or [1, 1]) if labels.ndim > 2 else labels
  if plane.ndim != 2:
    raise ValueError(f"cannot write a segmentation of shape {labels.shape} as PNG")
  if plane.max(initial=0) < 256:
    im = PILImage.fromarray(np.ascontiguousarray(plane, np.uint8))
    im.putpalette(_palette())  # an "L" image becomes "P" with its values as indices
  else:
    im = PILImage.fromarray(np.ascontiguousarray(plane, np.uint16))
  im.save(tmp, format="PNG")


# ----------------------------------------------------------------------------------------------
# Public functions.


def read_image(path: str | os.PathLike, *, labels: bool = False) -> Image:
  """Reads an image and its geometry.

  Args:
    path: a NIfTI, NRRD, TIFF, PNG or JPEG file, a DICOM file, or a folder holding one DICOM series.
    labels: read a label file: palette PNGs give their indices rather than colours.

  Returns:
    An :class:`Image`: ``array`` ``[*spatial, C]`` in the axis order of the module docstring's table.

  Raises:
    ValueError: the path is missing, the format is not supported, the file cannot be read, or it
      holds values that are not real numbers (complex); the message names the path.
  """
  p = Path(path)
  family = format_of(p)
  if p.is_file() and not os.access(p, os.R_OK):
    raise ValueError(f"cannot read {path}: permission denied")
  readers = {"nifti": _read_nifti, "nrrd": _read_nrrd, "dicom": _read_dicom, "tiff": _read_tiff}
  image = readers[family](p) if family in readers else _read_raster(p, family, labels)
  dtype = image.array.dtype
  if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or dtype == np.bool_):
    raise ValueError(f"{path} holds {dtype} values; images must be real numbers (integer or floating point)")
  return image


def label_dtype(labels: np.ndarray) -> np.dtype:
  """The smallest unsigned type holding the labels (uint8 or uint16)."""
  top = int(np.max(labels, initial=0))
  if np.min(labels, initial=0) < 0 or top >= 65536:
    raise ValueError(f"labels must lie in [0, 65535], got [{int(np.min(labels))}, {top}]")
  return np.dtype(np.uint8 if top < 256 else np.uint16)


def write_label_map(path: str | os.PathLike, labels: Any, geometry: Geometry) -> str:
  """Writes a segmentation atomically, in the input's format family and geometry.

  Args:
    path: the output file; its suffix picks the format among those allowed for ``geometry.family``
      (see :data:`OUTPUTS`: NIfTI <-> NRRD, DICOM -> NIfTI or NRRD, TIFF <-> PNG, JPEG -> PNG or TIFF).
    labels: ``int[*geometry.shape]``, class indices ``>= 0``.
    geometry: the :class:`Geometry` of the image the labels belong to.

  Returns:
    The family written.

  Raises:
    ValueError: the labels' shape differs from the geometry's, the suffix is not allowed, or the
      labels are out of range.
  """
  labels = np.asarray(labels)
  if tuple(labels.shape) != tuple(geometry.shape):
    raise ValueError(f"labels have shape {labels.shape}, but the image's spatial shape is {geometry.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  labels = labels.astype(label_dtype(labels))
  out = Path(path)
  family = output_format(out, geometry)
  writer = {"nifti": _write_nifti, "nrrd": _write_nrrd, "tiff": _write_tiff, "png": _write_png}[family]
  _atomic_write(out, lambda tmp: writer(tmp, labels, geometry))
  return family
