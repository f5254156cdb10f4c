"""On CI (CI set) a skipped converter module or test fails the run: checked on a throwaway test folder."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SKIPPING_MODULE = """import pytest
pytest.skip("deliberately skipped: the family's package does not import", allow_module_level=True)
"""
SKIPPING_TEST = """import pytest

def test_equivalence():
  pytest.importorskip("a_package_that_is_not_installed")

def test_fine():
  pass
"""


def run_pytest(folder: Path, ci: str | None) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "CI"}
  if ci is not None:
    env["CI"] = ci
  return subprocess.run(
    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
    cwd=folder,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """This suite's conftest (with the helpers it imports) beside a skipping smp module, a skipping convert test
  and a skipping other module."""
  root = tmp_path_factory.mktemp("ci_guard")
  for name in ("conftest.py", "helpers.py"):
    shutil.copy(Path(__file__).with_name(name), root / name)
  (root / "test_converters_smp.py").write_text(SKIPPING_MODULE)
  (root / "test_converters_convert.py").write_text(SKIPPING_TEST)
  (root / "test_unguarded.py").write_text(SKIPPING_MODULE)
  return root


@pytest.mark.slow
def test_on_ci_a_guarded_skip_fails_the_run_naming_test_and_reason(folder):
  proc = run_pytest(folder, "true")
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "SKIPPED ON CI test_converters_smp.py: Skipped: deliberately skipped" in proc.stdout
  assert "SKIPPED ON CI test_converters_convert.py::test_equivalence: Skipped: could not import" in proc.stdout
  assert (
    "test_unguarded" not in proc.stdout.split("converter equivalence tests skipped on CI")[1].split("short test")[0]
  )


@pytest.mark.slow
@pytest.mark.parametrize("ci", [None, "false"])
def test_off_ci_a_skip_is_only_a_skip(folder, ci):
  proc = run_pytest(folder, ci)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "SKIPPED ON CI" not in proc.stdout and "3 skipped" in proc.stdout
