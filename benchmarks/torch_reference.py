"""The PyTorch eager reference: Algorithm 1 as a researcher would write it in PyTorch.

A torch U-Net that mirrors :class:`scribblejax.UNet` layer for layer (instance norm as
``GroupNorm(C, C, eps=1e-5)``, edge padding to a multiple of ``2 ** (levels - 1)``, 2x max pooling,
2x transposed convolutions, concatenation ``[up(x), skip]``, a 1x1 head, crop back), weights copied
from the Flax model, and the refinement loop a researcher would write: copy the model, make the last
l layers trainable, SGD with momentum on cross-entropy over the marked pixels plus
``prox_weight * ||W_lam - W||_2``, and a ``.item()`` stop check each step.

Semantics match :func:`scribblejax.refine` step for step: evaluate; stop when every marked pixel is
predicted as its label (if early stopping is on) or the loss is not finite; otherwise one SGD update.
The final logits are those of W_lam after the loop. :func:`check_same` runs both for a fixed number of
steps and compares the final logits.

torch is imported lazily: importing this module never needs it.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np


def torch_available() -> bool:
  """Whether torch can be imported."""
  import importlib.util  # noqa: PLC0415
  return importlib.util.find_spec("torch") is not None


def _torch():
  import torch  # noqa: PLC0415 (lazy: torch is optional)
  return torch


def build_torch_unet(model) -> Any:
  """A ``torch.nn.Module`` computing the same function as ``model`` (a :class:`scribblejax.UNet`).

  Inputs and outputs are channels-first (``[batch, channels, *spatial]``). Parameter names mirror the
  Flax paths: ``encoder.0.1.conv.weight``, ``decoder.2.0.norm.bias``, ``up.1.weight``, ``head.bias``.

  Raises:
    ValueError: the model is not a U-Net with instance normalisation and ReLU (the benchmark's
      architecture; the mirror covers only that).
  """
  torch = _torch()
  nn = torch.nn
  F = torch.nn.functional
  from flax import nnx  # noqa: PLC0415

  dims = model.spatial_dims
  first = model.encoder[0][0]
  if not isinstance(first.norm, nnx.GroupNorm) or first.norm.group_size != 1 or first.norm.epsilon != 1e-5:
    raise ValueError("the torch mirror covers U-Nets with norm='instance' only")
  if first.activation != "relu":
    raise ValueError("the torch mirror covers U-Nets with activation='relu' only")
  conv_cls = nn.Conv2d if dims == 2 else nn.Conv3d
  tconv_cls = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
  pool = F.max_pool2d if dims == 2 else F.max_pool3d

  class Block(nn.Module):
    def __init__(self, cin, cout):
      super().__init__()
      self.conv = conv_cls(cin, cout, 3, padding=1, bias=False)
      self.norm = nn.GroupNorm(cout, cout, eps=1e-5)

    def forward(self, x):
      return F.relu(self.norm(self.conv(x)))

  class TorchUNet(nn.Module):
    def __init__(self):
      super().__init__()
      chans = model.channels
      cin = model.in_channels
      self.encoder = nn.ModuleList()
      for i, c in enumerate(chans):
        level = [Block(cin if i == 0 else chans[i - 1], c)]
        level += [Block(c, c) for _ in range(len(model.encoder[i]) - 1)]
        self.encoder.append(nn.ModuleList(level))
      deep = chans[::-1]
      self.up = nn.ModuleList([tconv_cls(deep[i], deep[i + 1], 2, stride=2) for i in range(len(deep) - 1)])
      self.decoder = nn.ModuleList([
          nn.ModuleList([Block(2 * deep[i + 1], deep[i + 1])]
                        + [Block(deep[i + 1], deep[i + 1]) for _ in range(len(model.decoder[i]) - 1)])
          for i in range(len(deep) - 1)])
      self.head = conv_cls(chans[0], model.num_classes, 1)
      self.multiple = 2 ** (len(chans) - 1)

    def forward(self, x):
      spatial = x.shape[2:]
      pad = []
      for s in reversed(spatial):
        pad += [0, (-s) % self.multiple]
      if any(pad):
        x = F.pad(x, pad, mode="replicate")
      skips = []
      for i, level in enumerate(self.encoder):
        if i > 0:
          x = pool(x, 2)
        for layer in level:
          x = layer(x)
        skips.append(x)
      for up, level, skip in zip(self.up, self.decoder, skips[-2::-1]):
        x = torch.cat([up(x), skip], dim=1)
        for layer in level:
          x = layer(x)
      x = self.head(x)
      return x[(slice(None), slice(None), *(slice(0, s) for s in spatial))]

  net = TorchUNet()
  copy_weights(model, net)
  return net.eval()


def _np(value) -> np.ndarray:
  return np.asarray(value.get_value() if hasattr(value, "get_value") else value.value)


def copy_weights(model, net) -> None:
  """Copies every parameter of the Flax U-Net ``model`` into the torch mirror ``net`` (in place)."""
  torch = _torch()
  from flax import nnx  # noqa: PLC0415
  dims = model.spatial_dims
  conv_perm = (dims + 1, dims, *range(dims))          # (*k, in, out) -> (out, in, *k)
  tconv_perm = (dims, dims + 1, *range(dims))         # (*k, in, out) -> (in, out, *k)
  flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  named = dict(net.named_parameters())
  used = set()
  with torch.no_grad():
    for name, param in named.items():
      parts = name.split(".")
      key = ".".join(parts[:-1]) + "." + {"weight": "kernel", "bias": "bias"}[parts[-1]]
      if parts[-2] == "norm":
        key = ".".join(parts[:-1]) + "." + {"weight": "scale", "bias": "bias"}[parts[-1]]
      if key not in flat:
        raise ValueError(f"no Flax parameter {key!r} for torch parameter {name!r}")
      value = _np(flat[key])
      if parts[-1] == "weight" and parts[-2] != "norm":
        value = value.transpose(tconv_perm if parts[0] == "up" else conv_perm)
        if parts[0] == "up":
          # lax.conv_transpose (transpose_kernel=False) applies the kernel unflipped; torch's
          # ConvTranspose is the gradient of a convolution, i.e. flipped.
          value = np.flip(value, axis=tuple(range(2, 2 + dims)))
      if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"shape mismatch for {name}: flax {value.shape} vs torch {tuple(param.shape)}")
      param.copy_(torch.from_numpy(np.array(value, np.float32)))
      used.add(key)
  unused = set(flat) - used
  if unused:
    raise ValueError(f"Flax parameters with no torch counterpart: {sorted(unused)}")


def tunable_names(split) -> list[str]:
  """Torch parameter names of the split's tunable Flax parameters."""
  from flax import nnx  # noqa: PLC0415
  names = []
  for path, _ in nnx.to_flat_state(split.tunable):
    parts = [str(p) for p in path]
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[parts[-1]]
    names.append(".".join(parts[:-1] + [leaf]))
  return names


