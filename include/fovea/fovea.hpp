// fovea: header-only CPU attention kernels. Include this one header.
#pragma once

#define FOVEA_VERSION_MAJOR 0
#define FOVEA_VERSION_MINOR 1
#define FOVEA_VERSION_PATCH 0

#include "attention/agent.hpp"
#include "attention/block_sparse.hpp"
#include "attention/dynamic_mask.hpp"
#include "attention/hip.hpp"
#include "attention/routing.hpp"
#include "attention/linear.hpp"
#include "attention/softmax.hpp"
#include "attention/softmax_paged.hpp"
#include "attention/softmax_varlen.hpp"
#include "core/error.hpp"
#include "core/tensor_view.hpp"
#include "simd/backend.hpp"
