// Runs fastpeft's adapter GEMM kernels (csrc/adapter/skinny_gemm.cuh, wide_gemm.cuh) on the CPU through
// cuda_emulation.h and checks every output element against a float64 computation on the same inputs.
//
// Each case fills outputs with NaN (an element the kernel fails to write stays NaN and fails the check) and guards
// them with canaries (a write past either end is caught). Inputs get row strides wider than their rows and base
// addresses off 16-byte alignment, so both the cp.async and the element-by-element load paths run, with partial
// tiles in every dimension and split K.
//
// Usage: adapter_gemm_emulation [quick]    ("quick" runs a few cases, for -fsanitize=thread builds)
// Prints one line per case and exits non-zero if any element is off.
#include "cuda_emulation.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <random>
#include <string>

#include "adapter/skinny_gemm.cuh"
#include "adapter/wide_gemm.cuh"

using namespace fastpeft;
using namespace fastpeft::adapter;

namespace {

template <typename T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::kFloat32;
  if constexpr (std::is_same_v<T, __half>) return DType::kFloat16;
  return DType::kBFloat16;
}

template <typename T>
const char* name_of() {
  if constexpr (std::is_same_v<T, float>) return "float32";
  if constexpr (std::is_same_v<T, __half>) return "float16";
  return "bfloat16";
}

// Unit roundoff of T: the relative error of one rounding to T (normal numbers).
template <typename T>
double unit_roundoff() {
  if constexpr (std::is_same_v<T, float>) return std::ldexp(1.0, -24);
  if constexpr (std::is_same_v<T, __half>) return std::ldexp(1.0, -11);
  return std::ldexp(1.0, -8);
}

// The spacing of T's subnormal numbers: the absolute error of one rounding near zero.
template <typename T>
double subnormal_spacing() {
  if constexpr (std::is_same_v<T, float>) return std::ldexp(1.0, -149);
  if constexpr (std::is_same_v<T, __half>) return std::ldexp(1.0, -24);
  return std::ldexp(1.0, -133);
}

// The error of rounding `value` to T once.
template <typename T>
double rounding_error(double value) {
  return unit_roundoff<T>() * std::fabs(value) + subnormal_spacing<T>();
}

constexpr double kFloatRoundoff = 5.9604644775390625e-08;  // 2^-24: float32 accumulation

std::mt19937 rng(1234);

// A matrix in a buffer with `offset` leading elements (to misalign the base) and row stride ld >= cols.
template <typename T>
struct HostMatrix {
  int64_t rows = 0, cols = 0, ld = 0, offset = 0;
  std::vector<T> buffer;

  HostMatrix(int64_t r, int64_t c, int64_t pad, int64_t off, float scale) : rows(r), cols(c), ld(c + pad), offset(off) {
    buffer.assign(offset + std::max<int64_t>(rows * ld, 1) + 8, from_compute<T>(0.f));
    std::normal_distribution<float> normal(0.f, scale);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) at(i, j) = from_compute<T>(normal(rng));
  }
  T& at(int64_t i, int64_t j) { return buffer[offset + i * ld + j]; }
  double get(int64_t i, int64_t j) const { return to_compute(buffer[offset + i * ld + j]); }
  const T* data() const { return buffer.data() + offset; }
  bool vec_ok() const {
    const bool aligned = reinterpret_cast<uintptr_t>(data()) % 16 == 0;
    return aligned && (rows <= 1 || ld % Chunk<T>::kSize == 0);
  }
};

// A contiguous output [rows, cols] between canaries, prefilled with NaN.
template <typename T>
struct Output {
  static constexpr int kGuard = 64;
  static constexpr float kCanary = 1232.f;  // representable in every T (bf16 spacing there is 8)
  int64_t rows, cols;
  std::vector<T> buffer;
  Output(int64_t r, int64_t c) : rows(r), cols(c) {
    buffer.assign(r * c + 2 * kGuard + 8, from_compute<T>(kCanary));
    for (int64_t i = 0; i < r * c; ++i) data()[i] = from_compute<T>(NAN);
  }
  // 16-byte aligned start after the leading guard.
  T* data() {
    auto p = reinterpret_cast<uintptr_t>(buffer.data() + kGuard);
    return reinterpret_cast<T*>((p + 15) / 16 * 16);
  }
  double get(int64_t i, int64_t j) { return to_compute(data()[i * cols + j]); }
  bool canaries_intact() {
    T* d = data();
    for (T* p = buffer.data(); p < d; ++p)
      if (to_compute(*p) != kCanary) return false;
    for (T* p = d + rows * cols; p < buffer.data() + buffer.size(); ++p)
      if (to_compute(*p) != kCanary) return false;
    return true;
  }
};

