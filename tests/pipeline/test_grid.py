"""Marks to the model's grid and label maps back: axis order, crop, length-1 axes and padding undone."""

import numpy as np

from scribblejax.config import RefineConfig
from scribblejax.io.images import Geometry, Image
from scribblejax.pipeline import (
  InputSpec,
  fit_image,
  image_on_image_grid,
  inside,
  labels_from_logits,
  masks_on_image,
  to_image,
  to_model,
)


def _image(array, family="tiff"):
  geometry = Geometry(family, array.shape[:-1], "zyx", (1.0,) * (array.ndim - 1), None, {})
  return Image(array, geometry, "img.tif")


def _cropped(seed, channels=1):
  """A 1x12x10 image, non-zero in the box [2:9, 3:8], fitted to a 2-D model that crops to the non-zero
  region and reads the raster axes swapped: ``(array, fitted)``."""
  array = np.zeros((1, 12, 10, channels), np.float32)
  array[0, 2:9, 3:8] = np.random.default_rng(seed).uniform(1, 2, (7, 5, channels))
  metadata = {"crop_to_nonzero": True, "input_axis_order": {"raster": [0, 2, 1]}}
  return array, fit_image(_image(array), InputSpec(2, channels, 2), {"kind": "none"}, metadata, crop=True)


def test_marks_go_to_the_models_grid_and_back_through_order_crop_squeeze_and_padding():
  _, fitted = _cropped(0)
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


def test_sure_and_unsure_pixels_land_where_the_labels_do_and_a_region_network_has_none():
  _, fitted = _cropped(1)
  # model-layout logits (5 x 7): class 1 very sure on one voxel, unsure on another, class 0 sure elsewhere
  logits = np.zeros((5, 7, 2), np.float32)
  logits[..., 0] = 8.0
  logits[1, 2] = (0.0, 8.0)
  logits[3, 4] = (0.0, 0.1)
  labels = labels_from_logits(logits, fitted)
  config = RefineConfig(merge_protect=0.99, merge_confidence=0.8)
  unsure, none, sure = masks_on_image(None, logits, fitted, config)  # W's masks: free (unsure), protected (sure)
  assert none is None
  assert sure.shape == unsure.shape == labels.shape == (1, 12, 10)
  marker = np.full((5, 7), -1, np.int32)
  marker[1, 2], marker[3, 4] = 1, 2
  where = to_image(marker, fitted)  # where those two model voxels lie on the image's grid
  assert sure[where == 1].all() and (labels[where == 1] == 1).all()
  np.testing.assert_array_equal(unsure, where == 2)
  assert not sure[0, 0, 0]  # outside the crop: neither
  assert sure[0, 2:9, 3:8].sum() == 34  # the crop's 35 pixels less the unsure one
  far, near, _ = masks_on_image(logits, None, fitted, RefineConfig(merge_far=0.99, merge_near=0.99))
  np.testing.assert_array_equal(far, sure)  # the refined network's masks, from its logits ...
  np.testing.assert_array_equal(near, sure)
  softmax = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  given = RefineConfig(merge_far=0.99, output="probabilities")
  np.testing.assert_array_equal(masks_on_image(softmax, None, fitted, given)[0], sure)  # ... or a softmax
  regions = fitted._replace(regions=((1,),))
  assert masks_on_image(logits, logits, regions, config) == (None, None, None)


def test_the_image_comes_back_to_its_own_grid_as_the_labels_do():
  array, fitted = _cropped(2, channels=2)
  fitted = fitted._replace(image=np.pad(fitted.image, ((1, 2), (0, 1), (0, 0))), pad=((1, 2), (0, 1)))
  back = image_on_image_grid(fitted)
  assert back.shape == array.shape
  np.testing.assert_array_equal(back[0, 2:9, 3:8], array[0, 2:9, 3:8])  # no normalisation here: the very image
  outside = np.ones((12, 10), bool)
  outside[2:9, 3:8] = False
  assert np.isnan(back[0][outside]).all()  # the model never read those pixels
