r"""Connectors between a vision encoder and a language model: pixel shuffle, the LLaVA MLP
projector, the merging connectors (Qwen2/2.5/3-VL patch mergers, Idefics3 / SmolVLM /
InternVL / MiniCPM-V 4.6 pixel-shuffle projectors) and Qwen3-VL's DeepStack add.

A connector reads features x, viewed as a (B, H, W, C) grid, through a merge of
MH x MW patches without copying them:

    X[(b, i, j), (dr MW + dc) C + c] = x[b, i MH + dr, j MW + dc, c]       (M, K = MH MW C)
    Xn = norm(X)       LayerNorm (x - mean) rstd w + b or RMSNorm x rstd w, rstd =
                       1 / sqrt(var + eps), over each patch (C) or each merged row (K), fp32
    h  = Xn W1^T + b1
    y  = GELU(h) W2^T + b2          (or y = h with a single linear)
    y  = (v SiLU(u)) W2^T + b2      SwiGLU (Aya Vision): (v, u) the halves of h, each I wide

GELU is exact, 0.5 h (1 + erf(h / sqrt 2)). The backward recomputes GELU(h) from h, and h
itself from x unless the forward was asked to keep it:

    dh = (g W2) * GELU'(h),  dW2 = g^T GELU(h),  db2 = sum g,  dW1 = dh^T Xn,  db1 = sum dh,
    dXn = dh W1, then the norm's backward, scattered back through the merge.

SwiGLU's first GEMM (N = 2 I) reads W1's value and gate rows interleaved, so v and u of an
output column meet in one accumulator tile and only v SiLU(u) (M x I) is written; its
backward's dh = (dv, du) = (dp SiLU(u), dp v s (1 + u (1 - s))), dp = g W2 and
s = sigmoid(u), comes out of the dp GEMM's epilogue.

With 16-bit inputs the norm is folded into the first GEMM instead of normalising X: with
W' = W1 diag(w) (rounded once per call), colsum_s[n] = sum over segment s of W'[n, k] and
the statistics (mean_s, rstd_s) of each norm segment s of a row (a patch, or the row),

    Xn W1^T = sum_s rstd_s (X_s W'_s^T - mean_s colsum_s) + b W1^T,

so the k-loop multiplies raw X; the accumulator is rescaled by rstd_{s-1} / rstd_s between
segments and by the last rstd at the end (fp32 inputs normalise X in the GEMM's prologue:
the subtraction would cost fp32 accuracy). dW1 reads Xn stored once by a normalising pass
(or the shuffle copy without a norm) and the bias gradients are column sums of their own.

The pixel shuffle of Idefics3 (scale s) is the merge (s, s) of the S x S grid; the Qwen-VL
mergers merge s^2 consecutive patches, the merge (1, s^2) of a (P / s^2, 1, s^2, C) grid.

Pooled projector (``mlp_projector(..., pool=)``): a token-grid pooling P of the projected
grid (the 2 x 2 mean, or LLaVA-OneVision's bilinear resize) is an affine combination of
tokens with weights summing to 1, so it commutes with the second linear:

    P(GELU(h) W2^T + b2) = P(GELU(h)) W2^T + b2,
    dW2 = g^T P(GELU(h)),  dh = P^T(g W2) * GELU'(h)

and the second GEMM and its two backward GEMMs run on the pooled rows (exact up to rounding).

DeepStack (Qwen3-VL): out = hidden, out[mask] = hidden[mask] + visual_embeds, one pass.

Modules: ``kernels`` (the Triton kernels: the GEMM core with its merge addressing, norm
prologue or folded norm, and bias / GELU / SwiGLU / residual epilogue; the weight fold; the norm
statistics, normalising pass and backward; the shuffle copy; the DeepStack add),
``launchers``, ``reference`` (the PyTorch path), ``ops`` (the op declarations),
``functional`` (the public functions), ``family``.
"""

from .family import FAMILY
from .functional import deepstack_add, merger, mlp_projector, pixel_shuffle

__all__ = ["FAMILY", "deepstack_add", "merger", "mlp_projector", "pixel_shuffle"]
