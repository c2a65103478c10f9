// The Mamba-1 selective scan as one fused CPU kernel per pass, called from JAX through the XLA FFI
// (`native_scan.py` builds and loads it; `scan.py` holds the reference forms it must match).
//
//   a_t = exp(delta_t * A)    h_t = a_t * h_{t-1} + delta_t * u_t * B_t    y_t = sum_n h_t * C_t
//
// Why: on CPU the sequential `lax.scan` spends its time in ~16 separate kernels per token of the
// backward (XLA CPU does not fuse across the small dots), not in arithmetic. Here each token's
// whole update runs in one pass over the (N, D) state, which stays in L1/L2.
//
// Layout: batch-major, D innermost. u, delta: (Bt, L, D); B, C: (Bt, L, N); At: (Bt, N, D) (the
// caller broadcasts a shared A so the leading axis is always the batch: the call is then
// batch-partitionable). The backward keeps only the states at chunk starts (every `chunk` tokens,
// saved by the forward) and recomputes each chunk's states and decays into a buffer that stays in
// cache, as Mamba's CUDA kernel does. Rows are split over threads. All arithmetic is fp32.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// exp for x <= 0 (delta > 0, A < 0), vectorisable: Cephes' expf polynomial after a range reduction
// by ln 2; relative error ~1e-7. Below -87.3 the result is 0 (expf's is a denormal or 0).
inline float exp_nonpos(float x) {
  const float xc = x < -87.3f ? -87.3f : x;
  const float k = std::nearbyint(xc * 1.44269504088896341f);
  float r = std::fma(k, -0.693359375f, xc);
  r = std::fma(k, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.0f : p * scale;
}

struct Dims {
  int64_t rows, length, d, n, chunk;
  int64_t chunks() const { return (length + chunk - 1) / chunk; }
};

// Runs fn(row) for every row, the rows split in contiguous blocks over up to `threads` threads.
// The workers take the caller's floating-point control state (on x86 the MXCSR: XLA runs its
// thunks with denormals flushed to zero), so every row is computed as on the calling thread.
template <typename Fn>
void for_rows(int64_t rows, int64_t threads, Fn fn) {
  threads = std::max<int64_t>(1, std::min(threads, rows));
  if (threads == 1) {
    for (int64_t r = 0; r < rows; ++r) fn(r);
    return;
  }
#if defined(__SSE__)
  const unsigned int csr = _mm_getcsr();
#endif
  std::vector<std::thread> pool;
  const int64_t per = (rows + threads - 1) / threads;
  for (int64_t k = 1; k < threads; ++k) {
    const int64_t lo = k * per, hi = std::min(rows, lo + per);
    if (lo < hi)
      pool.emplace_back([=] {
#if defined(__SSE__)
        _mm_setcsr(csr);
#endif
        for (int64_t r = lo; r < hi; ++r) fn(r);
      });
  }
  for (int64_t r = 0; r < std::min(rows, per); ++r) fn(r);
  for (auto& t : pool) t.join();
}

// One token of the recurrence on one row, forward pass: h <- a h + delta u B in place, y = sum_n h C.
inline void step_forward(const Dims& s, float* h, const float* A, const float* u, const float* dt, const float* B,
                         const float* C, float* y, float* du) {
  const int64_t D = s.d;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    du[d] = dt[d] * u[d];
    y[d] = 0.0f;
  }
  for (int64_t n = 0; n < s.n; ++n) {
    float* hn = h + n * D;
    const float* An = A + n * D;
    const float bn = B[n], cn = C[n];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const float hv = std::fma(exp_nonpos(dt[d] * An[d]), hn[d], du[d] * bn);
      hn[d] = hv;
      y[d] = std::fma(hv, cn, y[d]);
    }
  }
}

// The same token in the backward's recomputation: h_out = a h_in + delta u B, keeping a.
inline void step_recompute(const Dims& s, const float* h_in, float* h_out, float* a_out, const float* A,
                           const float* u, const float* dt, const float* B, float* du) {
  const int64_t D = s.d;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) du[d] = dt[d] * u[d];
  for (int64_t n = 0; n < s.n; ++n) {
    const float *hi = h_in + n * D, *An = A + n * D;
    float *ho = h_out + n * D, *an = a_out + n * D;
    const float bn = B[n];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      const float a = exp_nonpos(dt[d] * An[d]);
      an[d] = a;
      ho[d] = std::fma(a, hi[d], du[d] * bn);
    }
  }
}

