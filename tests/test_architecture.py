"""The package's layers, read from its source: imports only go down, no private names cross modules, the
top-level API is curated and no function hides a module (docs/design.md describes the layers)."""

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import scribblejax

PACKAGE = Path(scribblejax.__file__).parent
# Each layer may import the layers below it, never one above. The library (everything not named here) is
# the bottom; the use cases over files sit on it; the research harness on both; the front ends on top.
LAYERS = {"app": 1, "research": 2, "cli": 3, "napari": 3}
FOREIGN = ("benchmarks", "tests", "converters")  # never imported by the installed package


def module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
  parts = module.split(".")
  return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def imports_of(path: Path):
  """(imported module, names taken from it, line) for every import in the file, function bodies included."""
  tree = ast.parse(path.read_text(), str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, (), node.lineno
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      yield node.module, tuple(a.name for a in node.names), node.lineno


def is_module(name: str) -> bool:
  """Whether ``name`` is a module of the package (a package's private module may be imported by name)."""
  path = PACKAGE.parent.joinpath(*name.split("."))
  return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def source_files():
  return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_imports_only_go_down_and_never_reach_benchmarks_or_tests():
  wrong = []
  for path in source_files():
    here = module_name(path)
    for module, _, line in imports_of(path):
      if module.split(".")[0] in FOREIGN:
        wrong.append(f"{here}:{line} imports {module}")
      elif module.startswith("scribblejax.") and layer_of(module) > layer_of(here):
        wrong.append(f"{here}:{line} (layer {layer_of(here)}) imports {module} (layer {layer_of(module)})")
  assert not wrong, "\n".join(wrong)


def test_no_module_imports_another_modules_private_names():
  wrong = []
  for path in source_files():
    here = module_name(path)
    for module, names, line in imports_of(path):
      if not module.startswith("scribblejax") or module == here:
        continue
      private = [n for n in names if n.startswith("_") and not n.startswith("__") and not is_module(f"{module}.{n}")]
      if private:
        wrong.append(f"{here}:{line} takes {private} from {module}")
  assert not wrong, "\n".join(wrong)


def test_the_top_level_api_is_curated_sorted_and_complete():
  names = scribblejax.__all__
  assert len(names) <= 35, f"{len(names)} names at the top: put the rest in a namespace"
  assert list(names) == sorted(names, key=str.lower) or list(names) == sorted(names)
  missing = [n for n in names if not hasattr(scribblejax, n)]
  assert not missing


def test_no_function_or_class_hides_a_module_of_the_same_name():
  hidden = []
  for info in pkgutil.walk_packages([str(PACKAGE)], "scribblejax."):
    if info.name.startswith("scribblejax.napari"):
      continue  # importing napari's widgets needs Qt
    parent_name, _, child = info.name.rpartition(".")
    parent = importlib.import_module(parent_name)
    value = getattr(parent, child, None)
    if value is not None and not hasattr(value, "__path__") and not type(value).__name__ == "module":
      hidden.append(f"{parent_name}.{child} is {type(value).__name__}, hiding the module {info.name}")
  assert not hidden, "\n".join(hidden)


@pytest.mark.parametrize(
  "folder", sorted(p.name for p in Path(__file__).parent.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))
)
def test_test_folders_mirror_the_package(folder):
  assert (PACKAGE / folder).is_dir() or folder == "benchmarks", f"tests/{folder} has no scribblejax/{folder}"
