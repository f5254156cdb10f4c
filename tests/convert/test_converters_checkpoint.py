"""The torch-free checkpoint reader: bit-identical to torch.load, and refuses unsafe pickles."""

import collections
import json
import pickle
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from scribblejax.convert.checkpoint import CheckpointFormatError, UnsafeCheckpointError, load_checkpoint


def _same_bits(a, b):
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_torch_zip_bit_identical(tmp_path):
  torch = pytest.importorskip("torch")
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 5, generator=g)
  state = collections.OrderedDict(
    f32=torch.randn(3, 4, 5, generator=g),
    f16=torch.randn(7, generator=g).half(),
    bf16=torch.randn(2, 3, generator=g).bfloat16(),
    f64=torch.randn(2, generator=g).double(),
    i64=torch.arange(-5, 7),
    i8=torch.tensor([-3, 4], dtype=torch.int8),
    u8=torch.tensor([200, 4], dtype=torch.uint8),
    boolean=torch.tensor([True, False, True]),
    transposed=base.t(),
    row=base[2],
    strided=base[::2, 1::2],
    scalar=torch.tensor(3.5),
    empty=torch.zeros(0, 3),
    param=torch.nn.Parameter(torch.randn(4, generator=g)),
  )
  state["base"] = base
  path = tmp_path / "w.pth"
  torch.save({"net": state, "epoch": 3, "dev": torch.device("cpu"), "nested": [1, (2.5, "x")]}, path)
  ours = load_checkpoint(path)
  theirs = torch.load(path, weights_only=True)
  assert ours["epoch"] == 3 and ours["nested"] == [1, (2.5, "x")] and ours["dev"] == "cpu"
  assert isinstance(ours["net"], collections.OrderedDict) and list(ours["net"]) == list(theirs["net"])
  for key, tensor in theirs["net"].items():
    expected = (
      tensor.detach().float().numpy().astype(ml_dtypes.bfloat16)
      if tensor.dtype == torch.bfloat16
      else tensor.detach().numpy()
    )
    assert _same_bits(ours["net"][key], np.array(expected)), key
  assert ours["net"]["bf16"].dtype == ml_dtypes.bfloat16
  # Views of one storage share memory, as in torch.
  net = ours["net"]
  assert np.shares_memory(net["base"], net["transposed"]) and np.shares_memory(net["base"], net["row"])
  net["base"][2, 0] = 123.0
  assert net["row"][0] == 123.0 and net["transposed"][0, 2] == 123.0


