"""The chunked-GEMM driver of the backward passes: the logit gradient G (M x N) is made a
chunk of rows at a time, and each chunk goes straight into the two matrix products
dX = c G Y and dY = c G^T X, so memory is O(chunk x N), never M x N.

Also the chunk budget: how many rows a chunk has when the caller does not say.
"""

from __future__ import annotations

import functools

import torch

from ...core.runtime import cast

__all__ = [
    "CHUNK_BUDGET_BYTES",
    "MIN_TRITON_CHUNK_ROWS",
    "NORMALISED_DTYPES",
    "default_chunk_rows",
    "feature_grads",
    "forward_grad_dtype",
    "mm_f32",
    "normalise",
    "triton_chunk_rows",
]

CHUNK_BUDGET_BYTES = 128 << 20
"""Memory for the (chunk x N) temporaries when ``chunk_size`` is None: the PyTorch path's two
or three chunk buffers together; the Triton path's one logit-gradient chunk, unless that
is under :data:`MIN_TRITON_CHUNK_ROWS` rows."""

MIN_TRITON_CHUNK_ROWS = 2048
"""Fewest rows of a Triton-path chunk when ``chunk_size`` is None (or the whole block). The
chunk's dY product, dY += s dS_c^T X_c ((N x C) times (C x d), dY in fp32), does 2 N C d
FLOP for about 2 N C + 8 N d bytes: C d / (C + 4 d) FLOP per byte, 307 at C = 2048 and
d = 768, over the H100's ridge point (687 TFLOP/s / 3 TB/s = 229; C = 1024 gives 192,
memory-bound). At N = 65536 in bf16 the chunk is 256 MiB (128 MiB of bytes gave 1024
rows: 64 chunks re-reading and re-writing the 192 MiB fp32 dY, 25 GB)."""


