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

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

// The CPU kernels, equal bit for bit to dequantize_ops: per block, the 16 code values times the
// block's scale (fp32, the same product) cast to the output type once, then one table lookup
// per 4-bit code. The vector kernels do the lookup with a permute across one register holding
// the table; the scalar kernel is the reference they are tested against and the fallback.
// The numbers are lorafit_quant_dequantize's `kernel` argument.
enum class Kernel : int { Best = 0, Ops = 1, Scalar = 2, Avx2 = 3, Avx512 = 4, Avx512Bf16 = 5 };

// Whether this CPU runs `k` (checked at run time: the build assumes no CPU beyond x86-64).
bool supported(Kernel k) {
#if defined(__x86_64__)
  switch (k) {
    case Kernel::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    case Kernel::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl");
    case Kernel::Avx512Bf16:
      return supported(Kernel::Avx512) && __builtin_cpu_supports("avx512bf16");
    default:
      break;
  }
#endif
  return k == Kernel::Best || k == Kernel::Ops || k == Kernel::Scalar;
}

const char* name(Kernel k) {
  switch (k) {
    case Kernel::Best: return "best";
    case Kernel::Ops: return "ops";
    case Kernel::Scalar: return "scalar";
    case Kernel::Avx2: return "avx2";
    case Kernel::Avx512: return "avx512";
    case Kernel::Avx512Bf16: return "avx512-bf16";
  }
  return "unknown";
}

Kernel best_kernel() {
  static const Kernel best = [] {
    for (auto k : {Kernel::Avx512Bf16, Kernel::Avx512, Kernel::Avx2}) {
      if (supported(k)) return k;
    }
    return Kernel::Scalar;
  }();
  return best;
}

// A CPU weight's buffers as the kernels read them.
struct Blocks {
  const uint8_t* packed;
  const float* code;
  const float* absmax;         // plain scales, or null when nested
  const uint8_t* scale_codes;  // nested: the 8-bit scale codes, ...
  const float* nested_absmax;  // ... their scale per 256 blocks,
  const float* nested_code;    // ... their 256-value code
  float offset;                // ... and the offset added to every scale
  int64_t n;

  // Block b's fp32 scale, with the same two roundings as block_scales (the product, then the
  // offset; build.rs forbids fusing them).
  float scale(int64_t b) const {
    if (absmax) return absmax[b];
    const float product = nested_code[scale_codes[b]] * nested_absmax[b / kNestedBlock];
    return product + offset;
  }
};

template <typename Out>
void scalar_block(const Blocks& w, int64_t b, Out* out) {
  Out table[16];
  const float scale = w.scale(b);
  for (int k = 0; k < 16; ++k) table[k] = static_cast<Out>(w.code[k] * scale);
  const int64_t first = b * kBlock;
  const int64_t len = std::min(kBlock, w.n - first);
  const uint8_t* bytes = w.packed + first / 2;
  Out* o = out + first;
  const int64_t pairs = len / 2;
  for (int64_t i = 0; i < pairs; ++i) {
    const uint8_t byte = bytes[i];
    o[2 * i] = table[byte >> 4];
    o[2 * i + 1] = table[byte & 15];
  }
  if (len % 2) o[len - 1] = table[bytes[pairs] >> 4];
}

template <typename Out>
void scalar_range(const Blocks& w, int64_t begin, int64_t end, Out* out) {
  for (int64_t b = begin; b < end; ++b) scalar_block(w, b, out);
}

#if defined(__x86_64__)
#define LORAFIT_AVX2 __attribute__((target("avx2,f16c")))
#define LORAFIT_AVX512 __attribute__((target("avx2,f16c,avx512f,avx512bw,avx512vl")))
#define LORAFIT_AVX512_BF16 __attribute__((target("avx2,f16c,avx512f,avx512bw,avx512vl,avx512bf16")))

