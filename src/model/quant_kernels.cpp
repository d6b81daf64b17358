// 4-bit frozen weights (src/model/quantized.rs) on the C++ side of libtorch: dequantization
// (a CPU kernel, and libtorch ops on other devices) and a linear layer whose autograd node keeps
// only the packed weight and dequantizes it again for the backward pass, so that a dense copy of
// the weight never outlives the layer's forward or backward call. No exception crosses the C
// boundary: each entry point catches, keeps the message for lorafit_quant_last_error and
// returns null.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <string>

namespace {

thread_local std::string last_error;

constexpr int64_t kBlock = 64;
constexpr int64_t kNestedBlock = 256;

// A 4-bit `[rows, cols]` weight: packed codes (two per byte, high nibble first), the 16-value
// code, and per block of 64 either an fp32 scale (`absmax`) or, double-quantized, a uint8 code
// of `nested_code` scaled by `nested_absmax[block / 256]` plus `offset`.
struct Quant {
  at::Tensor packed, absmax, nested_absmax, nested_code, code;
  double offset;
  int64_t rows, cols;
  at::ScalarType compute;

  bool nested() const { return nested_absmax.defined(); }
};

// The fp32 scale of every block, on the weight's device: the same two roundings as
// bitsandbytes' generic dequantization (the product, then the offset).
at::Tensor block_scales(const Quant& q) {
  if (!q.nested()) return q.absmax;
  auto n = q.absmax.numel();
  auto values = q.nested_code.index_select(0, q.absmax.to(at::kLong));
  auto blocks = q.nested_absmax.repeat_interleave(kNestedBlock, 0).narrow(0, 0, n);
  return values * blocks + q.offset;
}

// Dequantization with libtorch ops, on any device: `code[q] · scale[block]` in fp32, cast once.
at::Tensor dequantize_ops(const Quant& q) {
  auto n = q.rows * q.cols;
  auto device = q.packed.device();
  auto code = q.code.to(device);
  // One lookup per byte: row b of `pairs` holds the values of its high and low nibble.
  auto bytes = at::arange(256, at::TensorOptions().dtype(at::kLong).device(device));
  auto pairs = at::stack({code.index_select(0, bytes.bitwise_right_shift(4)),
                          code.index_select(0, bytes.bitwise_and(15))},
                         1);
  auto values = pairs.index_select(0, q.packed.view({-1}).to(at::kLong)).view({-1});
  auto blocks = (n + kBlock - 1) / kBlock;
  auto padded = at::constant_pad_nd(values, {0, blocks * kBlock - values.size(0)});
  auto scaled = padded.view({blocks, kBlock}) * block_scales(q).view({blocks, 1});
  return scaled.view({-1}).narrow(0, 0, n).view({q.rows, q.cols}).to(q.compute);
}

// The CPU kernel, equal bit for bit to dequantize_ops: per block, the 16 code values times the
// block's scale (fp32, the same product) cast to the output type once, then one table lookup
// per 4-bit code. The nested scale is computed here too, with the same two fp32 roundings.
template <typename Out>
void dequantize_blocks(const Quant& q, Out* out) {
  const int64_t n = q.rows * q.cols;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const uint8_t* packed = q.packed.data_ptr<uint8_t>();
  const float* code = q.code.data_ptr<float>();
  const bool nested = q.nested();
  const float* absmax = nested ? nullptr : q.absmax.data_ptr<float>();
  const uint8_t* scale_codes = nested ? q.absmax.data_ptr<uint8_t>() : nullptr;
  const float* nested_absmax = nested ? q.nested_absmax.data_ptr<float>() : nullptr;
  const float* nested_code = nested ? q.nested_code.data_ptr<float>() : nullptr;
  const float offset = static_cast<float>(q.offset);
  at::parallel_for(0, blocks, 256, [&](int64_t begin, int64_t end) {
    Out table[16];
    for (int64_t b = begin; b < end; ++b) {
      float scale;
      if (nested) {
        const float product = nested_code[scale_codes[b]] * nested_absmax[b / kNestedBlock];
        scale = product + offset;
      } else {
        scale = absmax[b];
      }
      for (int k = 0; k < 16; ++k) table[k] = static_cast<Out>(code[k] * scale);
      const int64_t first = b * kBlock;
      const int64_t len = std::min(kBlock, n - first);
      const uint8_t* bytes = packed + first / 2;
      Out* o = out + first;
      const int64_t pairs = len / 2;
      for (int64_t i = 0; i < pairs; ++i) {
        const uint8_t byte = bytes[i];
        o[2 * i] = table[byte >> 4];
        o[2 * i + 1] = table[byte & 15];
      }
      if (len % 2) o[len - 1] = table[bytes[pairs] >> 4];
    }
  });
}

at::Tensor dequantize_cpu(const Quant& q) {
  auto out = at::empty({q.rows, q.cols}, at::TensorOptions().dtype(q.compute));
  auto contiguous = q;
  for (auto* t : {&contiguous.packed, &contiguous.absmax, &contiguous.nested_absmax, &contiguous.nested_code}) {
    if (t->defined()) *t = t->contiguous();
  }
  contiguous.code = q.code.to(at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.compute, "dequantize_4bit",
                                  [&] { dequantize_blocks<scalar_t>(contiguous, out.data_ptr<scalar_t>()); });
  return out;
}

at::Tensor dequantize(const Quant& q) {
  return q.packed.is_cpu() ? dequantize_cpu(q) : dequantize_ops(q);
}

// The parts of a Quant an autograd node keeps, by name.
void save(torch::autograd::AutogradContext* ctx, const Quant& q) {
  auto& s = ctx->saved_data;
  s["packed"] = q.packed;
  s["absmax"] = q.absmax;
  s["nested_absmax"] = q.nested_absmax;
  s["nested_code"] = q.nested_code;
  s["code"] = q.code;
  s["offset"] = q.offset;
  s["rows"] = q.rows;
  s["cols"] = q.cols;
  s["compute"] = static_cast<int64_t>(q.compute);
}

Quant restore(torch::autograd::AutogradContext* ctx) {
  auto& s = ctx->saved_data;
  auto tensor = [&](const char* key) { return s[key].isTensor() ? s[key].toTensor() : at::Tensor(); };
  return Quant{tensor("packed"),          tensor("absmax"),     tensor("nested_absmax"),
               tensor("nested_code"),     tensor("code"),       s["offset"].toDouble(),
               s["rows"].toInt(),         s["cols"].toInt(),    static_cast<at::ScalarType>(s["compute"].toInt())};
}

// `x Wᵀ (+ b)` with W dequantized for the forward pass and again for the backward pass; the
// weight is frozen, so the backward needs neither x nor the dense W of the forward pass. A
// layer without bias calls the two-argument forward (autograd takes no undefined input).
struct QuantLinear : public torch::autograd::Function<QuantLinear> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& bias,
                            const Quant& q) {
    save(ctx, q);
    ctx->saved_data["bias"] = bias.requires_grad() ? 2 : 1;
    return at::linear(x, dequantize(q), bias);
  }

  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const Quant& q) {
    save(ctx, q);
    ctx->saved_data["bias"] = 0;
    return at::linear(x, dequantize(q));
  }

  // One gradient per forward argument: x, then the bias when there is one, then none for q.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto& grad = grads[0];
    auto bias = ctx->saved_data["bias"].toInt();
    torch::autograd::variable_list out{grad.matmul(dequantize(restore(ctx)))};
    if (bias == 2) out.push_back(grad.reshape({-1, grad.size(-1)}).sum(0));
    if (bias == 1) out.emplace_back();
    out.emplace_back();
    return out;
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

