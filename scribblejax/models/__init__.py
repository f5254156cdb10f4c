"""Models: the built-in U-Net, the imported architectures (:mod:`scribblejax.models.zoo`), the one registry
of model families (:mod:`scribblejax.models.families`), the model folder store, layer order, ensembles,
region-based heads and model surgery."""

from scribblejax.models.ensemble import Ensemble
from scribblejax.models.ordering import check_layer_order, layer_order, traced_layer_order
from scribblejax.models.regions import Regions, region_labels, region_scores
from scribblejax.models.store import ModelInfo, builtin_models, load_model, read_info, save_model
from scribblejax.models.surgery import add_classes, suppress_class
from scribblejax.models.unet import UNet

__all__ = [
  "Ensemble",
  "ModelInfo",
  "Regions",
  "UNet",
  "add_classes",
  "builtin_models",
  "check_layer_order",
  "layer_order",
  "load_model",
  "read_info",
  "region_labels",
  "region_scores",
  "save_model",
  "suppress_class",
  "traced_layer_order",
]
