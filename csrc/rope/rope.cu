// Rotary position embeddings (RoPE, M-RoPE chunked / interleaved, vision RoPE): the CUDA C++
// twin of the Triton kernel `_rope_kernel` in vlmkernels/ops/rope.py. The math, layouts and
// argument contract are in rope.h.
//
// Grid: blockDim.y tokens per block, one (b, s) token per y-row. Each row first computes
// the token's per-lane c1 = c[j], c2 = c[j+h], s1 = s[j], s2 = s[j+h] (j < h) once into
// shared memory, then rotates every head of q and k: thread x owns the lane chunk
// [c V, c V + V) of the halves (c = x % NC, NC = h / V chunks) and heads x / NC, + G, + 2G...
// (G = blockDim.x / NC; all heads in one pass where NC * heads <= 256). V elements make one
// 16-byte access where the last dim is contiguous and everything is aligned (8, 4 or 2 bytes,
// or single elements with any strides, otherwise). The first head's loads are issued before
// the cos/sin set-up; later heads are not prefetched (their registers would halve occupancy:
// at most 64 registers keep 4 blocks of 256 threads, 32 KB of loads in flight, per SM).
//
// Exactness against the Triton kernel: the same fp32 operations in the same order. Triton
// (3.6 to 3.9, FP fusion on) contracts each two-product sum into one FMA, fusing the product
// named first below and rounding the other; cosf/sinf are libdevice's, as Triton's tl.cos/sin.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "rope.h"

namespace {

constexpr int kBlockThreads = 256;  // threads per block, at most

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

struct Side {  // q or k
  const void* x;
  void* o;
  int64_t sx[4], so[4];  // (B, S, H, D) strides
  int heads;
  bool copy;  // lanes R..D copied (out of place)
};

struct Params {
  Side q, k;
  int64_t seq, tokens;
  int half, rot, head_dim;
  int nc;  // V-lane chunks per half
  int pc;  // V-lane chunks in R..D
  int source, lane_rule, sec_t, sec_h, sec_w;
  const void* cos;
  const void* sin;
  int64_t sc[4], ss[4];
  int cos_dtype, sin_dtype;
  const void* pos;
  int64_t sp[3];
  int pos_dtype;
  const float* freq;
  int64_t sf;
  float scaling;
};

__device__ __forceinline__ int lane_axis(int j, const Params& p) {
  if (p.lane_rule == VLMK_CHUNKED) return j < p.sec_t ? 0 : (j < p.sec_t + p.sec_h ? 1 : 2);
  if (p.lane_rule == VLMK_INTERLEAVED) {
    const int r = j % 3;
    if (r == 1 && j < 3 * p.sec_h) return 1;
    if (r == 2 && j < 3 * p.sec_w) return 2;
  }
  return 0;
}

__device__ __forceinline__ float load_float(const void* base, int dtype, int64_t off) {
  switch (dtype) {
    case VLMK_F16:
      return __half2float(static_cast<const __half*>(base)[off]);
    case VLMK_BF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[off]);
    case VLMK_F64:
      return __double2float_rn(static_cast<const double*>(base)[off]);
    default:
      return static_cast<const float*>(base)[off];
  }
}

// The token's c1, c2, s1, s2 lanes (each h floats) into `out`.
__device__ void token_lanes(const Params& p, int64_t b, int64_t s, float* out) {
  const int h = p.half;
  for (int j = threadIdx.x; j < h; j += blockDim.x) {
    const int64_t axis = lane_axis(j, p);
    float c1, c2, s1, s2;
    if (p.source == VLMK_ROPE_TABLE) {
      const int64_t rc = axis * p.sc[0] + b * p.sc[1] + s * p.sc[2];
      const int64_t rs = axis * p.ss[0] + b * p.ss[1] + s * p.ss[2];
      c1 = load_float(p.cos, p.cos_dtype, rc + j * p.sc[3]);
      c2 = load_float(p.cos, p.cos_dtype, rc + (j + h) * p.sc[3]);
      s1 = load_float(p.sin, p.sin_dtype, rs + j * p.ss[3]);
      s2 = load_float(p.sin, p.sin_dtype, rs + (j + h) * p.ss[3]);
    } else {
      const int64_t off = axis * p.sp[0] + b * p.sp[1] + s * p.sp[2];
      const int64_t pos = p.pos_dtype == VLMK_I32 ? static_cast<const int32_t*>(p.pos)[off]
                                                  : static_cast<const int64_t*>(p.pos)[off];
      const float angle = __fmul_rn(static_cast<float>(pos), p.freq[j * p.sf]);
      c1 = c2 = __fmul_rn(cosf(angle), p.scaling);
      s1 = s2 = __fmul_rn(sinf(angle), p.scaling);
    }
    out[j] = c1;
    out[h + j] = c2;
    out[2 * h + j] = s1;
    out[3 * h + j] = s2;
  }
}

