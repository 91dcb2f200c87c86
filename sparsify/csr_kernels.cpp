// The csr backend's products as CPU kernels: a training step of a CsrLinear in two calls.
//
// Dense operands are laid out features x batch (contiguous), as CsrLinear keeps its activations,
// so every active link touches one contiguous row of the batch: the forward and the input gradient
// add v * row into an accumulator held in registers, the weight gradient is one dot product per link.
// Rows are split across torch's threads (at::parallel_for); each output element is written by one
// thread in a fixed order, so results do not depend on the number of threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

namespace {

int64_t grain(int64_t rows, int64_t links, int64_t batch) {
  const int64_t work_per_row = std::max<int64_t>(1, links / std::max<int64_t>(1, rows) * batch + batch);
  return std::max<int64_t>(1, 32768 / work_per_row);
}

// A 64-byte vector of scalar_t (GCC/Clang vector extensions: AVX-512 registers with -march=native on
// such CPUs, pairs or quads of narrower ones elsewhere), loaded and stored unaligned.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64), may_alias, aligned(sizeof(T))));
  static constexpr int64_t L = 64 / sizeof(T);
};

// the sum of a vector's lanes, halving it pairwise (a fixed order)
template <typename V>
inline auto hsum(V s) {
  typedef decltype(s[0] + 0) T;
  if constexpr (sizeof(V) == 2 * sizeof(T)) {
    return s[0] + s[1];
  } else {
    typedef T H __attribute__((vector_size(sizeof(V) / 2)));
    H lo, hi;
    __builtin_memcpy(&lo, &s, sizeof(H));
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&s) + sizeof(H), sizeof(H));
    return hsum(lo + hi);
  }
}

// NV vectors of batch columns of one output row, accumulated in registers: acc = init + sum over
// links k of value(k) * dense[idx[k], b0 : ...]; value(k) = values[perm[k]] with PERM (the transposed structure).
template <int64_t NV, bool PERM, typename scalar_t, typename index_t>
inline void spmm_chunk(int64_t k0, int64_t k1, const index_t* __restrict__ idx, const scalar_t* __restrict__ values,
                       const index_t* __restrict__ perm, const scalar_t* __restrict__ dense, scalar_t init,
                       scalar_t* __restrict__ out, int64_t batch, int64_t b0) {
  typedef typename Vec<scalar_t>::type V;
  constexpr int64_t L = Vec<scalar_t>::L;
  V acc[NV];
  for (int64_t j = 0; j < NV; ++j) acc[j] = V{} + init;
  for (int64_t k = k0; k < k1; ++k) {
    const scalar_t v = PERM ? values[perm[k]] : values[k];
    const scalar_t* x = dense + static_cast<int64_t>(idx[k]) * batch + b0;
    for (int64_t j = 0; j < NV; ++j) acc[j] += v * *reinterpret_cast<const V*>(x + j * L);
  }
  for (int64_t j = 0; j < NV; ++j) *reinterpret_cast<V*>(out + b0 + j * L) = acc[j];
}

// the last n < L batch columns
template <bool PERM, typename scalar_t, typename index_t>
inline void spmm_tail(int64_t k0, int64_t k1, const index_t* __restrict__ idx, const scalar_t* __restrict__ values,
                      const index_t* __restrict__ perm, const scalar_t* __restrict__ dense, scalar_t init,
                      scalar_t* __restrict__ out, int64_t batch, int64_t b0) {
  scalar_t acc[Vec<scalar_t>::L];
  const int64_t n = batch - b0;
  for (int64_t j = 0; j < n; ++j) acc[j] = init;
  for (int64_t k = k0; k < k1; ++k) {
    const scalar_t v = PERM ? values[perm[k]] : values[k];
    const scalar_t* x = dense + static_cast<int64_t>(idx[k]) * batch + b0;
    for (int64_t j = 0; j < n; ++j) acc[j] += v * x[j];
  }
  for (int64_t j = 0; j < n; ++j) out[b0 + j] = acc[j];
}

