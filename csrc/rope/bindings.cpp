// The CUDA C++ kernels as ops of the `vlmkernels` torch.library namespace (CUDA tensors;
// Meta runs the checks only), beside the Python custom ops of the same namespace:
//
//   rope_cuda_(Tensor q, Tensor k, Tensor(a!) qo, Tensor(b!) ko, Tensor? cos, Tensor? sin,
//              Tensor? positions, Tensor? inv_freq, int lane_rule, int[] sections,
//              float scaling, bool backward) -> ()
//       q, k: (B, S, HQ|HK, D) views; qo, ko: outputs like them (may be q, k: in place);
//       cos, sin: (A, B, S, R) tables, or positions (3, B, S) int32/int64 with inv_freq
//       (R/2,) float32. Semantics: csrc/rope/rope.h.
//   rope_cuda_plan(Tensor q, Tensor k, Tensor qo, Tensor ko, int rot_dim) -> int[]
//       [elements per access, threads per token, tokens per block] the kernel would use.
//
// Only device-generic c10 APIs are used (DeviceGuard, the current stream through the
// virtual guard), so this file also compiles against a CPU build of torch. The Python module
// that loads these registrations is csrc/common/module.cpp.
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "rope.h"

namespace {

int data_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return VLMK_F32;
    case at::kHalf:
      return VLMK_F16;
    case at::kBFloat16:
      return VLMK_BF16;
    default:
      TORCH_CHECK(false, "rope_cuda_: ", name, " must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

int table_code(const at::Tensor& t, const char* name) {
  if (t.scalar_type() == at::kDouble) return VLMK_F64;
  return data_code(t, name);
}

void copy_strides(const at::Tensor& t, int64_t* out) {
  for (int64_t d = 0; d < t.dim(); ++d) out[d] = t.stride(d);
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "rope_cuda_: ", name, " is on ", t.device(),
              ", q on ", ref.device());
}

// Checks q, k, qo, ko and fills their part of the launcher's arguments.
VlmkRopeArgs qk_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& qo,
                     const at::Tensor& ko) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "rope_cuda_: q and k must be (B, S, H, D), got ",
              q.sizes(), " and ", k.sizes());
  TORCH_CHECK(qo.sizes() == q.sizes() && ko.sizes() == k.sizes(),
              "rope_cuda_: qo and ko must have q's and k's shapes");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "rope_cuda_: q ", q.sizes(), " and k ", k.sizes(),
              " must share B, S and the head dim");
  for (const auto* t : {&k, &qo, &ko}) check_like(*t, q, "every tensor");
  VlmkRopeArgs a{};
  a.batch = q.size(0);
  a.seq = q.size(1);
  a.q_heads = q.size(2);
  a.k_heads = k.size(2);
  a.head_dim = q.size(3);
  a.q = q.const_data_ptr();
  a.k = k.const_data_ptr();
  a.qo = qo.data_ptr();
  a.ko = ko.data_ptr();
  copy_strides(q, a.q_stride);
  copy_strides(k, a.k_stride);
  copy_strides(qo, a.qo_stride);
  copy_strides(ko, a.ko_stride);
  a.q_dtype = data_code(q, "q");
  a.k_dtype = data_code(k, "k");
  TORCH_CHECK(qo.scalar_type() == q.scalar_type() && ko.scalar_type() == k.scalar_type(),
              "rope_cuda_: qo and ko must have q's and k's dtypes");
  TORCH_CHECK(a.q_heads + a.k_heads <= (1 << 14) && a.head_dim <= (1 << 16),
              "rope_cuda_: at most 16384 heads and a head dim of 65536");
  return a;
}

