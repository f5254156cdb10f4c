"""File formats: images with their geometry, segmentations written back in the same geometry, and the
files users draw marks in (label maps, LabelMe JSON, 3D Slicer segmentations).

Example:
  >>> from scribblejax.io import read_image, read_marks, write_label_map
  >>> image = read_image("scan.nii.gz")                  # array [i, j, k, C] + geometry
  >>> marks = read_marks(["fix.seg.nrrd"], image.geometry, num_classes=3)
  >>> write_label_map("seg.nii.gz", labels, image.geometry)   # same affine and header
"""

from scribblejax.io.images import Geometry, Image, format_of, image_digest, output_format, read_image, write_label_map
from scribblejax.io.marks_files import (
  align_to_grid,
  class_index,
  read_label_map_marks,
  read_labelme,
  read_marks,
  read_marks_file,
  read_slicer_segmentation,
)

__all__ = [
  "Geometry",
  "Image",
  "align_to_grid",
  "class_index",
  "format_of",
  "image_digest",
  "output_format",
  "read_image",
  "read_label_map_marks",
  "read_labelme",
  "read_marks",
  "read_marks_file",
  "read_slicer_segmentation",
  "write_label_map",
]
