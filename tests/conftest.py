"""Fixtures shared by several test files."""

import os

import pytest
from flax import nnx
from helpers import memory_mappings, release_compiled_programs

from scribblejax.models.store import save_model
from scribblejax.models.unet import UNet
from scribblejax.pipeline.normalization import normalize
from scribblejax.research import data
from scribblejax.research.train import TrainConfig, train_segmenter

# The command line keeps compiled programs on disk (scribblejax.cli.enable_compilation_cache); the tests,
# which call it in-process and in subprocesses, do not write there (one test turns it on on purpose).
os.environ["SCRIBBLEJAX_COMPILATION_CACHE"] = "0"

# Every program XLA compiles for the CPU maps several regions of memory (code, constants, data) for
# as long as a jit cache holds it, and Linux caps the mappings of one process (vm.max_map_count, 65,530 by
# default); past the cap LLVM's compiler dies with a segmentation fault, not an error. One pytest process
# compiles thousands of programs: kept all together, they reached the cap about 95% of the way through the
# suite (a segmentation fault inside XLA's compilation, in tests/test_session.py). So once a module ends with
# more than RELEASE_AT of the cap mapped, every compiled program is dropped (later modules compile what they
# need again), and if that leaves more than MAP_BUDGET of the cap mapped, the module fails by name.
RELEASE_AT = 0.3
MAP_BUDGET = 0.2


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """After each test module: drop the compiled programs if they map too much; fail if that does not help."""
  yield
  counts = memory_mappings()
  if counts is None or counts[0] <= RELEASE_AT * counts[1]:
    return
  release_compiled_programs()
  held, limit = memory_mappings()
  if held > MAP_BUDGET * limit:
    pytest.fail(
      f"after this module (or what an earlier one or a session fixture left) and dropping every compiled "
      f"program, the test process still holds {held} memory "
      f"mappings, more than {MAP_BUDGET:.0%} of the kernel's limit ({limit}, vm.max_map_count): something keeps "
      "compiled programs or other mapped memory alive, and the suite would die in XLA's compiler at the limit"
    )


NORM = {"kind": "percentile", "lower": 1.0, "upper": 99.8}
KW = dict(spatial_dims=2, in_channels=1, num_classes=2, channels=[4, 8])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
  """A 4/8 U-Net trained for 40 Adam steps on the DSB training columns, saved to a folder: (model, folder)."""
  ds = data.nuclei2d("binary")
  model = UNet(**KW, rngs=nnx.Rngs(0))
  train_segmenter(
    model,
    normalize(ds.image, NORM)[ds.train],
    ds.labels[ds.train],
    TrainConfig(steps=40, crop=48, batch_size=4, learning_rate=1e-2),
    progress=False,
  )
  folder = tmp_path_factory.mktemp("models") / "tiny"
  save_model(
    folder, model, family="scribblejax.UNet", kwargs=KW, normalization=NORM, class_names=["background", "nucleus"]
  )
  return model, folder


# Markers (pyproject.toml registers them): `make test-quick` runs `-m "not slow and not torch and not gui"`,
# `make test` runs everything. torch and gui are set here by where a test lives; slow is set on each test
# that takes more than about a second (long refinements, training, subprocesses).
TORCH_MODULES = ("test_torch_reference.py", "test_torch_case.py")


def pytest_collection_modifyitems(config, items):
  for item in items:
    path = item.path
    if path.parent.name == "convert" or path.name in TORCH_MODULES:
      item.add_marker(pytest.mark.torch)
    if path.parent.name == "napari":
      item.add_marker(pytest.mark.gui)


# On CI (the environment variable CI set, as CI services do) the converter families' equivalence tests
# must run: a failed import of torch, monai, smp or dynamic_network_architectures would otherwise hide every
# test of a family behind one "skipped" line. There a skip in these modules fails the session.
GUARDED_MODULES = (
  "test_converters_smp.py",
  "test_converters_monai.py",
  "test_converters_nnunet.py",
  "test_converters_convert.py",
  "test_converters_checkpoint.py",
)


def on_ci() -> bool:
  """Whether the environment says this is a CI run (``CI`` set, and not to "0"/"false")."""
  return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def guarded_skip(report) -> str | None:
  """``"nodeid: reason"`` when ``report`` (a collection or test report) is a skip in a guarded module."""
  if not report.skipped or report.nodeid.split("::", 1)[0].rsplit("/", 1)[-1] not in GUARDED_MODULES:
    return None
  reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
  return f"{report.nodeid}: {reason}"


class ConverterSkipGuard:
  """A pytest plugin: a skipped guarded module or test makes the session fail, naming module and reason."""

  def __init__(self):
    self.skips = []  # "nodeid: reason", in the order pytest reported them

  def _note(self, report) -> None:
    found = guarded_skip(report)
    if found is not None:
      self.skips.append(found)

  def pytest_collectreport(self, report):  # a module skipped at import (importorskip, allow_module_level)
    self._note(report)

  def pytest_runtest_logreport(self, report):  # a test skipped inside a guarded module
    self._note(report)

  def pytest_sessionfinish(self, session):
    if self.skips and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
      session.exitstatus = pytest.ExitCode.TESTS_FAILED

  def pytest_terminal_summary(self, terminalreporter):
    if self.skips:
      terminalreporter.section("converter equivalence tests skipped on CI (CI is set): failing", sep="=", red=True)
      for line in self.skips:
        terminalreporter.write_line(f"SKIPPED ON CI {line}", red=True)


def pytest_configure(config):
  if on_ci():
    config.pluginmanager.register(ConverterSkipGuard(), "converter_skip_guard")
