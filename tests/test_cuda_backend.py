"""The CUDA C++ backend where it cannot run (CPU CI).

- Every csrc/<family>/*.cu compiles for sm_80 and sm_90a through CMakeLists.txt (nvcc + cmake, no
  torch); the vector kernels use 16-byte accesses and stay within their register budget.
- The backend reports itself unavailable with its reason, and forcing it raises.
- Every family's binding (csrc/<family>/bindings.cpp) and the module (csrc/common/module.cpp)
  type-check against the installed torch's headers.
- The rotary kernels' logic runs on the CPU: csrc/rope/rope.cu compiled by g++ against a small
  emulation of the CUDA execution model (a block's threads as OS threads, __syncthreads as a
  barrier, the fp32 intrinsics as their IEEE host equivalents) and called through its C
  launcher, under the public rope functions, against the PyTorch path: every lane rule,
  source, layout, access width, partial and in-place rotation. Only the device's cosf/sinf
  differ (the host libm's), hence a tolerance; bitwise equality with Triton is checked on a
  GPU by tests/test_cuda_backend_gpu.py.

Skipped (with the reason) only where nvcc, cmake, g++ or the CUDA headers are missing.
"""

import ctypes
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

import vlmkernels
from vlmkernels.core import cuda as _cuda
from vlmkernels.ops.rope import cuda as rope_cuda

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARCHS = ("sm_80", "sm_90a")
NO_CUDA_TORCH = pytest.mark.skipif(
    bool(torch.version.cuda), reason="torch has CUDA here: the extension may be built"
)


def find_tool(name: str) -> str | None:
    """``name`` on PATH, in CUDA_HOME or /usr/local/cuda, or (cuobjdump) Triton's copy."""
    found = shutil.which(name)
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    if name == "cuobjdump":
        import triton

        homes.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia"))
    for home in homes:
        path = os.path.join(home, "bin", name)
        if not found and home and os.path.exists(path):
            found = path
    return found


@pytest.fixture(scope="module")
def cmake_build(tmp_path_factory):
    """(build dir, build log with ptxas -v) of the standalone CMake build."""
    nvcc, cmake = find_tool("nvcc"), shutil.which("cmake")
    if nvcc is None or cmake is None:
        pytest.skip(f"needs nvcc and cmake: {'nvcc' if nvcc is None else 'cmake'} not found")
    build = tmp_path_factory.mktemp("csrc_build")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    steps = [
        [cmake, "-S", str(ROOT), "-B", str(build), *generator,
         f"-DCMAKE_CUDA_COMPILER={nvcc}", "-DVLMKERNELS_PTXAS_VERBOSE=ON"],
        [cmake, "--build", str(build)],
    ]  # fmt: skip
    for cmd in steps:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        log = result.stdout + result.stderr
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{log[-6000:]}"
    return build, log  # the build step's


def kernel_resources(log: str) -> dict[tuple[str, str], tuple[int, int]]:
    """{(mangled kernel, arch): (registers, spill store bytes)} from ptxas -v output."""
    out, current, spills = {}, None, 0
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '(\w+)' for '(\w+)'", line)
        if entry:
            current = entry.groups()
        spill = re.search(r"(\d+) bytes spill stores", line)
        if spill and current:
            spills = int(spill.group(1))
        regs = re.search(r"Used (\d+) registers", line)
        if regs and current:
            out[current] = (int(regs.group(1)), spills)
            current = None
    return out


def test_every_cu_compiles_for_sm80_and_sm90a(cmake_build):
    build, log = cmake_build
    sources = sorted(p.stem for p in (ROOT / "csrc").rglob("*.cu"))
    assert sources, "no csrc/<family>/*.cu"
    assert "warning" not in log.lower(), log
    resources = kernel_resources(log)
    for arch in ARCHS:
        assert any(a == arch for _, a in resources), f"no kernel compiled for {arch}:\n{log}"
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        return  # the ptxas report above already names the architectures
    (lib,) = build.glob("*vlmkernels_cuda.a")
    built = cubin_archs(cuobjdump, lib)
    for source in sources:
        for arch in ARCHS:
            assert arch in built.get(source, ()), built


