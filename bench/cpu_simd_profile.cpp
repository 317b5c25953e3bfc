// Micro-kernel profile of csrc/cpu_simd.h with the real tile shapes (64 q rows x 64 keys x D).
// Build (from bench/): g++ -O3 -std=gnu++17 -march=x86-64-v4 -mavx512bf16 cpu_simd_profile.cpp -o /tmp/simd
// (or -march=x86-64-v3, -march=x86-64-v4, no -march for the generic variant); run: /tmp/simd [D].
// Single-threaded, medians of 15 rounds; other processes on the core show up as noise.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../csrc/cpu_simd.h"

using namespace ringattn::simd;

static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

template <class F>
double median_seconds(F&& f, int inner) {
  std::vector<double> t;
  for (int rep = 0; rep < 15; ++rep) {
    const double t0 = now();
    for (int i = 0; i < inner; ++i) f();
    t.push_back((now() - t0) / inner);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

static volatile float sink;

// Full-tile driver for any register block (R rows x C vectors), like gemm_rows/gemm.
template <int R, int C, Mode M>
void gemm_rc(float* c, int64_t ldc, int rows, int64_t cols, const float* a, int64_t a_rs, int64_t a_cs, int depth,
             const float* b, int64_t ldb) {
  int64_t j = 0;
  for (; j + C * kLanes <= cols; j += C * kLanes) {
    int r = 0;
    for (; r + R <= rows; r += R) {
      gemm_block<R, C, M>(c + r * ldc + j, ldc, a + r * a_rs, a_rs, a_cs, depth, b + j, ldb);
    }
    for (; r < rows; ++r) gemm_block<1, C, M>(c + r * ldc + j, ldc, a + r * a_rs, a_rs, a_cs, depth, b + j, ldb);
  }
  if (j < cols) gemm<M>(c + j, ldc, rows, cols - j, a, a_rs, a_cs, depth, b + j, ldb);  // leftover: shipped
}

struct Bufs {
  int D;
  std::vector<float> q, kt, p, v, acc, s, dout;
  explicit Bufs(int d) : D(d), q(64 * d), kt(d * 64), p(64 * 64), v(64 * d), acc(64 * d), s(64 * 64), dout(68 * d) {
    std::mt19937 g(1);
    std::normal_distribution<float> n;
    for (auto* x : {&q, &kt, &p, &v, &dout}) {
      for (auto& y : *x) y = n(g) * 0.1f;
    }
  }
};

template <int R, int C>
void profile_rc(Bufs& b) {
  const int D = b.D;
  const double f_abt = 2.0 * 64 * 64 * D, f_wx = 2.0 * 64 * 64 * D;
  const double t_abt = median_seconds(
      [&] { gemm_rc<R, C, Mode::kStore>(b.s.data(), 64, 64, 64, b.q.data(), D, 1, D, b.kt.data(), 64); }, 200);
  const double t_pv = median_seconds(
      [&] { gemm_rc<R, C, Mode::kAccumulate>(b.acc.data(), D, 64, D, b.p.data(), 64, 1, 64, b.v.data(), D); }, 200);
  const double t_ptdo = median_seconds(
      [&] { gemm_rc<R, C, Mode::kAddAfter>(b.acc.data(), D, 64, D, b.p.data(), 1, 64, 64, b.dout.data(), D); }, 200);
  sink = b.acc[0] + b.s[0];
  std::printf("  %2dx%-3d (%2d acc): QK^T %6.1f  PV %6.1f  P^T dO %6.1f GFLOP/s\n", R, C * kLanes, R * C,
              f_abt / t_abt * 1e-9, f_wx / t_pv * 1e-9, f_wx / t_ptdo * 1e-9);
}

#if defined(__AVX512BF16__)
template <int R, int C, Mode M>
void gemm_bf16_rc(float* c, int64_t ldc, int rows, int64_t cols, const uint32_t* a, int64_t a_rs, int64_t a_ps,
                  int pairs, const uint32_t* b, int64_t ldb) {
  int64_t j = 0;
  for (; j + C * 16 <= cols; j += C * 16) {
    int r = 0;
    for (; r + R <= rows; r += R)
      gemm_bf16_block<R, C, M>(c + r * ldc + j, ldc, a + r * a_rs, a_rs, a_ps, pairs, b + j, ldb);
    for (; r < rows; ++r) gemm_bf16_block<1, C, M>(c + r * ldc + j, ldc, a + r * a_rs, a_rs, a_ps, pairs, b + j, ldb);
  }
  if (j < cols) gemm_bf16<M>(c + j, ldc, rows, cols - j, a, a_rs, a_ps, pairs, b + j, ldb);
}

template <int R, int C>
void profile_bf16(int D) {
  std::vector<uint32_t> q(64 * D / 2, 0x3f803f80u), kt(D / 2 * 64, 0x3f003f00u), p(64 * 32, 0x3e003e00u),
      v(32 * D, 0x3f003f00u);
  std::vector<float> s(64 * 64), acc(64 * D);
  const double f = 2.0 * 64 * 64 * D;
  // QK^T: q pairs along D (row stride D/2 words), K^T tile (D/2 rows of 64 key words)
  const double t_abt = median_seconds(
      [&] { gemm_bf16_rc<R, C, Mode::kStore>(s.data(), 64, 64, 64, q.data(), D / 2, 1, D / 2, kt.data(), 64); }, 200);
  // PV: P pairs along keys (row stride 32 words), V pairs along keys (32 rows of D words)
  const double t_pv = median_seconds(
      [&] { gemm_bf16_rc<R, C, Mode::kAccumulate>(acc.data(), D, 64, D, p.data(), 32, 1, 32, v.data(), D); }, 200);
  // P^T dO: P^T pairs along queries (row = key: stride 1 word, pair stride 64 words), dO pairs along queries
  const double t_ptdo = median_seconds(
      [&] { gemm_bf16_rc<R, C, Mode::kAddAfter>(acc.data(), D, 64, D, p.data(), 1, 64, 32, v.data(), D); }, 200);
  // dO V^T as blocked dots: dO and V rows pairs along D
  const double t_dot = median_seconds(
      [&] { matmul_abt_dot_bf16(q.data(), D / 2, 64, v.data(), D / 2, 64, D / 2, s.data(), 64); }, 200);
  sink = s[0] + acc[0];
  std::printf("  bf16 %2dx%-3d (%2d acc): QK^T %6.1f  PV %6.1f  P^T dO %6.1f  dot dO V^T %6.1f GFLOP/s\n", R,
              C * 16, R * C, f / t_abt * 1e-9, f / t_pv * 1e-9, f / t_ptdo * 1e-9, f / t_dot * 1e-9);
}
#endif

int main(int argc, char** argv) {
  const int D = argc > 1 ? std::atoi(argv[1]) : 128;
  Bufs b(D);
  std::printf("isa %s, lanes %d, D %d, default block %dx%d\n", kIsa, kLanes, D, kRows, kCols * kLanes);
#if defined(__AVX512F__)
  profile_rc<4, 4>(b);
  profile_rc<6, 4>(b);
  profile_rc<7, 4>(b);
  profile_rc<8, 2>(b);
  profile_rc<8, 3>(b);
  profile_rc<12, 2>(b);
  profile_rc<14, 2>(b);
  profile_rc<4, 6>(b);
#elif defined(__AVX2__)
  profile_rc<6, 2>(b);
  profile_rc<4, 3>(b);
  profile_rc<3, 4>(b);
  profile_rc<4, 2>(b);
  profile_rc<5, 2>(b);
  profile_rc<2, 4>(b);
  profile_rc<8, 1>(b);
#else
  profile_rc<4, 2>(b);
  profile_rc<6, 2>(b);
  profile_rc<4, 3>(b);
  profile_rc<3, 4>(b);
  profile_rc<2, 4>(b);
#endif
#if defined(__AVX512BF16__)
  profile_bf16<4, 4>(D);
  profile_bf16<6, 4>(D);
  profile_bf16<8, 2>(D);
  profile_bf16<8, 3>(D);
  profile_bf16<12, 2>(D);
  profile_bf16<4, 2>(D);
#endif
  // the shipped drivers
  const double f = 2.0 * 64 * 64 * D;
  const double t_gemm = median_seconds(
      [&] { gemm<Mode::kStore>(b.s.data(), 64, 64, 64, b.q.data(), D, 1, D, b.kt.data(), 64); }, 200);
  const double t_dot = median_seconds(
      [&] { matmul_abt_dot(b.dout.data(), D, 64, b.v.data(), D, 64, D, b.s.data(), 64); }, 200);
  std::vector<float> e(64 * 64);
  for (int i = 0; i < 4096; ++i) e[i] = -30.0f * (i % 97) / 97.0f;
  const double t_exp = median_seconds(
      [&] {
        exp2_inplace(e.data(), 4096);
        e[0] = -1.0f;
      },
      200);
  sink = b.s[0] + e[1];
  std::printf("  shipped gemm QK^T %6.1f GFLOP/s, dot dO V^T %6.1f GFLOP/s, exp2 %6.2f Gelem/s\n", f / t_gemm * 1e-9,
              f / t_dot * 1e-9, 4096 / t_exp * 1e-9);
  return 0;
}
