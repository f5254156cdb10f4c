"""The one registry of model families: what ``model.json`` may name, how each family is built, and how
its PyTorch checkpoints convert.

A family is registered once, as one :class:`Family` entry in :data:`FAMILIES`: its name in
``model.json``, the ``"module:attribute"`` of its Flax NNX class, the ``"module:function"`` of its
converter, and the class paths of the original library that ``scribblejax convert --arch`` and MONAI
bundles use. Classes and converters are imported on first use only: loading a model imports its own
family's module and nothing else, never code named by a file, and never torch.

Adding a family (see ``docs/converters.md``): the architecture in ``scribblejax/models/zoo/<x>.py``, its
state-dict mapping ``load_weights(model, state, *, source)`` in ``scribblejax/convert/<x>.py``, and one
``Family(...)`` line below.

Example::

    >>> from scribblejax.models.families import FAMILIES, family_of_source
    >>> FAMILIES["monai.BasicUNet"].builder
    'scribblejax.models.zoo.monai:BasicUNet'
    >>> family_of_source("monai.networks.nets.BasicUNet").name
    'monai.BasicUNet'
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from flax import nnx


class Family(NamedTuple):
  """One model family.

  Attributes:
    name: the family's name as ``model.json`` stores it (``"monai.BasicUNet"``).
    builder: ``"module:attribute"`` of the Flax NNX class, called as ``Cls(**kwargs, rngs=nnx.Rngs(seed))``.
    converter: ``"module:function"`` of ``load_weights(model, state, *, source)``, which moves a PyTorch
      state dict (NumPy arrays) into a freshly built model, strictly; ``None`` for families with no PyTorch
      original (the built-in U-Net, ensembles, region heads).
    sources: the original library's class paths (``"monai.networks.nets.BasicUNet"``) under which a bare
      checkpoint or a MONAI bundle names this family; empty for families converted another way (nnU-Net
      folders) or not at all.
  """

  name: str
  builder: str
  converter: str | None = None
  sources: tuple[str, ...] = ()

  def constructor(self) -> Callable[..., nnx.Module]:
    """The family's class (imported now)."""
    return _resolve(self.builder)

  def load_weights(self) -> Callable[..., None]:
    """The family's converter ``load_weights(model, state, *, source)`` (imported now).

    Raises:
      ValueError: the family has no converter.
    """
    if self.converter is None:
      raise ValueError(f"model family {self.name!r} has no PyTorch converter")
    return _resolve(self.converter)


def _resolve(target: str) -> Any:
  module, attr = target.split(":")
  return getattr(importlib.import_module(module), attr)


_MONAI = "monai.networks.nets"
_SMP = "segmentation_models_pytorch"

# The registry. A fixed table: nothing else is ever imported to build a model.
FAMILIES: Mapping[str, Family] = types.MappingProxyType(
  {
    f.name: f
    for f in (
      Family("scribblejax.UNet", "scribblejax.models.unet:UNet"),
      Family(
        "nnunet.PlainConvUNet", "scribblejax.models.zoo.nnunet:PlainConvUNet", "scribblejax.convert.nnunet:load_weights"
      ),
      Family(
        "nnunet.ResidualEncoderUNet",
        "scribblejax.models.zoo.nnunet:ResidualEncoderUNet",
        "scribblejax.convert.nnunet:load_weights",
      ),
      Family(
        "monai.BasicUNet",
        "scribblejax.models.zoo.monai:BasicUNet",
        "scribblejax.convert.monai_nets:load_weights",
        (f"{_MONAI}.BasicUNet", f"{_MONAI}.basic_unet.BasicUNet", f"{_MONAI}.BasicUnet"),
      ),
      Family(
        "monai.UNet",
        "scribblejax.models.zoo.monai:UNet",
        "scribblejax.convert.monai_nets:load_weights",
        (f"{_MONAI}.UNet", f"{_MONAI}.Unet", f"{_MONAI}.unet.UNet"),
      ),
      Family(
        "monai.SegResNet",
        "scribblejax.models.zoo.monai:SegResNet",
        "scribblejax.convert.monai_nets:load_weights",
        (f"{_MONAI}.SegResNet", f"{_MONAI}.segresnet.SegResNet"),
      ),
      Family(
        "smp.Unet",
        "scribblejax.models.zoo.smp:Unet",
        "scribblejax.convert.smp_unet:load_weights",
        (f"{_SMP}.Unet", f"{_SMP}.decoders.unet.model.Unet"),
      ),
      Family("scribblejax.Ensemble", "scribblejax.models.ensemble:Ensemble"),
      Family("scribblejax.Regions", "scribblejax.models.regions:Regions"),
    )
  }
)

# original class path -> family, for checkpoints named by the library they were trained with
SOURCES: Mapping[str, Family] = types.MappingProxyType({source: f for f in FAMILIES.values() for source in f.sources})


def family(name: str) -> Family:
  """The registered family called ``name``.

  Raises:
    ValueError: an unknown family (the message lists the known ones).
  """
  if name not in FAMILIES:
    raise ValueError(f"unknown model family {name!r}; known families: {sorted(FAMILIES)}")
  return FAMILIES[name]


def family_of_source(source: str) -> Family | None:
  """The family an original class path (``"segmentation_models_pytorch.Unet"``) converts to, or ``None``."""
  return SOURCES.get(source)


def constructor(name: str) -> Callable[..., nnx.Module]:
  """The class of family ``name`` (see :func:`family`)."""
  return family(name).constructor()


def build_model(name: str, kwargs: dict, seed: int = 0) -> nnx.Module:
  """Constructs a freshly initialised model of a registered family (random weights from ``seed``).

  Raises:
    ValueError: an unknown family, or arguments its constructor rejects.
  """
  try:
    return constructor(name)(**kwargs, rngs=nnx.Rngs(seed))
  except TypeError as err:
    raise ValueError(f"model family {name!r} rejects the arguments {kwargs}: {err}") from err


def abstract_model(name: str, kwargs: dict) -> nnx.Module:
  """The model's structure with shape-only leaves: no initial value is drawn (they would be overwritten).

  Constructors that need concrete values (e.g. Python control flow on random numbers) are built concretely.
  """
  cls = constructor(name)
  try:
    return nnx.eval_shape(lambda: cls(**kwargs, rngs=nnx.Rngs(0)))
  except Exception:  # noqa: BLE001 -- any tracing problem: fall back to the plain build (and its error messages)
    return build_model(name, kwargs)