// out[r, :] = bias[r] + sum over links k of row r: value(k) * dense[idx[k], :]
template <bool PERM, typename scalar_t, typename index_t>
void spmm_kernel(const index_t* ptr, const index_t* idx, const scalar_t* values, const index_t* perm,
                 const scalar_t* dense, const scalar_t* bias, scalar_t* out, int64_t rows, int64_t batch) {
  constexpr int64_t L = Vec<scalar_t>::L;
  at::parallel_for(0, rows, grain(rows, ptr[rows], batch), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t k0 = ptr[r], k1 = ptr[r + 1];
      const scalar_t init = bias ? bias[r] : scalar_t(0);
      scalar_t* o = out + r * batch;
      int64_t b0 = 0;
      for (; b0 + 4 * L <= batch; b0 += 4 * L) spmm_chunk<4, PERM>(k0, k1, idx, values, perm, dense, init, o, batch, b0);
      if (b0 + 2 * L <= batch) { spmm_chunk<2, PERM>(k0, k1, idx, values, perm, dense, init, o, batch, b0); b0 += 2 * L; }
      if (b0 + L <= batch) { spmm_chunk<1, PERM>(k0, k1, idx, values, perm, dense, init, o, batch, b0); b0 += L; }
      if (b0 < batch) spmm_tail<PERM>(k0, k1, idx, values, perm, dense, init, o, batch, b0);
    }
  });
}

// the dot product of two batch rows: vectors of partial sums, then their lanes, then the tail (a fixed order)
template <typename scalar_t>
inline scalar_t dot(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t batch) {
  typedef typename Vec<scalar_t>::type V;
  constexpr int64_t L = Vec<scalar_t>::L;
  scalar_t s = 0;
  int64_t b0 = 0;
  if (batch >= L) {
    V part = *reinterpret_cast<const V*>(a) * *reinterpret_cast<const V*>(b);
    for (b0 = L; b0 + L <= batch; b0 += L) part += *reinterpret_cast<const V*>(a + b0) * *reinterpret_cast<const V*>(b + b0);
    s = hsum(part);
  }
  for (; b0 < batch; ++b0) s += a[b0] * b[b0];
  return s;
}

template <typename scalar_t>
inline scalar_t total(const scalar_t* a, int64_t batch) {
  scalar_t s = 0;
  for (int64_t b = 0; b < batch; ++b) s += a[b];
  return s;
}

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define SPARSIFY_SHUFFLE 1  // __builtin_shufflevector
// four dot products of one fp32 batch row with four others: their lanes summed together (a 4 x 8
// transpose-and-add), about 1.5x faster than four single sums of lanes at batch 32
// NV > 0: the batch holds NV whole vectors and a tail, known when compiling (a loop of runtime length
// keeps the partial sums in memory: twice the time at batch 32); NV = 0: any batch.
template <int64_t NV>
inline void dot4(const float* __restrict__ a, const float* const* rows, int64_t batch, float* out) {
  typedef Vec<float>::type V;
  typedef float H __attribute__((vector_size(32)));
  typedef float Q __attribute__((vector_size(16)));
  constexpr int64_t L = Vec<float>::L;
  V p[4] = {V{}, V{}, V{}, V{}};
  int64_t b0 = 0;
  const int64_t whole = NV > 0 ? NV * L : batch / L * L;
  for (; b0 < whole; b0 += L) {
    const V g = *reinterpret_cast<const V*>(a + b0);
    for (int i = 0; i < 4; ++i) p[i] += g * *reinterpret_cast<const V*>(rows[i] + b0);
  }
  H h[4];
  for (int i = 0; i < 4; ++i) {
    H lo, hi;
    __builtin_memcpy(&lo, &p[i], sizeof(H));
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&p[i]) + sizeof(H), sizeof(H));
    h[i] = lo + hi;
  }
  const H t01 = __builtin_shufflevector(h[0], h[1], 0, 1, 2, 3, 8, 9, 10, 11) +
                __builtin_shufflevector(h[0], h[1], 4, 5, 6, 7, 12, 13, 14, 15);
  const H t23 = __builtin_shufflevector(h[2], h[3], 0, 1, 2, 3, 8, 9, 10, 11) +
                __builtin_shufflevector(h[2], h[3], 4, 5, 6, 7, 12, 13, 14, 15);
  const H u = __builtin_shufflevector(t01, t23, 0, 1, 8, 9, 4, 5, 12, 13) +
              __builtin_shufflevector(t01, t23, 2, 3, 10, 11, 6, 7, 14, 15);
  const Q w = __builtin_shufflevector(u, u, 0, 4, 2, 6) + __builtin_shufflevector(u, u, 1, 5, 3, 7);
  for (int i = 0; i < 4; ++i) {
    float s = w[i];
    for (int64_t b = b0; b < batch; ++b) s += a[b] * rows[i][b];
    out[i] = s;
  }
}
#endif