// The 16-bit conversions of a table, as c10's scalar ones round: bf16 to nearest even with
// every NaN 0x7FC0 (c10::BFloat16), fp16 to nearest even with a NaN's payload replaced by
// 0x7E00 under its sign (c10::Half; F16C would keep part of the payload).
LORAFIT_AVX2 __m128i bf16_x8(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

LORAFIT_AVX2 __m128i half_x8(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i nan32 = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  const __m256i quiet32 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x8000)),
                                          _mm256_set1_epi32(0x7E00));
  const __m128i nan = _mm_packs_epi32(_mm256_castsi256_si128(nan32), _mm256_extracti128_si256(nan32, 1));
  const __m128i quiet = _mm_packus_epi32(_mm256_castsi256_si128(quiet32), _mm256_extracti128_si256(quiet32, 1));
  return _mm_blendv_epi8(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT), quiet, nan);
}

LORAFIT_AVX512 __m256i bf16_x16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// vcvtneps2bf16 rounds as c10 does except that it flushes subnormal inputs to zero and keeps
// NaN payloads: a table holding either (weights near FLT_MIN, or not finite) takes bf16_x16.
LORAFIT_AVX512_BF16 __m256i bf16_native_x16(__m512 x) {
  const __m512 abs = _mm512_abs_ps(x);
  const __mmask16 odd = _mm512_cmp_ps_mask(abs, _mm512_set1_ps(FLT_MIN), _CMP_NGE_UQ) &
                        _mm512_cmp_ps_mask(abs, _mm512_setzero_ps(), _CMP_NEQ_UQ);
  if (odd) return bf16_x16(x);
  const __m256bh h = _mm512_cvtneps_pbh(x);
  __m256i bits;
  std::memcpy(&bits, &h, sizeof bits);
  return bits;
}

LORAFIT_AVX512 __m256i half_x16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i quiet = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x8000)),
                                        _mm512_set1_epi32(0x7E00));
  return _mm256_mask_blend_epi16(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q),
                                 _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT), _mm512_cvtepi32_epi16(quiet));
}

// One block's 64 values from its 32 bytes, `lo` and `hi` the table's entries 0-7 and 8-15.
// fp32: one permute per half table on the indices (byte >> 4, byte) of 4 bytes, the upper
// half chosen where index bit 3 is set (the permute reads only bits 0-2).
LORAFIT_AVX2 void lookup_avx2(__m256 lo, __m256 hi, const uint8_t* bytes, float* out) {
  for (int q = 0; q < 8; ++q) {
    int32_t four;
    std::memcpy(&four, bytes + 4 * q, 4);
    const __m256i d = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(four));
    const __m256i idx = _mm256_or_si256(_mm256_srli_epi64(d, 4), _mm256_slli_epi64(d, 32));
    const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    _mm256_storeu_ps(out + 8 * q, _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx),
                                                   _mm256_permutevar8x32_ps(hi, idx), upper));
  }
}

// 16 bits: byte shuffles of the table's low and high bytes by the nibbles in order, the two
// interleaved back into words (unpack works within 128-bit lanes, hence the final permutes).
LORAFIT_AVX2 void lookup16_avx2(__m128i lo, __m128i hi, const uint8_t* bytes, uint16_t* out) {
  const __m128i low_byte = _mm_set1_epi16(0xFF);
  const __m256i table_lo = _mm256_broadcastsi128_si256(
      _mm_packus_epi16(_mm_and_si128(lo, low_byte), _mm_and_si128(hi, low_byte)));
  const __m256i table_hi =
      _mm256_broadcastsi128_si256(_mm_packus_epi16(_mm_srli_epi16(lo, 8), _mm_srli_epi16(hi, 8)));
  const __m128i nibble = _mm_set1_epi8(15);
  for (int half = 0; half < 2; ++half) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16 * half));
    const __m128i high = _mm_and_si128(_mm_srli_epi16(x, 4), nibble), low = _mm_and_si128(x, nibble);
    const __m256i idx = _mm256_set_m128i(_mm_unpackhi_epi8(high, low), _mm_unpacklo_epi8(high, low));
    const __m256i l = _mm256_shuffle_epi8(table_lo, idx), h = _mm256_shuffle_epi8(table_hi, idx);
    const __m256i w0 = _mm256_unpacklo_epi8(l, h), w1 = _mm256_unpackhi_epi8(l, h);
    auto* o = reinterpret_cast<__m256i*>(out + 32 * half);
    _mm256_storeu_si256(o, _mm256_permute2x128_si256(w0, w1, 0x20));
    _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(w0, w1, 0x31));
  }
}

