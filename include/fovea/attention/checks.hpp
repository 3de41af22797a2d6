// The argument checks every (q, k, v, out) front-end shares.
#pragma once

#include <cmath>
#include <cfloat>
#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "../core/cache_types.hpp"
#include "../core/error.hpp"
#include "../core/storage.hpp"
#include "../core/tensor_view.hpp"
#include "../core/validate.hpp"
#include "../engine/kv/kv_source.hpp"

namespace fovea::detail {

/// q, k, v and out of one storage type.
template <class TQ, class TK, class TV, class TO>
concept attention_types = is_storage_type_v<TQ> && !std::is_const_v<TO> &&
                          std::is_same_v<std::remove_const_t<TQ>, std::remove_const_t<TK>> &&
                          std::is_same_v<std::remove_const_t<TQ>, std::remove_const_t<TV>> &&
                          std::is_same_v<std::remove_const_t<TQ>, TO>;

/// q and out of one storage type; k and v each of any cache type (float, bf16, fp16,
/// block_q8_0, int8, e4m3, e5m2) computed in float, or all four double.
template <class TQ, class TK, class TV, class TO>
concept mixed_attention_types =
    is_storage_type_v<TQ> && !std::is_const_v<TO> && std::is_same_v<std::remove_const_t<TQ>, TO> &&
    is_cache_type_v<TK> && is_cache_type_v<TV> &&
    std::is_same_v<TO, double> == std::is_same_v<std::remove_const_t<TK>, double> &&
    std::is_same_v<TO, double> == std::is_same_v<std::remove_const_t<TV>, double>;

/// The name of a cache type, for messages.
template <class S>
constexpr const char* cache_type_name() noexcept {
  using E = std::remove_const_t<S>;
  if constexpr (std::is_same_v<E, float>) return "float";
  else if constexpr (std::is_same_v<E, double>) return "double";
  else if constexpr (std::is_same_v<E, bfloat16>) return "bfloat16";
  else if constexpr (std::is_same_v<E, half>) return "half";
  else if constexpr (std::is_same_v<E, block_q8_0>) return "block_q8_0";
  else if constexpr (std::is_same_v<E, std::int8_t>) return "int8";
  else if constexpr (std::is_same_v<E, e4m3>) return "e4m3";
  else return "e5m2";
}

/// A cache of blocks (block_q8_0): rows of whole blocks, every stride a whole block.
template <class S>
void check_blocks(const tensor_view<S, 4>& c, std::string_view name) {
  constexpr index_t per = values_per_element<S>::value;
  if constexpr (per > 1) {
    require(c.extent(3) % per == 0, name, ": extent 3 (dim) is ", c.extent(3),
            ", expected a multiple of ", per, " (", cache_type_name<S>(), " blocks)");
    for (std::size_t r = 0; r < 3; ++r)
      require(c.extent(r) <= 1 || c.stride(r) % per == 0, name, ": stride ", r, " is ",
              c.stride(r), " values, expected a multiple of ", per, " (whole ",
              cache_type_name<S>(), " blocks)");
  }
}

/// The scales of a key or value cache of type S with `rows` (batch or pages), Hk heads
/// and `slots` (keys or page size): (rows|1, Hk|1, slots|1) for int8 (required) and fp8
/// (optional, default 1; every scale finite); empty for the other types.
template <class S>
void check_cache_scales(const tensor_view<const float, 3>& s, std::string_view name,
                        index_t rows, index_t Hk, index_t slots, bool per_channel = false) {
  const bool given = s.data() != nullptr || !s.empty();
  if constexpr (!is_scaled_v<S>) {
    require(!given, name, ": given for a ", cache_type_name<S>(),
            " cache, which has no separate scales");
  } else {
    if (!given) {
      require(!std::is_same_v<std::remove_const_t<S>, std::int8_t> || per_channel, name,
              ": an int8 cache needs its scales, (", rows, "|1, ", Hk, "|1, ", slots,
              "|1), or per-channel scales");
      return;
    }
    check_data(s, name);
    require(s.data() != nullptr, name, ": data is null");
    const index_t full[3] = {rows, Hk, slots};
    const char* what[3] = {"batch or pages", "heads", "keys or page slots"};
    for (std::size_t r = 0; r < 3; ++r)
      require(s.extent(r) == 1 || s.extent(r) == full[r], name, ": extent ", r, " (", what[r],
              ") is ", s.extent(r), ", expected 1 (broadcast) or ", full[r]);
    if constexpr (!std::is_same_v<std::remove_const_t<S>, std::int8_t>)
      for (index_t a = 0; a < s.extent(0); ++a)
        for (index_t h = 0; h < s.extent(1); ++h)
          for (index_t t = 0; t < s.extent(2); ++t)
            require(std::isfinite(s(a, h, t)), name, ": scale (", a, ", ", h, ", ", t, ") is ",
                    s(a, h, t), ", expected a finite fp8 scale");
  }
}

/// out: (B, H, Sq, Dv) of q and v, one-to-one, overlapping none of the inputs.
template <class T, class K, class V>
void check_output(const tensor_view<T, 4>& out, const tensor_view<const T, 4>& q,
                  const tensor_view<const K, 4>& k, const char* k_name,
                  const tensor_view<const V, 4>& v, const char* v_name) {
  check_extent(out, 0, q.extent(0), "out", "batch of q");
  check_extent(out, 1, q.extent(1), "out", "heads of q");
  check_extent(out, 2, q.extent(2), "out", "queries of q");
  check_extent(out, 3, v.extent(3), "out", "value dim of v");
  check_one_to_one(out, "out");
  check_no_alias(out, "out", q, "q");
  check_no_alias(out, "out", k, k_name);
  check_no_alias(out, "out", v, v_name);
}

/// The shape checks every (q, k, v, out) front-end shares; returns the GQA group size.
template <class T, class K, class V>
index_t check_qkvo(const tensor_view<const T, 4>& q, const tensor_view<const K, 4>& k,
                   const tensor_view<const V, 4>& v, const tensor_view<T, 4>& out) {
  check_rows(q, "q");
  check_rows(k, "k");
  check_rows(v, "v");
  check_blocks(k, "k");
  check_blocks(v, "v");
  check_rows(out, "out");
  const index_t B = q.extent(0), H = q.extent(1), D = q.extent(3);
  const index_t Hk = k.extent(1), Sk = k.extent(2);
  require(D >= 1, "q: extent 3 (dim) is ", D, ", expected at least 1");
  check_extent(k, 0, B, "k", "batch of q");
  check_extent(k, 3, D, "k", "head dim of q");
  require(Hk >= 1 || H == 0, "k: extent 1 (heads) is 0 but q has ", H, " heads");
  require(Hk == 0 || H % Hk == 0, "k: extent 1 (heads) is ", Hk, ", which does not divide the ", H,
          " heads of q");
  check_extent(v, 0, B, "v", "batch of q");
  check_extent(v, 1, Hk, "v", "heads of k");
  check_extent(v, 2, Sk, "v", "keys of k");
  check_output(out, q, k, "k", v, "v");
  return Hk == 0 || H == 0 ? 1 : H / Hk;  // >= 1: callers divide by it
}

/// Per-channel scales of a cache of type S with Hk heads of D columns: none, or for int8
/// a (Hk|1, D) view with contiguous rows (ONNX Runtime's per-channel k_scale, KIVI's keys).
template <class S>
void check_channel_scales(const tensor_view<const float, 2>& s, std::string_view name, index_t Hk,
                          index_t D) {
  if (s.data() == nullptr && s.empty()) return;
  require(std::is_same_v<std::remove_const_t<S>, std::int8_t>, name, ": given for a ",
          cache_type_name<S>(), " cache; per-channel scales apply to int8 caches");
  check_data(s, name);
  require(s.data() != nullptr, name, ": data is null");
  require(s.extent(0) == 1 || s.extent(0) == Hk, name, ": extent 0 (heads) is ", s.extent(0),
          ", expected 1 (broadcast) or ", Hk);
  require(s.extent(1) == D, name, ": extent 1 (channels) is ", s.extent(1), ", expected ", D);
  require(s.extent(1) <= 1 || s.stride(1) == 1, name, ": stride 1 is ", s.stride(1),
          ", expected 1 (contiguous rows)");
}

/// The checks of a front-end that selects keys from q and k alone (hip_select,
/// dhsa_select, landmark_select): q and k rows, k's blocks, batch, head dim, GQA heads,
/// k's scales. Returns the key/value layout of k, for the selection to read.
template <class S, class K>
kv_layout<K, K> check_selection_inputs(const tensor_view<const S, 4>& q,
                                       const tensor_view<const K, 4>& k,
                                       const tensor_view<const float, 3>& k_scale) {
  check_rows(q, "q");
  check_rows(k, "k");
  check_blocks(k, "k");
  check_extent(k, 0, q.extent(0), "k", "batch of q");
  check_extent(k, 3, q.extent(3), "k", "head dim of q");
  require(q.extent(3) >= 1, "q: extent 3 (dim) is ", q.extent(3), ", expected at least 1");
  require(k.extent(1) >= 1 ? q.extent(1) % k.extent(1) == 0 : q.extent(1) == 0,
          "k: extent 1 (heads) is ", k.extent(1), ", which does not divide the ", q.extent(1),
          " heads of q");
  check_cache_scales<K>(k_scale, "options.k_scale", k.extent(0), k.extent(1), k.extent(2));
  return {k, k, {}, k_scale, {}};
}

/// Whether an optional view was given (a default view has neither data nor extents).
template <class T, std::size_t Rank>
bool is_given(const tensor_view<T, Rank>& x) noexcept {
  return x.data() != nullptr || x.extents() != std::array<index_t, Rank>{};
}

/// A recurrence's (B, heads|1, S, 1|width) per-token input (decay, beta, gates): shape and
/// finite values in [lo, hi].
inline void check_side_input(const tensor_view<const float, 4>& x, const char* name, index_t B,
                             index_t Hk, bool shared_heads, index_t S, index_t width,
                             index_t Dk, double lo = -INFINITY, double hi = INFINITY) {
  check_data(x, name);
  require(x.data() != nullptr || x.empty(), name, ": data is null");
  require(x.extent(0) == B, name, ": extent 0 (batch) is ", x.extent(0), ", expected ", B);
  require(x.extent(1) == Hk || (shared_heads && x.extent(1) == 1), name, ": extent 1 (heads) is ",
          x.extent(1), ", expected ", Hk, " (key/value heads)", shared_heads ? " or 1" : "");
  require(x.extent(2) == S, name, ": extent 2 (tokens) is ", x.extent(2), ", expected ", S);
  require(x.extent(3) == 1 || x.extent(3) == width, name, ": extent 3 is ", x.extent(3),
          ", expected 1", width != 1 ? " or " + std::to_string(Dk) + " (key dim)" : "");
  const bool bounded = lo != -INFINITY || hi != INFINITY;
  const float flo = bounded ? float(lo) : -FLT_MAX, fhi = bounded ? float(hi) : FLT_MAX;
  for (index_t b = 0; b < x.extent(0); ++b)
    for (index_t h = 0; h < x.extent(1); ++h)
      for (index_t t = 0; t < x.extent(2); ++t) {
        // A branch-free pass over the row (NaN fails both compares), then the element that
        // failed, if any, for the message (its strings built only then).
        bool ok = true;
        for (index_t e = 0; e < x.extent(3); ++e) {
          const float y = x(b, h, t, e);
          ok &= y >= flo && y <= fhi && double(y) >= lo && double(y) <= hi;
        }
        if (ok) [[likely]]
          continue;
        for (index_t e = 0; e < x.extent(3); ++e) {
          const float y = x(b, h, t, e);
          require(std::isfinite(y) && y >= lo && y <= hi, name, ": element (", b, ", ", h, ", ",
                  t, ", ", e, ") is ", y, ", expected a finite value",
                  bounded ? " in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]" : "");
        }
      }
}

/// A recurrence's (B, Hk, Dk, Dv) fp32 state, when given.
template <class T>
void check_state(const tensor_view<T, 4>& state, const char* name, index_t B, index_t Hk,
                 index_t Dk, index_t Dv) {
  if (!is_given(state)) return;
  check_data(state, name);
  require(state.data() != nullptr, name, ": data is null");
  const index_t want[4] = {B, Hk, Dk, Dv};
  const char* what[4] = {"batch", "key/value heads", "key dim", "value dim"};
  for (std::size_t r = 0; r < 4; ++r)
    require(state.extent(r) == want[r], name, ": extent ", r, " (", what[r], ") is ",
            state.extent(r), ", expected ", want[r]);
}

/// An output state that is exactly its input's view (decoding in place), or separate.
inline void check_in_place(const tensor_view<float, 4>& out, const char* out_name,
                           const tensor_view<const float, 4>& in, const char* in_name) {
  const bool same = out.data() == in.data() && out.extents() == in.extents() &&
                    out.strides() == in.strides();
  if (!same) check_no_alias(out, out_name, in, in_name);
}

/// A state written by the call: one-to-one, overlapping none of q, k, v, out.
template <class TQ, class TK, class TV, class TO>
void check_state_out(const tensor_view<float, 4>& state, const char* name,
                     const tensor_view<TQ, 4>& q, const tensor_view<TK, 4>& k,
                     const tensor_view<TV, 4>& v, const tensor_view<TO, 4>& out) {
  check_one_to_one(state, name);
  check_no_alias(state, name, out, "out");
  check_no_alias(state, name, q, "q");
  check_no_alias(state, name, k, "k");
  check_no_alias(state, name, v, "v");
}

/// A gradient output: rows like check_rows, the extents of `like`, one-to-one.
template <class T, class G>
void check_gradient(const tensor_view<T, 4>& g, const char* name, const tensor_view<G, 4>& like,
                    const char* like_name) {
  check_rows(tensor_view<const T, 4>(g), name);
  for (std::size_t r = 0; r < 4; ++r)
    require(g.extent(r) == like.extent(r), name, ": extent ", r, " (", dim_name(r), ") is ",
            g.extent(r), ", expected ", like.extent(r), " as ", like_name);
  check_one_to_one(g, name);
}

/// A backward's dq, dk, dv: shaped like q, k, v, dout like out, no gradient overlapping an
/// input or another gradient.
template <class S>
void check_gradients(const tensor_view<const S, 4>& q, const tensor_view<const S, 4>& k,
                     const tensor_view<const S, 4>& v, const tensor_view<const S, 4>& out,
                     const tensor_view<const S, 4>& dout, const tensor_view<S, 4>& dq,
                     const tensor_view<S, 4>& dk, const tensor_view<S, 4>& dv) {
  check_gradient(tensor_view<S, 4>(const_cast<S*>(dout.data()), dout.extents(), dout.strides()),
                 "dout", out, "out");
  check_gradient(dq, "dq", q, "q");
  check_gradient(dk, "dk", k, "k");
  check_gradient(dv, "dv", v, "v");
  const char* inputs[] = {"q", "k", "v", "out", "dout"};
  const tensor_view<const S, 4> in[] = {q, k, v, out, dout};
  const char* grad_names[] = {"dq", "dk", "dv"};
  const tensor_view<S, 4> gs[] = {dq, dk, dv};
  for (int g = 0; g < 3; ++g) {
    for (int i = 0; i < 5; ++i) check_no_alias(gs[g], grad_names[g], in[i], inputs[i]);
    for (int h = g + 1; h < 3; ++h) check_no_alias(gs[g], grad_names[g], gs[h], grad_names[h]);
  }
}

}  // namespace fovea::detail
