// Plain C interface of the rotary-embedding kernels in rope.cu (no torch headers).
//
// q, k are canonical (B, S, H, D) strided views with their own head counts HQ, HK; qo, ko
// are outputs of the same shapes (qo == q, ko == k: in place). With R the rotary dim, h = R/2
// and per-lane cosines c and sines s of length R, each head vector x becomes
//
//   forward   o[j] = x[j] c[j] - x[j+h] s[j],     o[j+h] = x[j+h] c[j+h] + x[j] s[j+h]
//   backward  o[j] = x[j] c[j] + x[j+h] s[j+h],   o[j+h] = x[j+h] c[j+h] - x[j] s[j]
//
// for j < h; lanes R..D are copied when the output is not the input. c and s come from
// (A, B, S, R) tables (A = 3: lane j and j+h read the table of axis(j)), or from (3, B, S)
// integer positions: c = cosf(pos[axis(j)] * inv_freq[j]) * scaling (fp32), same for s.
// axis(j) follows the lane rule: PLAIN 0; CHUNKED (sections t, h, w) 0 for j < t, 1 for
// j < t + h, else 2; INTERLEAVED 1 where j % 3 == 1 and j < 3h, 2 where j % 3 == 2 and
// j < 3w, else 0. Arithmetic is fp32 with one rounding of each output to its dtype.
// Strides are in elements; offsets are 64-bit. Limits: HQ + HK <= 16384, D <= 65536, and
// R/2 at most 256 accesses (vlmk_rope_plan says whether a layout fits).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum VlmkDtype {
  VLMK_F32 = 0, VLMK_F16 = 1, VLMK_BF16 = 2, VLMK_F64 = 3, VLMK_I32 = 4, VLMK_I64 = 5
};
enum VlmkRopeSource { VLMK_ROPE_TABLE = 0, VLMK_ROPE_POSITIONS = 1 };
enum VlmkLaneRule { VLMK_PLAIN = 0, VLMK_CHUNKED = 1, VLMK_INTERLEAVED = 2 };

typedef struct VlmkRopeArgs {
  int64_t batch, seq, q_heads, k_heads, head_dim, rot_dim;
  const void* q;  // (B, S, HQ, D), dtype q_dtype (f32, f16 or bf16)
  const void* k;  // (B, S, HK, D), dtype k_dtype
  void* qo;       // like q, same dtype
  void* ko;       // like k, same dtype
  int64_t q_stride[4], k_stride[4], qo_stride[4], ko_stride[4];
  int q_dtype, k_dtype;

  int source;     // VlmkRopeSource
  int lane_rule;  // VlmkLaneRule
  int sections[3];
  int backward;

  // source == VLMK_ROPE_TABLE: (A, B, S, R) tables, dtypes f16, bf16, f32 or f64
  const void* cos;
  const void* sin;
  int64_t cos_stride[4], sin_stride[4];
  int64_t table_axes;  // A: 1 (lane rule PLAIN only) or 3
  int cos_dtype, sin_dtype;

  // source == VLMK_ROPE_POSITIONS: (3, B, S) positions (i32 or i64), (R/2,) f32 inv_freq
  const void* positions;
  int64_t pos_stride[3];
  int pos_dtype;
  const float* inv_freq;
  int64_t freq_stride;
  float scaling;
} VlmkRopeArgs;

// Enqueues the rotation on `stream` (a cudaStream_t). Returns cudaErrorInvalidValue for
// arguments outside the contract above, else the launch error (cudaSuccess when queued).
cudaError_t vlmk_rope(const VlmkRopeArgs* args, void* stream);

// The vector width (elements per access: 16 bytes where the layout allows it, down to 1)
// and the block shape that vlmk_rope would use for `args`; 0 when it would refuse them.
// q and k of different dtypes are launched apart: 1 when both launches fit, with q's plan.
int vlmk_rope_plan(const VlmkRopeArgs* args, int* vec, int* threads_x, int* tokens_per_block);

#ifdef __cplusplus
}
#endif
