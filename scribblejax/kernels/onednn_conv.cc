// Convolutions on oneDNN for XLA:CPU, through the XLA FFI.
//
// XLA:CPU runs convolutions, and above all their gradients and 3D convolutions, on generic kernels
// that reach a quarter to a half of oneDNN's speed on the same cores. These handlers compute a
// channels-last convolution or transposed convolution (oneDNN's "deconvolution", the gradient of a
// convolution, as torch.nn.ConvTranspose) and their two gradients with oneDNN;
// scribblejax/kernels/__init__.py builds this file, registers the handlers and wraps them in a
// jax.custom_vjp.
//
// Layouts (N batch, S spatial axes (1 to 3), I input and O output features, K kernel taps):
//   x, dx: f32[N, *S, I]     w, dw: f32[*K, I, O]     y, dy: f32[N, *S', O]
// Attributes: strides, padding_lo, padding_hi (one int64 per spatial axis), transposed (bool);
// no dilation, no groups. S' = (S + lo + hi - K) / stride + 1, or for a transposed convolution
// S' = (S - 1) * stride + K - lo - hi.

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

Tag ActivationTag(size_t nd) { return nd == 1 ? Tag::nwc : nd == 2 ? Tag::nhwc : Tag::ndhwc; }
Tag WeightTag(size_t nd) { return nd == 1 ? Tag::wio : nd == 2 ? Tag::hwio : Tag::dhwio; }

// oneDNN's logical dimensions of one convolution, and the checks that the buffers agree.
struct Geometry {
  memory::dims src, wei, dst, strides, dilates, pad_l, pad_r;
  size_t nd = 0;
  bool transposed = false;
  std::string key;
};

