"""The PyTorch peer (benchmarks.torch_reference.TorchPeer): each variant gives scribblejax's logits."""

import numpy as np
import pytest

import scribblejax as sj
from benchmarks import speed
from benchmarks import torch_reference as ref

torch = pytest.importorskip("torch")

HYPER = dict(learning_rate=0.01, momentum=0.9, prox_weight=1.0)


@pytest.fixture(scope="module")
def problem():
  """A 3-level 2D U-Net, the last 5 layers tunable, and a 20 x 28 image (padded inside) with marks."""
  model = speed.random_unet(2, (4, 8, 16), classes=2, seed=2)
  split = sj.split_params(model, sj.last_layers(5))
  images, marks = speed.make_inputs(2, 28, 1, seed=7)
  return model, split, images[0][:20], marks[0][:20]


def test_trunk_then_tail_is_the_whole_network(problem):
  model, split, image, _ = problem
  net = ref.build_torch_unet(model)
  x = torch.from_numpy(np.moveaxis(image, -1, 0)[None].copy())
  first = net.first_unit(ref.tunable_names(split))
  assert net.units()[first][0] == "decoder.0.1."  # the first tunable layer, in forward order
  with torch.no_grad():
    whole = net(x)
    for start in range(len(net.units()) + 1):
      assert torch.equal(net.tail(net.trunk(x, start), start), whole), start
      split = net.tail(net.trunk(x, start, split_concat=True), start, split_concat=True)  # halves of each kernel
      torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "options",
  [
    ref.PeerOptions(),
    ref.PeerOptions(cache_trunk=False),
    ref.PeerOptions(sync_every=1),
    ref.PeerOptions(split_concat=False),
  ],
  ids=["cached", "full_forward", "sync_every_step", "concatenated"],
)
@pytest.mark.slow
def test_peer_gives_scribblejax_logits_after_the_same_steps(problem, options):
  model, split, image, marks = problem
  err = ref.check_peer(split, model, image, marks, options, steps=3, **HYPER)  # rtol = atol = 1e-3, float32
  assert err < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("cache_trunk", [True, False])
def test_bf16_autocast_peer_is_near_scribblejax_bf16(problem, cache_trunk):
  model, split, image, marks = problem
  options = ref.PeerOptions(cache_trunk=cache_trunk, autocast_bf16=True)
  assert ref.check_peer(split, model, image, marks, options, steps=3, **ref.BF16_TOLERANCE, **HYPER) < 0.2


@pytest.mark.slow
def test_compiled_peer_gives_scribblejax_logits(problem):
  """torch.compile (inductor): its C++ kernels compile in 30 to 90 s on 2 busy cores the first time
  (the inductor cache makes a second run quick); kept in the suite, as the slowest test here."""
  reason = ref.compile_unavailable()
  if reason:
    pytest.skip(f"torch.compile unavailable here: {reason}")
  model, split, image, marks = problem
  assert ref.check_peer(split, model, image, marks, ref.PeerOptions(compile=True), steps=2, **HYPER) < 1e-3


def test_cuda_graphs_need_cuda(problem):
  model, split, image, marks = problem
  if not torch.cuda.is_available():
    with pytest.raises(ValueError, match="CUDA"):
      ref.TorchPeer(ref.build_torch_unet(model), ref.tunable_names(split), ref.PeerOptions(cuda_graphs=True))
    return
  for options in (ref.PeerOptions(cuda_graphs=True), ref.PeerOptions(cuda_graphs=True, compile=True)):
    assert ref.check_peer(split, model, image, marks, options, steps=3, device="cuda", **HYPER) < 1e-3


def test_no_host_read_in_a_fixed_step_loop(problem, monkeypatch):
  model, split, image, marks = problem
  peer = ref.TorchPeer(ref.build_torch_unet(model), ref.tunable_names(split), **HYPER)
  reads = []
  plain = torch.Tensor.item
  monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or plain(self))
  result = peer.refine(image, marks, max_steps=6, early_stop=False)
  assert result.num_steps == 6 and not result.nonfinite
  assert len(reads) == 1  # the finiteness flag, once, after the loop
  reads.clear()
  peer.refine(image, marks, max_steps=6, early_stop=True)
  assert len(reads) <= 6 + 1  # one read per step at most (was two), then the flag


@pytest.mark.slow
def test_early_stop_peer_stops_where_scribblejax_stops(problem):
  model, split, image, marks = problem
  hyper = dict(learning_rate=0.05, momentum=0.9, prox_weight=0.01)
  ours = sj.refine(split, image, marks, sj.RefineConfig.paper(max_steps=40, **hyper))
  assert bool(ours.satisfied) and 0 < int(ours.num_steps) < 40  # the stop rule fired
  peer = ref.TorchPeer(ref.build_torch_unet(model), ref.tunable_names(split), **hyper)
  theirs = peer.refine(image, marks, max_steps=40, early_stop=True)
  assert theirs.num_steps == int(ours.num_steps)
  np.testing.assert_allclose(theirs.logits, np.asarray(ours.logits), rtol=1e-3, atol=1e-3)
  again = peer.refine(image, marks, max_steps=40, early_stop=True)  # reset to W: the same interaction
  assert again.num_steps == theirs.num_steps and np.array_equal(again.logits, theirs.logits)


def test_options_are_checked():
  with pytest.raises(ValueError, match="check_every"):
    ref.PeerOptions(check_every=0)
