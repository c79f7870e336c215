"""The fused CLIP backward: one Triton kernel that recomputes the logit tiles, turns them
into the logit gradient and multiplies it into both feature gradients, with no (chunk x N)
buffer and no separate matrix products.

For a block S = s X Y^T + b (X: M x d, Y: N x d) and the (6, M) / (6, N) coefficients of
:meth:`~.algebra.SideStats.coefficients` (lse, u, h, e, a, teacher lse), the logit
gradient of a tile is (as in :func:`~.kernels._clip_grad_kernel`)

    G_ij = u_i exp(S_ij - r_i) - h_i P_ij - e_i + v_j exp(S_ij - c_j) - h'_j P_ij - e'_j

and the kernel adds, per tile (rows I, columns J) and per k-step of BK features,

    dX[I, k] += c G_IJ Y[J, k],    dY[J, k] += c G_IJ^T X[I, k]        (c = s kappa)

with sum(G X Y^T) and sum(G) (the scale and bias gradients, before kappa) as per-program
partials. Program (g, k) owns a rectangle of tiles: the row blocks of group g times the
column blocks of split k, visited from row block k and column block g on (mod the
rectangle) so that programs sharing rows or columns seldom meet. Two ways of summing
over programs:

- ``fused`` (atomic): fp32 atomics into one (M, d) and one (N, d) fp32 buffer: memory
  (M + N) d 4 bytes above the inputs (201 MB at M = N = 32768, d = 768), any grid; the
  order of the additions, hence the last bits, varies from run to run.
- ``fused_deterministic`` (partials): program (g, k) is the only one to touch slot k of
  the dX partials (K, M, d) and slot g of the dY partials (G, N, d) (read, add, write per
  tile, in a fixed order); the host sums the slots. Bitwise repeatable; memory
  (K M + G N) d 4 bytes, so the grid is small (``max_slots`` per side): a mode for
  reproducibility, not speed.

Not covered (ids or a teacher): the launcher falls back to the chunked design
(:func:`~.launchers.block_grads_triton` with ``design="chunked"``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...core.runtime import (
    INTERPRETED,
    autotune_configs,
    device_guard,
    dot_precision,
    environment_reader,
    next_pow2,
    sm_count,
)
from ...core.tuning import preferred_design, tuned
from ...kernels.blocks import (
    LOG2E,
    POS_INF,
    block_range,
    diagonal_tile,
    even_k,
    logits_tile,
    pad,
    scale_and_bias,
    tile_addressable,
)

__all__ = ["DESIGNS", "ENV_DESIGN", "clip_backward_design", "fused_block_grads", "fused_covers"]

ENV_DESIGN = "VLMKERNELS_CLIP_BACKWARD"
DESIGN_CHOICE = "clip_backward"  # its name in designs.json (vlmkernels tune)
_design_variable = environment_reader(ENV_DESIGN)
"""Environment variable choosing the CLIP backward design when the caller does not:
``chunked`` (the default), ``fused`` or ``fused_deterministic``."""
DESIGNS = ("chunked", "fused", "fused_deterministic")

# Two (BM x BN) tiles (G and its 16-bit copy) and two (B x BK) products live at once. The
# default is the one with the fewest atomics per flop ((BM + BN) BK per 4 BM BN BK): on
# sm_90a in bf16, 253 registers, no spill, 2005 instructions per tile and 346 in the
# d-loop (64 x 64 x 64: 1480 and 474 per a quarter of the work).
_GPU_CONFIGS = [
    triton.Config({"BM": 128, "BN": 128, "BK": 32}, num_warps=8, num_stages=2),
    triton.Config({"BM": 128, "BN": 64, "BK": 64}, num_warps=8, num_stages=3),
    triton.Config({"BM": 64, "BN": 128, "BK": 32}, num_warps=4, num_stages=3),
    triton.Config({"BM": 64, "BN": 64, "BK": 64}, num_warps=4, num_stages=3),
    triton.Config({"BM": 64, "BN": 64, "BK": 16}, num_warps=8, num_stages=2),
]
# fp32 inputs (tf32x3: a high and a low part of every operand) spilled 692-864 B per thread
# in each of the configs above; 64 x 64 x 16 with 8 warps uses 210-249 registers without a
# spill (Triton 3.6 and 3.9, both accumulation modes), at about 1.3x the instructions per
# logit of 128 x 128 x 32 (1,412 per 4,096 against 4,272 per 16,384) and twice the atomics
# per flop
_FP32_DEFAULT = {"fp32": _GPU_CONFIGS[4]}
_INTERPRETER_CONFIG = triton.Config({"BM": 32, "BN": 32, "BK": 32}, num_warps=4, num_stages=1)
_CONFIGS = autotune_configs(_GPU_CONFIGS, _INTERPRETER_CONFIG)
_NOMINAL = 32 if INTERPRETED else 128  # the default BM and BN (grids)


# fmt: off
@tuned("clip_fused_grad", configs=_CONFIGS,
       key=["D", "n_bucket", "ROWS", "COLS", "SMOOTH", "ATOMIC", "Y_GRAD"],
       sizes=["D", "n_bucket"], restore_value=["dx_ptr", "dy_ptr"],  # it adds into them
       defaults=_FP32_DEFAULT)
@even_k
@triton.jit
def _clip_fused_grad_kernel(
    x_ptr, y_ptr, scale_ptr, bias_ptr, coef_ptr, row_coef_ptr, col_coef_ptr,
    dx_ptr, dy_ptr, dx_slot, dy_slot, partial_ptr, partial_stride,
    M, N, D, offset, stride_xn, stride_xd, stride_yn, stride_yd, stride_dxn, stride_dyn,
    coef_stride_r, coef_stride_c, num_row_groups, n_bucket,
    ROWS: tl.constexpr, COLS: tl.constexpr, SMOOTH: tl.constexpr, HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr, Y_GRAD: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
):
    """dX += c G Y and dY += c G^T X over the rectangle of tiles of program (g, k), c =
    coef[0]; sum(G X Y^T) and sum(G) of the rectangle to partial[0, pid], partial[1, pid].
    ``ATOMIC``: fp32 atomics into dx (M, d) and dy (N, d); else slot k of dx (dx_slot
    apart) and slot g of dy, owned by this program. Without ``Y_GRAD`` (frozen columns: a
    locked tower, a queue) neither X nor dY is touched in the d-loop: one product per tile
    less. Padding rows and columns get G = 0."""
    pid = tl.program_id(0)
    num_col_splits = tl.num_programs(0) // num_row_groups
    g = pid % num_row_groups
    k = pid // num_row_groups
    i_lo, i_hi = block_range(g, num_row_groups, M, BM)
    j_lo, j_hi = block_range(k, num_col_splits, N, BN)
    scale, bias = scale_and_bias(scale_ptr, bias_ptr, HAS_BIAS)
    coef = tl.load(coef_ptr).to(tl.float32)
    scale2 = scale * LOG2E
    bias2 = bias * LOG2E
    if not ATOMIC:
        dx_ptr += k.to(tl.int64) * dx_slot
        dy_ptr += g.to(tl.int64) * dy_slot
    ks = tl.arange(0, BK)

    dscale_acc = tl.zeros((BM,), tl.float32)
    dbias_acc = tl.zeros((BM,), tl.float32)
    # staggered starts: the programs sharing rows (same g) or columns (same k) visit them at
    # different times, so that their atomics seldom meet on one address
    n_i = i_hi - i_lo
    n_j = j_hi - j_lo
    for t_i in range(0, n_i):
        i = i_lo + (t_i + k) % n_i
        rows = i * BM + tl.arange(0, BM)
        row_mask = rows < M
        keep_r = row_mask.to(tl.float32)
        row_pad = pad(row_mask)
        if ROWS:
            # +inf on padding: a -inf shift (kernels._col_coefs)
            row_shift = bias2 - tl.load(row_coef_ptr + rows, mask=row_mask,
                                        other=POS_INF) * LOG2E
            w_r = tl.load(row_coef_ptr + coef_stride_r + rows, mask=row_mask, other=0.0)
            h_r = tl.load(row_coef_ptr + 2 * coef_stride_r + rows, mask=row_mask, other=0.0)
            if SMOOTH:
                e_r = tl.load(row_coef_ptr + 3 * coef_stride_r + rows, mask=row_mask,
                              other=0.0)
        else:
            h_r = keep_r * 0.0
        x_rows = x_ptr + tl.cast(i * BM, tl.int64) * stride_xn
        dx_rows = dx_ptr + rows.to(tl.int64)[:, None] * stride_dxn
        for t_j in range(0, n_j):
            j = j_lo + (t_j + g) % n_j
            cols = j * BN + tl.arange(0, BN)
            col_mask = cols < N
            col_pad = pad(col_mask)
            valid = row_mask[:, None] & col_mask[None, :]
            acc = logits_tile(x_ptr, y_ptr, i * BM, j * BN, row_mask, col_mask, D,
                              stride_xn, stride_xd, stride_yn, stride_yd,
                              BM, BN, BK, EVEN_K, DOT_FP32, INPUT_PRECISION)
            grad = tl.zeros((BM, BN), tl.float32)
            if ROWS:
                grad += w_r[:, None] * tl.exp2(acc * scale2 + row_shift[:, None]
                                               + col_pad[None, :])
            if COLS:
                col_shift = bias2 - tl.load(col_coef_ptr + cols, mask=col_mask,
                                            other=POS_INF) * LOG2E
                w_c = tl.load(col_coef_ptr + coef_stride_c + cols, mask=col_mask, other=0.0)
                grad += w_c[None, :] * tl.exp2(acc * scale2 + col_shift[None, :]
                                               + row_pad[:, None])
            if diagonal_tile(i * BM + offset, j * BN, BM, BN):
                if COLS:
                    h_c = tl.load(col_coef_ptr + 2 * coef_stride_c + cols, mask=col_mask,
                                  other=0.0)
                else:
                    h_c = col_mask.to(tl.float32) * 0.0
                hard = (rows[:, None] + offset == cols[None, :]) & valid
                grad = tl.where(hard, grad - (h_r[:, None] + h_c[None, :]), grad)
            if SMOOTH:
                keep_c = col_mask.to(tl.float32)
                if ROWS:
                    grad -= e_r[:, None] * keep_c[None, :]
                if COLS:
                    e_c = tl.load(col_coef_ptr + 3 * coef_stride_c + cols, mask=col_mask,
                                  other=0.0)
                    grad -= e_c[None, :] * keep_r[:, None]
            # sum(G X Y^T) directly (not of G S): the scale gradient needs no division by s
            dscale_acc += tl.sum(grad * acc, 1)
            dbias_acc += tl.sum(grad, 1)
            if DOT_FP32:
                g_op = grad
            else:
                g_op = grad.to(x_ptr.dtype.element_ty)
            y_cols = y_ptr + tl.cast(j * BN, tl.int64) * stride_yn
            dy_cols = dy_ptr + cols.to(tl.int64)[:, None] * stride_dyn
            x_offs = tl.arange(0, BM)[:, None] * stride_xn + ks[None, :] * stride_xd
            y_offs = tl.arange(0, BN)[:, None] * stride_yn + ks[None, :] * stride_yd
            for k0 in range(0, D, BK):
                kk = k0 + ks
                k_mask = kk < D
                if Y_GRAD:
                    x_k = tl.load(x_rows + tl.cast(k0, tl.int64) * stride_xd + x_offs,
                                  mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                y_k = tl.load(y_cols + tl.cast(k0, tl.int64) * stride_yd + y_offs,
                              mask=col_mask[:, None] & k_mask[None, :], other=0.0)
                if DOT_FP32:
                    if Y_GRAD:
                        x_k = x_k.to(tl.float32)
                    y_k = y_k.to(tl.float32)
                dx_k = tl.dot(g_op, y_k, input_precision=INPUT_PRECISION) * coef
                if Y_GRAD:
                    dy_k = tl.dot(tl.trans(g_op), x_k, input_precision=INPUT_PRECISION) * coef
                dx_mask = row_mask[:, None] & k_mask[None, :]
                dy_mask = col_mask[:, None] & k_mask[None, :]
                if ATOMIC:
                    tl.atomic_add(dx_rows + kk[None, :], dx_k, mask=dx_mask, sem="relaxed")
                    if Y_GRAD:
                        tl.atomic_add(dy_cols + kk[None, :], dy_k, mask=dy_mask, sem="relaxed")
                else:
                    old_x = tl.load(dx_rows + kk[None, :], mask=dx_mask, other=0.0)
                    tl.store(dx_rows + kk[None, :], old_x + dx_k, mask=dx_mask)
                    if Y_GRAD:
                        old_y = tl.load(dy_cols + kk[None, :], mask=dy_mask, other=0.0)
                        tl.store(dy_cols + kk[None, :], old_y + dy_k, mask=dy_mask)
            if not ATOMIC:
                # the next read of these slots may come from other threads of this program
                tl.debug_barrier()
    tl.store(partial_ptr + pid, tl.sum(dscale_acc, 0))
    tl.store(partial_ptr + partial_stride + pid, tl.sum(dbias_acc, 0))
# fmt: on


def check_design_variable() -> None:
    """A set $VLMKERNELS_CLIP_BACKWARD names a design (checked by the forward of a loss that
    may run the backward, before any kernel, rather than by that backward)."""
    design = _design_variable()
    if design:
        _check_design(design, ENV_DESIGN)


def _check_design(design: str, source: str) -> None:
    if design not in DESIGNS:
        raise ValueError(f"{source}={design!r}: expected one of {', '.join(DESIGNS)}")


def clip_backward_design(design: str | None = None, device: torch.device | None = None) -> str:
    """The CLIP backward design: ``design`` if given, else $VLMKERNELS_CLIP_BACKWARD, else
    the one ``vlmkernels tune`` recorded as faster on ``device`` (a CUDA device; choice
    ``"clip_backward"`` of ``designs.json``), else ``"chunked"``. Raises ValueError naming
    the source for an unknown name.

    Under ``torch.use_deterministic_algorithms(True)`` the atomic ``"fused"`` design is
    never run: tune's choice gives way to ``"chunked"``, and an explicit ``"fused"`` (the
    argument or the variable) becomes its bitwise repeatable ``"fused_deterministic"``,
    as torch itself picks a deterministic implementation where it has one."""
    source = "design"
    if design is None:
        design, source = _design_variable(), ENV_DESIGN
    if not design and device is not None and device.type == "cuda":
        design, source = preferred_design(DESIGN_CHOICE, device, DESIGNS) or "", "designs.json"
    design = design or "chunked"
    _check_design(design, source)
    if design == "fused" and torch.are_deterministic_algorithms_enabled():
        return "chunked" if source == "designs.json" else "fused_deterministic"
    return design


def fused_covers(targets) -> bool:
    """Whether the fused kernel covers these targets: positives at col = row + offset, with
    or without label smoothing; not ids, not a teacher (the chunked design serves those)."""
    return not targets.ids and targets.teacher is None


def _grid(m: int, n: int, device: torch.device, deterministic: bool, max_slots: int):
    """(row groups G, column splits K): about 2 programs per SM in rectangles of about
    square shape; deterministic: at most ``max_slots`` each (the partials' memory)."""
    row_blocks, col_blocks = -(-m // _NOMINAL), -(-n // _NOMINAL)
    target = 2 * sm_count(device)
    if deterministic:
        return min(row_blocks, max_slots), min(col_blocks, max_slots)
    groups = max(1, min(row_blocks, round((target * row_blocks / col_blocks) ** 0.5)))
    return groups, max(1, min(col_blocks, -(-target // groups)))


def fused_block_grads(x, y, scale, bias, targets, r_coef, c_coef, rows, cols, kappa,
                      dx_acc=None, dy_acc=None, deterministic=False, max_slots=2,
                      y_grad=True):  # fmt: skip
    """(dx, dy, dscale, dbias) of a block with the fused kernel, from the (6, M) / (6, N)
    coefficients as :func:`~.launchers.block_grads_triton` prepares them (normalised by
    ``kappa`` or not; stand-ins for a direction not in the loss). With fp32 accumulators
    dx_acc / dy_acc, the gradients are added into them (atomic mode: by the kernel).
    Without ``y_grad`` (and no ``dy_acc``) dy is None, and neither made nor stored."""
    y_grad = y_grad or dy_acc is not None
    x, y = tile_addressable(x), tile_addressable(y)
    m, d = x.shape
    n = y.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    groups, splits = _grid(m, n, x.device, deterministic, max_slots)
    s = scale.float()
    coef = (s if kappa is None else s * kappa).reshape(1).contiguous()

    def own(acc, length):
        ok = acc is not None and acc.stride(1) == 1 and not deterministic
        return acc if ok else torch.zeros((length, d), **f32)

    if deterministic:
        dx_buf = torch.zeros((splits, m, d), **f32)
        dy_buf = torch.zeros((groups, n, d), **f32) if y_grad else dx_buf  # untouched
        dx_out, dy_out = dx_buf[0], dy_buf[0]
    else:
        dx_out = own(dx_acc, m)
        dy_out = own(dy_acc, n) if y_grad else dx_out  # a stand-in the kernel never touches
        dx_buf, dy_buf = dx_out, dy_out
    partials = torch.zeros((2, groups * splits), **f32)
    dot_fp32, precision = dot_precision(x.dtype)
    with device_guard(x):
        _clip_fused_grad_kernel[(groups * splits,)](
            x, y, scale, bias if bias is not None else scale, coef, r_coef, c_coef,
            dx_buf, dy_buf, m * d, n * d, partials, groups * splits,
            m, n, d, targets.offset, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            dx_out.stride(0), dy_out.stride(0), r_coef.stride(0), c_coef.stride(0),
            groups, next_pow2(max(m, n)),
            ROWS=rows, COLS=cols, SMOOTH=bool(targets.smoothing), HAS_BIAS=bias is not None,
            ATOMIC=not deterministic, Y_GRAD=y_grad, DOT_FP32=dot_fp32,
            INPUT_PRECISION=precision,
        )  # fmt: skip
    if deterministic:
        dx_f, dy_f = dx_buf.sum(0), dy_buf.sum(0) if y_grad else None
    else:
        dx_f, dy_f = dx_out, dy_out
    del dx_buf, dy_buf, dx_out, dy_out  # dx_f and dy_f hold the only references
    dscale, dbias = partials[0].sum(), partials[1].sum()
    if kappa is not None:
        dscale, dbias = dscale * kappa, dbias * kappa

    def result(acc, grad, dtype):
        if acc is None:
            return grad.to(dtype)
        if acc is not grad:
            acc += grad
        return acc

    dx = result(dx_acc, dx_f, x.dtype)
    del dx_f  # peak: the fp32 dY, dX and dY in the input dtype
    return dx, result(dy_acc, dy_f, y.dtype) if y_grad else None, dscale, dbias