// Checks every argument and fills the launcher's.
VlmkRopeArgs make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& qo,
                       const at::Tensor& ko, const std::optional<at::Tensor>& cos,
                       const std::optional<at::Tensor>& sin,
                       const std::optional<at::Tensor>& positions,
                       const std::optional<at::Tensor>& inv_freq, int64_t lane_rule,
                       c10::IntArrayRef sections, double scaling, bool backward,
                       bool with_data = true) {
  VlmkRopeArgs a = qk_args(q, k, qo, ko);
  TORCH_CHECK(lane_rule >= VLMK_PLAIN && lane_rule <= VLMK_INTERLEAVED,
              "rope_cuda_: lane_rule must be 0 (plain), 1 (chunked) or 2 (interleaved)");
  TORCH_CHECK(sections.size() == 3, "rope_cuda_: sections must be 3 ints");
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(sections[i] >= 0 && sections[i] <= (1 << 20), "rope_cuda_: bad sections");
    a.sections[i] = static_cast<int>(sections[i]);
  }
  a.lane_rule = static_cast<int>(lane_rule);
  a.backward = backward ? 1 : 0;
  a.scaling = static_cast<float>(scaling);

  const bool table = cos.has_value() || sin.has_value();
  const bool angles = positions.has_value() || inv_freq.has_value();
  TORCH_CHECK(table != angles, "rope_cuda_: pass cos and sin, or positions and inv_freq");
  if (table) {
    TORCH_CHECK(cos.has_value() && sin.has_value(), "rope_cuda_: pass both cos and sin");
    const at::Tensor& c = *cos;
    const at::Tensor& s = *sin;
    check_like(c, q, "cos");
    check_like(s, q, "sin");
    TORCH_CHECK(c.dim() == 4 && c.sizes() == s.sizes(),
                "rope_cuda_: cos and sin must be (A, B, S, R) of one shape, got ", c.sizes(),
                " and ", s.sizes());
    TORCH_CHECK(c.size(0) == 3 || (c.size(0) == 1 && lane_rule == VLMK_PLAIN),
                "rope_cuda_: tables have A = 3 (M-RoPE) or A = 1 (plain RoPE), got ", c.size(0));
    TORCH_CHECK(c.size(1) == a.batch && c.size(2) == a.seq,
                "rope_cuda_: tables must be (A, B, S, R) with q's B and S, got ", c.sizes());
    a.source = VLMK_ROPE_TABLE;
    a.rot_dim = c.size(3);
    a.cos = c.const_data_ptr();
    a.sin = s.const_data_ptr();
    copy_strides(c, a.cos_stride);
    copy_strides(s, a.sin_stride);
    a.table_axes = c.size(0);
    a.cos_dtype = table_code(c, "cos");
    a.sin_dtype = table_code(s, "sin");
  } else {
    TORCH_CHECK(positions.has_value() && inv_freq.has_value(),
                "rope_cuda_: pass both positions and inv_freq");
    const at::Tensor& p = *positions;
    const at::Tensor& f = *inv_freq;
    check_like(p, q, "positions");
    check_like(f, q, "inv_freq");
    TORCH_CHECK(p.dim() == 3 && p.size(0) == 3 && p.size(1) == a.batch && p.size(2) == a.seq,
                "rope_cuda_: positions must be (3, B, S), got ", p.sizes());
    TORCH_CHECK(p.scalar_type() == at::kInt || p.scalar_type() == at::kLong,
                "rope_cuda_: positions must be int32 or int64, got ", p.scalar_type());
    TORCH_CHECK(f.dim() == 1 && f.scalar_type() == at::kFloat,
                "rope_cuda_: inv_freq must be 1-D float32");
    a.source = VLMK_ROPE_POSITIONS;
    a.rot_dim = 2 * f.size(0);
    a.positions = p.const_data_ptr();
    copy_strides(p, a.pos_stride);
    a.pos_dtype = p.scalar_type() == at::kInt ? VLMK_I32 : VLMK_I64;
    a.inv_freq = f.const_data_ptr<float>();
    a.freq_stride = f.stride(0);
  }
  TORCH_CHECK(a.rot_dim > 0 && a.rot_dim % 2 == 0 && a.rot_dim <= a.head_dim,
              "rope_cuda_: the rotary dim must be even, positive and at most the head dim ",
              a.head_dim, ", got ", a.rot_dim);
  if (a.lane_rule == VLMK_CHUNKED) {  // the interleaved rule takes any sum (Qwen3-VL's slices)
    TORCH_CHECK(a.sections[0] + a.sections[1] + a.sections[2] == a.rot_dim / 2,
                "rope_cuda_: chunked sections must sum to R / 2 = ", a.rot_dim / 2);
  }
  const bool work = a.batch * a.seq > 0 && a.q_heads + a.k_heads > 0;
  TORCH_CHECK(!with_data || !work || vlmk_rope_plan(&a, nullptr, nullptr, nullptr),
              "rope_cuda_: the rotary dim ", a.rot_dim, " is too large for the CUDA kernels with",
              " this layout (at most 256 accesses per half head vector)");
  return a;
}

