"""NumPy-drawn initialisers: the distributions Flax would draw, without compiling per weight shape."""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import scribblejax as sj
from scribblejax.models import init
from scribblejax.models.zoo import layers


def test_lecun_normal_draws_the_truncated_fan_in_distribution():
  shape = (3, 3, 64, 48)
  values = np.asarray(init.lecun_normal()(jax.random.key(0), shape, jnp.float32))
  assert values.shape == shape and values.dtype == np.float32
  std = 1.0 / math.sqrt(3 * 3 * 64)  # variance 1 / fan_in
  assert abs(values.std() / std - 1.0) < 0.03
  assert abs(values.mean()) < 0.03 * std
  # truncated at 2 standard deviations of the untruncated normal, and it reaches near the bound
  bound = 2 * std / init._TRUNCATED_STD
  assert np.abs(values).max() <= bound and np.abs(values).max() > 0.95 * bound
  # the same variance as JAX's own initialiser on the same shape
  reference = np.asarray(jax.nn.initializers.lecun_normal()(jax.random.key(1), shape, jnp.float32))
  assert abs(values.std() / reference.std() - 1.0) < 0.03


def test_draws_follow_the_key_and_dtype():
  a = init.lecun_normal()(jax.random.key(0), (4, 5), jnp.float32)
  b = init.lecun_normal()(jax.random.key(0), (4, 5), jnp.float32)
  c = init.lecun_normal()(jax.random.key(1), (4, 5), jnp.float32)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert init.normal(0.5)(jax.random.key(0), (7,), jnp.bfloat16).dtype == jnp.bfloat16
  np.testing.assert_array_equal(init.zeros(None, (2, 3), jnp.float16), np.zeros((2, 3), np.float16))
  np.testing.assert_array_equal(init.ones(None, (4,)), np.ones(4, np.float32))
  with pytest.raises(ValueError, match="at least 2 axes"):
    init.lecun_normal()(jax.random.key(0), (5,))


@pytest.mark.slow
def test_traced_keys_use_jax_initialisers():
  # under jit the key is a tracer: JAX's own initialiser runs inside the program
  values = jax.jit(lambda k: init.lecun_normal()(k, (3, 3, 8, 4), jnp.float32))(jax.random.key(0))
  assert values.shape == (3, 3, 8, 4) and np.all(np.abs(np.asarray(values)) <= 2 / math.sqrt(72) / init._TRUNCATED_STD)
  abstract = nnx.eval_shape(lambda: sj.UNet(spatial_dims=3, channels=(4, 8), rngs=nnx.Rngs(0)))
  assert abstract.encoder[0][0].conv.kernel.shape == (3, 3, 3, 1, 4)
  # converter layers build abstractly too (a concrete seed was required before)
  conv = nnx.eval_shape(lambda: layers.Conv(3, 5, 3, spatial_dims=2, rngs=nnx.Rngs(0)))
  assert conv.kernel.shape == (3, 3, 3, 5)


def test_building_a_unet_of_new_shapes_compiles_nothing():
  sj.UNet(spatial_dims=2, channels=(3, 5), rngs=nnx.Rngs(0))  # one-time key operations
  compiled = []

  class Handler(logging.Handler):
    def emit(self, record):
      if "Compiling" in record.getMessage():
        compiled.append(record.getMessage())

  handler = Handler()
  logging.getLogger("jax").addHandler(handler)
  try:
    with jax.log_compiles(True):
      model = sj.UNet(spatial_dims=3, in_channels=2, num_classes=3, channels=(6, 10, 14), rngs=nnx.Rngs(5))
  finally:
    logging.getLogger("jax").removeHandler(handler)
  assert compiled == []
  kernel = np.asarray(model.decoder[1][1].conv.kernel[...])
  assert kernel.shape == (3, 3, 3, 6, 6) and kernel.std() > 0
  assert not np.array_equal(kernel, np.asarray(model.decoder[0][1].conv.kernel[...])[..., :6, :6])