// Element offset of head `head` of token (b, s) in a (B, S, H, D) view with strides `st`.
__device__ __forceinline__ int64_t row(const int64_t* st, int64_t b, int64_t s, int head) {
  return b * st[0] + s * st[1] + static_cast<int64_t>(head) * st[2];
}

template <typename T, int V>
struct HeadIO {  // where one head's lane chunk lives, and its two halves once loaded
  const T* x1;
  T* o1;
  int64_t step_x, step_o;  // from lane j to lane j + h
  Pack<T, V> a, b;
};

template <typename T, int V>
__device__ __forceinline__ void locate(const Params& p, int head, int64_t b, int64_t s, int64_t j0,
                                       HeadIO<T, V>& io) {
  const bool is_q = head < p.q.heads;
  const Side& sd = is_q ? p.q : p.k;
  const int hh = is_q ? head : head - p.q.heads;
  const int64_t dx = V == 1 ? sd.sx[3] : 1, d_o = V == 1 ? sd.so[3] : 1;
  io.x1 = static_cast<const T*>(sd.x) + row(sd.sx, b, s, hh) + j0 * dx;
  io.o1 = static_cast<T*>(sd.o) + row(sd.so, b, s, hh) + j0 * d_o;
  io.step_x = p.half * dx;
  io.step_o = p.half * d_o;
}

template <typename T, int V>
__device__ __forceinline__ void load(HeadIO<T, V>& io) {
  io.a = *reinterpret_cast<const Pack<T, V>*>(io.x1);
  io.b = *reinterpret_cast<const Pack<T, V>*>(io.x1 + io.step_x);
}

// V consecutive floats of shared memory (16-byte reads where V allows).
template <int V>
__device__ __forceinline__ void read_lanes(const float* src, float* dst) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int i = 0; i < V; i += 4) {
      const float4 f = *reinterpret_cast<const float4*>(src + i);
      dst[i] = f.x;
      dst[i + 1] = f.y;
      dst[i + 2] = f.z;
      dst[i + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) dst[i] = src[i];
  }
}

// Rotates the loaded halves with the lanes at `cs` (c1 | c2 | s1 | s2, h apart) and stores.
template <typename T, int V, bool BACKWARD>
__device__ __forceinline__ void rotate_store(const HeadIO<T, V>& io, const float* cs, int h) {
  float c1[V], c2[V], s1[V], s2[V];
  read_lanes<V>(cs, c1);
  read_lanes<V>(cs + h, c2);
  read_lanes<V>(cs + 2 * h, s1);
  read_lanes<V>(cs + 3 * h, s2);
  Pack<T, V> o1, o2;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const float x1 = to_f32(io.a.v[i]), x2 = to_f32(io.b.v[i]);
    float r1, r2;
    if (BACKWARD) {  // x1 c1 + x2 s2 ; x2 c2 - x1 s1
      r1 = __fmaf_rn(c1[i], x1, __fmul_rn(s2[i], x2));
      r2 = __fmaf_rn(c2[i], x2, -__fmul_rn(s1[i], x1));
    } else {  // x1 c1 - x2 s1 ; x1 s2 + x2 c2
      r1 = __fmaf_rn(c1[i], x1, -__fmul_rn(s1[i], x2));
      r2 = __fmaf_rn(s2[i], x1, __fmul_rn(c2[i], x2));
    }
    o1.v[i] = from_f32<T>(r1);
    o2.v[i] = from_f32<T>(r2);
  }
  *reinterpret_cast<Pack<T, V>*>(io.o1) = o1;
  *reinterpret_cast<Pack<T, V>*>(io.o1 + io.step_o) = o2;
}

