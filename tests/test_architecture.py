"""The package's layers, read from its source: imports only go down, no private names cross modules, the
top-level API is curated and no function hides a module (docs/design.md describes the layers)."""

import ast
import functools
import importlib
import pkgutil
from pathlib import Path

import pytest

import scribblejax

PACKAGE = Path(scribblejax.__file__).parent
# Each module may import modules of its own rank or below, never above. Within the library: small
# leaves, then models, the parameter split, the refinement, sessions and file formats, the image
# pipeline, the converters; above the library, the use cases over files, the research harness on
# both, and the two front ends on top. A module named in RANK_OF_MODULE overrides its package.
RANK_OF_PACKAGE = {
  "_checks": 0,
  "kernels": 0,
  "config": 1,
  "marks": 1,
  "models": 2,
  "params": 3,
  "refinement": 4,
  "session": 5,
  "io": 5,
  "pipeline": 6,
  "convert": 7,
  "": 8,
  "testing": 8,
  "app": 10,
  "research": 11,
  "cli": 12,
  "napari": 12,
}
# intensity normalisation is a leaf (numpy only): the model store checks the specs it stores with it
RANK_OF_MODULE = {"scribblejax.pipeline.normalization": 1}
FOREIGN = ("benchmarks", "tests", "converters", "torch")  # never imported by the installed package


def module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
  """Whether ``name`` is a module of the package (a package's private module may be imported by name)."""
  path = PACKAGE.parent.joinpath(*name.split("."))
  return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def rank_of(module: str) -> int:
  if module in RANK_OF_MODULE:
    return RANK_OF_MODULE[module]
  parts = module.split(".")
  return RANK_OF_PACKAGE[parts[1] if len(parts) > 1 else ""]


@functools.cache
def tree_of(path: Path) -> ast.Module:
  """The file's syntax tree, parsed once for every check that reads it."""
  return ast.parse(path.read_text(), str(path))


def absolute(node: ast.ImportFrom, here: str, is_package: bool) -> str:
  """The module an ``ImportFrom`` reads from, relative imports resolved against ``here``."""
  if not node.level:
    return node.module or ""
  package = here.split(".") if is_package else here.split(".")[:-1]
  package = package[: len(package) - (node.level - 1)]
  return ".".join(package + ([node.module] if node.module else []))


def imports_of(path: Path):
  """(imported module, names taken from it, line) for every import in the file, function bodies included.

  ``from a import b`` where ``a.b`` is a module counts as an import of ``a.b`` (so ``from scribblejax
  import research`` is an import of ``scribblejax.research``); relative imports are resolved.
  """
  here = module_name(path)
  for node in ast.walk(tree_of(path)):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, (), node.lineno
    elif isinstance(node, ast.ImportFrom):
      module = absolute(node, here, path.name == "__init__.py")
      names = []
      for alias in node.names:
        if is_module(f"{module}.{alias.name}"):
          yield f"{module}.{alias.name}", (), node.lineno
        else:
          names.append(alias.name)
      if names:
        yield module, tuple(names), node.lineno


def module_aliases(path: Path) -> dict[str, str]:
  """Local names bound to scribblejax modules in the file (``import a.b as c``, ``from a import b``)."""
  here = module_name(path)
  aliases = {}
  for node in ast.walk(tree_of(path)):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("scribblejax") and alias.asname:
          aliases[alias.asname] = alias.name
    elif isinstance(node, ast.ImportFrom):
      module = absolute(node, here, path.name == "__init__.py")
      for alias in node.names:
        if is_module(f"{module}.{alias.name}"):
          aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
  return aliases


def source_files():
  return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_imports_only_go_down_and_never_reach_benchmarks_tests_or_torch():
  wrong = []
  for path in source_files():
    here = module_name(path)
    for module, _, line in imports_of(path):
      if module.split(".")[0] in FOREIGN:
        wrong.append(f"{here}:{line} imports {module}")
      elif module.startswith("scribblejax") and rank_of(module) > rank_of(here):
        wrong.append(f"{here}:{line} (rank {rank_of(here)}) imports {module} (rank {rank_of(module)})")
  assert not wrong, "\n".join(wrong)


def test_no_module_takes_another_modules_private_names():
  wrong = []
  for path in source_files():
    here = module_name(path)
    for module, names, line in imports_of(path):
      if not module.startswith("scribblejax") or module == here:
        continue
      private = [n for n in names if n.startswith("_") and not n.startswith("__")]
      if private:
        wrong.append(f"{here}:{line} takes {private} from {module}")
    aliases = module_aliases(path)
    for node in ast.walk(tree_of(path)):
      if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and aliases[node.value.id] != here
      ):
        wrong.append(f"{here}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
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