template <typename Out, __m128i (*To16)(__m256)>
LORAFIT_AVX2 void avx2_range(const Blocks& w, int64_t begin, int64_t end, Out* out) {
  const __m256 code_lo = _mm256_loadu_ps(w.code), code_hi = _mm256_loadu_ps(w.code + 8);
  for (int64_t b = begin; b < end; ++b) {
    const int64_t first = b * kBlock;
    if (first + kBlock > w.n) {
      scalar_block(w, b, out);
      continue;
    }
    const __m256 scale = _mm256_set1_ps(w.scale(b));
    const __m256 lo = _mm256_mul_ps(code_lo, scale), hi = _mm256_mul_ps(code_hi, scale);
    const uint8_t* bytes = w.packed + first / 2;
    if constexpr (std::is_same_v<Out, float>) {
      lookup_avx2(lo, hi, bytes, out + first);
    } else {
      lookup16_avx2(To16(lo), To16(hi), bytes, reinterpret_cast<uint16_t*>(out + first));
    }
  }
}

// fp32: vpermps on the indices (byte >> 4, byte) of 8 bytes (it reads only bits 0-3).
LORAFIT_AVX512 void lookup_avx512(__m512 table, const uint8_t* bytes, float* out) {
  for (int q = 0; q < 4; ++q) {
    const __m512i d = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * q)));
    const __m512i idx = _mm512_or_si512(_mm512_srli_epi64(d, 4), _mm512_slli_epi64(d, 32));
    _mm512_storeu_ps(out + 16 * q, _mm512_permutexvar_ps(idx, table));
  }
}

// 16 bits: vpermw on the word indices (byte >> 4, byte) of 16 bytes; it reads bits 0-4, so the
// table fills both halves of the register.
LORAFIT_AVX512 void lookup16_avx512(__m256i table, const uint8_t* bytes, uint16_t* out) {
  const __m512i both = _mm512_broadcast_i64x4(table);
  for (int half = 0; half < 2; ++half) {
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16 * half)));
    const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(d, 16));
    _mm512_storeu_si512(out + 32 * half, _mm512_permutexvar_epi16(idx, both));
  }
}

template <typename Out, __m256i (*To16)(__m512)>
LORAFIT_AVX512 void avx512_range(const Blocks& w, int64_t begin, int64_t end, Out* out) {
  const __m512 code = _mm512_loadu_ps(w.code);
  for (int64_t b = begin; b < end; ++b) {
    const int64_t first = b * kBlock;
    if (first + kBlock > w.n) {
      scalar_block(w, b, out);
      continue;
    }
    const __m512 table = _mm512_mul_ps(code, _mm512_set1_ps(w.scale(b)));
    const uint8_t* bytes = w.packed + first / 2;
    if constexpr (std::is_same_v<Out, float>) {
      lookup_avx512(table, bytes, out + first);
    } else {
      lookup16_avx512(To16(table), bytes, reinterpret_cast<uint16_t*>(out + first));
    }
  }
}
#endif  // __x86_64__