struct Checker {
  std::string name;
  int64_t checked = 0, bad = 0;
  double worst = 0;  // largest error / bound
  void check(double actual, double expected, double bound, int64_t i, int64_t j, const char* what) {
    ++checked;
    const double err = std::fabs(actual - expected);
    if (!(err <= bound)) {  // NaN fails
      if (bad++ < 5)
        std::printf("  %s %s[%lld, %lld]: got %.9g, expected %.9g (bound %.3g)\n", name.c_str(), what, (long long)i,
                    (long long)j, actual, expected, bound);
    } else if (bound > 0) {
      worst = std::max(worst, err / bound);
    }
  }
  bool report() const {
    std::printf("%-4s %s: %lld elements, worst error %.2f of bound\n", bad ? "FAIL" : "ok", name.c_str(),
                (long long)checked, worst);
    return bad == 0;
  }
};

const Activation kActivations[] = {Activation::kIdentity, Activation::kRelu, Activation::kGelu,
                                   Activation::kGeluTanh, Activation::kSilu, Activation::kTanh};
const char* kActivationNames[] = {"identity", "relu", "gelu", "gelu_tanh", "silu", "tanh"};

// The launchers of skinny_gemm.cuh / wide_gemm.cuh, with emu::launch in place of <<<>>>. The split-K reduction
// gets at most 3 CTAs so that its grid-stride loop runs.
template <typename T>
void run_skinny(const SkinnyParams& p) {
  if (p.rows == 0 || p.cols == 0) return;
  const dim3 grid(unsigned(ceil_div(p.rows, kSkinnyBlockM) * ceil_div(p.cols, kSkinnyBlockN)), unsigned(p.splits));
  const dim3 reduce_grid(unsigned(std::min<int64_t>(ceil_div(p.rows * p.cols, kThreads), 3)));
  if (p.mode == SkinnyMode::kShrink) {
    emu::launch(skinny_gemm_kernel<T, SkinnyMode::kShrink>, grid, kThreads, p);
    if (p.splits > 1) emu::launch(skinny_reduce_kernel<T, SkinnyMode::kShrink>, reduce_grid, kThreads, p);
  } else {
    emu::launch(skinny_gemm_kernel<T, SkinnyMode::kGradZ>, grid, kThreads, p);
    if (p.splits > 1) emu::launch(skinny_reduce_kernel<T, SkinnyMode::kGradZ>, reduce_grid, kThreads, p);
  }
}

template <typename T>
void run_wide(const WideParams& p) {
  if (p.rows == 0 || p.cols == 0) return;
  const dim3 grid(unsigned(ceil_div(p.rows, kWideBlockM) * ceil_div(p.cols, kWideBlockN)));
  if (p.b_n_major) {
    emu::launch(wide_gemm_kernel<T, true>, grid, kThreads, p);
  } else {
    emu::launch(wide_gemm_kernel<T, false>, grid, kThreads, p);
  }
}

struct SkinnyCase {
  int64_t n, k, r, splits, pad, offset;
  int activation;
  bool bias_or_act;  // shrink: with b_down; grad_z: want act(z) and colsum(dy)
  float scale;       // grad_z: s (a negative value is passed through the device pointer)
};