ffi::Error MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, ffi::Span<const int64_t> y,
                        ffi::Span<const int64_t> strides, ffi::Span<const int64_t> lo,
                        ffi::Span<const int64_t> hi, bool transposed, Geometry* g) {
  const size_t nd = strides.size();
  if (nd < 1 || nd > 3 || lo.size() != nd || hi.size() != nd) {
    return ffi::Error::InvalidArgument("onednn_conv: 1 to 3 spatial axes, one stride and padding per axis");
  }
  if (x.size() != nd + 2 || y.size() != nd + 2 || w.size() != nd + 2) {
    return ffi::Error::InvalidArgument("onednn_conv: x, y need rank spatial+2 and w rank spatial+2");
  }
  const int64_t n = x[0], in = x[nd + 1], out = w[nd + 1];
  if (w[nd] != in || y[0] != n || y[nd + 1] != out) {
    return ffi::Error::InvalidArgument("onednn_conv: feature or batch sizes of x, w and y disagree");
  }
  g->nd = nd;
  g->transposed = transposed;
  g->src = {n, in};
  g->wei = {out, in};
  g->dst = {n, out};
  for (size_t d = 0; d < nd; ++d) {
    if (strides[d] < 1 || lo[d] < 0 || hi[d] < 0) {
      return ffi::Error::InvalidArgument("onednn_conv: strides must be >= 1 and padding >= 0");
    }
    const int64_t expect = transposed ? (x[1 + d] - 1) * strides[d] + w[d] - lo[d] - hi[d]
                                      : (x[1 + d] + lo[d] + hi[d] - w[d]) / strides[d] + 1;
    if (expect != y[1 + d]) {
      return ffi::Error::InvalidArgument("onednn_conv: output spatial size does not match the convolution");
    }
    g->src.push_back(x[1 + d]);
    g->wei.push_back(w[d]);
    g->dst.push_back(y[1 + d]);
    g->strides.push_back(strides[d]);
    g->dilates.push_back(0);
    g->pad_l.push_back(lo[d]);
    g->pad_r.push_back(hi[d]);
  }
  for (const memory::dims* part : {&g->src, &g->wei, &g->dst, &g->strides, &g->pad_l, &g->pad_r}) {
    for (int64_t v : *part) g->key += std::to_string(v) + ",";
    g->key += ";";
  }
  g->key += transposed ? "T" : "C";
  return ffi::Error::Success();
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// One cached primitive: its descriptor's weights layout and scratchpad size, and the reorder between
// the user's weights layout and the primitive's.
struct Entry {
  dnnl::primitive primitive;
  memory::desc weights;      // the primitive's (diff_)weights layout
  memory::desc user_weights; // [*K, I, O]
  dnnl::reorder reorder;     // user -> primitive (forward, backward data) or primitive -> user (weights)
  bool needs_reorder = false;
  size_t scratchpad = 0;
};

enum class Kind { kForward, kBackwardData, kBackwardWeights };

// The three primitives of one family: convolution_* or deconvolution_*.
template <class Forward, class BackwardData, class BackwardWeights>
void BuildFamily(Kind kind, const Geometry& g, dnnl::algorithm algorithm, Entry* entry) {
  const memory::desc src(g.src, memory::data_type::f32, ActivationTag(g.nd));
  const memory::desc dst(g.dst, memory::data_type::f32, ActivationTag(g.nd));
  const memory::desc any_wei(g.wei, memory::data_type::f32, Tag::any);
  typename Forward::primitive_desc forward(Engine(), dnnl::prop_kind::forward_training, algorithm, src, any_wei, dst,
                                           g.strides, g.dilates, g.pad_l, g.pad_r, UserScratchpad());
  if (kind == Kind::kForward) {
    entry->primitive = Forward(forward);
    entry->weights = forward.weights_desc();
    entry->scratchpad = forward.scratchpad_desc().get_size();
  } else if (kind == Kind::kBackwardData) {
    typename BackwardData::primitive_desc pd(Engine(), algorithm, src, any_wei, dst, g.strides, g.dilates, g.pad_l,
                                             g.pad_r, forward, UserScratchpad());
    entry->primitive = BackwardData(pd);
    entry->weights = pd.weights_desc();
    entry->scratchpad = pd.scratchpad_desc().get_size();
  } else {
    typename BackwardWeights::primitive_desc pd(Engine(), algorithm, src, any_wei, dst, g.strides, g.dilates,
                                                g.pad_l, g.pad_r, forward, UserScratchpad());
    entry->primitive = BackwardWeights(pd);
    entry->weights = pd.diff_weights_desc();
    entry->scratchpad = pd.scratchpad_desc().get_size();
  }
}

std::shared_ptr<Entry> Build(Kind kind, const Geometry& g) {
  auto entry = std::make_shared<Entry>();
  entry->user_weights = memory::desc(g.wei, memory::data_type::f32, WeightTag(g.nd));
  if (g.transposed) {
    BuildFamily<dnnl::deconvolution_forward, dnnl::deconvolution_backward_data,
                dnnl::deconvolution_backward_weights>(kind, g, dnnl::algorithm::deconvolution_direct, entry.get());
  } else {
    BuildFamily<dnnl::convolution_forward, dnnl::convolution_backward_data, dnnl::convolution_backward_weights>(
        kind, g, dnnl::algorithm::convolution_direct, entry.get());
  }
  entry->needs_reorder = entry->weights != entry->user_weights;
  if (entry->needs_reorder) {
    entry->reorder = kind == Kind::kBackwardWeights
                         ? dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), entry->weights, Engine(),
                                                                       entry->user_weights))
                         : dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), entry->user_weights, Engine(),
                                                                       entry->weights));
  }
  return entry;
}

// Primitives are built once per geometry and kind (building one generates code: milliseconds).
std::shared_ptr<Entry> Lookup(Kind kind, const Geometry& g) {
  static std::mutex* mutex = new std::mutex();
  static auto* cache = new std::unordered_map<std::string, std::shared_ptr<Entry>>();
  const std::string key = std::to_string(static_cast<int>(kind)) + ":" + g.key;
  std::lock_guard<std::mutex> lock(*mutex);
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;
  auto entry = Build(kind, g);
  cache->emplace(key, entry);
  return entry;
}

