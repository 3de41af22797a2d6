// Declarations the README's code blocks use without declaring, so that every block
// compiles as written (tests/readme/CMakeLists: each block becomes a function of its own;
// a block's own declarations shadow these).
#pragma once

#include <cstdint>
#include <numeric>
#include <fovea/fovea.hpp>
#include <span>
#include <vector>

namespace readme {

using fovea::index_t;
inline index_t B = 1, H = 4, Hk = 2, Sq = 8, Sk = 8, D = 16, Dv = 16;
inline index_t total_q = 8, total_k = 8, pages = 4, page_size = 16, max_pages = 4;
inline float *q_packed, *k_packed, *v_packed, *o_packed, *k_cache, *v_cache;
inline const std::int32_t* table;
inline std::span<const std::int32_t> cu_seqlens_q, cu_seqlens_k, seqlens_k, row_offsets, key_blocks;
inline fovea::tensor_view<const float, 4> Q, K, V, A, q_t, k_t, v_t, W, K_cache, V_cache, Q_new,
    bias;
inline fovea::tensor_view<float, 4> O, o_t, O_new, bias_out;
inline fovea::tensor_view<const float, 2> b, W_dt;
inline fovea::tensor_view<const float, 1> A_dt;
inline fovea::tensor_view<const float, 4> G, Beta, g_t, b_t, Eta, Theta, Alpha, theta_t;
inline fovea::tensor_view<float, 4> M, U, dQ, dK, dV, landmarks;
inline fovea::tensor_view<const float, 4> dO;
inline fovea::tensor_view<float, 3> L;
inline fovea::tensor_view<const float, 3> router_weights, row_weights;
inline fovea::tensor_view<float, 4> dbias;
inline fovea::tensor_view<float, 2> dW_dt;
inline fovea::tensor_view<float, 1> dA_dt;
// chunked training through linear_state (two chunks)
inline fovea::tensor_view<const float, 4> Q1, K1, V1, O1, dO1, Q2, K2, V2, O2, dO2;
inline fovea::tensor_view<float, 4> dQ1, dK1, dV1, dQ2, dK2, dV2;
inline std::vector<float> state_before_chunk2, d_state;

}  // namespace readme