def cubin_archs(cuobjdump: str, lib: pathlib.Path) -> dict[str, set[str]]:
    """{source stem: the architectures of its cubins} in ``lib``, from the ``arch = sm_90a``
    line that heads each cubin in ``cuobjdump -elf``. Not ``--list-elf``'s file names:
    cuobjdump 12.8 (Triton 3.6's copy) names an sm_90a cubin rope.sm_90.cubin (13.1: sm_90a).
    """
    dump = subprocess.run([cuobjdump, "-elf", str(lib)], capture_output=True, text=True)
    assert dump.returncode == 0, dump.stderr
    archs: dict[str, set[str]] = {}
    member = None
    for line in dump.stdout.splitlines():
        if found := re.match(r"member .*:([^:/]+)\.cu\.o:$", line.strip()):
            member = found.group(1)
        elif (found := re.fullmatch(r"arch = (sm_\w+)", line.strip())) and member:
            archs.setdefault(member, set()).add(found.group(1))
    return archs


def test_rope_kernels_registers_and_spills(cmake_build):
    """Every rotary variant (dtype x access width x direction) for both architectures; at most
    64 registers (4 blocks of 256 threads per SM) and no spill beyond one register's worth.
    """
    _, log = cmake_build
    rope = {k: v for k, v in kernel_resources(log).items() if "rope_kernel" in k[0]}
    # (float: 1, 2, 4 elements; half, bf16: 1, 2, 4, 8) x forward/backward x 2 architectures
    assert len(rope) == (3 + 4 + 4) * 2 * 2, sorted(rope)
    for (name, arch), (regs, spills) in rope.items():
        assert regs <= 64 and spills <= 8, (name, arch, regs, spills)


def test_vector_path_uses_16_byte_accesses(cmake_build):
    """The SASS of the 16-byte variants (8 x 16-bit, 4 x fp32) loads and stores q/k with
    LDG.E.128 / STG.E.128 on both architectures."""
    build, _ = cmake_build
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or Triton's bundled copy)")
    (lib,) = build.glob("*vlmkernels_cuda.a")
    sass = subprocess.run([cuobjdump, "-sass", str(lib)], capture_output=True, text=True)
    assert sass.returncode == 0, sass.stderr
    functions = re.split(r"\n\s*Function : ", sass.stdout)[1:]
    wide = [
        f for f in functions
        if re.match(r"\S*rope_kernel(I6__halfLi8|I13__nv_bfloat16Li8|IfLi4)", f)
    ]  # fmt: skip
    assert len(wide) == 3 * 2 * len(ARCHS), [f.split()[0] for f in functions]
    for body in wide:
        assert "LDG.E.128" in body and "STG.E.128" in body, body.split()[0]


@pytest.mark.parametrize(
    "source", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp"))
)
def test_bindings_compile_against_torch_headers(source):
    """Each family's op registration and the module parse and type-check against the
    installed torch's headers, as the extension build compiles them (g++, C++20, no warnings
    of ours)."""
    from torch.utils import cpp_extension

    gxx, cuda_include = shutil.which("g++"), None
    for home in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            cuda_include = os.path.join(home, "include")
            break
    if gxx is None or cuda_include is None:
        pytest.skip("needs g++ and the CUDA runtime headers")
    import sysconfig

    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], cuda_include]
    cmd = [
        gxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra",
        *(f"-I{p}" for p in includes), f"-I{ROOT / 'csrc'}",
        "-DTORCH_EXTENSION_NAME=_C", "-DVLMKERNELS_CUDA_ARCHS=sm_80__sm_90a",
        str(ROOT / source),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ours = [line for line in proc.stderr.splitlines() if "csrc/" in line and "warning" in line]
    assert not ours, "\n".join(ours)


@NO_CUDA_TORCH
def test_status_reports_unavailable():
    ok, why = _cuda.status()
    assert not ok
    assert why.startswith("not built") and "has no CUDA" in why, why


@NO_CUDA_TORCH
def test_forcing_cuda_backend_raises():
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8)
    cos, sin = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    positions = torch.randint(0, 9, (3, 1, 4))
    with vlmkernels.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="rope: the 'cuda' backend is unavailable: not"):
            vlmkernels.rope(q, k, cos, sin, unsqueeze_dim=2)
        with pytest.raises(RuntimeError, match="the 'cuda' backend is unavailable: not built"):
            vlmkernels.mrope_from_positions(
                q.transpose(1, 2), k.transpose(1, 2), positions, torch.rand(4), [2, 1, 1]
            )