// Lanes R..D of every out-of-place head, unchanged.
template <typename T, int V>
__device__ void copy_pass(const Params& p, int64_t b, int64_t s) {
  const int heads = p.q.heads + p.k.heads;
  for (int i = threadIdx.x; i < heads * p.pc; i += blockDim.x) {
    const int head = i / p.pc, lane = p.rot + (i % p.pc) * V;
    const bool is_q = head < p.q.heads;
    const Side& sd = is_q ? p.q : p.k;
    if (!sd.copy) continue;
    const int hh = is_q ? head : head - p.q.heads;
    const int64_t dx = V == 1 ? sd.sx[3] : 1, d_o = V == 1 ? sd.so[3] : 1;
    const T* x = static_cast<const T*>(sd.x) + row(sd.sx, b, s, hh) + lane * dx;
    T* o = static_cast<T*>(sd.o) + row(sd.so, b, s, hh) + lane * d_o;
    *reinterpret_cast<Pack<T, V>*>(o) = *reinterpret_cast<const Pack<T, V>*>(x);
  }
}

template <typename T, int V, bool BACKWARD>
__global__ void __launch_bounds__(kBlockThreads, 4) rope_kernel(const __grid_constant__ Params p) {
  extern __shared__ float lanes[];  // [blockDim.y][c1 | c2 | s1 | s2][h]
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = t < p.tokens;
  int64_t b = 0, s = 0;
  if (live && p.tokens <= INT32_MAX) {  // 32-bit division where it suffices
    b = static_cast<uint32_t>(t) / static_cast<uint32_t>(p.seq);
    s = static_cast<uint32_t>(t) - static_cast<uint32_t>(b) * static_cast<uint32_t>(p.seq);
  } else if (live) {
    b = t / p.seq;
    s = t - b * p.seq;
  }
  float* mine = lanes + static_cast<int64_t>(threadIdx.y) * 4 * p.half;

  const int chunk = threadIdx.x % p.nc, stride = blockDim.x / p.nc;
  const int heads = p.q.heads + p.k.heads, j0 = chunk * V;
  int head = threadIdx.x / p.nc;
  HeadIO<T, V> cur;
  if (live && head < heads) {
    locate(p, head, b, s, j0, cur);
    load(cur);
  }
  if (live) token_lanes(p, b, s, mine);
  __syncthreads();
  if (!live) return;

  for (bool first = true; head < heads; head += stride, first = false) {
    if (!first) {
      locate(p, head, b, s, j0, cur);
      load(cur);
    }
    rotate_store<T, V, BACKWARD>(cur, mine + j0, p.half);
  }
  if (p.pc > 0) copy_pass<T, V>(p, b, s);
}

// ------------------------------------------------------------------------------ host side

int elem_size(int dtype) { return dtype == VLMK_F32 ? 4 : 2; }

bool data_dtype(int d) { return d == VLMK_F32 || d == VLMK_F16 || d == VLMK_BF16; }

bool table_dtype(int d) { return data_dtype(d) || d == VLMK_F64; }

// Whether one side (x read, o written) allows accesses of V elements.
bool side_vectorizable(const Side& sd, const VlmkRopeArgs& a, int V, int esize) {
  if (sd.heads == 0) return true;
  const int64_t sizes[3] = {a.batch, a.seq, sd.heads};
  const int bytes = V * esize;
  for (const int64_t* st : {sd.sx, sd.so}) {
    if (st[3] != 1) return false;
    for (int d = 0; d < 3; ++d)
      if (sizes[d] > 1 && st[d] % V != 0) return false;
  }
  return reinterpret_cast<uintptr_t>(sd.x) % bytes == 0 &&
         reinterpret_cast<uintptr_t>(sd.o) % bytes == 0;
}

Side make_side(const void* x, void* o, const int64_t* sx, const int64_t* so, int64_t heads,
               bool partial) {
  Side sd{};
  sd.x = x;
  sd.o = o;
  for (int d = 0; d < 4; ++d) {
    sd.sx[d] = sx[d];
    sd.so[d] = so[d];
  }
  sd.heads = static_cast<int>(heads);
  sd.copy = partial && o != x;
  return sd;
}

