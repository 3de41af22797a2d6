// The one register-blocked micro-kernel both tile products use:
//   C[rows x N] (= or +=) A[rows x depth] * B[depth x N],  N = Vectors SIMD widths,
// A read by broadcast through (row, column) strides, B and C row-major, B in the compute
// type or a storage type converted as it is loaded. With queries along N, Q K^T is
// C = K * Q^T and P V is O^T += V^T * P^T: neither K nor V is copied. With A and B in bf16
// pairs (depth counted in pairs) the products are AVX512-BF16's vdpbf16ps.
#pragma once

#include <type_traits>
#include <utility>

#include "../../core/tensor_view.hpp"
#include "../../simd/bf16_pairs.hpp"
#include "../../simd/convert.hpp"
#include "../../simd/prefetch.hpp"
#include "../../simd/vec.hpp"

namespace fovea::detail {

/// Where A's rows are: `a + r * stride` (strided), or a list of row pointers (rows
/// gathered from anywhere, e.g. the representative keys HiP scores).
template <class TA>
struct strided_rows {
  const TA* a;
  index_t stride;
  const TA* operator()(index_t r) const noexcept { return a + r * stride; }
};
template <class TA>
struct listed_rows {
  const TA* const* rows;
  const TA* operator()(index_t r) const noexcept { return rows[r]; }
};

/// The micro-kernel's products: B's rows loaded as vectors of T (converted from their
/// storage type), A's elements broadcast, fused multiply-adds.
template <class T, class Backend, class TA, class TB>
struct fma_product {
  using V = vec<T, Backend>;
  using a_reg = typename V::type;
  using b_reg = typename V::type;
  static b_reg load_b(const TB* p) noexcept { return load_as<T, Backend>(p); }
  static a_reg broadcast_a(const TA* p) noexcept { return V::broadcast(T(*p)); }
  static typename V::type fma(a_reg a, b_reg b, typename V::type acc) noexcept {
    return V::fma(a, b, acc);
  }
  static void pin(b_reg& x) noexcept { V::pin(x); }
};

/// bf16 pairs (A and B both bf16_pair, depth counted in pairs): vdpbf16ps.
template <class T, class Backend, class TA, class TB>
using product_for =
#if FOVEA_HAS_BF16_DOT
    std::conditional_t<std::is_same_v<TB, bf16_pair>, pair_product<Backend>,
                       fma_product<T, Backend, TA, TB>>;
#else
    fma_product<T, Backend, TA, TB>;
#endif

template <class T, class Backend, int Rows, int Vectors, bool Accumulate, class TA, class TB>
inline void micro_kernel_body(const TA* const* a_rows, index_t a_col, const TB* b, index_t ldb,
                              T* c, index_t ldc, index_t depth) noexcept {
  using V = vec<T, Backend>;
  using P = product_for<T, Backend, TA, TB>;
  constexpr int W = V::width;
  // The row pointers as locals: read through a_rows, clang reloads all of them from
  // memory at every depth step (the pinning asm counts as a memory access for it), six
  // more loads per twelve FMAs, 8-11% slower prefill.
  const TA* a[Rows];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) a[r] = a_rows[r];
  typename V::type acc[Rows][Vectors];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 8
    for (int x = 0; x < Vectors; ++x)
      acc[r][x] = Accumulate ? V::load(c + r * ldc + x * W) : V::broadcast(T(0));
  for (index_t p = 0; p < depth; ++p) {
    typename P::b_reg bp[Vectors];
#pragma GCC unroll 8
    for (int x = 0; x < Vectors; ++x) {
      bp[x] = P::load_b(b + p * ldb + x * W);
      P::pin(bp[x]);
    }
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const auto ar = P::broadcast_a(a[r] + p * a_col);
#pragma GCC unroll 8
      for (int x = 0; x < Vectors; ++x) acc[r][x] = P::fma(ar, bp[x], acc[r][x]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 8
    for (int x = 0; x < Vectors; ++x) V::store(c + r * ldc + x * W, acc[r][x]);
}

/// The scalar backend's copy. GCC 12 at -O2/-O3 auto-vectorises the scalar loop above
/// into code that loads the next depth step's A and B after the last one (reading past
/// the end of K or V: a crash when they end on a page boundary), so the scalar backend,
/// meant to be plain C++ anyway, is compiled without tree vectorisation (a GCC attribute:
/// clang would warn about it at every include).
#if defined(__GNUC__) && !defined(__clang__)
#define FOVEA_NO_TREE_VECTORIZE \
  __attribute__((optimize("no-tree-vectorize", "no-tree-slp-vectorize")))
#else
#define FOVEA_NO_TREE_VECTORIZE
#endif
template <class T, int Rows, int Vectors, bool Accumulate, class TA, class TB>
FOVEA_NO_TREE_VECTORIZE void micro_kernel_scalar(const TA* const* a_rows, index_t a_col,
                                                 const TB* b, index_t ldb, T* c, index_t ldc,
                                                 index_t depth) noexcept {
  micro_kernel_body<T, scalar, Rows, Vectors, Accumulate>(a_rows, a_col, b, ldb, c, ldc, depth);
}

/// The SIMD backends' copy, out of line: the register allocation wants the whole function
/// to itself (GCC inlined the body into prefill's tile loop once gemm_rows took a paced
/// prefetch: 25% slower).
template <class T, class Backend, int Rows, int Vectors, bool Accumulate, class TA, class TB>
[[gnu::noinline]] void micro_kernel_simd(const TA* const* a_rows, index_t a_col, const TB* b,
                                         index_t ldb, T* c, index_t ldc, index_t depth) noexcept {
  micro_kernel_body<T, Backend, Rows, Vectors, Accumulate>(a_rows, a_col, b, ldb, c, ldc, depth);
}

/// C[Rows x Vectors*W] (= or +=) A * B with A's rows a(r0), ..., a(r0 + Rows - 1).
template <class T, class Backend, int Rows, int Vectors, bool Accumulate, class ARows, class TB>
inline void micro_kernel(const ARows& a, index_t r0, index_t a_col, const TB* b, index_t ldb, T* c,
                         index_t ldc, index_t depth) noexcept {
  using TA = std::remove_cv_t<std::remove_pointer_t<decltype(a(0))>>;
  const TA* a_rows[Rows];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) a_rows[r] = a(r0 + r);
  if constexpr (std::is_same_v<Backend, scalar>)
    micro_kernel_scalar<T, Rows, Vectors, Accumulate>(a_rows, a_col, b, ldb, c, ldc, depth);
  else
    micro_kernel_simd<T, Backend, Rows, Vectors, Accumulate>(a_rows, a_col, b, ldb, c, ldc, depth);
}

/// C[rows x Vectors*W] (= or +=) A * B for any number of rows: full row blocks, then one
/// call of the micro-kernel sized to the remainder; pace->tick() after each full block.
template <class T, class Backend, int RowBlock, int Vectors, bool Accumulate, class ARows, class TB>
inline void gemm_rows(index_t rows, const ARows& a, index_t a_col, const TB* b, index_t ldb, T* c,
                      index_t ldc, index_t depth, paced_prefetch* pace = nullptr) noexcept {
  index_t r = 0;
  for (; r + RowBlock <= rows; r += RowBlock) {
    micro_kernel<T, Backend, RowBlock, Vectors, Accumulate>(a, r, a_col, b, ldb, c + r * ldc, ldc,
                                                            depth);
    if (pace) pace->tick();
  }
  const index_t rest = rows - r;
  if constexpr (RowBlock > 1) {
    if (rest > 0) {
      [&]<int... R>(std::integer_sequence<int, R...>) {
        ((rest == R + 1 ? micro_kernel<T, Backend, R + 1, Vectors, Accumulate>(
                              a, r, a_col, b, ldb, c + r * ldc, ldc, depth)
                        : void()),
         ...);
      }
      (std::make_integer_sequence<int, RowBlock - 1>{});
    }
  }
}

/// gemm_rows with A's rows at a + r * a_row.
template <class T, class Backend, int RowBlock, int Vectors, bool Accumulate, class TA, class TB>
inline void gemm_rows(index_t rows, const TA* a, index_t a_row, index_t a_col, const TB* b,
                      index_t ldb, T* c, index_t ldc, index_t depth,
                      paced_prefetch* pace = nullptr) noexcept {
  gemm_rows<T, Backend, RowBlock, Vectors, Accumulate>(rows, strided_rows<TA>{a, a_row}, a_col, b,
                                                       ldb, c, ldc, depth, pace);
}

}  // namespace fovea::detail