def test_import_does_not_load_the_extension():
    code = "import sys, vlmkernels; assert 'vlmkernels._C' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------ host emulation

EMULATION_PRELUDE = r"""
#include <cuda_runtime_api.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <vector_types.h>
#include <barrier>
#include <cmath>
#include <cstdlib>
#include <thread>
#include <vector>
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __grid_constant__
#define __grid_constant__
static thread_local uint3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
alignas(16) static float emu_shared[1 << 16];
static std::barrier<>* emu_barrier;
static inline void emu_syncthreads() { emu_barrier->arrive_and_wait(); }
static inline float emu_fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
static inline float emu_fmul_rn(float a, float b) { return a * b; }
static inline float emu_double2float_rn(double d) { return static_cast<float>(d); }
#define __syncthreads emu_syncthreads
#define __fmaf_rn emu_fmaf_rn
#define __fmul_rn emu_fmul_rn
#define __double2float_rn emu_double2float_rn
// internal, not an exported cudaGetLastError: a CUDA build of torch has loaded the real
// libcudart globally, whose symbol would win (35, no driver, on a machine without a GPU)
static inline cudaError_t emu_cudaGetLastError() { return cudaSuccess; }
#define cudaGetLastError emu_cudaGetLastError
template <typename Kernel, typename Params>
static void emulate_launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t,
                           const Params& params) {
  if (smem > sizeof(emu_shared)) std::abort();
  blockDim = block;
  gridDim = grid;
  const unsigned n = block.x * block.y * block.z;
  for (unsigned bx = 0; bx < grid.x; ++bx) {
    std::barrier<> barrier(n);
    emu_barrier = &barrier;
    std::vector<std::thread> threads;
    for (unsigned i = 0; i < n; ++i)
      threads.emplace_back([&, i, bx] {
        blockIdx = uint3{bx, 0, 0};
        threadIdx = uint3{i % block.x, i / block.x % block.y, i / (block.x * block.y)};
        kernel(params);
      });
    for (auto& t : threads) t.join();
  }
}
"""


def host_source(cu: str) -> str:
    """rope.cu made host C++: shared memory from the emulation, launches through it."""
    cu = cu.replace("#include <cuda_runtime.h>\n", "")
    cu = cu.replace("extern __shared__ float lanes[];", "float* lanes = emu_shared;")
    cu, launches = re.subn(
        r"(\w+<[^<>;]*>)<<<(.*?)>>>\((.*?)\);", r"emulate_launch(\1, \2, \3);", cu
    )
    assert launches > 0, "no kernel launch found in rope.cu"
    return cu + '\nextern "C" size_t emu_args_size() { return sizeof(VlmkRopeArgs); }\n'


_CTYPES = {"int64_t": ctypes.c_int64, "int": ctypes.c_int, "float": ctypes.c_float}


def header_struct(header: str, name: str) -> type[ctypes.Structure]:
    """The ctypes mirror of the C struct ``name`` in ``header`` (scalar, pointer and array
    fields, one or more per declaration), read from the header itself: one definition."""
    body = re.search(rf"typedef struct {name} \{{(.*?)\}} {name};", header, re.S)
    assert body, f"{name} not found"
    fields = []
    for declaration in re.sub(r"//[^\n]*", "", body.group(1)).split(";"):
        declaration = declaration.strip()
        if not declaration:
            continue
        match = re.match(r"(?:const\s+)?(\w+)\s*(\*?)\s*(.*)", declaration, re.S)
        kind, pointer, names = match.groups()
        for item in (n.strip() for n in names.split(",")):
            array = re.match(r"(\w+)\[(\d+)\]", item)
            ctype = ctypes.c_void_p if pointer else _CTYPES[kind]
            if array:
                fields.append((array.group(1), ctype * int(array.group(2))))
            else:
                fields.append((item.lstrip("*"), ctype))
    return type(name, (ctypes.Structure,), {"_fields_": fields})