def default_chunk_rows(n: int, elem_size: int, budget_bytes: int = CHUNK_BUDGET_BYTES) -> int:
    """Rows per dS chunk: a (rows x n) chunk of ``budget_bytes`` at most, in multiples of
    256 rows (at least 256) so that the chunk products stay efficient."""
    rows = budget_bytes // (n * elem_size)
    rows = max(256, rows // 256 * 256)
    return min(n, rows)


NORMALISED_DTYPES = (torch.float16,)
"""Chunk dtypes that need the gradient weights normalised (:func:`normalise`): float16,
whose smallest normal is 6e-5 and largest value 65504, while the weights of a mean over N
samples are 1 / N and an upstream gradient may be large. bfloat16 and float32 have
float32's exponent range: their chunks hold the weights as they are."""


def forward_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of feature gradients computed before the upstream gradient that scales
    them is known (a loss that makes its gradients in the forward pass): float32 for
    float16 features, the features' dtype otherwise.

    A float16 gradient of a mean over N pairs has entries near s / N, below float16's
    smallest normal (6e-5) for large N; eager autograd rounds them only after a GradScaler's
    loss scale has lifted them, so they are kept in float32 until the upstream gradient is
    applied. bfloat16 has float32's exponent range."""
    return torch.float32 if dtype == torch.float16 else dtype


def triton_chunk_rows(x: torch.Tensor, chunk_size: int) -> int:
    """Rows per chunk on the Triton path: ``chunk_size``, or (0) the budget's but at least
    :data:`MIN_TRITON_CHUNK_ROWS`: memory max(128 MiB, 2048 N elements)."""
    n = x.shape[0]
    if chunk_size > 0:
        return min(n, chunk_size)
    if n <= MIN_TRITON_CHUNK_ROWS:  # one chunk whatever the budget
        return n
    return min(n, max(MIN_TRITON_CHUNK_ROWS, default_chunk_rows(n, x.element_size())))


@functools.cache
def _mixed_precision_mm(device_type: str) -> bool:
    """Whether 16-bit matrix products can write and accumulate fp32 outputs here
    (``aten::mm.dtype`` / ``aten::addmm.dtype_out``: CUDA in torch >= 2.8). Probed once
    per device type, at the first backward: out of memory there (the step of peak memory)
    says nothing about support, so it is raised, not cached as False, which would have
    put every later product of the process (after a caller recovered, e.g. retrying a
    smaller batch) on fp32 copies of both operands."""
    if device_type != "cuda":
        return False
    try:
        a = torch.ones((16, 16), dtype=torch.bfloat16, device=device_type)
        acc = torch.zeros((16, 16), dtype=torch.float32, device=device_type)
        torch.ops.aten.mm.dtype(a, a, torch.float32)
        torch.ops.aten.addmm.dtype_out(acc, a, a, torch.float32, out=acc)
    except torch.OutOfMemoryError:  # a RuntimeError; functools.cache keeps no exception
        raise
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return False
    return True


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and an fp32 (or fp64) result."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.mm(a, b)
    if _mixed_precision_mm(a.device.type):
        return torch.ops.aten.mm.dtype(a, b, torch.float32)
    return torch.mm(a.float(), b.float())


def _addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in place, acc fp32 (or fp64)."""
    if a.dtype in (torch.float32, torch.float64):
        acc.addmm_(a, b)
    elif _mixed_precision_mm(a.device.type):
        torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def feature_grads(x, y, coef, chunk_rows, fill, dx_acc=None, dy_acc=None, y_grad=True,
                  grads_dtype=None):  # fmt: skip
    """dx = coef * G y, dy = coef * G^T x and sum(G * (x y^T)) for the logit gradient G
    (M x N) of rows x (M, d) and columns y (N, d), made chunk by chunk; without ``y_grad``
    (and no ``dy_acc``) dy is None and its product is not computed. dx and dy are in
    ``grads_dtype`` (default: the features' dtype).

    ``fill(buf, chunk, row0, n)`` writes rows row0 .. row0 + n of G into buf[:n]. The chunk
    is stored in the input dtype (a GEMM operand). Without accumulators dx is written per
    chunk in ``grads_dtype`` and dy accumulated in fp32 then rounded; with fp32
    ``dx_acc`` / ``dy_acc`` both are added into them (ring steps). The scale gradient's sum
    comes from the dx product for free: sum_ij G_ij x_i . y_j = sum_i x_i . (G y)_i.
    Returns (dx, dy, that sum (fp32, before ``coef``)).
    """
    m, d = x.shape
    n = y.shape[0]
    dx_dtype, dy_dtype = grads_dtype or x.dtype, grads_dtype or y.dtype
    if m <= chunk_rows and dx_acc is None and dy_acc is None:  # one chunk: the results
        g = torch.empty((m, n), dtype=x.dtype, device=x.device)
        fill(g, 0, 0, m)
        gy = mm_f32(g, y)
        g_dot_xy = (gy * x).sum()
        dy = cast(mm_f32(g.t(), x).mul_(coef), dy_dtype) if y_grad else None
        del g
        return cast(gy.mul_(coef), dx_dtype), dy, g_dot_xy
    y_grad = y_grad or dy_acc is not None
    buf = torch.empty((min(chunk_rows, m), n), dtype=x.dtype, device=x.device)
    dx = dx_acc if dx_acc is not None else torch.empty((m, d), dtype=dx_dtype, device=x.device)
    dy = dy_acc
    if dy_acc is None and y_grad:
        dy = torch.zeros((n, d), dtype=torch.float32, device=x.device)
    g_dot_xy = torch.zeros((), dtype=torch.float32, device=x.device)
    for c, row0 in enumerate(range(0, m, chunk_rows)):
        rows = min(chunk_rows, m - row0)
        fill(buf, c, row0, rows)
        g = buf[:rows]
        x_rows = x[row0 : row0 + rows]
        gy = mm_f32(g, y)
        g_dot_xy += (gy * x_rows).sum()
        if dx_acc is not None:
            dx[row0 : row0 + rows] += gy.mul_(coef)
        else:
            dx[row0 : row0 + rows] = gy.mul_(coef)
        if dy_acc is not None:  # other calls add with other coefficients: scale now
            dy.add_(mm_f32(g.t(), x_rows).mul_(coef))
        elif y_grad:
            _addmm_f32_(dy, g.t(), x_rows)
    del buf, g  # the rounded dy below can reuse the chunk's memory
    if dy_acc is not None or not y_grad:
        return dx, dy, g_dot_xy
    return dx, cast(dy.mul_(coef), dy_dtype), g_dot_xy


def normalise(*weights: torch.Tensor):
    """Weights divided by their largest magnitude, and that magnitude (1 if all are 0):
    the logit-gradient chunk then holds values of order 1, which fp16 represents (see
    :data:`NORMALISED_DTYPES`)."""
    kappa = torch.stack([w.abs().amax() for w in weights]).amax()
    kappa = torch.where(kappa > 0, kappa, torch.ones_like(kappa))
    return [(w / kappa).contiguous() for w in weights], kappa
