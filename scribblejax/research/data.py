"""Real data vendored with the package (unchanged files; see NOTICE for sources and credit).

Every loader returns a :class:`Dataset`: the image as stored (float32, channels last, *not* normalised),
integer class labels, class names, a fixed train/test split given as two index tuples into the image
and labels (``ds.image[ds.train]``), pixel spacing and, for NIfTI data, the voxel-to-world affine.
The splits are disjoint.

* :func:`nuclei2d` -- DSB 2018 nuclei (Caicedo et al., Nature Methods 2019; from the stardist 0.9.2
  wheel, BSD-3): one 512x512 fluorescence field with 125 nuclei. Split: the left 384 columns train,
  the right 128 columns test.
* :func:`tissue2d` and :func:`tissue3d` -- MNI152 ICBM 2009a nonlinear symmetric T1 template
  (Fonov et al., NeuroImage 2011; from the nilearn 0.14.1 wheel), 197x233x189 at 1 mm, with a 4-class
  tissue label *derived* here (it is not a manual segmentation), see :func:`derive_tissue_labels`.
  Split by axial slice ``z`` (the third voxel axis): :data:`TISSUE_TRAIN_SLICES` train,
  :data:`TISSUE_TEST_SLICES` test, with a gap of 10 slices between them.
  :func:`tissue2d` returns the axial slices as a stack of 2D images (``stacked=True``);
  :func:`tissue3d` returns the volume downsampled by 3 by default (3x3x3 block means of T1, GM and WM,
  labels derived from the downsampled maps by the same rule), 3 mm voxels.
* :func:`nuclei3d` -- synthetic 3D nuclei (stardist 0.9.2 wheel, BSD-3), 31x61x57, 51 nuclei, binary
  label. Split along the first axis: planes 0..15 train, 16..30 test. Spacing is not given by the
  source; (1, 1, 1) is assumed.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from scribblejax._checks import is_integer

DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # scribblejax/data: shipped with the package

MNI_FILES = {name: f"mni152_brain/mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz" for name in ("t1", "gm", "wm")}
TISSUE_CLASSES = ("background", "csf_other", "grey_matter", "white_matter")
TISSUE_TRAIN_SLICES = (0, 95)  # axial slices z in [0, 95) of the 1 mm volume train
TISSUE_TEST_SLICES = (105, 150)  # axial slices z in [105, 150) test
BRAIN_THRESHOLD = 0.2  # brain = T1 / max(T1) > 0.2 (nilearn's brain-mask rule)


class Dataset(NamedTuple):
  """Images and labels with their split and class names."""

  image: np.ndarray  # [*spatial, C] float32, as stored (no normalisation); [n, H, W, C] if stacked
  labels: np.ndarray  # int32[*spatial]; int32[n, H, W] if stacked
  class_names: tuple[str, ...]
  train: tuple  # index (tuple of slices) of the training part
  test: tuple  # index of the test part (disjoint from train)
  spacing: tuple[float, ...]  # pixel spacing of the spatial axes (of one 2D image if stacked)
  affine: np.ndarray | None = None  # float64[4, 4] voxel -> world (mm) of the returned axes, if known
  stacked: bool = False  # True: axis 0 indexes independent 2D images (e.g. the slices of a volume)
  description: str = ""  # where the data and the label come from


def _read_tiff(path: Path) -> np.ndarray:
  import tifffile

  try:
    return tifffile.imread(path)
  except (OSError, ValueError) as err:
    raise ValueError(f"cannot read {path}: {err}") from err


def _renumber(mask: np.ndarray) -> np.ndarray:
  ids = np.unique(mask)
  ids = ids[ids != 0]
  lookup = np.zeros(int(mask.max()) + 1, np.int32)
  lookup[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
  return lookup[mask]


def nuclei_instances() -> tuple[np.ndarray, np.ndarray]:
  """The DSB image (uint16 [512, 512]) and its instance mask renumbered 0..N (int32)."""
  image = _read_tiff(DATA_DIR / "dsb2018_nuclei" / "img2d.tif")
  mask = _read_tiff(DATA_DIR / "dsb2018_nuclei" / "mask2d.tif")
  return image, _renumber(mask)


def nuclei2d(classes: str = "binary") -> Dataset:
  """DSB 2018 nuclei as semantic labels; image ``float32[512, 512, 1]``.

  Args:
    classes: "binary" (0 background, 1 nucleus) or "border" (0 background, 1 interior, 2 border: the
      pixels of a nucleus that touch another label).

  Returns:
    A :class:`Dataset`; train = columns 0..383, test = columns 384..511.
  """
  image, instances = nuclei_instances()
  if classes == "binary":
    labels = (instances > 0).astype(np.int32)
    names = ("background", "nucleus")
  elif classes == "border":
    from skimage.segmentation import find_boundaries

    border = find_boundaries(instances, mode="inner") & (instances > 0)
    labels = np.where(border, 2, (instances > 0).astype(np.int32)).astype(np.int32)
    names = ("background", "interior", "border")
  else:
    raise ValueError(f"classes must be 'binary' or 'border', got {classes!r}")
  return Dataset(
    image[..., None].astype(np.float32),
    labels,
    names,
    (slice(None), slice(0, 384)),
    (slice(None), slice(384, 512)),
    (1.0, 1.0),
    description="DSB 2018 nuclei field (stardist 0.9.2 wheel); label from the instance mask",
  )


def nuclei3d_instances() -> tuple[np.ndarray, np.ndarray]:
  """The synthetic 3D nuclei image (uint16 [31, 61, 57]) and its instance mask renumbered 0..N (int32)."""
  image = _read_tiff(DATA_DIR / "synthetic_nuclei_3d" / "img3d.tif")
  mask = _read_tiff(DATA_DIR / "synthetic_nuclei_3d" / "mask3d.tif")
  return image, _renumber(mask)


def nuclei3d() -> Dataset:
  """Synthetic 3D nuclei, binary (0 background, 1 nucleus); image ``float32[31, 61, 57, 1]``.

  Returns:
    A :class:`Dataset`; train = planes 0..15 of the first axis, test = planes 16..30.
  """
  image, instances = nuclei3d_instances()
  return Dataset(
    image[..., None].astype(np.float32),
    (instances > 0).astype(np.int32),
    ("background", "nucleus"),
    (slice(0, 16),),
    (slice(16, None),),
    (1.0, 1.0, 1.0),
    affine=np.eye(4),
    description="synthetic 3D nuclei (stardist 0.9.2 wheel); spacing assumed 1",
  )


def mni152() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The vendored MNI152 2009a volumes as stored.

  Returns:
    ``(t1, gm, wm, affine)``: three ``uint8[197, 233, 189]`` volumes (T1 intensity; grey- and white-matter
    probability maps scaled to 0..255) and the ``float64[4, 4]`` voxel-to-world affine (1 mm voxels).
  """
  import nibabel as nib

  volumes = []
  for name in ("t1", "gm", "wm"):
    path = DATA_DIR / MNI_FILES[name]
    try:
      img = nib.load(path)
      volumes.append(np.asarray(img.dataobj))
    except (OSError, nib.filebasedimages.ImageFileError) as err:
      raise ValueError(f"cannot read {path}: {err}") from err
    affine = np.asarray(img.affine, np.float64)
  return (*volumes, affine)