namespace fovea::detail {

/// gemm_rows over any number of vectors of columns: blocks of Block vectors, then one
/// call sized to the remainder; pace->tick() between micro-kernel calls.
template <class T, class Backend, int RowBlock, int Block, bool Accumulate, class ARows, class TB>
inline void gemm_wide(index_t rows, index_t vectors, const ARows& a, index_t a_col, const TB* b,
                      index_t ldb, T* c, index_t ldc, index_t depth,
                      paced_prefetch* pace = nullptr) noexcept {
  constexpr int W = vec<T, Backend>::width;
  index_t x = 0;
  for (; x + Block <= vectors; x += Block)
    gemm_rows<T, Backend, RowBlock, Block, Accumulate>(rows, a, a_col, b + x * W, ldb, c + x * W,
                                                       ldc, depth, pace);
  const index_t rest = vectors - x;
  if constexpr (Block > 1) {
    if (rest > 0) {
      [&]<int... X>(std::integer_sequence<int, X...>) {
        ((rest == X + 1 ? gemm_rows<T, Backend, RowBlock, X + 1, Accumulate>(
                              rows, a, a_col, b + x * W, ldb, c + x * W, ldc, depth, pace)
                        : void()),
         ...);
      }
      (std::make_integer_sequence<int, Block - 1>{});
    }
  }
}

/// gemm_wide with A's rows at a + r * a_row.
template <class T, class Backend, int RowBlock, int Block, bool Accumulate, class TA, class TB>
inline void gemm_wide(index_t rows, index_t vectors, const TA* a, index_t a_row, index_t a_col,
                      const TB* b, index_t ldb, T* c, index_t ldc, index_t depth,
                      paced_prefetch* pace = nullptr) noexcept {
  gemm_wide<T, Backend, RowBlock, Block, Accumulate>(rows, vectors, strided_rows<TA>{a, a_row},
                                                     a_col, b, ldb, c, ldc, depth, pace);
}

}  // namespace fovea::detail
