"""PyTorch references: Algorithm 1 as a researcher would first write it, and as a demanding user would.

A torch U-Net that mirrors :class:`scribblejax.UNet` layer for layer (instance norm as
``GroupNorm(C, C, eps=1e-5)``, edge padding to a multiple of ``2 ** (levels - 1)``, 2x max pooling,
2x transposed convolutions, concatenation ``[up(x), skip]``, a 1x1 head, crop back), weights copied
from the Flax model, and the refinement loop a researcher would write: copy the model, make the last
l layers trainable, SGD with momentum on cross-entropy over the marked pixels plus
``prox_weight * ||W_lam - W||_2``, and a ``.item()`` stop check each step.

Semantics match :func:`scribblejax.refinement.refine` step for step: evaluate; stop when every marked pixel is
predicted as its label (if early stopping is on) or the loss is not finite; otherwise one SGD update.
The final logits are those of W_lam after the loop. :func:`check_same` runs both for a fixed number of
steps and compares the final logits.

That first loop (:func:`refine_torch`, the benchmark's ``torch_eager``) runs the whole network at every
step, reads the device twice per step and runs one more forward after an early stop. :class:`TorchPeer`
is the loop a demanding PyTorch user would write instead: the frozen trunk once per interaction
(the mirror's :meth:`trunk` up to the first tunable layer, under ``torch.no_grad``) and only the
:meth:`tail` in the loop, no host read in a fixed-step loop, and by :class:`PeerOptions`
``torch.compile``, CUDA graphs and bf16 autocast. :func:`check_peer` compares any of them with
scribblejax the same way.

torch is imported lazily: importing this module never needs it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, NamedTuple

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
      self.decoder = nn.ModuleList(
        [
          nn.ModuleList(
            [Block(2 * deep[i + 1], deep[i + 1])]
            + [Block(deep[i + 1], deep[i + 1]) for _ in range(len(model.decoder[i]) - 1)]
          )
          for i in range(len(deep) - 1)
        ]
      )
      self.head = conv_cls(chans[0], model.num_classes, 1)
      self.multiple = 2 ** (len(chans) - 1)

    def units(self, split_concat: bool = False) -> list[tuple[str, Any]]:
      """The forward pass as a list of ``(parameter name prefix, function of (x, skips))``, in order.

      With ``split_concat`` an up-sampling unit hands on the pair ``(up(x), skip)`` instead of their
      concatenation, and the next layer convolves each with its half of the kernel and adds the two
      (the kernel has no bias): the same function, but the backward pass computes no gradient for the
      skip connection, which only the frozen trunk produced (scribblejax does the same).
      """
      out = []
      for i, level in enumerate(self.encoder):
        for j, layer in enumerate(level):
          out.append(
            (f"encoder.{i}.{j}.", functools.partial(_encoder_unit, layer, i > 0 and j == 0, j == len(level) - 1))
          )
      for k, (up, level) in enumerate(zip(self.up, self.decoder)):
        out.append((f"up.{k}.", functools.partial(_up_pair_unit if split_concat else _up_unit, up, k)))
        for j, layer in enumerate(level):
          unit = _split_block_unit if split_concat and j == 0 else _layer_unit
          out.append((f"decoder.{k}.{j}.", functools.partial(unit, layer)))
      out.append(("head.", functools.partial(_layer_unit, self.head)))
      return out

    def first_unit(self, names) -> int:
      """Index of the first unit holding one of the parameters ``names`` (the first tunable layer)."""
      for index, (prefix, _) in enumerate(self.units()):
        if any(n.startswith(prefix) for n in names):
          return index
      raise ValueError(f"no unit holds any of {sorted(names)}")

    def trunk(self, x, first: int, split_concat: bool = False):
      """Runs units ``[0, first)`` on channels-first ``x``: the state ``(x, skips, spatial)`` the tail reads
      (``x`` a pair with ``split_concat`` when ``first`` follows an up-sampling unit)."""
      spatial = tuple(x.shape[2:])
      pad = []
      for s in reversed(spatial):
        pad += [0, (-s) % self.multiple]
      if any(pad):
        x = F.pad(x, pad, mode="replicate")
      skips = ()
      for _, unit in self.units(split_concat)[:first]:
        x, skips = unit(x, skips)
      return x, skips, spatial

    def tail(self, state, first: int, split_concat: bool = False):
      """Runs units ``[first, end)`` on a state from :meth:`trunk`; the logits, cropped to the input."""
      x, skips, spatial = state
      for _, unit in self.units(split_concat)[first:]:
        x, skips = unit(x, skips)
      return x[(slice(None), slice(None), *(slice(0, s) for s in spatial))]

    def forward(self, x):
      return self.tail(self.trunk(x, 0), 0)

  def _encoder_unit(layer, pool_first, keep, x, skips):
    if pool_first:
      x = pool(x, 2)
    x = layer(x)
    return x, (skips + (x,) if keep else skips)

  def _up_unit(up, k, x, skips):
    return torch.cat([up(x), skips[-2 - k]], dim=1), skips

  def _layer_unit(layer, x, skips):
    return layer(x), skips

  def _up_pair_unit(up, k, x, skips):
    return (up(x), skips[-2 - k]), skips

  def _split_block_unit(layer, x, skips):
    upsampled, skip = x
    weight = layer.conv.weight
    c = upsampled.shape[1]
    y = layer.conv._conv_forward(upsampled, weight[:, :c], None) + layer.conv._conv_forward(skip, weight[:, c:], None)
    return F.relu(layer.norm(y)), skips

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
  conv_perm = (dims + 1, dims, *range(dims))  # (*k, in, out) -> (out, in, *k)
  tconv_perm = (dims, dims + 1, *range(dims))  # (*k, in, out) -> (in, out, *k)
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


def refine_torch(
  net,
  names,
  image,
  marks,
  *,
  max_steps=100,
  learning_rate=0.05,
  momentum=0.9,
  prox_weight=0.01,
  early_stop=True,
  device="cpu",
):
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
    logits = model(x)[0]  # [classes, *spatial]
    picked = logits.movedim(0, -1)[marked]  # [marked, classes]
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


# ---------------------------------------------------------------------------------------------
# The peer a demanding PyTorch user would write
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PeerOptions:
  """How :class:`TorchPeer` runs Algorithm 1; every choice a PyTorch user could make to go faster.

  Attributes:
    cache_trunk: run the frozen trunk once per interaction (``torch.no_grad``, up to the first
      tunable layer) and only the tail, with gradients, in the loop; ``False`` runs the whole network
      at every step.
    compile: ``torch.compile`` the step's forward pass and loss (AOTAutograd compiles its backward)
      and the optimiser update.
    cuda_graphs: capture one guarded step (forward, backward, update, stop flag, step count) in a
      CUDA graph and replay it (CUDA only; refused elsewhere).
    autocast_bf16: run the network under ``torch.autocast(dtype=torch.bfloat16)``; weights, the loss
      and the update stay float32 (like ``RefineConfig(compute_dtype="bfloat16")``).
    check_every: with early stop, steps between host reads of the stop test (one ``.item()`` of the
      combined "satisfied or not finite" flag). scribblejax tests on the device every step, so the
      default 1 matches it.
    sync_every: with early stop off, steps between host reads of the finiteness flag; 0 (the
      default) reads it once, after the loop: no host sync in the loop at all.
    split_concat: a decoder layer reading ``[up(x), skip]`` convolves the two halves apart, so the
      backward pass computes no gradient for the frozen skip connection (the mirror's ``units``).
  """

  cache_trunk: bool = True
  compile: bool = False
  cuda_graphs: bool = False
  autocast_bf16: bool = False
  check_every: int = 1
  sync_every: int = 0
  split_concat: bool = True

  def __post_init__(self):
    if self.check_every < 1 or self.sync_every < 0:
      raise ValueError(f"check_every must be >= 1 and sync_every >= 0, got {self.check_every}, {self.sync_every}")


class PeerResult(NamedTuple):
  """What one :meth:`TorchPeer.refine` returns."""

  logits: np.ndarray  # f32[*spatial, classes], channels-last, W_lam's
  num_steps: int  # SGD updates taken
  nonfinite: bool  # the objective was not finite at some step (the loop stopped there
  # when it checked; with sync_every=0 it is only reported)


# bf16 autocast against RefineConfig(compute_dtype="bfloat16"): the two round differently (measured:
# 0.07 on logits up to 5.6 after 3 steps at 2D 32^2), so the float32 tolerance cannot hold.
BF16_TOLERANCE = {"rtol": 5e-2, "atol": 1e-1}


@functools.cache
def compile_unavailable(device: str = "cpu") -> str | None:
  """Why ``torch.compile`` cannot run here (``None`` when a tiny function compiles and runs)."""
  torch = _torch()
  try:
    fn = torch.compile(lambda a: (a * 2).sum())
    fn(torch.ones(3, device=device))
  except Exception as err:  # noqa: BLE001 (any failure means: not available here)
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
  return None


# Every peer, case and precision of a benchmark run is one more compilation of the same two functions;
# past torch's default limit (8) it would silently run them eagerly.
RECOMPILE_LIMIT = 256


def _compiled(fn):
  """``torch.compile(fn)`` with static shapes (each case compiles its own kernels, as a user compiling
  for one image size gets) and room for every compilation of a benchmark run."""
  torch = _torch()
  compiled = torch.compile(fn, dynamic=False)

  def call(*args):
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
      return compiled(*args)

  return call


class TorchPeer:
  """Algorithm 1 in PyTorch, as a demanding PyTorch user would write it, reusable across interactions.

  W_lam lives in one private copy of the torch mirror, made once; each interaction resets its tunable
  parameters to W (``copy_``) and the momentum buffers to 0, so compiled code and CUDA graphs are
  built once and replayed for every interaction of the same shape. Per step: the tail's forward
  (the whole network without ``cache_trunk``), cross-entropy over the marked pixels (a dense
  ``ignore_index`` loss: no boolean indexing, which would sync with the host), the proximal term,
  ``torch.autograd.grad`` and SGD with momentum by ``torch._foreach`` ops (what ``torch.optim.SGD``
  with ``foreach=True`` runs). With early stop the stop test is read every ``check_every`` steps
  before the backward pass, so the last step computes no gradient and its logits are the result (no
  extra forward). Without early stop nothing is read from the device in the loop (``sync_every=0``).

  Args:
    net: the torch mirror (:func:`build_torch_unet`); never modified.
    names: names of the tunable parameters (:func:`tunable_names`).
    options: :class:`PeerOptions`.
    learning_rate, momentum, prox_weight: as in :class:`scribblejax.RefineConfig`.
    device: torch device.

  Raises:
    ValueError: ``cuda_graphs`` off CUDA.
  """

  def __init__(
    self,
    net,
    names,
    options: PeerOptions = PeerOptions(),
    *,
    learning_rate=0.01,
    momentum=0.9,
    prox_weight=1.0,
    device="cpu",
  ):
    torch = _torch()
    if options.cuda_graphs and torch.device(device).type != "cuda":
      raise ValueError("CUDA graphs need a CUDA device")
    self.options, self.device = options, torch.device(device)
    self.hyper = (float(learning_rate), float(momentum), float(prox_weight))
    self.model = copy.deepcopy(net).to(self.device).eval()
    params = dict(self.model.named_parameters())
    for name, p in params.items():
      p.requires_grad_(name in set(names))
    self.tunable = [params[n] for n in names]
    self.anchor = [p.detach().clone() for p in self.tunable]
    self.buffers = [torch.zeros_like(p) for p in self.tunable]
    self.first = self.model.first_unit(names) if options.cache_trunk else 0
    self._forward = self._loss_and_logits
    self._update = self._sgd_update
    if options.compile:
      self._forward = _compiled(self._loss_and_logits)
      self._update = _compiled(self._sgd_update)
    self._graphs = {}  # input shape -> (graph, static tensors)

  # -- pieces -------------------------------------------------------------------------------------

  def _autocast(self):
    torch = _torch()
    # CUDA graph capture needs autocast's cache of cast weights off (PyTorch's CUDA graphs notes)
    return torch.autocast(
      self.device.type,
      dtype=torch.bfloat16,
      enabled=self.options.autocast_bf16,
      cache_enabled=not self.options.cuda_graphs,
    )

  def _trunk(self, x):
    torch = _torch()
    with torch.no_grad(), self._autocast():
      return self.model.trunk(x, self.first, self.options.split_concat)

  def _loss_and_logits(self, state, target, count):
    """The objective at the current W_lam and the logits ``f32[classes, *spatial]`` it evaluated."""
    torch = _torch()
    with self._autocast():
      logits = self.model.tail(state, self.first, self.options.split_concat)[0]
    logits = logits.float()
    ce = torch.nn.functional.cross_entropy(logits[None], target[None], ignore_index=-1, reduction="sum") / count
    diff = torch.cat([(p - a).reshape(-1) for p, a in zip(self.tunable, self.anchor)])
    return ce + self.hyper[2] * torch.linalg.vector_norm(diff), logits

  def _sgd_update(self, grads):
    """SGD with momentum, as ``torch.optim.SGD(foreach=True)`` (buffer = m * buffer + g; W -= lr * buffer)."""
    torch = _torch()
    with torch.no_grad():
      torch._foreach_mul_(self.buffers, self.hyper[1])
      torch._foreach_add_(self.buffers, grads)
      torch._foreach_add_(self.tunable, self.buffers, alpha=-self.hyper[0])

  def _reset(self):
    torch = _torch()
    with torch.no_grad():
      torch._foreach_copy_(self.tunable, self.anchor)
      torch._foreach_zero_(self.buffers)

  def _inputs(self, image, marks):
    torch = _torch()
    x = torch.from_numpy(np.moveaxis(np.asarray(image, np.float32), -1, 0)[None].copy()).to(self.device)
    target = torch.from_numpy(np.asarray(marks, np.int64)).to(self.device)
    count = (target >= 0).sum().clamp(min=1).float()
    return x, target, count

  @staticmethod
  def _satisfied(logits, target):
    return ((logits.argmax(0) == target) | (target < 0)).all()

  def _final_logits(self, state):
    torch = _torch()
    with torch.no_grad(), self._autocast():
      return self.model.tail(state, self.first, self.options.split_concat)[0].float()

  # -- loops --------------------------------------------------------------------------------------

  def refine(self, image, marks, *, max_steps=100, early_stop=True) -> PeerResult:
    """One interaction from W: at most ``max_steps`` SGD steps.

    Args:
      image: float ``[*spatial, channels]`` (channels-last, like scribblejax).
      marks: int ``[*spatial]``, -1 unmarked.
      max_steps: M.
      early_stop: stop as soon as every marked pixel is predicted as its label.

    Returns:
      :class:`PeerResult`.
    """
    self._reset()
    x, target, count = self._inputs(image, marks)
    state = self._trunk(x)
    if self.options.cuda_graphs:
      return self._refine_graphed(state, target, count, max_steps, early_stop)
    return self._refine_eager(state, target, count, max_steps, early_stop)

  def _refine_eager(self, state, target, count, max_steps, early_stop) -> PeerResult:
    torch = _torch()
    bad = torch.zeros((), dtype=torch.bool, device=self.device)
    every = self.options.check_every if early_stop else self.options.sync_every
    for step in range(max_steps):
      loss, logits = self._forward(state, target, count)
      bad = bad | ~torch.isfinite(loss)
      if every and step % every == 0:
        stop = bad | self._satisfied(logits, target) if early_stop else bad
        if bool(stop.item()):  # the loop's one host read
          return self._result(logits.detach(), step, bool(bad.item()))
      grads = torch.autograd.grad(loss, self.tunable)
      self._update(grads)
    return self._result(self._final_logits(state), max_steps, bool(bad.item()))

  def _result(self, logits, steps, nonfinite) -> PeerResult:
    return PeerResult(np.moveaxis(logits.float().cpu().numpy(), 0, -1), int(steps), bool(nonfinite))

  def _refine_graphed(self, state, target, count, max_steps, early_stop) -> PeerResult:
    """The loop as replays of one captured, guarded step: after the stop rule fires a replay changes
    nothing, so reading the flag every ``check_every`` replays loses no exactness."""
    torch = _torch()
    from torch.utils import _pytree as pytree  # noqa: PLC0415

    leaves, spec = pytree.tree_flatten((state[0], state[1], target, count))
    key = (spec, tuple(t.shape for t in leaves), tuple(t.dtype for t in leaves), state[2], early_stop)
    if key not in self._graphs:
      self._graphs[key] = self._capture(leaves, spec, state[2], early_stop)
    graph, static = self._graphs[key]
    with torch.no_grad():
      torch._foreach_copy_(static["inputs"], leaves)
      for name in ("done", "satisfied", "bad", "steps"):
        static[name].zero_()
      self._reset()
    every = self.options.check_every if early_stop else (self.options.sync_every or max_steps)
    for step in range(max_steps):
      graph.replay()
      if (step + 1) % every == 0 and bool(static["done"].item()):
        break
    steps = min(int(static["steps"].item()), max_steps)
    if bool(static["done"].item()) and bool(static["satisfied"].item()) and not bool(static["bad"].item()):
      logits = static["logits"]  # the stopping step's own logits (no update taken)
    else:
      x, skips, _, _ = pytree.tree_unflatten(static["inputs"], spec)
      logits = self._final_logits((x, skips, state[2]))
    return self._result(logits, steps, bool(static["bad"].item()))

  def _guarded_step(self, static, early_stop):
    torch = _torch()
    from torch.utils import _pytree as pytree  # noqa: PLC0415

    x, skips, target, count = pytree.tree_unflatten(static["inputs"], static["spec"])
    loss, logits = self._forward((x, skips, static["spatial"]), target, count)
    satisfied = self._satisfied(logits, target)
    finite = torch.isfinite(loss)
    active = ~static["done"]
    stop = ~finite | satisfied if early_stop else ~finite
    take = active & ~stop
    grads = torch.autograd.grad(loss, self.tunable)
    with torch.no_grad():
      lr, m, _ = self.hyper
      for p, b, g in zip(self.tunable, self.buffers, grads):
        b.copy_(torch.where(take, b * m + g, b))
        p.copy_(torch.where(take, p - lr * b, p))
      static["logits"].copy_(torch.where(active, logits.detach(), static["logits"]))
      static["satisfied"].copy_(torch.where(active, satisfied, static["satisfied"]))
      static["bad"].copy_(static["bad"] | (active & ~finite))
      static["done"].copy_(static["done"] | (active & stop))
      static["steps"].add_(take.to(static["steps"].dtype))

  def _capture(self, leaves, spec, spatial, early_stop):
    """Static tensors and the captured step (after warm-up steps on a side stream, as CUDA requires)."""
    torch = _torch()
    from torch.utils import _pytree as pytree  # noqa: PLC0415

    x, skips, target, _ = pytree.tree_unflatten(leaves, spec)
    with torch.no_grad():
      logits = self._final_logits((x, skips, spatial))
    flag = functools.partial(torch.zeros, (), dtype=torch.bool, device=self.device)
    static = {
      "inputs": [t.clone() for t in leaves],
      "spec": spec,
      "spatial": spatial,
      "logits": torch.zeros_like(logits),
      "satisfied": flag(),
      "bad": flag(),
      "done": flag(),
      "steps": torch.zeros((), dtype=torch.int32, device=self.device),
    }
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
      for _ in range(3):
        self._guarded_step(static, early_stop)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
      self._guarded_step(static, early_stop)
    return graph, static


def check_peer(
  split, model, image, marks, options: PeerOptions, *, steps=3, rtol=1e-3, atol=1e-3, device="cpu", **settings
) -> float:
  """Runs scribblejax and :class:`TorchPeer` for ``steps`` fixed steps; returns the max logit error.

  float32 options compare in full float32 precision, as :func:`check_same`; ``autocast_bf16`` compares
  against ``RefineConfig(compute_dtype="bfloat16")`` with the caller's (looser) tolerance.

  Raises:
    AssertionError: the final logits differ by more than ``atol + rtol * |logits|``, or the peer took
      another number of steps.
  """
  import jax  # noqa: PLC0415

  import scribblejax as sj  # noqa: PLC0415

  torch = _torch()
  dtype = "bfloat16" if options.autocast_bf16 else "float32"
  config = sj.RefineConfig.paper(max_steps=steps, early_stop=False, compute_dtype=dtype, **settings)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(sj.refine(split, image, marks, config).logits)
  saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
  torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
  try:
    peer = TorchPeer(
      build_torch_unet(model),
      tunable_names(split),
      options,
      learning_rate=config.learning_rate,
      momentum=config.momentum,
      prox_weight=config.prox_weight,
      device=device,
    )
    theirs = peer.refine(image, marks, max_steps=steps, early_stop=False)
  finally:
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
  if theirs.num_steps != steps:
    raise AssertionError(f"the torch peer {options} took {theirs.num_steps} steps instead of {steps}")
  err = float(np.max(np.abs(ours - theirs.logits)))
  if not np.allclose(ours, theirs.logits, rtol=rtol, atol=atol):
    raise AssertionError(f"scribblejax and the torch peer {options} differ after {steps} steps: max |diff| {err:.3g}")
  return err


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
  config = sj.RefineConfig.paper(max_steps=steps, early_stop=False, **settings)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(sj.refine(split, image, marks, config).logits)
  saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
  torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
  try:
    theirs, taken = refine_torch(
      net,
      tunable_names(split),
      image,
      marks,
      max_steps=steps,
      early_stop=False,
      learning_rate=config.learning_rate,
      momentum=config.momentum,
      prox_weight=config.prox_weight,
      device=device,
    )
  finally:
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
  if taken != steps:
    raise AssertionError(f"the torch reference took {taken} steps instead of {steps}")
  err = float(np.max(np.abs(ours - theirs)))
  if not np.allclose(ours, theirs, rtol=rtol, atol=atol):
    raise AssertionError(f"scribblejax and the torch reference differ after {steps} steps: max |diff| {err:.3g}")
  return err