// z = x w_down^T + b_down, act(z).
template <typename T>
bool shrink_case(const SkinnyCase& c) {
  HostMatrix<T> x(c.n, c.k, c.pad, c.offset, 1.f);
  HostMatrix<T> w(c.r, c.k, c.pad, c.offset, 1.f / std::sqrt(float(c.k)));
  HostMatrix<T> b(1, c.r, 0, 0, 1.f);
  Output<T> z(c.n, c.r), act(c.n, c.r);
  SkinnyParams p;
  p.dtype = dtype_of<T>();
  p.mode = SkinnyMode::kShrink;
  p.activation = kActivations[c.activation];
  p.rows = c.n, p.cols = c.r, p.depth = c.k;
  p.a = x.data(), p.a_ld = x.ld, p.a_vec_ok = x.vec_ok();
  p.b = w.data(), p.b_ld = w.ld, p.b_vec_ok = w.vec_ok();
  p.bias = c.bias_or_act ? b.data() : nullptr;
  p.out0 = z.data(), p.out1 = act.data();
  const SplitK split = split_k(c.k, p.dtype, c.splits);
  p.splits = int(split.splits), p.steps_per_split = split.steps_per_split;
  std::vector<float> partials(size_t(p.splits) * c.n * c.r, NAN);
  p.partials = p.splits > 1 ? partials.data() : nullptr;
  run_skinny<T>(p);

  Checker check{std::string("shrink ") + name_of<T>() + " N=" + std::to_string(c.n) + " K=" + std::to_string(c.k) +
                " r=" + std::to_string(c.r) + " splits=" + std::to_string(p.splits) + " " +
                kActivationNames[c.activation] + (x.vec_ok() ? " vec" : " scalar")};
  for (int64_t i = 0; i < c.n; ++i)
    for (int64_t j = 0; j < c.r; ++j) {
      double sum = c.bias_or_act ? b.get(0, j) : 0.0, abs_sum = std::fabs(sum);
      for (int64_t k = 0; k < c.k; ++k) {
        sum += x.get(i, k) * w.get(j, k);
        abs_sum += std::fabs(x.get(i, k) * w.get(j, k));
      }
      const double bound = rounding_error<T>(sum) + (c.k + 2) * kFloatRoundoff * abs_sum;
      check.check(z.get(i, j), sum, bound, i, j, "z");
      // act is computed from the rounded z by the same float function: exact.
      const T z_out = z.data()[i * c.r + j];
      const double act_expected = to_compute(from_compute<T>(activate(to_compute(z_out), p.activation)));
      check.check(act.get(i, j), act_expected, 0.0, i, j, "act");
    }
  if (!z.canaries_intact() || !act.canaries_intact()) check.check(NAN, 0, 0, -1, -1, "canary");
  return check.report();
}

