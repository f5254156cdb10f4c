"""Where the predict, refine and info workflows lived before issue 19 split them; kept so that code
outside the app layer that imports from here goes on working. New code imports from
:mod:`scribblejax.pipeline` (the image <-> network path) and :mod:`scribblejax.app` (the use cases).

Still imported from here: :mod:`scribblejax.convert.nnunet` (``nnunet_axis_order``), the converter
tests (``spec_from_info``) and the ensemble tests (``network_passes`` as ``_passes``).
"""

from scribblejax.app.info import describe_model
from scribblejax.app.predict import run_predict
from scribblejax.app.refine_round import run_refine
from scribblejax.app.report import check_outputs, companion_paths, compile_timer
from scribblejax.app.settings import TUNED, MarkOptions, RefineSettings
from scribblejax.pipeline.network import network_passes, prepare, resolve_layers
from scribblejax.pipeline.spec import (InferenceOptions, InputSpec, input_axis_order, mirroring_axes, nnunet_axis_order,
                                       spec_from_info, spec_of)

_passes = network_passes   # the name tests/models/test_ensemble.py imports

__all__ = ["InferenceOptions", "InputSpec", "MarkOptions", "RefineSettings", "TUNED", "check_outputs",
           "companion_paths", "compile_timer", "describe_model", "input_axis_order", "mirroring_axes",
           "network_passes", "nnunet_axis_order", "prepare", "resolve_layers", "run_predict", "run_refine",
           "spec_from_info", "spec_of"]