void forward_row(const Dims& s, int64_t r, const float* u, const float* delta, const float* At, const float* B,
                 const float* C, float* y, float* starts) {
  const int64_t D = s.d, N = s.n, ND = N * D;
  std::vector<float> h(ND, 0.0f), du(D);
  const float* A = At + r * ND;
  for (int64_t t = 0; t < s.length; ++t) {
    if (starts && t % s.chunk == 0) std::copy(h.begin(), h.end(), starts + (r * s.chunks() + t / s.chunk) * ND);
    const int64_t td = (r * s.length + t) * D, tn = (r * s.length + t) * N;
    step_forward(s, h.data(), A, u + td, delta + td, B + tn, C + tn, y + td, du.data());
  }
}

void backward_row(const Dims& s, int64_t r, const float* u, const float* delta, const float* At, const float* B,
                  const float* C, const float* g, const float* starts, float* du_out, float* ddelta_out,
                  float* dA_out, float* dB_out, float* dC_out) {
  const int64_t D = s.d, N = s.n, ND = N * D, T = s.chunk;
  const float* A = At + r * ND;
  float* dA = dA_out + r * ND;
  std::fill(dA, dA + ND, 0.0f);
  std::vector<float> lam(ND, 0.0f), hs((T + 1) * ND), as(T * ND), du(D), s_acc(D), qa(D);
  for (int64_t c = s.chunks() - 1; c >= 0; --c) {
    const int64_t t0 = c * T, t1 = std::min(s.length, t0 + T);
    // Recompute the chunk: hs[0] is the state entering it, hs[k + 1] the state after token t0 + k.
    std::copy(starts + (r * s.chunks() + c) * ND, starts + (r * s.chunks() + c + 1) * ND, hs.begin());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t td = (r * s.length + t) * D, tn = (r * s.length + t) * N, k = t - t0;
      step_recompute(s, hs.data() + k * ND, hs.data() + (k + 1) * ND, as.data() + k * ND, A, u + td, delta + td,
                     B + tn, du.data());
    }
    // Reverse through the chunk, carrying lam = dL/dh_t (its value from later tokens, a_{t+1} lam_{t+1}).
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const int64_t td = (r * s.length + t) * D, tn = (r * s.length + t) * N, k = t - t0;
      const float *ut = u + td, *dt = delta + td, *gt = g + td, *Bt = B + tn, *Ct = C + tn;
      const float *hprev = hs.data() + k * ND, *a = as.data() + k * ND;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        du[d] = dt[d] * ut[d];
        s_acc[d] = 0.0f;
        qa[d] = 0.0f;
      }
      for (int64_t n = 0; n < N; ++n) {
        float* ln = lam.data() + n * D;
        float* dAn = dA + n * D;
        const float *hpn = hprev + n * D, *an = a + n * D, *An = A + n * D;
        const float bn = Bt[n], cn = Ct[n];
        float dc = 0.0f, db = 0.0f;
#pragma omp simd reduction(+ : dc, db)
        for (int64_t d = 0; d < D; ++d) {
          const float l = std::fma(gt[d], cn, ln[d]);
          dc += std::fma(an[d], hpn[d], du[d] * bn) * gt[d];
          db += l * du[d];
          s_acc[d] = std::fma(l, bn, s_acc[d]);
          const float q = l * hpn[d] * an[d];
          qa[d] = std::fma(q, An[d], qa[d]);
          dAn[d] = std::fma(q, dt[d], dAn[d]);
          ln[d] = an[d] * l;
        }
        dC_out[tn + n] = dc;
        dB_out[tn + n] = db;
      }
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        ddelta_out[td + d] = std::fma(s_acc[d], ut[d], qa[d]);
        du_out[td + d] = s_acc[d] * dt[d];
      }
    }
  }
}

Dims dims_of(ffi::Buffer<ffi::F32>& u, ffi::Buffer<ffi::F32>& B, int64_t chunk) {
  auto du = u.dimensions();
  return Dims{du[0], du[1], du[2], B.dimensions()[2], chunk};
}

