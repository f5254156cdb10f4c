"""A torch-free, code-free reader for PyTorch, safetensors and NumPy checkpoints.

``torch.save`` writes a zip archive holding a pickle (``<prefix>/data.pkl``) and one raw little-endian
byte file per tensor storage (``<prefix>/data/<key>``). Unpickling an untrusted file can run arbitrary
code, so this module unpickles with :class:`RestrictedUnpickler`, whose ``find_class`` accepts only an
allow-list of globals (tensor rebuild functions, storage types, ``OrderedDict``, builtin containers and
the NumPy scalar/dtype types that nnU-Net checkpoints contain) and raises :class:`UnsafeCheckpointError`
for anything else *before* the global can be called. Tensors come back as NumPy arrays; tensors that
are views of one storage share memory, as they do in torch.

Example::

  state = load_checkpoint("fold_0/checkpoint_final.pth")["network_weights"]
  state["encoder.stages.0.0.convs.0.conv.weight"].shape   # (32, 1, 3, 3, 3)
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np


class UnsafeCheckpointError(ValueError):
  """A checkpoint's pickle names a global outside the allow-list (loading it could run code)."""


class CheckpointFormatError(ValueError):
  """A file is missing, unreadable or not a checkpoint format this module reads."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stand-in for a ``torch.<X>Storage`` class: only its element dtype matters here."""

  name: str
  dtype: np.dtype


_STORAGE_DTYPES = {
  "DoubleStorage": np.dtype(np.float64),
  "FloatStorage": np.dtype(np.float32),
  "HalfStorage": np.dtype(np.float16),
  "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
  "LongStorage": np.dtype(np.int64),
  "IntStorage": np.dtype(np.int32),
  "ShortStorage": np.dtype(np.int16),
  "CharStorage": np.dtype(np.int8),
  "ByteStorage": np.dtype(np.uint8),
  "BoolStorage": np.dtype(np.bool_),
  "ComplexFloatStorage": np.dtype(np.complex64),
  "ComplexDoubleStorage": np.dtype(np.complex128),
}


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
  """Builds the NumPy view of ``storage`` that ``torch._utils._rebuild_tensor_v2`` would build."""
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, np.ndarray):
    raise CheckpointFormatError(f"tensor storage is a {type(storage).__name__}, not a storage record")
  itemsize = storage.dtype.itemsize
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if any(n == 0 for n in size):
    return np.zeros(size, storage.dtype)
  last = int(storage_offset) + sum((n - 1) * s for n, s in zip(size, stride))
  if storage_offset < 0 or any(s < 0 for s in stride) or last >= storage.size:
    raise CheckpointFormatError(
      f"tensor of size {size}, stride {stride}, offset {storage_offset} lies outside its storage "
      f"of {storage.size} elements"
    )
  return np.ndarray(
    size,
    storage.dtype,
    buffer=storage,
    offset=int(storage_offset) * itemsize,
    strides=tuple(s * itemsize for s in stride),
  )


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
  """``torch._utils._rebuild_parameter``: a Parameter is its data here."""
  del requires_grad, backward_hooks, state
  return data


def _torch_device(*args):
  """``torch.device(...)`` recorded as a plain string, e.g. ``"cuda:0"``."""
  return ":".join(str(a) for a in args)


def _codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
  """``_codecs.encode`` as protocol-2 pickles use it to store bytes; text encodings only."""
  if not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "utf-8", "utf8"):
    raise UnsafeCheckpointError(f"checkpoint calls _codecs.encode with encoding {encoding!r}")
  return text.encode(encoding)