void rope_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& qo,
               const at::Tensor& ko, const std::optional<at::Tensor>& cos,
               const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& positions,
               const std::optional<at::Tensor>& inv_freq, int64_t lane_rule,
               c10::IntArrayRef sections, double scaling, bool backward) {
  TORCH_CHECK(q.is_cuda(), "rope_cuda_: tensors must be on a CUDA device, got ", q.device());
  const VlmkRopeArgs args = make_args(q, k, qo, ko, cos, sin, positions, inv_freq, lane_rule,
                                      sections, scaling, backward);
  if (args.batch * args.seq == 0 || args.q_heads + args.k_heads == 0) return;
  const c10::DeviceGuard guard(q.device());
  const c10::impl::VirtualGuardImpl impl(q.device().type());
  void* stream = impl.getStream(q.device()).native_handle();
  const cudaError_t err = vlmk_rope(&args, stream);
  TORCH_CHECK(err == cudaSuccess, "rope_cuda_: kernel launch failed: ", cudaGetErrorString(err));
}

void rope_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& qo,
               const at::Tensor& ko, const std::optional<at::Tensor>& cos,
               const std::optional<at::Tensor>& sin, const std::optional<at::Tensor>& positions,
               const std::optional<at::Tensor>& inv_freq, int64_t lane_rule,
               c10::IntArrayRef sections, double scaling, bool backward) {
  make_args(q, k, qo, ko, cos, sin, positions, inv_freq, lane_rule, sections, scaling, backward,
            /*with_data=*/false);  // meta tensors have no data pointers to plan with
}

std::vector<int64_t> rope_plan(const at::Tensor& q, const at::Tensor& k, const at::Tensor& qo,
                               const at::Tensor& ko, int64_t rot_dim) {
  VlmkRopeArgs a = qk_args(q, k, qo, ko);
  a.rot_dim = rot_dim;
  a.source = VLMK_ROPE_POSITIONS;  // the plan does not depend on the source: any pointers
  a.positions = a.q;
  a.pos_dtype = VLMK_I64;
  a.inv_freq = static_cast<const float*>(a.q);
  int vec = 0, threads_x = 0, tokens = 0;
  TORCH_CHECK(vlmk_rope_plan(&a, &vec, &threads_x, &tokens),
              "rope_cuda_plan: the kernels refuse rot_dim ", rot_dim, " with this layout");
  return {vec, threads_x, tokens};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vlmkernels, m) {
  m.def(
      "rope_cuda_(Tensor q, Tensor k, Tensor(a!) qo, Tensor(b!) ko, Tensor? cos, Tensor? sin, "
      "Tensor? positions, Tensor? inv_freq, int lane_rule, int[] sections, float scaling, "
      "bool backward) -> ()");
  m.def("rope_cuda_plan(Tensor q, Tensor k, Tensor qo, Tensor ko, int rot_dim) -> int[]");
}

TORCH_LIBRARY_IMPL(vlmkernels, CUDA, m) {
  m.impl("rope_cuda_", &rope_cuda);
  m.impl("rope_cuda_plan", &rope_plan);
}

TORCH_LIBRARY_IMPL(vlmkernels, Meta, m) { m.impl("rope_cuda_", &rope_meta); }