// dz = s (dy w_up) act'(z), act(z), per-row-block column sums of dy.
template <typename T>
bool grad_z_case(const SkinnyCase& c) {
  HostMatrix<T> dy(c.n, c.k, c.pad, c.offset, 1.f);
  HostMatrix<T> w(c.k, c.r, c.pad, c.offset, 1.f / std::sqrt(float(c.k)));  // W_up [d_out, r]
  HostMatrix<T> zin(c.n, c.r, 0, 0, 1.f);
  Output<T> dz(c.n, c.r), act(c.n, c.r);
  const int64_t row_blocks = ceil_div(c.n, kSkinnyBlockM);
  std::vector<float> colsum(size_t(row_blocks * c.k), NAN);
  const float scale_value = c.scale;
  SkinnyParams p;
  p.dtype = dtype_of<T>();
  p.mode = SkinnyMode::kGradZ;
  p.activation = kActivations[c.activation];
  p.rows = c.n, p.cols = c.r, p.depth = c.k;
  p.a = dy.data(), p.a_ld = dy.ld, p.a_vec_ok = dy.vec_ok();
  p.b = w.data(), p.b_ld = w.ld, p.b_vec_ok = w.vec_ok();
  p.z = zin.data(), p.z_ld = zin.ld;
  p.scale_ptr = c.scale < 0 ? &scale_value : nullptr;
  p.scale = c.scale < 0 ? 99.0 : c.scale;  // must be ignored when scale_ptr is set
  p.out0 = dz.data(), p.out1 = c.bias_or_act ? act.data() : nullptr;
  p.a_colsum = c.bias_or_act ? colsum.data() : nullptr;
  const SplitK split = split_k(c.k, p.dtype, c.splits);
  p.splits = int(split.splits), p.steps_per_split = split.steps_per_split;
  std::vector<float> partials(size_t(p.splits) * c.n * c.r, NAN);
  p.partials = p.splits > 1 ? partials.data() : nullptr;
  run_skinny<T>(p);

  Checker check{std::string("grad_z ") + name_of<T>() + " N=" + std::to_string(c.n) + " K=" + std::to_string(c.k) +
                " r=" + std::to_string(c.r) + " splits=" + std::to_string(p.splits) + " " +
                kActivationNames[c.activation] + (c.bias_or_act ? " +act +colsum" : "") +
                (dy.vec_ok() ? " vec" : " scalar")};
  for (int64_t i = 0; i < c.n; ++i)
    for (int64_t j = 0; j < c.r; ++j) {
      double da = 0, abs_sum = 0;
      for (int64_t k = 0; k < c.k; ++k) {
        da += dy.get(i, k) * w.get(k, j);
        abs_sum += std::fabs(dy.get(i, k) * w.get(k, j));
      }
      const float zf = float(zin.get(i, j));
      const double grad = activation_derivative(zf, p.activation);
      const double expected = double(scale_value) * da * grad;
      const double bound = rounding_error<T>(expected) +
                           (c.k + 4) * kFloatRoundoff * std::fabs(scale_value * grad) * abs_sum;
      check.check(dz.get(i, j), expected, bound, i, j, "dz");
      if (c.bias_or_act) {
        check.check(act.get(i, j), to_compute(from_compute<T>(activate(zf, p.activation))), 0.0, i, j, "act");
      }
    }
  if (c.bias_or_act) {
    for (int64_t m = 0; m < row_blocks; ++m)
      for (int64_t k = 0; k < c.k; ++k) {
        double sum = 0, abs_sum = 0;
        for (int64_t i = m * kSkinnyBlockM; i < std::min(c.n, (m + 1) * kSkinnyBlockM); ++i) {
          sum += dy.get(i, k);
          abs_sum += std::fabs(dy.get(i, k));
        }
        check.check(colsum[m * c.k + k], sum, kSkinnyBlockM * kFloatRoundoff * abs_sum, m, k, "colsum");
      }
  }
  if (!dz.canaries_intact() || !act.canaries_intact()) check.check(NAN, 0, 0, -1, -1, "canary");
  return check.report();
}

struct WideCase {
  int64_t n, r, d, pad, offset;
  bool residual, bias;
  float scale;  // a negative value is passed through the device pointer
};

// expand (n-major B = W_up [d, r]) or grad_x (k-major B = W_down [r, d]):
// out = residual + s (a . B + bias).
template <typename T>
bool wide_case(const WideCase& c, bool n_major) {
  HostMatrix<T> a(c.n, c.r, c.pad, c.offset, 1.f);
  HostMatrix<T> w = n_major ? HostMatrix<T>(c.d, c.r, c.pad, c.offset, 1.f / std::sqrt(float(c.r)))
                            : HostMatrix<T>(c.r, c.d, c.pad, c.offset, 1.f / std::sqrt(float(c.r)));
  HostMatrix<T> res(c.n, c.d, c.pad + 1, c.offset, 1.f);  // a different row stride again
  HostMatrix<T> bias(1, c.d, 0, c.offset, 1.f);
  Output<T> out(c.n, c.d);
  const float scale_value = c.scale;
  WideParams p;
  p.dtype = dtype_of<T>();
  p.rows = c.n, p.cols = c.d, p.depth = c.r;
  p.a = a.data(), p.a_ld = a.ld, p.a_vec_ok = a.vec_ok();
  p.b_n_major = n_major;
  p.b = w.data(), p.b_ld = w.ld, p.b_vec_ok = w.vec_ok();
  if (c.residual) p.residual = res.data(), p.residual_ld = res.ld, p.residual_vec_ok = res.vec_ok();
  if (c.bias) p.bias = bias.data(), p.bias_vec_ok = bias.vec_ok();
  p.scale_ptr = c.scale < 0 ? &scale_value : nullptr;
  p.scale = c.scale < 0 ? 99.0 : c.scale;
  p.out = out.data();
  p.out_vec_ok = c.d % Chunk<T>::kSize == 0;
  run_wide<T>(p);

  Checker check{std::string(n_major ? "expand " : "grad_x ") + name_of<T>() + " N=" + std::to_string(c.n) +
                " r=" + std::to_string(c.r) + " D=" + std::to_string(c.d) + (c.residual ? " +residual" : "") +
                (c.bias ? " +bias" : "") + (a.vec_ok() ? " vec" : " scalar")};
  for (int64_t i = 0; i < c.n; ++i)
    for (int64_t j = 0; j < c.d; ++j) {
      double sum = c.bias ? bias.get(0, j) : 0.0, abs_sum = std::fabs(sum);
      for (int64_t k = 0; k < c.r; ++k) {
        const double term = a.get(i, k) * (n_major ? w.get(j, k) : w.get(k, j));
        sum += term;
        abs_sum += std::fabs(term);
      }
      const double base = c.residual ? res.get(i, j) : 0.0;
      const double expected = base + double(scale_value) * sum;
      const double bound = rounding_error<T>(expected) +
                           (c.r + 4) * kFloatRoundoff * (std::fabs(base) + std::fabs(scale_value) * abs_sum);
      check.check(out.get(i, j), expected, bound, i, j, "out");
    }
  if (!out.canaries_intact()) check.check(NAN, 0, 0, -1, -1, "canary");
  return check.report();
}