bool valid(const VlmkRopeArgs& a) {
  const int64_t r = a.rot_dim;
  if (a.batch < 0 || a.seq < 0 || a.q_heads < 0 || a.k_heads < 0) return false;
  // heads x lanes must fit an int (the copy pass indexes them with one)
  if (a.q_heads + a.k_heads > (1 << 14) || a.head_dim > (1 << 16)) return false;
  if (a.batch * a.seq >= (int64_t{1} << 40)) return false;
  if (r <= 0 || r % 2 || r > a.head_dim) return false;
  if (!data_dtype(a.q_dtype) || !data_dtype(a.k_dtype)) return false;
  if (a.lane_rule < VLMK_PLAIN || a.lane_rule > VLMK_INTERLEAVED) return false;
  if (a.source == VLMK_ROPE_TABLE) {
    if (!table_dtype(a.cos_dtype) || !table_dtype(a.sin_dtype) || !a.cos || !a.sin)
      return false;
    if (a.table_axes != 3 && !(a.table_axes == 1 && a.lane_rule == VLMK_PLAIN)) return false;
  } else if (a.source == VLMK_ROPE_POSITIONS) {
    if ((a.pos_dtype != VLMK_I32 && a.pos_dtype != VLMK_I64) || !a.positions || !a.inv_freq)
      return false;
  } else {
    return false;
  }
  return true;
}

struct Plan {
  int vec, threads_x, tokens_per_block;
  Params params;
};

// 0 when the arguments are refused; the plan for one data dtype (q_dtype) otherwise.
int make_plan(const VlmkRopeArgs& a, Plan& plan) {
  if (!valid(a)) return 0;
  Params& p = plan.params;
  p = Params{};
  const bool partial = a.rot_dim < a.head_dim;
  p.q = make_side(a.q, a.qo, a.q_stride, a.qo_stride, a.q_heads, partial);
  p.k = make_side(a.k, a.ko, a.k_stride, a.ko_stride, a.k_heads, partial);
  p.seq = a.seq;
  p.tokens = a.batch * a.seq;
  p.half = static_cast<int>(a.rot_dim / 2);
  p.rot = static_cast<int>(a.rot_dim);
  p.head_dim = static_cast<int>(a.head_dim);
  p.source = a.source;
  p.lane_rule = a.lane_rule;
  p.sec_t = a.sections[0];
  p.sec_h = a.sections[1];
  p.sec_w = a.sections[2];
  p.cos = a.cos;
  p.sin = a.sin;
  for (int d = 0; d < 4; ++d) {
    p.sc[d] = a.cos_stride[d];
    p.ss[d] = a.sin_stride[d];
  }
  p.cos_dtype = a.cos_dtype;
  p.sin_dtype = a.sin_dtype;
  p.pos = a.positions;
  for (int d = 0; d < 3; ++d) p.sp[d] = a.pos_stride[d];
  p.pos_dtype = a.pos_dtype;
  p.freq = a.inv_freq;
  p.sf = a.freq_stride;
  p.scaling = a.scaling;

  const int esize = elem_size(a.q_heads > 0 ? a.q_dtype : a.k_dtype);
  const bool copying = p.q.copy || p.k.copy;
  int vec = 1;
  for (int v = 16 / esize; v > 1; v /= 2) {
    if (p.half % v || (copying && (a.head_dim - a.rot_dim) % v)) continue;
    if (side_vectorizable(p.q, a, v, esize) && side_vectorizable(p.k, a, v, esize)) {
      vec = v;
      break;
    }
  }
  p.nc = p.half / vec;
  p.pc = copying ? static_cast<int>((a.head_dim - a.rot_dim) / vec) : 0;
  if (p.nc > kBlockThreads) return 0;  // thread x owns one lane chunk
  const int64_t heads = a.q_heads + a.k_heads;
  // Heads rotated at once per token: all of them, or an even share in the fewest passes.
  const int64_t fit = kBlockThreads / p.nc, passes = (heads + fit - 1) / fit;
  const int per_pass = static_cast<int>(heads > 0 ? (heads + passes - 1) / passes : 1);
  plan.vec = vec;
  plan.threads_x = p.nc * per_pass;
  int64_t ty = kBlockThreads / plan.threads_x;
  if (ty < 1) ty = 1;
  if (ty > p.tokens) ty = p.tokens > 0 ? p.tokens : 1;
  plan.tokens_per_block = static_cast<int>(ty);
  return 1;
}