#if defined(__AVX512F__)
#define SPARSIFY_DOT16 1
// sixteen dot products of one fp32 batch row with sixteen others, with 16-lane registers: their lanes
// summed together by a 16 x 16 transpose-and-add (four levels of shuffles, 30 shuffles and 15 adds for
// 16 links where dot4 takes 24 shuffles and adds for 4). Link j's products go into vector BITREV[j],
// so the sums come out in link order. About 1.5x dot4's rate at batch 32. NV as in dot4.
template <int64_t NV>
inline void dot16(const float* __restrict__ a, const float* const* rows, int64_t batch, float* out) {
  typedef Vec<float>::type V;
  constexpr int64_t L = Vec<float>::L;
  static_assert(L == 16, "dot16 takes 16 floats a vector");
  constexpr int BITREV[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  V p[16];
  for (int i = 0; i < 16; ++i) p[i] = V{};
  int64_t b0 = 0;
  const int64_t whole = NV > 0 ? NV * L : batch / L * L;
  for (; b0 < whole; b0 += L) {
    const V g = *reinterpret_cast<const V*>(a + b0);
    for (int i = 0; i < 16; ++i) p[BITREV[i]] += g * *reinterpret_cast<const V*>(rows[i] + b0);
  }
  V w[8], u[4], t[2];
  for (int j = 0; j < 8; ++j)  // halves: lanes 0-7 sum towards p[2j]'s dot, 8-15 towards p[2j+1]'s
    w[j] = __builtin_shufflevector(p[2 * j], p[2 * j + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(p[2 * j], p[2 * j + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int j = 0; j < 4; ++j)  // quarters
    u[j] = __builtin_shufflevector(w[2 * j], w[2 * j + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(w[2 * j], w[2 * j + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int j = 0; j < 2; ++j)  // pairs
    t[j] = __builtin_shufflevector(u[2 * j], u[2 * j + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(u[2 * j], u[2 * j + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  const V f = __builtin_shufflevector(t[0], t[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
              __builtin_shufflevector(t[0], t[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  if (b0 == batch) {
    *reinterpret_cast<V*>(out) = f;
    return;
  }
  for (int i = 0; i < 16; ++i) {
    float s = f[i];
    for (int64_t b = b0; b < batch; ++b) s += a[b] * rows[i][b];
    out[i] = s;
  }
}
#endif

// grad_values[k] = dot(grad_out[r, :], x[idx[k], :]) for each link k of row r; grad_bias[r] = sum grad_out[r, :]
// WIDE: links sixteen at a time first (dot16), for batches of up to 4 vectors; beyond, dot4's fewer
// accumulators run faster. Two instantiations, so that each loop is compiled on its own.
template <bool WIDE, typename scalar_t, typename index_t>
void sampled_kernel(const index_t* ptr, const index_t* idx, const scalar_t* grad_out, const scalar_t* x,
                    scalar_t* grad_values, scalar_t* grad_bias, int64_t rows, int64_t batch) {
  at::parallel_for(0, rows, grain(rows, ptr[rows], batch), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* g = grad_out + r * batch;
      if (grad_bias) grad_bias[r] = total(g, batch);
      int64_t k = ptr[r];
#ifdef SPARSIFY_DOT16
      if constexpr (WIDE && std::is_same_v<scalar_t, float>) {
        for (; k + 16 <= ptr[r + 1]; k += 16) {
          const float* rows16[16];
          for (int i = 0; i < 16; ++i) rows16[i] = x + static_cast<int64_t>(idx[k + i]) * batch;
          switch (batch / Vec<float>::L) {
            case 1: dot16<1>(g, rows16, batch, grad_values + k); break;
            case 2: dot16<2>(g, rows16, batch, grad_values + k); break;
            case 3: dot16<3>(g, rows16, batch, grad_values + k); break;
            case 4: dot16<4>(g, rows16, batch, grad_values + k); break;
            default: dot16<0>(g, rows16, batch, grad_values + k);  // batch < 16
          }
        }
      }
#endif
#ifdef SPARSIFY_SHUFFLE
      if constexpr (std::is_same_v<scalar_t, float>) {
        for (; k + 4 <= ptr[r + 1]; k += 4) {
          const float* four[4] = {x + static_cast<int64_t>(idx[k]) * batch, x + static_cast<int64_t>(idx[k + 1]) * batch,
                                  x + static_cast<int64_t>(idx[k + 2]) * batch, x + static_cast<int64_t>(idx[k + 3]) * batch};
          switch (batch / Vec<float>::L) {
            case 1: dot4<1>(g, four, batch, grad_values + k); break;
            case 2: dot4<2>(g, four, batch, grad_values + k); break;
            case 3: dot4<3>(g, four, batch, grad_values + k); break;
            case 4: dot4<4>(g, four, batch, grad_values + k); break;
            case 8: dot4<8>(g, four, batch, grad_values + k); break;
            case 16: dot4<16>(g, four, batch, grad_values + k); break;
            default: dot4<0>(g, four, batch, grad_values + k);
          }
        }
      }
#endif
      for (; k < ptr[r + 1]; ++k) grad_values[k] = dot(g, x + static_cast<int64_t>(idx[k]) * batch, batch);
    }
  });
}

// out[c, r] = a[r, c] for a contiguous [rows, cols] a, through 16 x 16 tiles held in cache: about twice
// the rate of torch's strided copy for the layout changes at the ends of a stack of csr layers
template <typename scalar_t>
void transpose_kernel(const scalar_t* __restrict__ a, scalar_t* __restrict__ out, int64_t rows, int64_t cols) {
  constexpr int64_t T = 16;
  at::parallel_for(0, (cols + T - 1) / T, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, rows * T)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t cb = begin; cb < end; ++cb) {
      const int64_t c0 = cb * T, c1 = std::min(cols, c0 + T);
      for (int64_t r0 = 0; r0 < rows; r0 += T) {
        const int64_t r1 = std::min(rows, r0 + T);
        if (r1 - r0 == T && c1 - c0 == T) {
          scalar_t tile[T][T];
          for (int64_t i = 0; i < T; ++i)
            for (int64_t j = 0; j < T; ++j) tile[j][i] = a[(r0 + i) * cols + c0 + j];
          for (int64_t j = 0; j < T; ++j)
            for (int64_t i = 0; i < T; ++i) out[(c0 + j) * rows + r0 + i] = tile[j][i];
        } else {
          for (int64_t j = c0; j < c1; ++j)
            for (int64_t i = r0; i < r1; ++i) out[j * rows + i] = a[i * cols + j];
        }
      }
    }
  });
}

void check(const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& dense, const char* what) {
  TORCH_CHECK(ptr.device().is_cpu() && idx.device().is_cpu() && dense.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(ptr.scalar_type() == idx.scalar_type(), what, ": the two index tensors differ in dtype");
  TORCH_CHECK(dense.dim() == 2 && dense.is_contiguous(), what, ": the dense operand must be 2-d and contiguous");
}

// One call for a product with a CSR (or, with perm, the transposed CSR) structure. The result is
// [batch, rows] with strides (1, batch): the transpose of the product's [rows, batch], not a view of it
// (autograd refuses in-place changes to a view a custom Function returns; Falcon adds its bias in place).
at::Tensor spmm(const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& values,
                const c10::optional<at::Tensor>& perm, const at::Tensor& dense, const c10::optional<at::Tensor>& bias,
                int64_t rows) {
  check(ptr, idx, dense, "sparsify_csr::spmm");
  TORCH_CHECK(values.is_contiguous() && values.scalar_type() == dense.scalar_type(), "sparsify_csr::spmm: values");
  TORCH_CHECK(ptr.numel() == rows + 1, "sparsify_csr::spmm: ptr must hold rows + 1 offsets");
  TORCH_CHECK(!perm.has_value() || perm->scalar_type() == ptr.scalar_type(), "sparsify_csr::spmm: perm's dtype must be the indices'");
  const int64_t batch = dense.size(1);
  at::Tensor out = at::empty_strided({batch, rows}, {1, batch}, dense.options());
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor p = perm.has_value() ? perm->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(dense.scalar_type(), "sparsify_csr::spmm", [&] {
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    if (ptr.scalar_type() == at::kInt) {
      const int32_t* pp = p.defined() ? p.data_ptr<int32_t>() : nullptr;
      auto run = pp ? spmm_kernel<true, scalar_t, int32_t> : spmm_kernel<false, scalar_t, int32_t>;
      run(ptr.data_ptr<int32_t>(), idx.data_ptr<int32_t>(), values.data_ptr<scalar_t>(), pp, dense.data_ptr<scalar_t>(), bp,
          out.data_ptr<scalar_t>(), rows, batch);
    } else {
      const int64_t* pp = p.defined() ? p.data_ptr<int64_t>() : nullptr;
      auto run = pp ? spmm_kernel<true, scalar_t, int64_t> : spmm_kernel<false, scalar_t, int64_t>;
      run(ptr.data_ptr<int64_t>(), idx.data_ptr<int64_t>(), values.data_ptr<scalar_t>(), pp, dense.data_ptr<scalar_t>(), bp,
          out.data_ptr<scalar_t>(), rows, batch);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sampled(const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& grad_out,
                                           const at::Tensor& x, bool with_bias) {
  check(ptr, idx, grad_out, "sparsify_csr::sampled");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) == grad_out.size(1), "sparsify_csr::sampled: x");
  const int64_t rows = grad_out.size(0), batch = grad_out.size(1);
  at::Tensor grad_values = at::empty({idx.numel()}, grad_out.options());
  at::Tensor grad_bias = with_bias ? at::empty({rows}, grad_out.options()) : at::empty({0}, grad_out.options());
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "sparsify_csr::sampled", [&] {
    scalar_t* gb = with_bias ? grad_bias.data_ptr<scalar_t>() : nullptr;
    const bool wide = batch <= 4 * Vec<float>::L;
    if (ptr.scalar_type() == at::kInt) {
      auto run = wide ? sampled_kernel<true, scalar_t, int32_t> : sampled_kernel<false, scalar_t, int32_t>;
      run(ptr.data_ptr<int32_t>(), idx.data_ptr<int32_t>(), grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
          grad_values.data_ptr<scalar_t>(), gb, rows, batch);
    } else {
      auto run = wide ? sampled_kernel<true, scalar_t, int64_t> : sampled_kernel<false, scalar_t, int64_t>;
      run(ptr.data_ptr<int64_t>(), idx.data_ptr<int64_t>(), grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
          grad_values.data_ptr<scalar_t>(), gb, rows, batch);
    }
  });
  return {grad_values, grad_bias};
}

// a.t() as a new contiguous tensor
at::Tensor transposed(const at::Tensor& a) {
  TORCH_CHECK(a.device().is_cpu() && a.dim() == 2 && a.is_contiguous(), "sparsify_csr::transposed: a 2-d contiguous CPU tensor");
  at::Tensor out = at::empty({a.size(1), a.size(0)}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sparsify_csr::transposed", [&] {
    transpose_kernel(a.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), a.size(0), a.size(1));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(sparsify_csr, m) {
  m.def("spmm(Tensor ptr, Tensor idx, Tensor values, Tensor? perm, Tensor dense, Tensor? bias, int rows) -> Tensor");
  m.def("sampled(Tensor ptr, Tensor idx, Tensor grad_out, Tensor x, bool with_bias) -> (Tensor, Tensor)");
  m.def("transposed(Tensor a) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsify_csr, CPU, m) {
  m.impl("spmm", &spmm);
  m.impl("sampled", &sampled);
  m.impl("transposed", &transposed);
}