ffi::Error ScanForwardImpl(ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> delta, ffi::Buffer<ffi::F32> At,
                           ffi::Buffer<ffi::F32> B, ffi::Buffer<ffi::F32> C, ffi::ResultBuffer<ffi::F32> y,
                           ffi::ResultBuffer<ffi::F32> starts, int64_t chunk, int64_t threads) {
  if (u.dimensions().size() != 3 || B.dimensions().size() != 3 || chunk < 1)
    return ffi::Error::InvalidArgument("mf_scan_forward: u, delta must be (Bt, L, D), B, C (Bt, L, N), chunk >= 1");
  const Dims s = dims_of(u, B, chunk);
  float* st = starts->element_count() ? starts->typed_data() : nullptr;
  if (st && starts->element_count() != static_cast<size_t>(s.rows * s.chunks() * s.n * s.d))
    return ffi::Error::InvalidArgument("mf_scan_forward: starts must be (Bt, ceil(L / chunk), N, D)");
  const float *pu = u.typed_data(), *pd = delta.typed_data(), *pA = At.typed_data(), *pB = B.typed_data(),
              *pC = C.typed_data();
  float* py = y->typed_data();
  for_rows(s.rows, threads, [&](int64_t r) { forward_row(s, r, pu, pd, pA, pB, pC, py, st); });
  return ffi::Error::Success();
}

ffi::Error ScanBackwardImpl(ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> delta, ffi::Buffer<ffi::F32> At,
                            ffi::Buffer<ffi::F32> B, ffi::Buffer<ffi::F32> C, ffi::Buffer<ffi::F32> g,
                            ffi::Buffer<ffi::F32> starts, ffi::ResultBuffer<ffi::F32> du,
                            ffi::ResultBuffer<ffi::F32> ddelta, ffi::ResultBuffer<ffi::F32> dA,
                            ffi::ResultBuffer<ffi::F32> dB, ffi::ResultBuffer<ffi::F32> dC, int64_t chunk,
                            int64_t threads) {
  if (u.dimensions().size() != 3 || B.dimensions().size() != 3 || chunk < 1)
    return ffi::Error::InvalidArgument("mf_scan_backward: u, delta must be (Bt, L, D), B, C (Bt, L, N), chunk >= 1");
  const Dims s = dims_of(u, B, chunk);
  if (starts.element_count() != static_cast<size_t>(s.rows * s.chunks() * s.n * s.d))
    return ffi::Error::InvalidArgument("mf_scan_backward: starts must be (Bt, ceil(L / chunk), N, D)");
  const float *pu = u.typed_data(), *pd = delta.typed_data(), *pA = At.typed_data(), *pB = B.typed_data(),
              *pC = C.typed_data(), *pg = g.typed_data(), *ps = starts.typed_data();
  float *pdu = du->typed_data(), *pdd = ddelta->typed_data(), *pdA = dA->typed_data(), *pdB = dB->typed_data(),
        *pdC = dC->typed_data();
  for_rows(s.rows, threads, [&](int64_t r) {
    backward_row(s, r, pu, pd, pA, pB, pC, pg, ps, pdu, pdd, pdA, pdB, pdC);
  });
  return ffi::Error::Success();
}

}  // namespace

// The same two passes with a plain C ABI on contiguous fp32 arrays (layouts as above), for callers
// outside XLA: the PyTorch wrapper `export/torch_native_scan.py` loads them with ctypes.
extern "C" {

void mf_scan_forward_raw(const float* u, const float* delta, const float* At, const float* B, const float* C,
                         float* y, float* starts, int64_t rows, int64_t length, int64_t d, int64_t n, int64_t chunk,
                         int64_t threads) {
  const Dims s{rows, length, d, n, chunk};
  for_rows(rows, threads, [&](int64_t r) { forward_row(s, r, u, delta, At, B, C, y, starts); });
}

void mf_scan_backward_raw(const float* u, const float* delta, const float* At, const float* B, const float* C,
                          const float* g, const float* starts, float* du, float* ddelta, float* dA, float* dB,
                          float* dC, int64_t rows, int64_t length, int64_t d, int64_t n, int64_t chunk,
                          int64_t threads) {
  const Dims s{rows, length, d, n, chunk};
  for_rows(rows, threads,
           [&](int64_t r) { backward_row(s, r, u, delta, At, B, C, g, starts, du, ddelta, dA, dB, dC); });
}

}  // extern "C"

XLA_FFI_DEFINE_HANDLER_SYMBOL(MfScanForward, ScanForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("chunk")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MfScanBackward, ScanBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("chunk")
                                  .Attr<int64_t>("threads"));