def refine_torch(net, names, image, marks, *, max_steps=100, learning_rate=0.05, momentum=0.9,
                 prox_weight=0.01, early_stop=True, device="cpu"):
  """Algorithm 1 in PyTorch eager mode on one image.

  Args:
    net: the torch mirror (never modified: the loop works on a deep copy, as a researcher would).
    names: names of the tunable parameters (the last l layers).
    image: float ``[*spatial, channels]`` (channels-last, like scribblejax).
    marks: int ``[*spatial]``, -1 unmarked.
    max_steps, learning_rate, momentum, prox_weight: as in :class:`scribblejax.RefineConfig`.
    early_stop: stop as soon as every marked pixel is predicted as its label.
    device: torch device.

  Returns:
    ``(logits, num_steps)``: channels-last float32 numpy logits ``[*spatial, classes]`` of W_lam, and
    the number of SGD steps taken.
  """
  torch = _torch()
  model = copy.deepcopy(net).to(device)
  params = dict(model.named_parameters())
  tunable = [params[n] for n in names]
  for name, p in params.items():
    p.requires_grad_(name in set(names))
  anchor = [p.detach().clone() for p in tunable]
  x = torch.from_numpy(np.moveaxis(np.asarray(image, np.float32), -1, 0)[None].copy()).to(device)
  mk = torch.from_numpy(np.asarray(marks, np.int64)).to(device)
  marked = mk >= 0
  labels = mk[marked]
  opt = torch.optim.SGD(tunable, lr=learning_rate, momentum=momentum)
  steps = 0
  for _ in range(max_steps):
    logits = model(x)[0]                                # [classes, *spatial]
    picked = logits.movedim(0, -1)[marked]              # [marked, classes]
    ce = torch.nn.functional.cross_entropy(picked, labels) if labels.numel() else logits.sum() * 0
    diff = torch.cat([(p - a).reshape(-1) for p, a in zip(tunable, anchor)])
    loss = ce + prox_weight * torch.linalg.vector_norm(diff)
    satisfied = bool((picked.argmax(-1) == labels).all().item())
    if (early_stop and satisfied) or not np.isfinite(loss.item()):
      break
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    steps += 1
  with torch.no_grad():
    logits = model(x)[0]
  return np.moveaxis(logits.float().cpu().numpy(), 0, -1), steps


def check_same(split, model, image, marks, *, steps=3, rtol=1e-3, atol=1e-3, device="cpu", **settings) -> float:
  """Runs scribblejax and the torch reference for ``steps`` fixed steps; returns the max logit error.

  Both run in full float32 precision (JAX ``default_matmul_precision("highest")``, torch with TF32
  off), so that the comparison also holds on GPUs, where both default to TF32 convolutions.

  Raises:
    AssertionError: the final logits differ by more than ``atol + rtol * |logits|``.
  """
  import jax  # noqa: PLC0415
  import scribblejax as sj  # noqa: PLC0415
  torch = _torch()
  net = build_torch_unet(model).to(device)
  config = sj.RefineConfig(max_steps=steps, early_stop=False, **settings)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(sj.refine(split, image, marks, config).logits)
  saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
  torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
  try:
    theirs, taken = refine_torch(net, tunable_names(split), image, marks, max_steps=steps, early_stop=False,
                                 learning_rate=config.learning_rate, momentum=config.momentum,
                                 prox_weight=config.prox_weight, device=device)
  finally:
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
  if taken != steps:
    raise AssertionError(f"the torch reference took {taken} steps instead of {steps}")
  err = float(np.max(np.abs(ours - theirs)))
  if not np.allclose(ours, theirs, rtol=rtol, atol=atol):
    raise AssertionError(f"scribblejax and the torch reference differ after {steps} steps: max |diff| {err:.3g}")
  return err