RopeArgs = header_struct((ROOT / "csrc" / "rope" / "rope.h").read_text(), "VlmkRopeArgs")
_I64x4, _I64x3 = ctypes.c_int64 * 4, ctypes.c_int64 * 3


CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3,
         torch.int32: 4, torch.int64: 5}  # fmt: skip


@pytest.fixture(scope="module")
def emulated_rope(tmp_path_factory):
    """A launcher with the Triton launcher's signature running csrc/rope/rope.cu on the host;
    its plans (elements per access, threads per token, tokens per block) are recorded in
    .plans."""
    cxx = shutil.which("g++") or shutil.which("c++")
    include = next(
        (d for d in (os.path.join(h, "include") for h in (os.environ.get("CUDA_HOME", ""),
         "/usr/local/cuda")) if os.path.exists(os.path.join(d, "cuda_bf16.h"))), None,
    )  # fmt: skip
    if cxx is None or include is None:
        pytest.skip("needs g++ and the CUDA headers (cuda_bf16.h)")
    build = tmp_path_factory.mktemp("rope_host")
    (build / "prelude.h").write_text(EMULATION_PRELUDE)
    (build / "rope_host.cpp").write_text(
        host_source((ROOT / "csrc" / "rope" / "rope.cu").read_text())
    )
    lib_path = build / "librope_host.so"
    cmd = [cxx, "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-include",
           str(build / "prelude.h"), f"-I{ROOT / 'csrc' / 'rope'}", f"-I{include}",
           str(build / "rope_host.cpp"), "-o", str(lib_path), "-lpthread"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-6000:]
    lib = ctypes.CDLL(str(lib_path))
    lib.emu_args_size.restype = ctypes.c_size_t
    assert lib.emu_args_size() == ctypes.sizeof(RopeArgs), "RopeArgs is out of step with rope.h"
    plans = []

    def args_of(q, k, qo, ko, *, table=None, positions=None, inv_freq=None, mode=0,
                sections=(0, 0, 0), scaling=1.0, backward=False):  # fmt: skip
        a = RopeArgs(*q.shape[:3], k.shape[2], q.shape[3])
        a.q, a.k, a.qo, a.ko = (t.data_ptr() for t in (q, k, qo, ko))
        a.q_stride, a.k_stride = _I64x4(*q.stride()), _I64x4(*k.stride())
        a.qo_stride, a.ko_stride = _I64x4(*qo.stride()), _I64x4(*ko.stride())
        a.q_dtype, a.k_dtype = CODES[q.dtype], CODES[k.dtype]
        a.lane_rule, a.sections, a.backward = mode, (ctypes.c_int * 3)(*sections), backward
        a.scaling = scaling
        if table is not None:
            cos, sin = table
            a.source, a.rot_dim, a.table_axes = 0, cos.shape[3], cos.shape[0]
            a.cos, a.sin = cos.data_ptr(), sin.data_ptr()
            a.cos_stride, a.sin_stride = _I64x4(*cos.stride()), _I64x4(*sin.stride())
            a.cos_dtype, a.sin_dtype = CODES[cos.dtype], CODES[sin.dtype]
        else:
            positions = positions.long() if positions.dtype != torch.int32 else positions
            a.source, a.rot_dim = 1, 2 * inv_freq.numel()
            a.positions, a.pos_stride = positions.data_ptr(), _I64x3(*positions.stride())
            a.pos_dtype = CODES[positions.dtype]
            a.inv_freq, a.freq_stride = inv_freq.data_ptr(), inv_freq.stride(0)
        return a

    def launch(q, k, qo, ko, **angles):
        a = args_of(q, k, qo, ko, **angles)
        plan = [ctypes.c_int() for _ in range(3)]
        if lib.vlmk_rope_plan(ctypes.byref(a), *(ctypes.byref(v) for v in plan)):
            plans.append(tuple(v.value for v in plan))
        assert lib.vlmk_rope(ctypes.byref(a), None) == 0

    launch.plans, launch.args_of, launch.lib = plans, args_of, lib
    return launch


