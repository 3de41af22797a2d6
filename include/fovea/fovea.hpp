// fovea: header-only CPU attention kernels. Include this one header.
#pragma once

#define FOVEA_VERSION_MAJOR 0
#define FOVEA_VERSION_MINOR 1
#define FOVEA_VERSION_PATCH 0

// GCC 12 reports -W(maybe-)uninitialized inside its own AVX-512 intrinsic headers (the
// `__Y = __Y` idiom of the _mm512_undefined_* helpers, GCC bug 105593) wherever they are
// inlined: ~200 false warnings per translation unit under -Wall. Silenced for fovea's
// code only; the user's own code keeps both warnings.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include "attention/agent.hpp"
#include "attention/block_sparse.hpp"
#include "attention/calibration.hpp"
#include "attention/dhsa.hpp"
#include "attention/dynamic_mask.hpp"
#include "attention/hip.hpp"
#include "attention/landmark.hpp"
#include "attention/routing.hpp"
#include "attention/linear.hpp"
#include "attention/linear_recurrence.hpp"
#include "attention/moh.hpp"
#include "attention/prob_mod.hpp"
#include "attention/titans_memory.hpp"
#include "attention/softmax.hpp"
#include "attention/softmax_backward.hpp"
#include "attention/softmax_paged.hpp"
#include "attention/softmax_varlen.hpp"
#include "attention/kv_cache.hpp"
#include "attention/quantize.hpp"
#include "core/build_info.hpp"
#include "core/cache_types.hpp"
#include "core/error.hpp"
#include "core/tensor_view.hpp"
#include "simd/backend.hpp"
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