def test_numpy_scalars_and_dtypes_as_in_nnunet(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "c.pth"
  torch.save(
    {"_best_ema": np.float64(0.25), "losses": [np.float32(1.5)], "dt": np.dtype("int16"), "arr": np.arange(3.0)}, path
  )
  ours = load_checkpoint(path)
  assert ours["_best_ema"] == np.float64(0.25) and ours["losses"][0].dtype == np.float32
  assert ours["dt"] == np.dtype("int16") and np.array_equal(ours["arr"], np.arange(3.0))


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    import os

    return (os.system, (f"touch {self.marker}",))


def _torch_like_zip(path, payload: bytes):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", payload)
    z.writestr("archive/byteorder", "little")
    z.writestr("archive/version", "3\n")


def _unsafe_load(loader: str, path) -> None:
  """Loads ``path`` in a fresh Python with an unsafe loader ("pickle" or "torch"), as a careless user would."""
  code = {
    "pickle": "import pickle, sys, zipfile; pickle.loads(zipfile.ZipFile(sys.argv[1]).read('archive/data.pkl'))",
    "torch": "import sys, torch; torch.load(sys.argv[1], weights_only=False)",
  }[loader]
  subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("unsafe", ["pickle", "torch"])
def test_malicious_pickle_runs_under_an_unsafe_loader_but_ours_refuses_it(tmp_path, unsafe):
  if unsafe == "torch":
    pytest.importorskip("torch")
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  _torch_like_zip(path, pickle.dumps({"network_weights": _Evil(str(marker))}, protocol=2))
  _unsafe_load(unsafe, path)  # positive control: the payload is live and does run
  assert marker.exists()
  marker.unlink()
  with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system"):
    load_checkpoint(path)
  assert not marker.exists()


@pytest.mark.parametrize(
  "module,name",
  [
    ("builtins", "eval"),
    ("builtins", "getattr"),
    ("subprocess", "Popen"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
  ],
)
def test_other_globals_refused(tmp_path, module, name):
  payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."
  path = tmp_path / "g.pt"
  _torch_like_zip(path, payload)
  with pytest.raises(UnsafeCheckpointError, match=f"{module}.{name}"):
    load_checkpoint(path)


def test_missing_and_garbage_files_name_the_path(tmp_path):
  with pytest.raises(CheckpointFormatError, match="nope.pth"):
    load_checkpoint(tmp_path / "nope.pth")
  bad = tmp_path / "bad.pth"
  bad.write_bytes(b"PK\x03\x04 not really a zip")
  with pytest.raises(CheckpointFormatError, match="bad.pth"):
    load_checkpoint(bad)
  legacy = tmp_path / "legacy.pth"
  legacy.write_bytes(pickle.dumps(1, protocol=2))
  with pytest.raises(CheckpointFormatError, match="legacy"):
    load_checkpoint(legacy)
  assert issubclass(UnsafeCheckpointError, ValueError) and issubclass(CheckpointFormatError, ValueError)


def _write_safetensors(path, arrays, names):
  header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
  for key, name in zip(arrays, names):
    raw = np.ascontiguousarray(arrays[key]).tobytes()
    header[key] = {"dtype": name, "shape": list(arrays[key].shape), "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  blob = json.dumps(header).encode()
  path.write_bytes(len(blob).to_bytes(8, "little") + blob + b"".join(chunks))


def test_safetensors_and_npz(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {
    "a": rng.standard_normal((3, 2)).astype(np.float32),
    "b": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
    "c": np.array([1, -2], np.int64),
    "d": np.array(True),
  }
  path = tmp_path / "m.safetensors"
  _write_safetensors(path, arrays, ["F32", "BF16", "I64", "BOOL"])
  loaded = load_checkpoint(path)
  for key in arrays:
    assert _same_bits(loaded[key], arrays[key]), key
  np.savez(tmp_path / "m.npz", **arrays)
  loaded = load_checkpoint(tmp_path / "m.npz")
  for key in ("a", "c", "d"):
    assert _same_bits(loaded[key], arrays[key]), key
  np.savez(tmp_path / "o.npz", o=np.array([{"x": 1}], dtype=object))
  with pytest.raises(UnsafeCheckpointError):
    load_checkpoint(tmp_path / "o.npz")


def test_safetensors_matches_reference_package(tmp_path):
  torch = pytest.importorskip("torch")
  safetensors_torch = pytest.importorskip("safetensors.torch")
  tensors = {"w": torch.randn(4, 3), "h": torch.randn(2).bfloat16(), "i": torch.arange(3)}
  safetensors_torch.save_file(tensors, str(tmp_path / "r.safetensors"))
  loaded = load_checkpoint(tmp_path / "r.safetensors")
  assert _same_bits(loaded["w"], tensors["w"].numpy())
  assert _same_bits(loaded["i"], tensors["i"].numpy())
  assert _same_bits(loaded["h"], tensors["h"].float().numpy().astype(ml_dtypes.bfloat16))


def test_unsupported_dtypes_and_damaged_files_are_format_errors_not_safety_errors(tmp_path):
  torch = pytest.importorskip("torch")
  torch.save({"w": torch.zeros(3, dtype=torch.uint16)}, tmp_path / "u16.pt")
  with pytest.raises(CheckpointFormatError, match="dtype this reader does not support"):
    load_checkpoint(tmp_path / "u16.pt")  # was: "could run code"
  header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (6,), }"
  with zipfile.ZipFile(tmp_path / "bad.npz", "w") as z:  # a damaged .npy header in a sound archive
    z.writestr("w.npy", b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.replace(b"<f4", b"<q9"))
  with pytest.raises(CheckpointFormatError, match="bad.npz"):
    load_checkpoint(tmp_path / "bad.npz")  # was: "contains pickled objects"
