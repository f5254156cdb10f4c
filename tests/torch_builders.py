"""Helpers for the converter consistency tests: random torch weights, logits comparison (torch imported lazily)."""

import numpy as np


def randomize_(module, seed=0):
  """Fills every parameter and float buffer of a torch module with random values (norms included).

  Norm layers are recognised by module type (any ``torch.nn`` batch/instance/group/layer norm), not by
  name, so that their scales are drawn around 1 (and running variances positive) whatever the layer
  is called; everything else gets a fan-in-scaled normal draw.
  """
  import torch

  norm_types = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
  norm_params = {
    f"{prefix}.{name}".lstrip(".")
    for prefix, sub in module.named_modules()
    if isinstance(sub, norm_types)
    for name, _ in list(sub.named_parameters(recurse=False)) + list(sub.named_buffers(recurse=False))
  }
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
      if not p.is_floating_point():
        continue
      if name.endswith("running_var"):
        p.copy_(torch.rand(p.shape, generator=g) + 0.5)
      elif name in norm_params:
        p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
      else:
        p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.3))
  return module.eval()


def torch_state(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def compare(torch_model, flax_model, shape_nchw, seed=1, atol=1e-4):
  """Runs both models on one random input; returns the max abs difference of the logits."""
  import torch

  x = np.random.default_rng(seed).standard_normal(shape_nchw).astype(np.float32)
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(x)).numpy()
    # a meaningful comparison needs logits that depend on the input (degenerate norms can erase it)
    other = torch_model(torch.from_numpy(np.flip(x, axis=-1).copy() * 0.5 + 0.3)).numpy()
  assert np.max(np.abs(other - expected)) > 1e-3, "the torch model's logits do not depend on its input"
  got = np.asarray(flax_model(np.moveaxis(x, 1, -1)))
  got = np.moveaxis(got, -1, 1)
  assert got.shape == expected.shape, (got.shape, expected.shape)
  diff = float(np.max(np.abs(got - expected)))
  assert diff < atol, f"max abs diff {diff}"
  return diff