def derive_tissue_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
  """The derived 4-class tissue label of the MNI152 template (not a manual segmentation).

  brain = ``t1 / max(t1) > 0.2``; inside the brain each voxel takes the largest of
  ``(1 - GM - WM, GM, WM)`` with GM and WM scaled to 0..1 (ties go to the first); outside it is 0.
  Labels: 0 background, 1 CSF/other, 2 grey matter, 3 white matter.

  Args:
    t1, gm, wm: volumes of one shape; ``gm`` and ``wm`` on the 0..255 scale of the vendored files.

  Returns:
    ``int32`` labels of the same shape.
  """
  t1 = np.asarray(t1, np.float64)
  if not (t1.shape == np.shape(gm) == np.shape(wm)):
    raise ValueError(f"T1, GM and WM shapes differ: {t1.shape}, {np.shape(gm)}, {np.shape(wm)}")
  g = np.asarray(gm, np.float64) / 255.0
  w = np.asarray(wm, np.float64) / 255.0
  brain = t1 / max(float(t1.max()), 1e-12) > BRAIN_THRESHOLD
  tissue = np.argmax(np.stack([1.0 - g - w, g, w]), axis=0) + 1
  return np.where(brain, tissue, 0).astype(np.int32)


def _tissue_description(extra: str) -> str:
  return (
    "MNI152 ICBM 2009a nonlinear symmetric T1 template (nilearn 0.14.1 wheel); 4-class tissue label "
    "DERIVED from the template's GM/WM probability maps: brain = T1/max(T1) > 0.2, inside it argmax of "
    f"(1-GM-WM, GM, WM) -> 0 background, 1 CSF/other, 2 GM, 3 WM. {extra}"
  )


