// int8_linear(x, q, scale, bias) for decoding on CPUs with AVX-512 VNNI (generation/cpu_kernels.py):
// y = x @ (q * scale)^T + bias for int8 weights q (out, in) with one fp32 scale per row, reading each
// weight once, the output rows split between the threads. As llama.cpp's q8_0 matmul does, each row
// of x (up to a few rows) is first rounded to int8 in blocks of 32 values (a block's step: its
// largest |value| / 127, rounded half to even), so the products are summed in int32 within a block
// (vpdpbusd: 64 products per instruction) and the blocks in fp32. Built on first use by
// torch.utils.cpp_extension; the caller checks the CPU's flags first.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {
constexpr int64_t kBlock = 32;

// One row of x rounded: xq (in, padded to 64 with zeros), its blocks' steps repeated in the lanes
// the kernel multiplies them with (16 per 64 values), and the products' offset: the kernel reads
// each weight as q + 128 (unsigned), which adds 128 * sum_b step_b * sum(xq in b).
float round_row(const float* x, int64_t in, int8_t* xq, float* lanes) {
  double offset = 0;
  for (int64_t start = 0; start < in; start += kBlock) {
    const int64_t n = std::min(kBlock, in - start);
    float top = 0;
    for (int64_t i = 0; i < n; i++) top = std::max(top, std::fabs(x[start + i]));
    const float step = top / 127.0f, inv = top > 0 ? 127.0f / top : 0.0f;
    int32_t sum = 0;
    for (int64_t i = 0; i < n; i++) {
      const auto v = static_cast<int32_t>(std::nearbyint(x[start + i] * inv));
      xq[start + i] = static_cast<int8_t>(v);
      sum += v;
    }
    for (int64_t l = 0; l < kBlock / 4; l++) lanes[start / 4 + l] = step;
    offset += 128.0 * step * sum;
  }
  return static_cast<float>(offset);
}

// y[m, r] = scale[r] * (sum over blocks of x's block step * int32 sum of (q + 128) * xq - offset[m])
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void int8_rows(
    const int8_t* q, const float* scale, const float* bias, const int8_t* xq, const float* lanes,
    const float* offset, float* y, int64_t rows, int64_t in, int64_t out, int64_t r0, int64_t r1) {
  const int64_t padded = (in + 63) / 64 * 64;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __mmask64 tail = in % 64 ? (~0ULL >> (64 - in % 64)) : ~0ULL;
  for (int64_t r = r0; r < r1; r++) {
    const int8_t* w = q + r * in;
    for (int64_t m = 0; m < rows; m++) {
      const int8_t* xm = xq + m * padded;
      const float* lm = lanes + m * padded / 4;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < padded; k += 64) {
        const __m512i wk = k + 64 <= in ? _mm512_loadu_si512(w + k) : _mm512_maskz_loadu_epi8(tail, w + k);
        const __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_xor_si512(wk, flip),
                                                 _mm512_loadu_si512(xm + k));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_loadu_ps(lm + k / 4), acc);
      }
      const float v = (_mm512_reduce_add_ps(acc) - offset[m]) * scale[r];
      y[m * out + r] = bias ? v + bias[r] : v;
    }
  }
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1), "int8_linear: shapes do not match");
  TORCH_CHECK(x.scalar_type() == at::kFloat && q.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat &&
                  (!bias.has_value() || bias->scalar_type() == at::kFloat),
              "int8_linear: x, scale and bias fp32, q int8");
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && scale.is_contiguous() && (!bias.has_value() || bias->is_contiguous()),
              "int8_linear: contiguous inputs");
  const int64_t rows = x.size(0), in = q.size(1), out = q.size(0), padded = (in + 63) / 64 * 64;
  std::vector<int8_t> xq(rows * padded, 0);
  std::vector<float> lanes(rows * padded / 4, 0.0f), offset(rows);
  for (int64_t m = 0; m < rows; m++)
    offset[m] = round_row(x.data_ptr<float>() + m * in, in, xq.data() + m * padded, lanes.data() + m * padded / 4);
  auto y = at::empty({rows, out}, x.options());
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  at::parallel_for(0, out, 16, [&](int64_t r0, int64_t r1) {
    int8_rows(q.data_ptr<int8_t>(), scale.data_ptr<float>(), b, xq.data(), lanes.data(), offset.data(),
              y.data_ptr<float>(), rows, in, out, r0, r1);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(gpt2repro, m) { m.def("int8_linear(Tensor x, Tensor q, Tensor scale, Tensor? bias) -> Tensor"); }
TORCH_LIBRARY_IMPL(gpt2repro, CPU, m) { m.impl("int8_linear", &int8_linear); }
