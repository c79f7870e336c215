r"""Rotary position embeddings for the Qwen-VL family: plain RoPE, M-RoPE (chunked and
interleaved), M-RoPE with the angles computed in the kernel from positions, and the
vision 2-D RoPE.

For a head vector x of dimension D, a rotary dimension R <= D (even) and h = R / 2, with
per-lane cosines c and sines s of length R (rotate-half, "NeoX" pairing):

    out[j]     = x[j]     c[j]     - x[j + h] s[j]          j < h
    out[j + h] = x[j + h] c[j + h] + x[j]     s[j + h]
    out[j]     = x[j]                                        R <= j < D   (partial rotary)

With paired lanes (``pairs=True``: GPT-J's pairing, GLM-4V's ``rotate_half_llm``) the
rotated pairs are (2j, 2j + 1) instead of (j, j + h), the tables laid out the same way
(each frequency's value on two adjacent lanes); everything below holds with that
renumbering.

The backward pass is its transpose (the rotation with the sign of sin flipped when the
two halves of c and s agree, as they do in every model):

    dx[j]     = g[j]     c[j]     + g[j + h] s[j + h]
    dx[j + h] = g[j + h] c[j + h] - g[j]     s[j]

M-RoPE gives each frequency lane j < h the angle of one of three position axes
(temporal, height, width), lane j + h sharing lane j's axis:

- chunked (Qwen2-VL, Qwen2.5-VL; section [t, h, w]): T for j < t, H for j < t + h, else W;
- interleaved (Qwen3-VL): H where j % 3 == 1 and j < 3 h, W where j % 3 == 2 and j < 3 w,
  else T.

The tables c, s either come from memory, (3, B, S, R) for M-RoPE as transformers' rotary
classes (<= 5.16) produce them, or are computed in the kernel in fp32 from integer
positions: angle = position[axis(j)] * inv_freq[j], c = cos(angle) * scaling. All
arithmetic is fp32 (fp64 for float64 q and k, which take the PyTorch path; the angles from
positions stay fp32, as transformers computes them, and ``vision_rope`` rounds float64 q
and k to fp32 first, as transformers' vision function does); results are rounded once to
the input dtype.

Layouts: q and k are (B, H, S, D) (``unsqueeze_dim=1``, including the transposed views
attention code makes), (B, S, H, D) (``unsqueeze_dim=2``) or token-major (T, H, D), any
strides, with their own head counts. They are viewed as (B, S, H, D) without copies.

Modules: ``kernels`` (the Triton kernel and its launcher), ``reference`` (the PyTorch path),
``cuda`` (the CUDA C++ launcher), ``ops`` (the op declarations), ``functional`` (the public
functions), ``index`` (``get_rope_index``), ``family`` (what the shared tools need).
"""

from .family import FAMILY
from .functional import mrope, mrope_from_positions, rope, vision_rope
from .index import get_rope_index
from .kernels import CHUNKED, INTERLEAVED, PAIRS, PLAIN, POSITIONS, TABLE

__all__ = [
    "CHUNKED",
    "FAMILY",
    "INTERLEAVED",
    "PAIRS",
    "PLAIN",
    "POSITIONS",
    "TABLE",
    "get_rope_index",
    "mrope",
    "mrope_from_positions",
    "rope",
    "vision_rope",
]