def tissue2d() -> Dataset:
  """MNI152 axial slices as a stack of 2D images with the derived tissue label.

  Returns:
    A stacked :class:`Dataset`: image ``float32[189, 197, 233, 1]`` (axis 0 is the axial slice ``z``,
    each slice is ``[x, y]``), labels ``int32[189, 197, 233]``, train = slices
    :data:`TISSUE_TRAIN_SLICES`, test = slices :data:`TISSUE_TEST_SLICES`; ``affine`` maps
    ``(z, x, y)`` indices to world mm.
  """
  t1, gm, wm, affine = mni152()
  labels = derive_tissue_labels(t1, gm, wm)
  order = (2, 0, 1)
  permuted = affine.copy()
  permuted[:3, :3] = affine[:3, :3][:, list(order)]
  return Dataset(
    np.transpose(t1, order)[..., None].astype(np.float32),
    np.ascontiguousarray(np.transpose(labels, order)),
    TISSUE_CLASSES,
    (slice(*TISSUE_TRAIN_SLICES),),
    (slice(*TISSUE_TEST_SLICES),),
    (1.0, 1.0),
    affine=permuted,
    stacked=True,
    description=_tissue_description("Axial 1 mm slices; train z in [0, 95), test z in [105, 150)."),
  )


def tissue3d(factor: int = 3) -> Dataset:
  """The MNI152 volume downsampled by ``factor`` with the derived tissue label.

  T1, GM and WM are reduced by ``factor``-wide block means (``skimage.transform.downscale_local_mean``,
  zero-padded at the far edges) and the label is derived from the reduced maps by the rule of
  :func:`derive_tissue_labels`.

  Args:
    factor: downsampling factor per axis (1 keeps the 1 mm volume; the shipped ``tissue3d`` model uses 3).

  Returns:
    A :class:`Dataset`: image ``float32[X, Y, Z, 1]`` (``[66, 78, 63, 1]`` for ``factor=3``), labels
    ``int32[X, Y, Z]``; train and test are the axial slabs of :data:`TISSUE_TRAIN_SLICES` and
    :data:`TISSUE_TEST_SLICES` divided by ``factor`` (rounded outwards from the gap).
  """
  if not is_integer(factor) or factor < 1:
    raise ValueError(f"factor must be a positive integer, got {factor!r}")
  factor = int(factor)
  from skimage.transform import downscale_local_mean

  t1, gm, wm, affine = mni152()
  if factor > 1:
    t1, gm, wm = (downscale_local_mean(v.astype(np.float64), (factor,) * 3) for v in (t1, gm, wm))
    affine = affine.copy()
    affine[:3, :3] = affine[:3, :3] * factor
    affine[:3, 3] += affine[:3, :3].sum(1) / factor * (factor - 1) / 2  # block centre of voxel 0
  labels = derive_tissue_labels(t1, gm, wm)
  train = (slice(None), slice(None), slice(TISSUE_TRAIN_SLICES[0] // factor, TISSUE_TRAIN_SLICES[1] // factor))
  test = (slice(None), slice(None), slice(-(-TISSUE_TEST_SLICES[0] // factor), -(-TISSUE_TEST_SLICES[1] // factor)))
  if train[2].start >= train[2].stop or test[2].start >= test[2].stop:
    raise ValueError(
      f"downsampling by {factor} leaves no {'training' if train[2].start >= train[2].stop else 'test'} "
      "slice; use a smaller factor"
    )
  spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
  return Dataset(
    np.asarray(t1, np.float32)[..., None],
    labels,
    TISSUE_CLASSES,
    train,
    test,
    spacing,
    affine=affine,
    description=_tissue_description(
      f"Downsampled by {factor} (block means of T1, GM, WM; label derived after downsampling); "
      f"train z in [{train[2].start}, {train[2].stop}), test z in [{test[2].start}, {test[2].stop})."
    ),
  )


DATASETS = {"nuclei2d": nuclei2d, "tissue2d": tissue2d, "tissue3d": tissue3d, "nuclei3d": nuclei3d}


def load(name: str) -> Dataset:
  """A dataset by name: one of :data:`DATASETS`."""
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
  return DATASETS[name]()