// Blocks [begin, end) with kernel `k` (one this CPU supports); fp64 output always scalar.
template <typename Out>
void dequantize_range(Kernel k, const Blocks& w, int64_t begin, int64_t end, Out* out) {
#if defined(__x86_64__)
  if constexpr (!std::is_same_v<Out, double>) {
    constexpr bool bf16 = std::is_same_v<Out, c10::BFloat16>;
    switch (k) {
      case Kernel::Avx2:
        return avx2_range<Out, bf16 ? &bf16_x8 : &half_x8>(w, begin, end, out);
      case Kernel::Avx512:
        return avx512_range<Out, bf16 ? &bf16_x16 : &half_x16>(w, begin, end, out);
      case Kernel::Avx512Bf16:
        return avx512_range<Out, bf16 ? &bf16_native_x16 : &half_x16>(w, begin, end, out);
      default:
        break;
    }
  }
#endif
  scalar_range(w, begin, end, out);
}

at::Tensor dequantize_cpu(const Quant& q, Kernel kernel) {
  auto out = at::empty({q.rows, q.cols}, at::TensorOptions().dtype(q.compute));
  auto packed = q.packed.contiguous(), absmax = q.absmax.contiguous();
  auto code = q.code.to(at::kFloat).contiguous();
  at::Tensor nested_absmax, nested_code;
  Blocks w{packed.data_ptr<uint8_t>(), code.data_ptr<float>(), nullptr, nullptr, nullptr, nullptr,
           static_cast<float>(q.offset), q.rows * q.cols};
  if (q.nested()) {
    nested_absmax = q.nested_absmax.contiguous();
    nested_code = q.nested_code.contiguous();
    w.scale_codes = absmax.data_ptr<uint8_t>();
    w.nested_absmax = nested_absmax.data_ptr<float>();
    w.nested_code = nested_code.data_ptr<float>();
  } else {
    w.absmax = absmax.data_ptr<float>();
  }
  const int64_t blocks = (w.n + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.compute, "dequantize_4bit", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 256, [&](int64_t begin, int64_t end) { dequantize_range(kernel, w, begin, end, o); });
  });
  return out;
}

// The dense weight with `kernel`: Best picks the fastest CPU kernel here, and libtorch ops on
// other devices, where a forced CPU kernel is an error.
at::Tensor dequantize(const Quant& q, Kernel kernel = Kernel::Best) {
  if (kernel == Kernel::Ops || (kernel == Kernel::Best && !q.packed.is_cpu())) return dequantize_ops(q);
  TORCH_CHECK(q.packed.is_cpu(), "a CPU dequantization kernel was asked for a weight on ", q.packed.device());
  TORCH_CHECK(supported(kernel), "this CPU lacks the instructions of dequantization kernel ", name(kernel));
  return dequantize_cpu(q, kernel == Kernel::Best ? best_kernel() : kernel);
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

// The dense weight `[rows, cols]` in the compute dtype, by `kernel` (enum Kernel: 0 the fastest
// here, 1 libtorch ops, the others one CPU kernel, for tests and benchmarks). A new tensor
// handle, or null with the reason in lorafit_quant_last_error.
void* lorafit_quant_dequantize(const lorafit_quant* q, int kernel) {
  return guarded("dequantizing a 4-bit weight", [&] { return dequantize(from_c(q), static_cast<Kernel>(kernel)); });
}

// Whether this CPU runs dequantization kernel `kernel` (as lorafit_quant_dequantize numbers it).
int lorafit_quant_kernel_supported(int kernel) { return supported(static_cast<Kernel>(kernel)); }

// `x Wᵀ (+ bias)` for the 4-bit W (`bias` may be null), x in the compute dtype, differentiable
// in x and bias. A new tensor handle, or null with the reason in lorafit_quant_last_error.
void* lorafit_quant_linear(const lorafit_quant* q, const at::Tensor* x, const at::Tensor* bias) {
  return guarded("a 4-bit linear layer", [&] {
    return bias ? QuantLinear::apply(*x, *bias, from_c(q)) : QuantLinear::apply(*x, from_c(q));
  });
}

}  // extern "C"