// Runs one cached primitive on the convolution's input `src` [N, *S, I], weights `wei` [*K, I, O] and
// output `dst` [N, *S', O]: whichever of them the kind reads (forward: src, wei; backward data: dst =
// dy, wei; backward weights: src, dst = dy) or writes (y into dst, dx into src, dw into wei).
ffi::Error Run(Kind kind, const Geometry& g, float* src, float* wei, float* dst) {
  try {
    auto entry = Lookup(kind, g);
    dnnl::stream stream(Engine());
    memory src_mem(memory::desc(g.src, memory::data_type::f32, ActivationTag(g.nd)), Engine(), src);
    memory dst_mem(memory::desc(g.dst, memory::data_type::f32, ActivationTag(g.nd)), Engine(), dst);
    memory user_wei(entry->user_weights, Engine(), wei);
    std::vector<uint8_t> scratch(entry->scratchpad);
    memory scratch_mem(memory::desc({static_cast<int64_t>(entry->scratchpad)}, memory::data_type::u8, Tag::a),
                       Engine(), scratch.data());
    std::vector<uint8_t> staged;
    memory wei_mem = user_wei;
    if (entry->needs_reorder) {
      staged.resize(entry->weights.get_size());
      wei_mem = memory(entry->weights, Engine(), staged.data());
      if (kind != Kind::kBackwardWeights) entry->reorder.execute(stream, user_wei, wei_mem);
    }
    if (kind == Kind::kForward) {
      entry->primitive.execute(stream, {{DNNL_ARG_SRC, src_mem}, {DNNL_ARG_WEIGHTS, wei_mem},
                                        {DNNL_ARG_DST, dst_mem}, {DNNL_ARG_SCRATCHPAD, scratch_mem}});
    } else if (kind == Kind::kBackwardData) {
      entry->primitive.execute(stream, {{DNNL_ARG_DIFF_SRC, src_mem}, {DNNL_ARG_WEIGHTS, wei_mem},
                                        {DNNL_ARG_DIFF_DST, dst_mem}, {DNNL_ARG_SCRATCHPAD, scratch_mem}});
    } else {
      entry->primitive.execute(stream, {{DNNL_ARG_SRC, src_mem}, {DNNL_ARG_DIFF_WEIGHTS, wei_mem},
                                        {DNNL_ARG_DIFF_DST, dst_mem}, {DNNL_ARG_SCRATCHPAD, scratch_mem}});
      if (entry->needs_reorder) entry->reorder.execute(stream, wei_mem, user_wei);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn_conv: oneDNN failed: ") + e.what());
  }
  return ffi::Error::Success();
}

// One handler per kind. Arguments and result, by kind:
//   forward: (x, w) -> y      backward data: (dy, w) -> dx      backward weights: (x, dy) -> dw
template <Kind kind>
ffi::Error Handle(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out,
                  ffi::Span<const int64_t> strides, ffi::Span<const int64_t> lo, ffi::Span<const int64_t> hi,
                  bool transposed) {
  float* x = kind == Kind::kBackwardData ? out->typed_data() : a.typed_data();
  float* w = kind == Kind::kBackwardWeights ? out->typed_data() : b.typed_data();
  float* y = kind == Kind::kForward ? out->typed_data() : kind == Kind::kBackwardData ? a.typed_data() : b.typed_data();
  auto x_dims = kind == Kind::kBackwardData ? out->dimensions() : a.dimensions();
  auto w_dims = kind == Kind::kBackwardWeights ? out->dimensions() : b.dimensions();
  auto y_dims = kind == Kind::kForward ? out->dimensions() : kind == Kind::kBackwardData ? a.dimensions()
                                                                                          : b.dimensions();
  Geometry g;
  if (auto err = MakeGeometry(x_dims, w_dims, y_dims, strides, lo, hi, transposed, &g); !err.success()) {
    return err;
  }
  return Run(kind, g, x, w, y);
}

auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<ffi::Span<const int64_t>>("strides")
      .Attr<ffi::Span<const int64_t>>("padding_lo")
      .Attr<ffi::Span<const int64_t>>("padding_hi")
      .Attr<bool>("transposed");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SjConvForward, Handle<Kind::kForward>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SjConvBackwardData, Handle<Kind::kBackwardData>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SjConvBackwardWeights, Handle<Kind::kBackwardWeights>, Binding());
