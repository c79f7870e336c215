r"""Fused contrastive losses: CLIP (symmetric InfoNCE) and SigLIP (pairwise sigmoid).

For image features X (N, d), text features Y (N, d), a logit scale s and a bias b, the logits
are S = s X Y^T + b (N x N). Neither loss writes S to memory: tiles of S are computed in
registers with ``tl.dot`` (bf16/fp16 on tensor cores, fp32 accumulation) and consumed there.

CLIP. Row and column log-sum-exp r_i = lse_j S_ij, c_j = lse_i S_ij come from one pass over
the tiles; the per-sample losses are l^{i2t}_i = r_i - S_ii and l^{t2i}_j = c_j - S_jj, and
the loss is (mean(l^{i2t}) + mean(l^{t2i})) / 2. With upstream weights u_i, v_j on the two
per-sample losses the logit gradient is

    dS_ij = u_i exp(S_ij - r_i) + v_j exp(S_ij - c_j) - delta_ij (u_i + v_j),

which the backward pass recomputes tile by tile, in chunks of rows, and feeds to two matrix
products: dX = s dS Y, dY = s dS^T X; ds = sum dS * (XY^T), db = sum dS. Saved for
backward: the inputs and r, c (O(N) fp32). About 4 N^2 d multiply-adds per forward+backward
(four N x N x d products: the statistics pass, the recomputation of S, dX, dY; 8 N^2 d
FLOPs, of which the benchmarks' model counts the 6 N^2 d useful ones).

SigLIP. With z_ij = +1 on the diagonal and -1 elsewhere, the loss of image i is
l_i = -sum_j logsigmoid(z_ij S_ij) and the loss is sum_i l_i / N (open_clip's normalisation).
The logit gradient dS_ij = -w_i z_ij sigmoid(-z_ij S_ij) needs no statistic, so when a
scalar loss needs gradients the forward pass produces them too (3 N^2 d multiply-adds), and
the backward pass only scales them.

Memory: the inputs, their gradients, an fp32 accumulator for dY and one dS chunk of
(chunk_size x N) elements; never N x N. No atomics: the results are deterministic. With
``chunk_size=None`` the Triton path's one chunk, in the input dtype, has the rows of
``CHUNK_BUDGET_BYTES`` (128 MiB) but at least ``MIN_TRITON_CHUNK_ROWS`` (2048, so that its dY
product stays compute-bound: 256 MiB at N = 65536 in bf16); the PyTorch path (CPU) keeps
all of its (chunk x N) buffers together within the budget: two fp32 ones (three with a
teacher, plus a bool one with ids). With an explicit ``chunk_size`` the PyTorch path's
temporaries are at most 3.25 x chunk_size x N fp32 elements (fp64 for fp64 inputs); 16-bit
inputs add their fp32 copies (O(N d)) there.

Modules, lowest layer first: ``kernels`` (the Triton kernels and their configs, built from
:mod:`vlmkernels.kernels.blocks`), ``algebra`` (``Targets`` and ``SideStats``: the block
algebra), ``chunked`` (the chunked-GEMM driver and the chunk budget), ``launchers`` (the
Triton launchers), ``reference`` (the PyTorch path), ``finalize``, ``whole_loss`` and
``whole_targets`` (the whole-loss path: a reduced cross-entropy, CLIP's or one
direction's, with one positive per row or with ids, label smoothing and a teacher, and the
fused SigLIP loss in prepared launches, finished by small Triton kernels instead of
host-side torch ops), ``ops`` (the op declarations and the block
primitives), ``functional`` (the public functions on one device), ``family`` (what the
shared tools need). The process-group forms of ``clip_loss`` and ``siglip_loss`` are
in :mod:`vlmkernels.distributed.contrastive`.
"""

from .algebra import SideStats, Targets
from .chunked import (
    CHUNK_BUDGET_BYTES,
    MIN_TRITON_CHUNK_ROWS,
    default_chunk_rows,
    forward_grad_dtype,
)
from .family import FAMILY
from .functional import (
    clip_loss,
    clip_loss_with_grads,
    contrastive_cross_entropy,
    siglip_loss,
    siglip_loss_with_grads,
)
from .fused_backward import clip_backward_design
from .ops import (
    block_grads,
    block_stats,
    first_order_only,
    siglip_block_grads,
    siglip_block_rows,
)

__all__ = [
    "CHUNK_BUDGET_BYTES",
    "MIN_TRITON_CHUNK_ROWS",
    "FAMILY",
    "SideStats",
    "Targets",
    "block_grads",
    "block_stats",
    "clip_backward_design",
    "clip_loss",
    "clip_loss_with_grads",
    "contrastive_cross_entropy",
    "default_chunk_rows",
    "first_order_only",
    "forward_grad_dtype",
    "siglip_block_grads",
    "siglip_block_rows",
    "siglip_loss",
    "siglip_loss_with_grads",
]