template <typename T>
bool run_all(bool quick) {
  bool ok = true;
  // n, k, r, splits, row pad, base offset, activation, bias/act flags, scale
  const SkinnyCase skinny[] = {
      {1, 64, 1, 1, 0, 0, 0, true, 2.f},       // one row, one column
      {5, 40, 3, 1, 0, 0, 1, false, 0.5f},     // K a partial tile
      {130, 200, 70, 3, 8, 0, 2, true, -0.7f},  // 2 x 2 CTAs, split K, wider rows
      {300, 264, 64, 2, 3, 1, 3, true, 1.f},   // unaligned rows and base: element-by-element loads
      {129, 72, 130, 1, 0, 0, 4, false, 3.f},   // 3 column blocks
      {64, 520, 16, 5, 0, 0, 5, true, -1.5f},  // 5 splits, the last one shorter
      {33, 37, 9, 1, 1, 1, 3, true, 0.25f},    // odd K and r: rows end inside a 16-byte chunk
      {0, 64, 8, 1, 0, 0, 2, true, 1.f},       // no rows
  };
  const WideCase wide[] = {
      {1, 1, 64, 0, 0, true, true, 2.f},      // r = 1
      {5, 3, 40, 0, 0, false, false, 1.f},    // r and D partial tiles
      {130, 70, 200, 8, 0, true, true, -0.3f},  // K over 3 steps (16-bit) / 5 steps (float32), 3 x 2 CTAs
      {65, 64, 264, 3, 1, true, false, 4.f},  // unaligned everything
      {64, 8, 128, 0, 0, true, true, 1.f},    // exact tiles
      {7, 5, 67, 1, 1, true, true, -2.f},     // odd D: rows end inside a 16-byte chunk
      {0, 8, 64, 0, 0, true, true, 1.f},      // no rows
  };
  const int skinny_count = quick ? 2 : int(std::size(skinny));
  const int wide_count = quick ? 2 : int(std::size(wide));
  for (int i = 0; i < skinny_count; ++i) {
    const SkinnyCase& c = quick ? skinny[i + 2] : skinny[i];
    ok &= shrink_case<T>(c);
    ok &= grad_z_case<T>(c);
  }
  for (int i = 0; i < wide_count; ++i) {
    const WideCase& c = quick ? wide[i + 2] : wide[i];
    ok &= wide_case<T>(c, true);
    ok &= wide_case<T>(c, false);
  }
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  bool ok = true;
  ok &= run_all<__nv_bfloat16>(quick);
  ok &= run_all<__half>(quick);
  ok &= run_all<float>(quick);
  std::printf(ok ? "all cases passed\n" : "SOME CASES FAILED\n");
  return ok ? 0 : 1;
}
