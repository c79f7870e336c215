r"""Visual token compression: selection, ToMe merging, pooling of token grids.

- ``select_tokens(x, scores, keep)``: the ``keep`` highest-scoring tokens of each sample of
  x (B, N, C), in their original order, with their int64 indices (B, keep); ties keep the
  lower index. One gather kernel; the backward scatters the gradient into the kept rows
  (as a gather through the inverse map), the scores get none.
- ``tome_merge(x, metric, r, size=None, class_token=False)``: ToMe's bipartite soft
  matching and size-weighted merge (Bolya et al. 2023). A = tokens 0, 2, 4, ...,
  B = 1, 3, 5, ...; with m the metric rows over their norms, s(a) = max_j <m_a, m_{b_j}>
  and j(a) its argmax (a Triton kernel: GEMM tiles reduced to a running row max, the
  (N/2, N/2) score matrix never stored); the r A tokens of highest s merge into b_{j(a)}:
  out = sum_i s_i x_i / sum_i s_i, size = sum_i s_i (a CSR segment mean, no atomics).
  Returns (merged (B, N - r, C), sizes (B, N - r, 1), source (B, N)).
- ``pool_tokens(x, grid, kind="avg2x2" | "avg" | "bilinear", size=None)``: the 2 x 2 mean
  of a (H, W) token grid, the mean of its (H/h) x (W/w) blocks (Gemma 3's 4 x 4), or
  LLaVA-OneVision's bilinear resize (``F.interpolate``, align_corners=False, default size
  (ceil(H/2), ceil(W/2))).

Modules: ``kernels`` (the Triton kernels and launchers), ``reference`` (the PyTorch path),
``ops`` (the op declarations), ``functional`` (the public functions), ``family`` (what the
shared tools need).
"""

from .family import FAMILY
from .functional import pool_tokens, select_tokens, tome_merge
from .kernels import AVG, AVG2X2, BILINEAR

__all__ = ["AVG", "AVG2X2", "BILINEAR", "FAMILY", "pool_tokens", "select_tokens", "tome_merge"]
