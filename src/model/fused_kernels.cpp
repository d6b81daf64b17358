// Elementwise parts of a decoder block as single passes with their own autograd nodes
// (src/model/kernels.rs): rotary embeddings and the SwiGLU product. Composed from libtorch ops
// they take several passes over the activations each way, with temporaries for the narrowed,
// negated and concatenated halves and for type promotion; here each is one pass forward and one
// backward, computed in fp32 and rounded once to the activations' type. No exception crosses the
// C boundary: each entry point catches, keeps the message for lorafit_kernels_last_error and
// returns null.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <cstdint>
#include <string>

namespace {

thread_local std::string last_error;

// Rows of `[batch, seq, heads, head_dim]` handed to one thread at a time.
constexpr int64_t kRowGrain = 64;

// Rotary embedding of the leading `rd` values of each row of `x`, whose rows are
// `[batch, seq, heads]` with any strides and whose last dimension is contiguous, with the tables
// `cos`, `sin` `[batch, seq, rd]` (fp32, contiguous). Forward: `x·cos + rotate_half(x)·sin`,
// where rotate_half(x) = [-x₂, x₁]: the same fp32 products and sum as the composed ops, so the
// result is bit-identical to them. Backward (`transpose`): the transposed rotation of the
// gradient, `g·cos + [g₂·sin₂, -(g₁·sin₁)]`, summed in fp32 and rounded once. The values past
// `rd` pass through.
template <typename T>
void rope_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out,
               bool transpose) {
  const int64_t batch = x.size(0), seq = x.size(1), heads = x.size(2), dim = x.size(3);
  const int64_t rd = cos.size(2), half = rd / 2;
  const int64_t sb = x.stride(0), ss = x.stride(1), sh = x.stride(2);
  const T* in = x.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  at::parallel_for(0, batch * seq * heads, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row % heads, bs = row / heads, t = bs % seq, b = bs / seq;
      const T* xr = in + b * sb + t * ss + h * sh;
      T* orow = o + row * dim;
      const float* cr = c + bs * rd;
      const float* sr = s + bs * rd;
      for (int64_t i = 0; i < half; ++i) {
        const float lo = static_cast<float>(xr[i]), hi = static_cast<float>(xr[i + half]);
        if (transpose) {
          orow[i] = static_cast<T>(lo * cr[i] + hi * sr[i + half]);
          orow[i + half] = static_cast<T>(hi * cr[i + half] + -(lo * sr[i]));
        } else {
          orow[i] = static_cast<T>(lo * cr[i] + -hi * sr[i]);
          orow[i + half] = static_cast<T>(hi * cr[i + half] + lo * sr[i + half]);
        }
      }
      for (int64_t i = rd; i < dim; ++i) orow[i] = xr[i];
    }
  });
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool transpose) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "rotary input must be [batch, seq, heads, head_dim], last dim contiguous");
  TORCH_CHECK(cos.dim() == 3 && cos.size(0) == x.size(0) && cos.size(1) == x.size(1) && cos.size(2) <= x.size(3) &&
                  cos.size(2) % 2 == 0,
              "rotary tables must be [batch, seq, rotary_dim]");
  auto c = cos.to(at::kFloat).contiguous();
  auto s = sin.to(at::kFloat).contiguous();
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope",
                                  [&] { rope_rows<scalar_t>(x, c, s, out, transpose); });
  return out;
}

struct Rope : public torch::autograd::Function<Rope> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos,
                            const at::Tensor& sin) {
    ctx->save_for_backward({cos, sin});
    return rope(x, cos, sin, false);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto grad = grads[0].stride(3) == 1 ? grads[0] : grads[0].contiguous();
    return {rope(grad, saved[0], saved[1], true), at::Tensor(), at::Tensor()};
  }
};

// `silu(gate) · up` elementwise, in fp32, rounded once. The backward pass needs only gate and
// up (the composed ops also keep silu(gate)).
template <typename T>
void silu_mul_forward(const T* gate, const T* up, T* out, int64_t n) {
  at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float g = static_cast<float>(gate[i]);
      out[i] = static_cast<T>(g / (1.0f + std::exp(-g)) * static_cast<float>(up[i]));
    }
  });
}

// d gate = dy · up · σ(g)(1 + g(1 − σ(g))), d up = dy · silu(g), as libtorch's silu_backward.
template <typename T>
void silu_mul_backward(const T* grad, const T* gate, const T* up, T* d_gate, T* d_up, int64_t n) {
  at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float dy = static_cast<float>(grad[i]), g = static_cast<float>(gate[i]);
      const float sigmoid = 1.0f / (1.0f + std::exp(-g));
      d_gate[i] = static_cast<T>(dy * static_cast<float>(up[i]) * (sigmoid * (1.0f + g * (1.0f - sigmoid))));
      d_up[i] = static_cast<T>(dy * (g * sigmoid));
    }
  });
}

struct SiluMul : public torch::autograd::Function<SiluMul> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type(),
                "gate and up must have one shape and type");
    auto g = gate.contiguous(), u = up.contiguous();
    ctx->save_for_backward({g, u});
    auto out = at::empty(g.sizes(), g.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "silu_mul", [&] {
      silu_mul_forward<scalar_t>(g.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g.numel());
    });
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto &g = saved[0], &u = saved[1];
    auto dy = grads[0].to(g.scalar_type()).contiguous();
    auto d_gate = at::empty(g.sizes(), g.options()), d_up = at::empty(g.sizes(), g.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "silu_mul_backward", [&] {
      silu_mul_backward<scalar_t>(dy.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
                                  d_gate.data_ptr<scalar_t>(), d_up.data_ptr<scalar_t>(), g.numel());
    });
    return {d_gate, d_up};
  }
};

template <typename F>
void* guarded(const char* what, F&& body) {
  try {
    return new at::Tensor(body());
  } catch (const c10::Error& e) {
    last_error = std::string(what) + ": " + e.what_without_backtrace();
  } catch (const std::exception& e) {
    last_error = std::string(what) + ": " + e.what();
  } catch (...) {
    last_error = std::string(what) + ": unknown C++ exception";
  }
  return nullptr;
}

}  // namespace

extern "C" {

const char* lorafit_kernels_last_error() { return last_error.c_str(); }

// Rotary embedding of `x` `[batch, seq, heads, head_dim]` (last dim contiguous) with tables
// `[batch, seq, rotary_dim]`; a new contiguous tensor in x's type, differentiable in x.
void* lorafit_rope(const at::Tensor* x, const at::Tensor* cos, const at::Tensor* sin) {
  return guarded("rotary embedding", [&] {
    return x->is_cpu() ? Rope::apply(*x, *cos, *sin) : at::Tensor();
  });
}

// `silu(gate) · up`, differentiable in both.
void* lorafit_silu_mul(const at::Tensor* gate, const at::Tensor* up) {
  return guarded("the SwiGLU product", [&] { return SiluMul::apply(*gate, *up); });
}

}  // extern "C"
