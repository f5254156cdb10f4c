"""Marks to the model's grid and label maps back: axis order, crop, length-1 axes and padding undone."""

import numpy as np

from scribblejax.io.images import Geometry, Image
from scribblejax.pipeline import InputSpec, fit_image, inside, labels_from_logits, to_image, to_model


def _image(array, family="tiff"):
  geometry = Geometry(family, array.shape[:-1], "zyx", (1.0,) * (array.ndim - 1), None, {})
  return Image(array, geometry, "img.tif")


def test_marks_go_to_the_models_grid_and_back_through_order_crop_squeeze_and_padding():
  rng = np.random.default_rng(0)
  array = np.zeros((1, 12, 10, 1), np.float32)
  array[0, 2:9, 3:8] = rng.uniform(1, 2, (7, 5, 1))  # non-zero box [2:9, 3:8]
  metadata = {"crop_to_nonzero": True, "input_axis_order": {"raster": [0, 2, 1]}}
  fitted = fit_image(_image(array), InputSpec(2, 1, 2), {"kind": "none"}, metadata, crop=True)
  assert fitted.order == (0, 2, 1) and fitted.squeezed == (0,) and fitted.image.shape == (5, 7, 1)
  fitted = fitted._replace(image=np.pad(fitted.image, ((1, 2), (0, 1), (0, 0))), pad=((1, 2), (0, 1)))
  marks = np.full((1, 12, 10), -1, np.int32)
  marks[0, 4, 5], marks[0, 8, 7] = 1, 0
  model = to_model(marks, fitted)
  assert model.shape == (8, 8) and (model[inside(fitted)] >= 0).sum() == 2 and (model[0] == -1).all()
  back = to_image(model, fitted)
  np.testing.assert_array_equal(back, marks)
  logits = np.stack([model < 0, model >= 0], axis=-1).astype(np.float32)
  labels = labels_from_logits(logits, fitted)
  assert labels.shape == (1, 12, 10) and labels[0, 4, 5] == 1 and labels.sum() == 2  # background outside the crop
