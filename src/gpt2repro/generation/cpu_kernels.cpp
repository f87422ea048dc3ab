// int8_linear(x, q, scale, bias) for decoding on CPUs with AVX-512 VNNI (generation/cpu_kernels.py):
// y = x @ (q * scale)^T + bias for int8 weights q (out, in) with one fp32 scale per row, reading each
// weight once, the output rows split between the threads. As llama.cpp's q8_0 matmul does, each row
// of x (up to a few rows) is first rounded to int8 in blocks of 32 values (to the nearest of 127
// steps of the block's largest |value|, ties to even), so the products are summed exactly in int32
// within a block (vpdpbusd: 64 products per instruction) and the blocks in fp32. Built on first use by
// torch.utils.cpp_extension; the caller checks the CPU's flags first.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {
constexpr int64_t kBlock = 32;

// One row of x rounded to int8 per block of 32 (xq, padded to 64 with zeros), and for each of the
// kernel's int32 lanes (4 values, 16 lanes per 64): its block's step, and where its sum starts. The
// kernel reads each weight as q + 128 (unsigned, for vpdpbusd), so a lane starting at -128 * the sum
// of its 4 values ends at sum(q * xq), exactly. A block that is not finite gives NaN steps (the
// output is NaN, as F.linear's would be); one too small for 127 / top to be finite, zeros.
void round_row(const float* x, int64_t in, int8_t* xq, float* steps, int32_t* starts) {
  for (int64_t start = 0; start < in; start += kBlock) {
    const int64_t n = std::min(kBlock, in - start);
    float top = 0;
    bool finite = true;
    for (int64_t i = 0; i < n; i++) {
      finite = finite && std::isfinite(x[start + i]);
      top = std::max(top, std::fabs(x[start + i]));
    }
    const float inv = 127.0f / top;
    const bool usable = finite && top > 0 && std::isfinite(inv);
    for (int64_t i = 0; i < n; i++) {
      const float v = usable ? std::clamp(std::nearbyint(x[start + i] * inv), -127.0f, 127.0f) : 0.0f;
      xq[start + i] = static_cast<int8_t>(v);
    }
    for (int64_t l = 0; l < kBlock / 4; l++) steps[start / 4 + l] = finite ? top / 127.0f : NAN;
  }
  for (int64_t l = 0; l < (in + 3) / 4; l++)
    starts[l] = -128 * (xq[4 * l] + xq[4 * l + 1] + xq[4 * l + 2] + xq[4 * l + 3]);
}

// y[m, r] = scale[r] * sum over lanes of the lane's step * its exact int32 sum of q * xq (+ bias[r])
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void int8_rows(
    const int8_t* q, const float* scale, const float* bias, const int8_t* xq, const float* steps,
    const int32_t* starts, float* y, int64_t rows, int64_t in, int64_t out, int64_t r0, int64_t r1) {
  const int64_t padded = (in + 63) / 64 * 64;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __mmask64 tail = in % 64 ? (~0ULL >> (64 - in % 64)) : ~0ULL;
  for (int64_t r = r0; r < r1; r++) {
    const int8_t* w = q + r * in;
    for (int64_t m = 0; m < rows; m++) {
      const int8_t* xm = xq + m * padded;
      const float* sm = steps + m * padded / 4;
      const int32_t* lm = starts + m * padded / 4;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t k = 0; k < padded; k += 64) {
        const __m512i wk = k + 64 <= in ? _mm512_loadu_si512(w + k) : _mm512_maskz_loadu_epi8(tail, w + k);
        const __m512i sums = _mm512_dpbusd_epi32(_mm512_loadu_si512(lm + k / 4), _mm512_xor_si512(wk, flip),
                                                 _mm512_loadu_si512(xm + k));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_loadu_ps(sm + k / 4), acc);
      }
      const float v = _mm512_reduce_add_ps(acc) * scale[r];
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
  TORCH_CHECK(scale.numel() == out && (!bias.has_value() || bias->numel() == out), "int8_linear: one scale and bias per row");
  std::vector<int8_t> xq(rows * padded, 0);
  std::vector<float> steps(rows * padded / 4, 0.0f);
  std::vector<int32_t> starts(rows * padded / 4, 0);
  for (int64_t m = 0; m < rows; m++)
    round_row(x.data_ptr<float>() + m * in, in, xq.data() + m * padded, steps.data() + m * padded / 4,
              starts.data() + m * padded / 4);
  auto y = at::empty({rows, out}, x.options());
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  at::parallel_for(0, out, 16, [&](int64_t r0, int64_t r1) {
    int8_rows(q.data_ptr<int8_t>(), scale.data_ptr<float>(), b, xq.data(), steps.data(), starts.data(),
              y.data_ptr<float>(), rows, in, out, r0, r1);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(gpt2repro, m) { m.def("int8_linear(Tensor x, Tensor q, Tensor scale, Tensor? bias) -> Tensor"); }
TORCH_LIBRARY_IMPL(gpt2repro, CPU, m) { m.impl("int8_linear", &int8_linear); }
