"""Parameter split and layer order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import scribblejax as sj


def _unet(norm="instance"):
  return sj.UNet(spatial_dims=2, in_channels=1, num_classes=3, channels=(4, 8, 16), norm=norm, rngs=nnx.Rngs(0))


def _names(state):
  return sorted("/".join(map(str, p)) for p, _ in nnx.to_flat_state(state))


def test_unet_layer_order_is_the_forward_order():
  model = _unet()
  stated = sj.models.layer_order(model)
  traced = sj.models.traced_layer_order(model, jnp.zeros((1, 16, 16, 1)))
  # the traced order names (conv, norm) separately: collapse to the stated layers and compare
  collapsed = []
  for path in traced:
    owner = next(layer for layer in stated if tuple(path[: len(layer)]) == layer)
    if not collapsed or collapsed[-1] != owner:
      collapsed.append(owner)
  assert tuple(collapsed) == stated
  assert stated[-1] == ("head",) and stated[0] == ("encoder", 0, 0)
  assert stated[-5:] == (("decoder", 0, 1), ("up", 1), ("decoder", 1, 0), ("decoder", 1, 1), ("head",))


@pytest.mark.parametrize("norm", ["instance", "group", "batch", "none"])
def test_split_covers_every_variable_once_and_merges_losslessly(norm):
  model = _unet(norm)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 20, 18, 1)), jnp.float32)
  for select in [
    sj.last_layers(5),
    sj.params.by_regex(r"decoder/1/.*"),
    sj.norm_affine() if norm != "none" else sj.head(),
    sj.params.biases() if norm == "none" else sj.head(),
    sj.params.by_predicate(lambda p: p[0] == "up"),
  ]:
    split = sj.split_params(model, select)
    tunable, frozen = _names(split.tunable), _names(split.frozen)
    assert tunable and not set(tunable) & set(frozen)
    assert sorted(tunable + frozen) == _names(nnx.state(model))
    np.testing.assert_array_equal(np.asarray(sj.params.merge_params(split)(x)), np.asarray(model(x)))


def test_selections_pick_the_right_parameters():
  model = _unet("batch")
  assert _names(sj.split_params(model, sj.head()).tunable) == ["head/bias", "head/kernel"]
  last3 = _names(sj.split_params(model, sj.last_layers(3)).tunable)
  assert all(n.startswith(("head/", "decoder/1/")) for n in last3) and "decoder/1/0/conv/kernel" in last3
  norms = _names(sj.split_params(model, sj.norm_affine()).tunable)
  assert norms and all(n.endswith(("/norm/scale", "/norm/bias")) for n in norms)
  biases = _names(sj.split_params(model, sj.params.biases()).tunable)
  assert biases and all(n.endswith("bias") for n in biases)
  # batch statistics are never tunable
  split = sj.split_params(model, sj.params.by_regex(r".*"))
  assert not any("mean" in n or "var" in n for n in _names(split.tunable))
  assert any(n.endswith("norm/mean") for n in _names(split.frozen))


def test_bad_selections_raise():
  model = _unet()
  n_layers = len(sj.models.layer_order(model))
  with pytest.raises(ValueError, match=f"only {n_layers} layers"):
    sj.split_params(model, sj.last_layers(n_layers + 1))
  with pytest.raises(ValueError, match="positive integer"):
    sj.split_params(model, sj.last_layers(0))
  with pytest.raises(ValueError, match="empty tunable set"):
    sj.split_params(model, sj.params.by_regex(r"no/such/param"))
  with pytest.raises(ValueError, match=r"pattern 'head/\(' is not a regular expression"):
    sj.split_params(model, sj.params.by_regex("head/("))
  assert sj.params.tunable_paths(model, sj.last_layers(np.int64(2))) == sj.params.tunable_paths(
    model, sj.last_layers(2)
  )


class _Plain(nnx.Module):
  """A user model without a layer_order method: the order is traced."""

  def __init__(self, rngs):
    self.late = nnx.Conv(4, 2, (1, 1), rngs=rngs)  # defined first, runs last
    self.early = nnx.Conv(1, 4, (3, 3), rngs=rngs)

  def __call__(self, x):
    return self.late(jax.nn.relu(self.early(x)))


class _Stated(_Plain):
  def __init__(self, rngs, order):
    super().__init__(rngs)
    self._order = order

  def layer_order(self):
    return self._order


def test_user_model_layer_order_traced_or_stated():
  model = _Plain(nnx.Rngs(0))
  example = jnp.zeros((1, 8, 8, 1))
  assert sj.models.layer_order(model, example) == (("early",), ("late",))
  with pytest.raises(ValueError, match="example input"):
    sj.models.layer_order(model)
  split = sj.split_params(model, sj.last_layers(1), example=example)
  assert _names(split.tunable) == ["late/bias", "late/kernel"]
  assert sj.models.layer_order(_Stated(nnx.Rngs(0), [("early",), ("late",)])) == (("early",), ("late",))
  with pytest.raises(ValueError, match="belongs to no layer"):
    sj.models.layer_order(_Stated(nnx.Rngs(0), [("early",)]))
  with pytest.raises(ValueError, match="owns no parameter"):
    sj.models.layer_order(_Stated(nnx.Rngs(0), [("early",), ("late",), ("nothing",)]))
  with pytest.raises(ValueError, match="several layers"):
    sj.models.layer_order(_Stated(nnx.Rngs(0), [("early",), ("late",), ("late", "kernel")]))


class _Scaled(nnx.Module):
  """A layer scale held beside its convolution, and a temperature held beside the whole network."""

  def __init__(self, rngs):
    self.stem = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.block = nnx.Dict(conv=nnx.Conv(4, 4, (3, 3), rngs=rngs), gamma=nnx.Param(jnp.full((4,), 0.1)))
    self.head = nnx.Conv(4, 3, (1, 1), rngs=rngs)
    self.temperature = nnx.Param(jnp.ones(()))

  def __call__(self, x):
    x = self.stem(x)
    x = x + self.block["gamma"] * self.block["conv"](x)
    return self.head(jax.nn.relu(x)) / self.temperature


def test_parameters_held_beside_submodules_are_layers_of_their_own():
  model, example = _Scaled(nnx.Rngs(0)), jnp.zeros((1, 8, 8, 1))
  order = sj.models.layer_order(model, example)  # was: "belongs to several layers" for any selection
  assert order == (("stem",), ("block", "conv"), ("block", "gamma"), ("head",), ("temperature",))
  assert _names(sj.split_params(model, sj.last_layers(2), example=example).tunable) == [
    "head/bias",
    "head/kernel",
    "temperature",
  ]
  assert _names(sj.split_params(model, sj.last_layers(4), example=example).tunable) == [
    "block/conv/bias",
    "block/conv/kernel",
    "block/gamma",
    "head/bias",
    "head/kernel",
    "temperature",
  ]


class _Nested(nnx.Module):
  """Three layers called inside one remat (or jit), defined in reverse alphabetical order, and an unused one."""

  def __init__(self, rngs, wrap):
    self.a_head = nnx.Conv(4, 2, (1, 1), rngs=rngs)
    self.y_second = nnx.Conv(4, 4, (3, 3), rngs=rngs)
    self.z_first = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.aux = nnx.Conv(1, 1, (1, 1), rngs=rngs)
    self.wrap = wrap

  def __call__(self, x):
    body = lambda m, x: m.a_head(jax.nn.relu(m.y_second(jax.nn.relu(m.z_first(x)))))
    if self.wrap == "remat":
      return nnx.remat(body)(self, x)
    return jax.jit(lambda x: body(self, x))(x)


@pytest.mark.parametrize("wrap", ["remat", "jit"])
def test_traced_order_looks_inside_nested_calls_and_puts_unused_layers_first(wrap):
  model = _Nested(nnx.Rngs(0), wrap)
  example = jnp.zeros((1, 8, 8, 1))
  # was: ('a_head', 'y_second', 'z_first') by name (one nested call), and 'aux' last, so head() tuned it
  assert sj.models.layer_order(model, example) == (("aux",), ("z_first",), ("y_second",), ("a_head",))
  assert _names(sj.split_params(model, sj.head(), example=example).tunable) == ["a_head/bias", "a_head/kernel"]


def test_split_does_not_alias_the_model():
  model = _unet()
  split = sj.split_params(model, sj.last_layers(2))
  before = np.array(model.head.kernel[...])
  split = split._replace(tunable=jax.tree.map(lambda a: a + 1.0, split.tunable))
  np.testing.assert_array_equal(np.asarray(model.head.kernel[...]), before)


@pytest.mark.slow
def test_unet_any_size_2d_3d():
  model2 = sj.UNet(spatial_dims=2, in_channels=2, num_classes=4, channels=(4, 8, 16), rngs=nnx.Rngs(0))
  assert model2(jnp.zeros((2, 13, 22, 2))).shape == (2, 13, 22, 4)
  model3 = sj.UNet(
    spatial_dims=3,
    in_channels=1,
    num_classes=2,
    channels=(4, 8),
    norm="group",
    groups=2,
    activation="leaky_relu",
    rngs=nnx.Rngs(0),
  )
  assert model3(jnp.zeros((1, 5, 6, 7, 1))).shape == (1, 5, 6, 7, 2)
  with pytest.raises(ValueError, match="norm"):
    sj.UNet(norm="layer", rngs=nnx.Rngs(0))
  for bad, message in [
    (dict(in_channels=0), "in_channels must be a positive integer"),
    (dict(channels=(4, -8)), "every entry of channels"),
    (dict(channels=(4.7, 8)), "every entry of channels"),  # was: truncated to 4
    (dict(channels="48"), "non-empty sequence"),  # was: (4, 8)
    (dict(channels=()), "non-empty sequence"),
    (dict(convs_per_level=1.5), "convs_per_level"),
    (dict(num_classes=1), "at least 2"),
    (dict(norm="group", groups=3, channels=(4, 8)), "divisible"),
  ]:
    with pytest.raises(ValueError, match=message):
      sj.UNet(**bad, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="expects"):
    model2(jnp.zeros((1, 8, 8, 1)))


def test_a_model_returning_a_tuple_is_refused_by_name():
  class Pair(nnx.Module):
    def __init__(self, rngs):
      self.head = nnx.Conv(1, 2, (3, 3), rngs=rngs)

    def __call__(self, x):
      return self.head(x), x  # (logits, something else)

  split = sj.split_params(Pair(nnx.Rngs(0)), sj.head(), example=jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(ValueError, match="the model returns a tuple; refinement needs one array of logits"):
    sj.predict(split, np.zeros((8, 8, 1), np.float32))  # was: "logits of shape (1, 8, 8, 2)"