def _numpy_allowed() -> dict[tuple[str, str], Any]:
  """The NumPy globals a checkpoint may name (scalars, dtypes, plain arrays)."""
  # numpy >= 2 names it numpy._core, older pickles numpy.core: accept both names.
  multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray
  allowed: dict[tuple[str, str], Any] = {}
  for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    allowed[(module, "scalar")] = multiarray.scalar
    allowed[(module, "_reconstruct")] = multiarray._reconstruct
  allowed[("numpy", "dtype")] = np.dtype
  allowed[("numpy", "ndarray")] = np.ndarray
  for name in dir(np.dtypes):
    if name.endswith("DType"):
      allowed[("numpy.dtypes", name)] = getattr(np.dtypes, name)
  return allowed


def _allowed_globals() -> dict[tuple[str, str], Any]:
  """The complete allow-list: ``(module, qualname) -> object`` handed to the unpickler."""
  allowed: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "device"): _torch_device,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): _codecs_encode,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
  }
  for name, dtype in _STORAGE_DTYPES.items():
    allowed[("torch", name)] = _StorageType(name, dtype)
  allowed.update(_numpy_allowed())
  return allowed


class RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that resolves only allow-listed globals and torch storage records.

  Args:
    file: the pickle stream.
    load_storage: ``(key, dtype, numel) -> np.ndarray`` returning the flat storage ``key``.
  """

  def __init__(self, file, load_storage):
    super().__init__(file)
    self._load_storage = load_storage
    self._allowed = _allowed_globals()

  def find_class(self, module, name):
    try:
      return self._allowed[(module, name)]
    except KeyError:
      if (module, name) == ("torch._utils", "_rebuild_tensor_v3"):
        raise CheckpointFormatError(
          "checkpoint holds tensors of a dtype this reader does not support (torch saves unsigned 16/32/64-bit "
          "and float8 tensors this way); convert them to float32 before saving"
        ) from None
      raise UnsafeCheckpointError(
        f"checkpoint refers to {module}.{name}, which is not on the allow-list of safe types; "
        "refusing to load it (unpickling it could run code)"
      ) from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise CheckpointFormatError(f"unsupported persistent id in checkpoint: {pid!r}")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise UnsafeCheckpointError(f"storage record names {storage_type!r}, not a torch storage type")
    return self._load_storage(str(key), storage_type.dtype, int(numel))


def _read_torch_zip(path: Path) -> Any:
  """Reads a ``torch.save`` zip archive (torch >= 1.6)."""
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if not pickles:
      if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        raise CheckpointFormatError(
          f"{path} is a TorchScript archive, not a state dict; save the weights with "
          "torch.save(model.state_dict(), ...) and convert that"
        )
      raise CheckpointFormatError(f"{path} is a zip file without a torch data.pkl")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = archive.read(prefix + "byteorder").decode().strip()
    storages: dict[str, np.ndarray] = {}

    def load_storage(key, dtype, numel):
      if key not in storages:
        try:
          raw = archive.read(f"{prefix}data/{key}")
        except KeyError:
          raise CheckpointFormatError(f"{path}: storage {key!r} is missing from the archive") from None
        order_dtype = dtype.newbyteorder("<" if byteorder == "little" else ">") if dtype.itemsize > 1 else dtype
        if len(raw) < numel * dtype.itemsize:
          raise CheckpointFormatError(
            f"{path}: storage {key!r} holds {len(raw)} bytes, expected {numel * dtype.itemsize}"
          )
        array = np.frombuffer(bytearray(raw), dtype=order_dtype, count=numel)
        storages[key] = array.astype(dtype, copy=False) if order_dtype != dtype else array
      storage = storages[key]
      if storage.dtype != dtype:
        raise CheckpointFormatError(f"{path}: storage {key!r} is read as two different dtypes")
      return storage

    return RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), load_storage).load()


_SAFETENSORS_DTYPES = {
  "F64": np.dtype("<f8"),
  "F32": np.dtype("<f4"),
  "F16": np.dtype("<f2"),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype("<i8"),
  "I32": np.dtype("<i4"),
  "I16": np.dtype("<i2"),
  "I8": np.dtype("i1"),
  "U64": np.dtype("<u8"),
  "U32": np.dtype("<u4"),
  "U16": np.dtype("<u2"),
  "U8": np.dtype("u1"),
  "BOOL": np.dtype(np.bool_),
  "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
  "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  """Reads a ``.safetensors`` file (8-byte header length, JSON header, raw little-endian data)."""
  data = path.read_bytes()
  if len(data) < 8:
    raise CheckpointFormatError(f"{path} is too short to be a safetensors file")
  header_len = int.from_bytes(data[:8], "little")
  if header_len > len(data) - 8:
    raise CheckpointFormatError(f"{path}: safetensors header length {header_len} exceeds the file")
  try:
    header = json.loads(data[8 : 8 + header_len])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointFormatError(f"{path}: invalid safetensors header ({e})") from None
  body = bytearray(data[8 + header_len :])
  out = collections.OrderedDict()
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise CheckpointFormatError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    dtype = _SAFETENSORS_DTYPES[info["dtype"]]
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end - start != int(np.prod(shape)) * dtype.itemsize or end > len(body):
      raise CheckpointFormatError(f"{path}: tensor {name!r} has inconsistent data offsets")
    count = int(np.prod(shape, dtype=np.int64))
    out[name] = np.frombuffer(body, dtype=dtype, count=count, offset=start).reshape(shape)
  return out


def _read_npz(path: Path) -> dict[str, np.ndarray]:
  """Reads a ``.npz`` archive without pickles."""
  try:
    with np.load(path, allow_pickle=False) as archive:
      return collections.OrderedDict((k, archive[k]) for k in archive.files)
  except ValueError as e:
    if "allow_pickle" in str(e):
      raise UnsafeCheckpointError(f"{path}: contains pickled objects, refusing to load ({e})") from None
    raise CheckpointFormatError(f"cannot read checkpoint {path}: {e}") from None


def load_checkpoint(path: str | os.PathLike) -> Any:
  """Loads a checkpoint without torch and without running code from it.

  Args:
    path: a ``torch.save`` file (``.pth``, ``.pt``, ``.ckpt``, ``.bin``: zip format), a
      ``.safetensors`` file or a ``.npz`` archive.

  Returns:
    The saved object with every tensor replaced by a NumPy array (``dict[str, np.ndarray]`` for
    safetensors and npz).

  Raises:
    UnsafeCheckpointError: the pickle names a global outside the allow-list.
    CheckpointFormatError: the file is missing, unreadable or in an unsupported format.
  """
  path = Path(path)
  if not path.is_file():
    raise CheckpointFormatError(f"checkpoint {path} does not exist or is not a file")
  try:
    with open(path, "rb") as f:
      magic = f.read(8)
  except OSError as e:
    raise CheckpointFormatError(f"cannot read checkpoint {path}: {e}") from None
  suffix = path.suffix.lower()
  try:
    if suffix == ".safetensors":
      return _read_safetensors(path)
    if suffix == ".npz":
      return _read_npz(path)
    if magic.startswith(b"PK"):
      return _read_torch_zip(path)
  except (UnsafeCheckpointError, CheckpointFormatError):
    raise
  except (
    zipfile.BadZipFile,
    EOFError,
    pickle.UnpicklingError,
    KeyError,
    TypeError,
    OSError,
    ValueError,
    IndexError,
    AttributeError,
    OverflowError,
    MemoryError,
    RecursionError,
  ) as e:
    # a damaged pickle stream can fail in any of these ways (a corrupted length asks for petabytes)
    raise CheckpointFormatError(
      f"cannot read checkpoint {path}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    ) from None
  if magic[:1] == b"\x80":
    raise CheckpointFormatError(
      f"{path} uses torch's legacy (pre-1.6) serialization, which this reader does not support; "
      "re-save it with a current torch.save"
    )
  raise CheckpointFormatError(f"{path} is not a torch zip, safetensors or npz checkpoint")