def test_emulated_mixed_dtypes_planned_before_any_launch(emulated_rope):
    """q and k of different dtypes are launched apart, each with its own access width (8
    bf16, 4 fp32): the plan, which the binding checks before launching, refuses a layout
    either launch refuses (rotary half 2048: 256 chunks of 8, 512 of 4), and the launcher
    refuses it before writing q."""
    q, k = torch.randn(1, 2, 2, 4096).to(torch.bfloat16), torch.randn(1, 2, 2, 4096)
    cos = torch.randn(1, 1, 2, 4096)
    lib, args_of = emulated_rope.lib, emulated_rope.args_of
    qo, ko = torch.zeros_like(q), torch.zeros_like(k)
    a = args_of(q, k, qo, ko, table=(cos, cos))
    assert lib.vlmk_rope_plan(ctypes.byref(a), None, None, None) == 0
    assert lib.vlmk_rope(ctypes.byref(a), None) != 0
    assert not qo.any() and not ko.any()
    k16 = k.to(torch.bfloat16)  # one dtype, one launch of 8-wide accesses: it fits
    a = args_of(q, k16, qo, torch.zeros_like(k16), table=(cos, cos))
    assert lib.vlmk_rope_plan(ctypes.byref(a), None, None, None) == 1


@pytest.fixture
def on_emulated_cuda(emulated_rope, monkeypatch):
    """use_backend("cuda") runs the rope ops on the emulated kernels (CPU tensors)."""
    monkeypatch.setattr(_cuda, "status", lambda: (True, "emulated"))
    monkeypatch.setattr(rope_cuda, "rope_launch", emulated_rope)
    emulated_rope.plans.clear()
    return emulated_rope


MANTISSA = {torch.float16: 10, torch.bfloat16: 7}
MIN_EXPONENT = {torch.float16: -13, torch.bfloat16: -125}


def ulp(x):
    _, exponent = torch.frexp(x.float())
    exponent = exponent.clamp_min(MIN_EXPONENT[x.dtype])
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exponent - 1 - MANTISSA[x.dtype])


def against_torch(fn, *args, **kwargs):
    """fn on the emulated CUDA kernels vs the PyTorch path: within 2^-21 of the max (fp32
    rounding of the products, which the kernels fuse into FMAs, and host cosf/sinf), plus
    one ulp of the output in 16-bit (a flipped rounding)."""
    with vlmkernels.use_backend("cuda"):
        outs = fn(*args, **kwargs)
    with vlmkernels.use_backend("torch"):
        refs = fn(*args, **kwargs)
    for out, ref in zip(outs, refs, strict=True):
        assert out.shape == ref.shape and out.dtype == ref.dtype and out.stride() == ref.stride()
        if out.numel() == 0:
            continue
        diff = (out.double() - ref.double()).abs()
        bound = 2.0**-21 * ref.double().abs().max()
        if out.dtype != torch.float32:
            bound = bound + torch.maximum(ulp(out), ulp(ref))
        assert bool((diff <= bound).all()), (diff.max().item(), out.dtype)
    return outs


def qk_views(layout, dtype, b=2, s=3, hq=5, hk=2, d=128):
    if layout == "packed":
        qkv = torch.randn(b * s, 3, hq, d).to(dtype)
        return qkv[:, 0], qkv[:, 1, :hk], 1
    q, k = torch.randn(b, s, hq, d).to(dtype), torch.randn(b, s, hk, d).to(dtype)
    if layout == "bhsd":
        return q.transpose(1, 2), k.transpose(1, 2), 1
    if layout == "bshd":
        return q, k, 2
    return q.reshape(b * s, hq, d), k.reshape(b * s, hk, d), 1