template <typename T, int V>
cudaError_t launch_vec(const Plan& plan, bool backward, cudaStream_t stream) {
  const int64_t blocks = (plan.params.tokens + plan.tokens_per_block - 1) / plan.tokens_per_block;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 block(plan.threads_x, plan.tokens_per_block);
  const size_t smem = sizeof(float) * 4 * plan.params.half * plan.tokens_per_block;
  if (backward)
    rope_kernel<T, V, true><<<static_cast<unsigned>(blocks), block, smem, stream>>>(plan.params);
  else
    rope_kernel<T, V, false><<<static_cast<unsigned>(blocks), block, smem, stream>>>(plan.params);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const Plan& plan, bool backward, cudaStream_t stream) {
  switch (plan.vec) {
    case 8:
      if constexpr (sizeof(T) == 2) return launch_vec<T, 8>(plan, backward, stream);
      return cudaErrorInvalidValue;
    case 4:
      return launch_vec<T, 4>(plan, backward, stream);
    case 2:
      return launch_vec<T, 2>(plan, backward, stream);
    default:
      return launch_vec<T, 1>(plan, backward, stream);
  }
}

}  // namespace

extern "C" int vlmk_rope_plan(const VlmkRopeArgs* args, int* vec, int* threads_x,
                              int* tokens_per_block) {
  Plan plan;
  if (!args) return 0;
  if (args->q_dtype != args->k_dtype && args->q_heads > 0 && args->k_heads > 0) {
    // vlmk_rope launches q and k apart (one launch per dtype), each with its own vector
    // width: both plans must exist, else a layout accepted here would be refused after q's
    // launch. The plan reported is q's.
    VlmkRopeArgs only_q = *args, only_k = *args;
    only_q.k_heads = 0;
    only_k.q_heads = 0;
    only_k.q_dtype = args->k_dtype;
    if (!make_plan(only_k, plan) || !make_plan(only_q, plan)) return 0;
  } else if (!make_plan(*args, plan)) {
    return 0;
  }
  if (vec) *vec = plan.vec;
  if (threads_x) *threads_x = plan.threads_x;
  if (tokens_per_block) *tokens_per_block = plan.tokens_per_block;
  return 1;
}

extern "C" cudaError_t vlmk_rope(const VlmkRopeArgs* args, void* stream) {
  if (!args) return cudaErrorInvalidValue;
  const VlmkRopeArgs& a = *args;
  if (a.batch == 0 || a.seq == 0 || (a.q_heads == 0 && a.k_heads == 0)) return cudaSuccess;
  if (!valid(a)) return cudaErrorInvalidValue;
  if (a.q_dtype != a.k_dtype && a.q_heads > 0 && a.k_heads > 0) {  // one launch per dtype
    // both launches planned first: a refused k must not follow a launched q
    if (!vlmk_rope_plan(&a, nullptr, nullptr, nullptr)) return cudaErrorInvalidValue;
    VlmkRopeArgs only_q = a, only_k = a;
    only_q.k_heads = 0;
    only_k.q_heads = 0;
    only_k.q_dtype = a.k_dtype;
    const cudaError_t err = vlmk_rope(&only_q, stream);
    return err != cudaSuccess ? err : vlmk_rope(&only_k, stream);
  }
  Plan plan;
  if (!make_plan(a, plan)) return cudaErrorInvalidValue;
  const int dtype = a.q_heads > 0 ? a.q_dtype : a.k_dtype;
  const bool backward = a.backward != 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case VLMK_F16:
      return launch_typed<__half>(plan, backward, s);
    case VLMK_BF16:
      return launch_typed<__nv_bfloat16>(plan, backward, s);
    default:
      return launch_typed<float>(plan, backward, s);
  }
}
