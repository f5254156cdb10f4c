"""Use cases over files: predict, one refinement round, describe a model. Each returns a report; the
command line (:mod:`scribblejax.cli`) and the napari plugin print or show it.

Each reads files, runs the network through the image pipeline (:mod:`scribblejax.pipeline`) and writes
its outputs atomically; none modifies an input. Bad input raises ``ValueError`` with a one-line message
naming the problem, before any heavy work where possible (files and the model's description are
checked before the network is loaded).
"""

from scribblejax.app.info import describe_model
from scribblejax.app.models import Log, load_network, model_ref, silent
from scribblejax.app.predict import run_predict
from scribblejax.app.refine_round import run_refine, taken_words
from scribblejax.app.report import check_outputs, companion_paths, compile_timer, round_line
from scribblejax.app.settings import SETTINGS, TUNED, MarkOptions, RefineSettings, Setting

__all__ = [
  "Log",
  "MarkOptions",
  "RefineSettings",
  "SETTINGS",
  "Setting",
  "TUNED",
  "check_outputs",
  "companion_paths",
  "compile_timer",
  "describe_model",
  "load_network",
  "model_ref",
  "round_line",
  "run_predict",
  "run_refine",
  "silent",
  "taken_words",
]