def cos_sin(q, ud, rot, leading=False, dtype=None):
    shape = [n for i, n in enumerate(q.shape[:-1]) if i != ud] + [rot]
    cos = torch.randn(([3] if leading else []) + shape).to(dtype or q.dtype)
    return cos, torch.randn_like(cos)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["bhsd", "bshd", "thd", "packed"])
@pytest.mark.parametrize("d", [64, 72, 80, 128])
def test_emulated_tables(d, layout, dtype, on_emulated_cuda):
    q, k, ud = qk_views(layout, dtype, d=d)
    cos, sin = cos_sin(q, ud, d)
    against_torch(vlmkernels.rope, q, k, cos, sin, ud)
    cos3, sin3 = cos_sin(q, ud, d, leading=True)
    section = [d // 2 - d // 6 - d // 8, d // 6, d // 8]
    for interleaved in (False, True):
        against_torch(vlmkernels.mrope, q, k, cos3, sin3, section, ud, interleaved=interleaved)
    widest = 16 // dtype.itemsize if d // 2 % (16 // dtype.itemsize) == 0 else 4
    assert {plan[0] for plan in on_emulated_cuda.plans} == {widest}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", [1, 2])
def test_emulated_backward_and_positions(rule, dtype, on_emulated_cuda):
    section = [16, 24, 24] if rule == 1 else [24, 20, 20]
    q, k, ud = qk_views("bhsd", dtype)
    cos, sin = cos_sin(q, ud, 128, leading=True)
    ops = torch.ops.vlmkernels
    against_torch(ops.rope_table, q, k, cos, sin, ud, True, rule, section, True)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, 128, 2).float() / 128))
    for pos_dtype in (torch.int32, torch.int64):
        positions = torch.randint(0, 200_000, (3, 2, 3), dtype=pos_dtype)  # slow-path angles too
        for backward in (False, True):
            args = (q, k, positions, inv_freq, ud, rule, section, 0.9, backward)
            against_torch(ops.rope_positions, *args)
    strided_freq = inv_freq[::2]  # 32 frequencies 2 apart: rotary dim 64 of 128
    half_section = [16, 8, 8] if rule == 1 else [12, 10, 10]
    against_torch(vlmkernels.mrope_from_positions, q, k, positions, strided_freq, half_section,
                  interleaved=rule == 2)  # fmt: skip


def test_emulated_positions_op_inv_freq_by_value(on_emulated_cuda):
    """torch.ops.vlmkernels.rope_positions called directly with a strided or a float64
    inv_freq (the public function makes it contiguous float32; the op must too: the
    binding takes float32 only)."""
    q, k, ud = qk_views("bhsd", torch.float32)
    positions = torch.randint(0, 300, (3, 2, 3))
    wide = torch.rand(128)
    for inv_freq in (wide[::2], wide[::2].double()):
        args = (q, k, positions, inv_freq, ud, 1, [16, 24, 24], 1.0, False)
        against_torch(torch.ops.vlmkernels.rope_positions, *args)


def test_emulated_cuda_default_leaves_refused_calls_to_triton(on_emulated_cuda, monkeypatch):
    """'cuda' as the recorded default (``vlmkernels tune``), not forced: a call the CUDA C++
    kernels refuse (a float64 k beside a bf16 q: the binding takes fp32 / fp16 / bf16 only)
    runs on the Triton kernels instead of raising; a call they take still goes to them."""
    from vlmkernels.core import op as op_module

    monkeypatch.setattr(op_module, "resolve_backend", lambda family, tensor: "cuda")
    q, k, ud = qk_views("bshd", torch.bfloat16)
    cos, sin = cos_sin(q, ud, 128)
    out = vlmkernels.rope(q, k.double(), cos, sin, ud)
    assert on_emulated_cuda.plans == []  # the CUDA launcher never saw it
    monkeypatch.undo()
    with vlmkernels.use_backend("torch"):
        ref = vlmkernels.rope(q, k.double(), cos, sin, ud)
    torch.testing.assert_close(out[0], ref[0], atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(op_module, "resolve_backend", lambda family, tensor: "cuda")
    monkeypatch.setattr(_cuda, "status", lambda: (True, "emulated"))
    monkeypatch.setattr(rope_cuda, "rope_launch", on_emulated_cuda)
    vlmkernels.rope(q, k, cos, sin, ud)
    assert on_emulated_cuda.plans  # taken: the CUDA launcher ran it


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("d", "rot"), [(64, 16), (72, 24), (80, 2)])
def test_emulated_partial_rotary_and_inplace(d, rot, dtype, on_emulated_cuda):
    q, k, ud = qk_views("bhsd", dtype, d=d)
    cos, sin = cos_sin(q, ud, rot)
    out = against_torch(vlmkernels.rope, q, k, cos, sin, ud)
    assert torch.equal(out[0][..., rot:], q[..., rot:])
    q2, k2 = q.clone(), k.clone()
    with vlmkernels.use_backend("cuda"):
        vlmkernels.rope(q2, k2, cos, sin, ud, inplace=True)
    assert torch.equal(q2, out[0]) and torch.equal(k2, out[1])


