// Where the decode step (decode_step_) finds each batch row's state. Torch-free: the CPU kernel, the CUDA kernels
// and the CPU harness that runs the CUDA source share it.
//
// Row b of a call (its q, k, v, valid and out) updates row rows[b] of every state tensor (k_slots, v_slots,
// psi_slots, pos, scores, H, z, next_position), or row b when rows is null. Rows are a per-tensor stride apart and
// contiguous inside, so a pool laid out by a serving engine (vLLM interleaves all of one request's state tensors in
// one page) is updated in place: no gather before the step, no scatter after it.
#pragma once

#include <cstdint>

#include "less_numerics.h"

namespace less_cuda {

struct StateRows {
  const int64_t* rows;  // [B] state row of each batch row, or null: row b
  // Elements between consecutive rows of each state tensor.
  int64_t k_slots, v_slots, psi_slots, pos, scores, H, z, next_position;

  LESS_HD int64_t row(int64_t b) const { return rows == nullptr ? b : rows[b]; }
};

}  // namespace less_cuda