// A 4-bit weight as Rust passes it: tensor handles (tch's `at::Tensor*`; nested_absmax and
// nested_code null without double quantization) and the dense shape and dtype.
struct lorafit_quant {
  const at::Tensor* packed;
  const at::Tensor* absmax;
  const at::Tensor* nested_absmax;
  const at::Tensor* nested_code;
  const at::Tensor* code;
  float offset;
  int64_t rows;
  int64_t cols;
  int compute;
};

const char* lorafit_quant_last_error() { return last_error.c_str(); }

}  // extern "C"

namespace {

Quant from_c(const lorafit_quant* q) {
  auto opt = [](const at::Tensor* t) { return t ? *t : at::Tensor(); };
  return Quant{*q->packed, *q->absmax, opt(q->nested_absmax), opt(q->nested_code), *q->code, q->offset,
               q->rows,    q->cols,    static_cast<at::ScalarType>(q->compute)};
}

}  // namespace

extern "C" {

// The dense weight `[rows, cols]` in the compute dtype; `ops` != 0 takes the libtorch-ops path
// on the CPU too (the path the kernel is checked and measured against). A new tensor handle, or
// null with the reason in lorafit_quant_last_error.
void* lorafit_quant_dequantize(const lorafit_quant* q, int ops) {
  return guarded("dequantizing a 4-bit weight", [&] {
    auto quant = from_c(q);
    return ops ? dequantize_ops(quant) : dequantize(quant);
  });
}

// `x Wᵀ (+ bias)` for the 4-bit W (`bias` may be null), x in the compute dtype, differentiable
// in x and bias. A new tensor handle, or null with the reason in lorafit_quant_last_error.
void* lorafit_quant_linear(const lorafit_quant* q, const at::Tensor* x, const at::Tensor* bias) {
  return guarded("a 4-bit linear layer", [&] {
    return bias ? QuantLinear::apply(*x, *bias, from_c(q)) : QuantLinear::apply(*x, from_c(q));
  });
}

}  // extern "C"