def test_emulated_layouts_heads_and_dtypes(on_emulated_cuda):
    """The narrower and scalar access paths, multi-pass head loops, k without heads, q and k
    of different dtypes, tables of every float dtype, empty inputs."""
    plans = on_emulated_cuda.plans
    cos, sin = cos_sin(torch.empty(2, 3, 1, 128), 2, 128)
    cases = {
        "misaligned": torch.randn(2, 3, 4, 129).to(torch.bfloat16)[..., 1:],  # odd strides
        "strided": torch.randn(2, 3, 4, 256).to(torch.bfloat16)[..., ::2],
        "4-byte": torch.randn(2 * 3 * 4 * 128 + 2).to(torch.bfloat16)[2:].view(2, 3, 4, 128),
    }
    for name, expected in (("misaligned", 1), ("strided", 1), ("4-byte", 2)):
        q = cases[name]
        against_torch(vlmkernels.rope, q, q[:, :, :2], cos, sin, 2)
        assert plans[-1][0] == expected, (name, plans[-1])
    for hq, hk in [(1, 1), (40, 8), (64, 8), (3, 0)]:
        q, k, ud = qk_views("bshd", torch.bfloat16, hq=hq, hk=max(hk, 1))
        against_torch(vlmkernels.rope, q, k[:, :, :hk], cos, sin, ud)
        assert plans[-1][1] * plans[-1][2] <= 256
    q, k, ud = qk_views("bshd", torch.bfloat16)
    against_torch(vlmkernels.rope, q, k.float(), cos.float(), sin.float(), ud)
    for table_dtype in (torch.float16, torch.float32, torch.float64):
        against_torch(vlmkernels.rope, q, k, cos[:1].to(table_dtype), sin[:1].to(table_dtype), 2)
    q0, k0, ud = qk_views("bhsd", torch.bfloat16, s=0)
    against_torch(vlmkernels.rope, q0, k0, *cos_sin(q0, ud, 128), ud)


# ------------------------------------------------------------------ the binding, emulated

BINDING_RUNNER = r"""
import importlib.util, os, sys
import pytest, torch
sys.path.insert(0, os.environ["VLMK_TESTS"])
spec = importlib.util.spec_from_file_location("vlmkernels._C", os.environ["VLMK_EXTENSION"])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
import test_cuda_backend as T
from vlmkernels.ops.rope import cuda as rope_cuda


def launch(q, k, qo, ko, *, table=None, positions=None, inv_freq=None, mode=0,
           sections=(0, 0, 0), scaling=1.0, backward=False):
    rot = table[0].shape[3] if table is not None else 2 * inv_freq.numel()
    try:  # the plans the binding reports, as the emulated launcher records them
        launch.plans.append(tuple(torch.ops.vlmkernels.rope_cuda_plan(q, k, qo, ko, rot)))
    except RuntimeError:
        pass
    # cuda.rope_launch without its is_cuda check (these are CPU tensors)
    rope_cuda._launch_op(q, k, qo, ko, table=table, positions=positions, inv_freq=inv_freq,
                         mode=mode, sections=sections, scaling=scaling, backward=backward)


@pytest.fixture
def on_emulated_cuda(monkeypatch):
    monkeypatch.setattr(T._cuda, "status", lambda: (True, "emulated"))
    monkeypatch.setattr(rope_cuda, "rope_launch", launch)
    launch.plans = []
    return launch


globals().update({n: getattr(T, n) for n in dir(T) if n.startswith("test_emulated_")
                  and "on_emulated_cuda" in getattr(T, n).__code__.co_varnames})
"""


