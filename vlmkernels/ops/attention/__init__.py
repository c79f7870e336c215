r"""Attention for vision-language connectors: one flash-style core (online softmax, fp32
accumulation, forward and backward) behind few-query cross-attention (dense or packed
varlen, split-K when batch x heads is small), Flamingo's media-masked cross-attention
computed by segment, and attention that reports the mass each key receives.

For query row i of a segment (batch b, head h), the keys it sees V(i) and the scale s:

    lse_i = log sum_{j in V(i)} exp(s q_i . k_j)
    P_ij  = exp(s q_i . k_j - lse_i)                 (j in V(i), else 0)
    out_i = sum_j P_ij v_j                           (0 when V(i) is empty, lse_i = -inf)

- ``cross_attention``: V(i) = every key of the segment not marked in ``key_padding_mask``;
- ``attention(causal=True)``: V(i) = {j <= i + Lk - Lq} (bottom-right aligned);
- ``media_cross_attention``: with text_time t = cumsum(media_locations) and key j in media
  j // L + 1, V(i) = the keys of media t_i (``only_immediate``) or of media 1..t_i;
- key mass: mass[b, j] = 1/(H Lq) sum_{h, i} P_ij ("mean") or 1/H sum_h P_rj (row r);
- grouped-query attention: k, v with H / G heads; query head h reads key/value head h // G;
- ``key_bias`` (ToMe's proportional attention, log(size)): s q_i . k_j + bias_j in the
  logits, d bias_j = sum_{h, i} dS_ij;
- ``gate`` (Flamingo): out_i = tanh(g) sum_j P_ij v_j in the forward's epilogue; the
  backward runs on tanh(g) V and dV' = P^T dO: dV = tanh(g) dV',
  d g = (1 - tanh^2 g) sum V . dV'.

Attention dropout (``dropout_p`` of ``cross_attention`` and ``media_cross_attention``):
out_i = sum_j P_ij M_ij / (1 - p) v_j, M ~ Bernoulli(1 - p) drawn in the kernels from a
counter-based RNG (Philox keyed by a seed tensor, counters (j, i, h, b)) and regenerated
in the backward: dV = P'^T dO, dP = (dO V^T) M / (1 - p), dS = P * (dP - delta).
``dropout_mask`` materialises the kernels' mask (tests, debugging).

Backward (flash-attention 2): delta_i = sum_d dO_id O_id - dlse_i,
dV = P^T dO, dS = P * (dO V^T - delta), dQ = s dS K, dK = s dS^T Q, P recomputed from lse.

Weight absorption (``absorbed_cross_attention``): with queries that are fixed parameters,
softmax(s Q (X W_k^T + b_k)^T)(X W_v^T + b_v) = softmax(s (Q W_k) X^T) X W_v^T + b_v per
head, so attention runs on the raw image features and K, V are never materialised.

Modules: ``kernels`` (the Triton kernels), ``launchers`` (their host side, the split-K
choice), ``reference`` (the PyTorch path), ``ops`` (the op declarations), ``functional``
(the public functions), ``absorption`` (weight absorption), ``family`` (what the shared
tools need).
"""

from .absorption import absorb_queries, absorbed_cross_attention
from .family import FAMILY
from .functional import (
    attention,
    cross_attention,
    draw_dropout_seed,
    dropout_mask,
    media_cross_attention,
)

__all__ = [
    "FAMILY",
    "absorb_queries",
    "absorbed_cross_attention",
    "attention",
    "cross_attention",
    "draw_dropout_seed",
    "dropout_mask",
    "media_cross_attention",
]
