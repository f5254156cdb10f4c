"""The shipped models: they load by name, have the stated classes and provenance, and segment (a small
part of) their test split. Thresholds sit 0.01 below the Dice measured on the same crops (the shipped
models are deterministic on CPU; the margin absorbs another machine's float rounding, not a worse model)."""

import numpy as np
import pytest

from scribblejax.models.store import builtin_models, load_model
from scribblejax.research import data
from scribblejax.research.metrics import dice_per_class
from scribblejax.research.train import normalize_dataset_part, predict_labels

# name -> (dataset, classes, crop of the test part, least mean foreground Dice on that crop).
# Measured on these crops (CPU, 2026-12-06): nuclei2d 0.9390, tissue2d 0.6682, tissue3d 0.8369
CASES = {
  "nuclei2d": (data.nuclei2d, ("background", "nucleus"), np.s_[:256], 0.928),
  "tissue2d": (data.tissue2d, data.TISSUE_CLASSES, np.s_[5:40:10], 0.658),
  "tissue3d": (data.tissue3d, data.TISSUE_CLASSES, np.s_[:], 0.826),
}


def test_builtin_models_are_listed():
  assert set(CASES) <= set(builtin_models())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_shipped_model_loads_and_segments_its_test_split(name):
  load, classes, crop, least = CASES[name]
  model, info = load_model(name)
  assert info.family == "scribblejax.UNet" and info.class_names == classes
  meta = info.metadata
  assert meta["command"].startswith(f"scribblejax train --task {name} ")
  assert meta["train_seconds"] > 0 and meta["machine"] and set(meta["test_dice"]) == set(classes)
  ds = load()
  image = ds.image[ds.test][crop]
  truth = ds.labels[ds.test][crop]
  pred = predict_labels(
    model, normalize_dataset_part(image, info.normalization, stacked=ds.stacked), stacked=ds.stacked
  )
  dice = dice_per_class(pred, truth, len(classes))
  assert np.nanmean(dice[1:]) >= least, dice