def test_emulated_through_the_binding(tmp_path):
    """bindings.cpp and module.cpp run on the CPU: built as the extension compiles them (g++,
    torch's headers), with the CUDA registrations made CPU ones (``is_cuda`` -> ``is_cpu``,
    no stream handle) over rope.cu on the host emulation, then every emulated test above
    that takes the ``on_emulated_cuda`` launcher reruns with torch.ops.vlmkernels.rope_cuda_
    (argument checks, strides, dtype codes, the plan check) in the launcher's place. In a
    subprocess: the registrations cannot be undone."""
    import sysconfig

    from torch.utils import cpp_extension

    gxx = shutil.which("g++")
    cuda_include = next((os.path.join(h, "include") for h in (os.environ.get("CUDA_HOME", ""),
                         "/usr/local/cuda") if h and os.path.exists(os.path.join(h, "include",
                         "cuda_bf16.h"))), None)  # fmt: skip
    if gxx is None or cuda_include is None:
        pytest.skip("needs g++ and the CUDA headers")
    bindings = (ROOT / "csrc" / "rope" / "bindings.cpp").read_text()
    for old, new in [
        ("TORCH_LIBRARY_IMPL(vlmkernels, CUDA, m)", "TORCH_LIBRARY_IMPL(vlmkernels, CPU, m)"),
        ("q.is_cuda()", "q.is_cpu()"),
        ("impl.getStream(q.device()).native_handle()", "(impl.getStream(q.device()), nullptr)"),
    ]:  # fmt: skip
        assert old in bindings, f"bindings.cpp no longer has {old!r}: update this test"
        bindings = bindings.replace(old, new)
    (tmp_path / "prelude.h").write_text(EMULATION_PRELUDE)
    (tmp_path / "rope_host.cpp").write_text(
        host_source((ROOT / "csrc" / "rope" / "rope.cu").read_text())
        + 'extern "C" const char* cudaGetErrorString(cudaError_t) { return "emulated"; }\n'
    )
    (tmp_path / "bindings_host.cpp").write_text(bindings)
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], cuda_include,
                str(ROOT / "csrc"), str(ROOT / "csrc" / "rope")]  # fmt: skip
    flags = ["-std=c++20", "-O1", "-fPIC", "-ffp-contract=off", *(f"-I{p}" for p in includes),
             "-DTORCH_EXTENSION_NAME=_C", "-DVLMKERNELS_CUDA_ARCHS=emulated"]  # fmt: skip
    objects = []
    for source in (tmp_path / "rope_host.cpp", tmp_path / "bindings_host.cpp",
                   ROOT / "csrc" / "common" / "module.cpp"):  # fmt: skip
        extra = ["-include", str(tmp_path / "prelude.h")] if source.name == "rope_host.cpp" else []
        obj = tmp_path / f"{source.stem}.o"
        proc = subprocess.run([gxx, *flags, *extra, "-c", str(source), "-o", str(obj)],
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        objects.append(str(obj))
    lib_dir = cpp_extension.library_paths()[0]
    so = tmp_path / "_C.so"
    proc = subprocess.run(
        [gxx, "-shared", "-o", str(so), *objects, f"-L{lib_dir}", "-lc10", "-ltorch",
         "-ltorch_cpu", "-ltorch_python", "-lpthread"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    runner = tmp_path / "test_binding_runner.py"
    runner.write_text(BINDING_RUNNER)
    path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(runner)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "VLMK_TESTS": str(ROOT / "tests"), "VLMK_EXTENSION": str(so),
             "PYTHONPATH": path},  # this checkout's vlmkernels, not an installed one
    )  # fmt: skip
    report = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0 and " passed" in proc.stdout, report
