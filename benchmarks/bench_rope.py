r"""M-RoPE family: ``mrope`` (chunked, Qwen2-VL), ``mrope_interleaved`` (Qwen3-VL),
``mrope_partial`` (Qwen3.5: interleaved, partial rotary), ``mrope_pairs`` (GLM-4V: chunked,
partial rotary, paired lanes) and ``vision_rope`` (the ViT's 2-D RoPE).

Ops (model shapes; the sweep key is the token count S, batch B = 1 by default):

- ``mrope``: Qwen2-VL-7B text attention, 28 query / 4 key heads, head dim 128, section
  [16, 24, 24], chunked lanes (T | H | W).
- ``mrope_interleaved``: Qwen3-VL-8B text attention, 32 / 8 heads, head dim 128, section
  [24, 20, 20], interleaved lanes (THW...THW then T).
- ``mrope_partial``: Qwen3.5 text attention at transformers' default ``Qwen3_5TextConfig``
  (16 query / 4 key heads, head dim 256), partial_rotary_factor 0.25: only the first 64
  lanes (32 frequencies) rotate, section [11, 11, 10], interleaved lanes, theta 1e7 (the
  released configs' rope_theta; the class default is 1e4); lanes 64..255 pass through
  unchanged.
- ``mrope_pairs``: GLM-4.1V-9B text attention (GLM-4V's ``Glm4vTextRotaryEmbedding`` and
  ``apply_rotary_pos_emb``). 32 query / 2 key heads and head dim 128 (hidden_size 4096 / 32
  heads, no head_dim key): transformers' default ``Glm4vTextConfig`` (documented as similar
  to GLM-4.1V-9B-Thinking; 5.16.1, 5.17.0 and 5.25.0 checked). partial_rotary_factor 0.5
  (rotary dim 64, 32 frequencies), mrope_section [8, 12, 12] and rope_theta 1e4: the
  released checkpoints' ``rope_parameters`` as transformers'
  ``glm4v/convert_glm4v_mgt_weights_to_hf.py`` writes them ([8, 12, 12] is also the rotary
  class's default section and 1e4 the config's default theta; the default config has no
  partial_rotary_factor, so on those versions its own rotary class makes 64 frequencies
  that section cannot split: a default config's rotary class fails in forward). Sections
  chunked over the frequencies (T 0..7, H 8..19, W 20..31, ``recomposition_frequencies``),
  frequency j on lanes (2j, 2j + 1) (``repeat_interleave(2)``, rotated by
  ``rotate_half_llm``); lanes 64..127 pass through.
- ``vision_rope``: Qwen2-VL vision tower, 16 heads, head dim 80, S packed patches (no batch
  axis: B must be 1); S = 16384 is the headline size, the other S are other image sizes.

Inputs, as attention code produces them (seeded, identical across providers):

- text: q = q_proj.transpose(1, 2) and k = k_proj.transpose(1, 2), (B, H, S, D) views of
  (B, S, H, D) projection outputs; vision: q = qkv[:, 0], k = qkv[:, 1], (S, 16, 80) strided
  views of a packed (S, 3, 16, 80) qkv projection. Random normal, the run's dtype (bf16 on a
  GPU, fp32 on the CPU), ``requires_grad`` (the projections, or the q/k views for vision,
  are the leaves whose ``.grad`` the backward pass fills).
- positions: a VL sequence (:func:`text_vision_positions`): S/8 text tokens, an image
  block of S - S/4 merged patches on a near-square grid (T constant, H = row, W = column,
  offset by the text before it), S/8 text tokens continuing after the image's largest
  position. (3, B, S) int64. Vision: (h, w) of each patch of a square grid in the 2x2
  merge order of the Qwen-VL towers (:func:`vision_positions`).
- cos/sin: as the Qwen rotary classes build them: fp32 angles position * inv_freq, with
  inv_freq = theta^(-2i/R) over the rotary dim R (R = D except ``mrope_partial``'s and
  ``mrope_pairs``' 64; theta 1e6 for Qwen2/3-VL text, 1e7 for Qwen3.5, 1e4 for GLM-4V, 1e4
  and D/4 frequencies for vision), duplicated halves (``mrope_pairs``: each frequency twice
  in a row, GLM-4V's lane order), cos/sin, then cast. Text: (3, B, S, R) in the input dtype
  (the tables transformers <= 5.16 passed to ``apply_multimodal_rotary_pos_emb``). Vision:
  (S, D) fp32, ``[h f | w f | h f | w f]``.
- incoming gradients: fixed random G_q, G_k in the layout attention's backward produces
  ((B, S, H, D) memory seen as (B, H, S, D); (S, H, D) contiguous for vision).

Each provider's timed call computes (q_out, k_out) and ends in L = <q_out, G_q> + <k_out,
G_k> (:class:`.harness.FixedGrads`): its backward hands G_q, G_k to the op's backward and does no
work; L itself is only computed (in fp64) in the first, untimed call, recorded as the
``loss`` row, a checksum on which every provider must agree. The timed calls return an
uninitialised 0-d tensor instead, so no provider is charged for a reduction.

Providers:

- ``vlmkernels``: :func:`vlmkernels.mrope` (``interleaved=`` per op; ``pairs=True`` for
  ``mrope_pairs``, from its pair-ordered tables) and :func:`vlmkernels.vision_rope`, from
  the tables (the Triton kernels, forced, on CUDA; the PyTorch path on the CPU).
- ``vlmkernels_positions``: :func:`vlmkernels.mrope_from_positions`: angles computed in the
  kernel from the (3, B, S) positions and inv_freq, no table. Vision is chunked M-RoPE with
  section [0, D/4, D/4], inv_freq = cat(f, f) and positions (0, h, w). ``pairs=True`` for
  ``mrope_pairs``.
- ``vlmkernels_cuda``, ``vlmkernels_cuda_positions``: the same two calls on the CUDA C++
  kernels (csrc/rope.cu, forced; unavailable without the built extension or a GPU). The
  summary prints their time over the Triton providers' at S = 16384, the issue's "at least
  as fast" check; ``vlmkernels tune`` records the faster as the default per device.
  Unavailable for ``mrope_pairs`` wherever the suite runs: the CUDA C++ kernels rotate
  halves only (``vlmkernels.ops.rope.cuda.fits`` is False for paired lanes, a forced
  'cuda' backend raises), so no CUDA / Triton comparison is made for it.
- ``eager``: transformers' formula. Chunked: the <= 5.16 ``apply_multimodal_rotary_pos_emb``
  (tables split by section * 2, chunk i from axis i % 3, concatenated; transformers 5.17
  removed it, so that merge is written out here) then the installed ``apply_rotary_pos_emb``
  (q * cos + rotate_half(q) * sin). Interleaved: Qwen3-VL's ``recomposition_frequencies``
  rule (written out of place: the method overwrites its input's T row) then
  ``apply_rotary_pos_emb``; the recomposition is timed, though in the model it runs once per
  forward pass rather than per layer. Partial (Qwen3.5): the same recomposition (its rotary
  class's ``recomposition_frequencies`` is Qwen3-VL's rule) on the 64-lane tables, then
  Qwen3.5's ``apply_rotary_pos_emb``, which rotates q[..., :64] and concatenates
  q[..., 64:] unchanged. Pairs (GLM-4V): its rotary class's ``recomposition_frequencies``
  on the per-frequency values (every other lane of the pair-ordered tables: chunk i of
  [8, 12, 12] from axis i % 3) then ``repeat_interleave(2)``, written out (timed, as for
  Qwen3-VL), then GLM-4V's ``apply_rotary_pos_emb``: ``rotate_half_llm`` on q[..., :64],
  q[..., 64:] concatenated unchanged. transformers 5.16's function took [f | f] tables and
  reordered them itself (its class concatenated halves): the order the installed function
  takes is recognised from what it does to a 4-lane table, and the written-out merge
  builds that order. Vision: the installed ``apply_rotary_pos_emb_vision`` (fp32 upcast).
  The transformers functions come from ``models.qwen2_vl.modeling_qwen2_vl``
  (``models.qwen3_5.modeling_qwen3_5`` for ``mrope_partial``, ``models.glm4v.modeling_glm4v``
  for ``mrope_pairs``) where the installed version has them, else from the same formulas
  written out (the row's note says which).
- ``compile``: ``torch.compile`` of the same eager functions (static shapes, dynamo reset per
  shape, compile time excluded by the warm-up).
- ``liger`` (CUDA, when ``liger_kernel`` is importable and has the function):
  ``liger_multimodal_rotary_pos_emb`` for ``mrope`` (the (3, B, S, D) tables), Liger's
  plain ``liger_rotary_pos_emb`` after the same torch recomposition as eager for
  ``mrope_interleaved`` (Liger has no interleaved M-RoPE kernel: this is what its Qwen3-VL
  patch runs), ``liger_rotary_pos_emb_vision`` for ``vision_rope`` (fp32 copies); none for
  ``mrope_partial``, always unavailable: Liger has no partial-rotary RoPE (its RoPE kernel
  rotates the whole head, cos/sin as wide as q, and its Qwen3.5 patch raises
  NotImplementedError for ``rope=True``; liger-kernel 0.8.2 source); none for
  ``mrope_pairs``, always unavailable: Liger has no paired-lane (GPT-J) RoPE (its RoPE and
  M-RoPE kernels rotate lane j with j + D/2; its GLM-4V patch raises NotImplementedError
  for ``rope=True``; Liger-Kernel's source; an interleaved-pairs kernel for DeepSeek-V4,
  linkedin/Liger-Kernel#1387, was an open pull request, not a release). Liger rotates in
  place: for the text ops the (B, S, H, D) memory under the transposed views is contiguous,
  so it overwrites the projection outputs in the forward pass and G_q, G_k in the backward
  pass (re-rotated at every timed call, which changes no timing; the checksum comes from
  the first call). Missing pieces mark the provider unavailable with the reason.

Byte model, the bytes every provider must move, per pass: read q and k and write their
outputs over the whole head dim D, 2 (Hq + Hk) B S D e (e = element size of the run's
dtype); the backward pass moves the same on the gradients (read G_q, G_k, write dq, dk);
fwd+bwd is the sum, 4 (Hq + Hk) B S D e. For ``mrope_partial`` that is D = 256 (128 for
``mrope_pairs``), not the rotary dim R = 64: every provider here is out of place, so the
pass-through lanes are read
and copied to the outputs (and the gradients' likewise to dq, dk) like the rotated ones. The
angle source is not counted because it differs by provider (the harness has one byte model
per op): the used lanes of the tables for table providers (each lane's cos and sin read from
one axis: 2 B S R e, +3.1 % at 28 + 4 heads, +1.25 % for ``mrope_partial``, +1.5 % for
``mrope_pairs``, what
``vlmkernels`` reads; Liger's M-RoPE kernel reads only the first half of each row, relying
on the halves being equal: B S R e), 3 B S int64 positions (+0.15 %) for
``vlmkernels_positions``, fp32 (S, D) cos/sin for vision (+6.25 %). GB/s and % of the copy
ceiling are therefore exact for ``vlmkernels_positions`` (to 0.2 %) and a lower bound for the
table providers; the summary also prints the table providers' percentage with the used
table lanes counted. FLOP model: 6 (Hq + Hk) B S R per pass (a rotation is 2 multiplies and
an add per rotated output element, fp32 casts counted as work; pass-through lanes are
copies). The op is memory-bound by two orders
of magnitude: TFLOP/s and % of the matmul ceiling are recorded because the harness records
them for every op, and no claim is made from them.

Targets (:mod:`benchmarks.targets`, printed after the sweep as measured in this run; bf16,
``mrope`` shapes): forward at >= 90 % of the copy ceiling for S >= 16384 (``vlmkernels`` and
``vlmkernels_positions``), and fwd+bwd in <= 1/3 of ``compile``'s time at every S (issue 4);
on a GPU the CUDA C++ providers at most the Triton ones' time at S = 16384 (issue 5, every
op of the suite the CUDA C++ kernels take: not ``mrope_pairs``).

Sweep: GPU full S in {1024, 4096, 16384, 65536}; ``--quick`` S in {1024, 16384, 65536}; CPU
S = 2048 (fp32; ``liger`` unavailable there): q, k and their outputs (42 MB and up) overflow
the 32 MiB L3 of the development machines, so the DRAM copy ceiling bounds them
(cache-resident sizes can read above 100 % of it). One S on the CPU: each ``compile`` shape is
a cold Inductor build of several seconds there, and the CPU run must stay within 3 minutes on
2 cores (``--shape S=2048,4096`` sweeps).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from . import targets
from .harness import (
    BuildArgs,
    Case,
    OpSpec,
    Prepared,
    Provider,
    Results,
    RunConfig,
    Skip,
    Suite,
    checksummed,
)
from .targets import Target

# --------------------------------------------------------------------------------------
# Model shapes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RopeConfig:
    """rotary_dim: the lanes rotated (R); lanes R..head_dim pass through unchanged."""

    model: str
    heads_q: int
    heads_k: int
    head_dim: int
    section: tuple[int, int, int]
    interleaved: bool
    vision: bool
    theta: float
    rotary_dim: int
    pairs: bool = False  # lanes (2j, 2j + 1) rotate together (GPT-J; GLM-4V's rotate_half_llm)


CONFIGS = {
    "mrope": RopeConfig("Qwen2-VL-7B text", 28, 4, 128, (16, 24, 24), False, False, 1e6, 128),
    "mrope_interleaved": RopeConfig(
        "Qwen3-VL-8B text", 32, 8, 128, (24, 20, 20), True, False, 1e6, 128
    ),
    # transformers' default Qwen3_5TextConfig heads; theta of the released configs
    "mrope_partial": RopeConfig(
        "Qwen3.5 text (default Qwen3_5TextConfig)", 16, 4, 256, (11, 11, 10), True, False, 1e7, 64
    ),
    # GLM-4.1V-9B: heads of transformers' default Glm4vTextConfig, rotary parameters of the
    # released config (partial_rotary_factor 0.5, mrope_section [8, 12, 12], theta 1e4)
    "mrope_pairs": RopeConfig(
        "GLM-4.1V-9B text", 32, 2, 128, (8, 12, 12), False, False, 1e4, 64, pairs=True
    ),
    "vision_rope": RopeConfig("Qwen2-VL vision", 16, 16, 80, (0, 20, 20), False, True, 1e4, 80),
}

# --------------------------------------------------------------------------------------
# Positions and tables, as the Qwen-VL models build them
# --------------------------------------------------------------------------------------


def text_vision_positions(batch: int, seq: int) -> torch.Tensor:
    """(3, B, S) int64 M-RoPE positions of text, one image block, text (same per row).

    S // 8 text tokens (T = H = W = index), then S - 2 (S // 8) image tokens on a grid of
    width ceil(sqrt(count)) filled row by row (T = start, H = start + row, W = start +
    column), then the remaining text from the image's largest position + 1.
    """
    n_text = seq // 8
    n_image = seq - 2 * n_text
    width = max(1, math.isqrt(max(n_image - 1, 0)) + 1)
    idx = torch.arange(n_image)
    image = torch.stack((torch.full_like(idx, n_text), n_text + idx // width, n_text + idx % width))
    start = int(image.max()) + 1 if n_image else n_text
    before = torch.arange(n_text).expand(3, n_text)
    after = (start + torch.arange(seq - n_text - n_image)).expand(3, -1)
    pos = torch.cat((before, image, after), dim=1)
    return pos.unsqueeze(1).expand(3, batch, seq).contiguous()


def vision_positions(n: int) -> torch.Tensor:
    """(n, 2) int64 (h, w) of the first n patches of a square grid (even side, the smallest
    holding n) in the Qwen-VL towers' 2x2 merge order (each 2x2 block's patches adjacent)."""
    side = max(2, 2 * math.ceil(math.sqrt(n) / 2))
    hpos = torch.arange(side).view(side, 1).expand(side, side)
    wpos = torch.arange(side).view(1, side).expand(side, side)

    def merge_order(p):
        return p.reshape(side // 2, 2, side // 2, 2).permute(0, 2, 1, 3).reshape(-1)

    return torch.stack((merge_order(hpos), merge_order(wpos)), dim=-1)[:n]


def inv_freq_of(dim: int, theta: float) -> torch.Tensor:
    """(dim / 2,) fp32 theta^(-2i/dim), as the rotary classes' default init."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


@dataclass
class RopeInputs:
    """One shape's inputs; ``views()`` gives (q, k) as attention code passes them."""

    leaves: tuple[torch.Tensor, torch.Tensor]
    views: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    grads: tuple[torch.Tensor, torch.Tensor]
    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor
    inv_freq: torch.Tensor
    section: tuple[int, int, int]


def make_inputs(args: BuildArgs) -> RopeInputs:
    cfg = CONFIGS[args.op]
    b, s, d = args.shape["B"], args.shape["S"], cfg.head_dim
    dev, dtype = args.device, args.dtype
    gen = torch.Generator(device=dev).manual_seed(args.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32).to(dtype)

    if cfg.vision:
        if b != 1:
            raise Skip("the vision tower packs patches token-major: no batch axis (B must be 1)")
        qkv = randn(s, 3, cfg.heads_q, d)
        q = qkv[:, 0].detach().requires_grad_()  # strided views of the packed projection
        k = qkv[:, 1].detach().requires_grad_()
        grads = (randn(s, cfg.heads_q, d), randn(s, cfg.heads_k, d))
        hw = vision_positions(s).to(dev)
        freq = inv_freq_of(d // 2, cfg.theta).to(dev)  # D/4 frequencies
        angles = torch.cat((hw[:, :1] * freq, hw[:, 1:] * freq), dim=-1)  # (S, D/2) fp32
        emb = torch.cat((angles, angles), dim=-1)
        positions = torch.cat((torch.zeros_like(hw[:, :1]), hw), dim=-1).T.contiguous()
        return RopeInputs(
            (q, k), lambda: (q, k), grads, emb.cos(), emb.sin(), positions,
            torch.cat((freq, freq)), cfg.section,
        )  # fmt: skip

    q_proj = randn(b, s, cfg.heads_q, d).requires_grad_()
    k_proj = randn(b, s, cfg.heads_k, d).requires_grad_()
    grads = (
        randn(b, s, cfg.heads_q, d).transpose(1, 2),
        randn(b, s, cfg.heads_k, d).transpose(1, 2),
    )
    positions = text_vision_positions(b, s).to(dev)
    inv_freq = inv_freq_of(cfg.rotary_dim, cfg.theta).to(dev)
    angles = positions[..., None].float() * inv_freq  # (3, B, S, R/2) fp32
    if cfg.pairs:  # each frequency twice in a row, as GLM-4V's rotary class lays it out
        emb = angles.repeat_interleave(2, dim=-1)
    else:
        emb = torch.cat((angles, angles), dim=-1)
    return RopeInputs(
        (q_proj, k_proj),
        lambda: (q_proj.transpose(1, 2), k_proj.transpose(1, 2)),
        grads,
        emb.cos().to(dtype),
        emb.sin().to(dtype),
        positions,
        inv_freq,
        cfg.section,
    )


# --------------------------------------------------------------------------------------
# Baselines: transformers' formulas
# --------------------------------------------------------------------------------------


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_formula(q, k, cos, sin, unsqueeze_dim=1):
    """q * cos + rotate_half(q) * sin (and k), cos/sin broadcast over heads."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _partial_rope_formula(q, k, cos, sin, unsqueeze_dim=1):
    """Qwen3.5's rotation: the first R = cos.shape[-1] lanes rotated by the formula above,
    the rest concatenated unchanged."""
    rot = cos.shape[-1]
    q_rot, k_rot = _rope_formula(q[..., :rot], k[..., :rot], cos, sin, unsqueeze_dim)
    return torch.cat((q_rot, q[..., rot:]), dim=-1), torch.cat((k_rot, k[..., rot:]), dim=-1)


def _rotate_pairs(x):
    """GLM-4V's ``rotate_half_llm``: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _paired_rope_formula(q, k, cos, sin, unsqueeze_dim=1):
    """GLM-4V's rotation (transformers >= 5.17): the first R = cos.shape[-1] lanes rotated in
    pairs (2j, 2j + 1), x * cos + rotate_half_llm(x) * sin with cos/sin in pair order, the
    rest concatenated unchanged."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rot = cos.shape[-1]

    def one(x):
        x_rot = x[..., :rot]
        return torch.cat((x_rot * cos + _rotate_pairs(x_rot) * sin, x[..., rot:]), dim=-1)

    return one(q), one(k)


def _vision_formula(q, k, cos, sin):
    """The rotation in fp32, results cast back to q's and k's dtypes."""
    out_q, out_k = _rope_formula(q.float(), k.float(), cos.float(), sin.float(), -2)
    return out_q.to(q.dtype), out_k.to(k.dtype)


def _transformers_module(model: str):
    """(transformers.models.<model>.modeling_<model>, transformers' version), or (None, None)
    where it does not import (the callers then write the formulas out)."""
    try:
        import transformers

        module = importlib.import_module(f"transformers.models.{model}.modeling_{model}")
        return module, transformers.__version__
    except Exception:  # noqa: BLE001 - any import failure falls back to the formulas
        return None, None


@functools.cache
def hf_functions() -> tuple[Callable, Callable, str]:
    """(apply_rotary_pos_emb, apply_rotary_pos_emb_vision, note): transformers' own where
    the installed version has them, else the formulas written out."""
    module, version = _transformers_module("qwen2_vl")
    text = getattr(module, "apply_rotary_pos_emb", None)
    vision = getattr(module, "apply_rotary_pos_emb_vision", None)
    if version is None:
        note = "transformers not importable: formulas written out"
    else:
        used = [n for n, f in (("apply_rotary_pos_emb", text), ("..._vision", vision)) if f]
        note = f"transformers {version} qwen2_vl {', '.join(used) or 'none'}"
        if not text or not vision:
            note += "; missing ones written out"
    return text or _rope_formula, vision or _vision_formula, note


@functools.cache
def hf_partial_function() -> tuple[Callable, str]:
    """(apply_rotary_pos_emb, note) of Qwen3.5 (partial rotary): transformers' own where the
    installed version has it, else the formula written out."""
    module, version = _transformers_module("qwen3_5")
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is not None:
        return fn, f"transformers {version} qwen3_5 apply_rotary_pos_emb"
    if version is None:
        note = "transformers' qwen3_5 not importable: formula written out"
    else:
        note = f"transformers {version} has no qwen3_5 apply_rotary_pos_emb: formula written out"
    return _partial_rope_formula, note


@functools.cache
def hf_pairs_function() -> tuple[Callable, str, str]:
    """(apply_rotary_pos_emb, the table order it takes, note) of GLM-4V (paired lanes,
    partial rotary): transformers' own where the installed version has it and takes a known
    order, else the formula written out (pair-ordered tables)."""
    from vlmkernels.integrations.tables.qwen_vl import paired_table_order

    module, version = _transformers_module("glm4v")
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if fn is not None:
        try:
            order = paired_table_order(fn)
        except Exception:  # noqa: BLE001 - another signature: neither order
            order = None
        if order is not None:
            return fn, order, f"transformers {version} glm4v apply_rotary_pos_emb ({order} tables)"
        note = (
            f"transformers {version} glm4v apply_rotary_pos_emb takes its tables in no "
            "known order: formula written out"
        )
    elif version is None:
        note = "transformers' glm4v not importable: formula written out"
    else:
        note = f"transformers {version} has no glm4v apply_rotary_pos_emb: formula written out"
    return _paired_rope_formula, "pairs", note


def merge_chunked(table: torch.Tensor, section) -> torch.Tensor:
    """(3, B, S, D) -> (B, S, D) as transformers <= 5.16's apply_multimodal_rotary_pos_emb
    merged its tables: lanes split in chunks of sizes section * 2, chunk i from axis i % 3."""
    chunks = table.split(list(section) * 2, dim=-1)
    return torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)


def merge_interleaved(table: torch.Tensor, section) -> torch.Tensor:
    """(3, B, S, D) -> (B, S, D) by Qwen3-VL's recomposition rule on the first half (T
    everywhere, H on lanes 1, 4, ... below 3 section[1], W on lanes 2, 5, ... below
    3 section[2]), duplicated; out of place."""
    half = table.shape[-1] // 2
    merged = table[0, ..., :half].clone()
    for axis in (1, 2):
        lanes = slice(axis, 3 * section[axis], 3)
        merged[..., lanes] = table[axis, ..., lanes]
    return torch.cat((merged, merged), dim=-1)


def merge_pairs(table: torch.Tensor, section, order: str = "pairs") -> torch.Tensor:
    """(3, B, S, R) pair-ordered -> (B, S, R) as GLM-4V's rotary class builds its tables from
    the per-frequency values (every other lane here): ``recomposition_frequencies``' chunk i
    of ``section`` from axis i % 3, then ``repeat_interleave(2)`` (order "pairs"), or
    duplicated halves [f | f] (order "halves", 5.16's class, whose function reorders)."""
    freq = table[..., 0::2]
    chunks = freq.split(list(section), dim=-1)
    merged = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)
    if order == "halves":
        return torch.cat((merged, merged), dim=-1)
    return merged.repeat_interleave(2, dim=-1)


def mrope_eager(q, k, cos, sin, section, apply=_rope_formula):
    """transformers <= 5.16 ``apply_multimodal_rotary_pos_emb(..., unsqueeze_dim=1)``;
    ``apply`` is ``apply_rotary_pos_emb``."""
    return apply(q, k, merge_chunked(cos, section), merge_chunked(sin, section), unsqueeze_dim=1)


def mrope_interleaved_eager(q, k, cos, sin, section, apply=_rope_formula):
    """Qwen3-VL: the rotary class's recomposition, then ``apply`` (``apply_rotary_pos_emb``)."""
    return apply(
        q, k, merge_interleaved(cos, section), merge_interleaved(sin, section), unsqueeze_dim=1
    )


def mrope_pairs_eager(q, k, cos, sin, section, apply=_paired_rope_formula, order="pairs"):
    """GLM-4V: the rotary class's recomposition and lane order, then ``apply``
    (``apply_rotary_pos_emb``, which takes tables in ``order``)."""
    merged = merge_pairs(cos, section, order), merge_pairs(sin, section, order)
    return apply(q, k, *merged, unsqueeze_dim=1)


def vision_eager(q, k, cos, sin, section=None, apply=_vision_formula):
    """``apply`` (``apply_rotary_pos_emb_vision``, fp32 upcast); ``section`` is unused."""
    return apply(q, k, cos, sin)


EAGER = {
    "mrope": mrope_eager,
    "mrope_interleaved": mrope_interleaved_eager,
    "mrope_partial": mrope_interleaved_eager,  # with Qwen3.5's apply_rotary_pos_emb
    "mrope_pairs": mrope_pairs_eager,  # with GLM-4V's apply_rotary_pos_emb
    "vision_rope": vision_eager,
}


def eager_function(op: str, section) -> tuple[Callable, str]:
    """(fn(q, k, cos, sin), note): the op's eager baseline bound to the installed
    transformers functions (resolved here, outside any torch.compile trace)."""
    text, vision, note = hf_functions()
    extra = {}
    if op == "mrope_partial":
        text, note = hf_partial_function()
    elif op == "mrope_pairs":
        text, extra["order"], note = hf_pairs_function()
    apply = vision if CONFIGS[op].vision else text
    fn = functools.partial(EAGER[op], section=section, apply=apply, **extra)
    if op == "mrope":
        note = "<= 5.16 table merge written out; " + note
    elif op == "mrope_interleaved":
        note = "Qwen3-VL recomposition (timed) written out; " + note
    elif op == "mrope_partial":
        rot = CONFIGS[op].rotary_dim
        note = (
            f"Qwen3.5 recomposition (timed) written out on the {rot}-lane tables; {note} "
            f"(rotates lanes :{rot}, concatenates the rest)"
        )
    elif op == "mrope_pairs":
        rot = CONFIGS[op].rotary_dim
        layout = "repeat_interleave(2)" if extra["order"] == "pairs" else "[f | f] (5.16's)"
        note = (
            f"GLM-4V recomposition + {layout} (timed) written out on the {rot}-lane tables; "
            f"{note} (rotates lane pairs of :{rot}, concatenates the rest)"
        )
    return fn, note


# --------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------


def _prepared(inp: RopeInputs, apply: Callable, note: str) -> Prepared:
    """The harness's fn: the first call returns L exactly (the ``loss`` row), later calls
    the uninitialised scalar; both back-propagate G_q, G_k."""
    fn = checksummed(lambda: apply(*inp.views()), lambda outs: inp.grads)
    q, k = inp.views()  # the op alone, on the views attention code passes (host-time mode)
    return Prepared(fn, inp.leaves, note, call=lambda: apply(q, k))


def _backend_note(q: torch.Tensor, forced: str | None) -> str:
    if forced is not None:
        return f"backend={forced} (forced)"
    try:
        from vlmkernels.core.backend import resolve_backend

        return f"backend={resolve_backend('rope', q)}"
    except Exception:  # noqa: BLE001 - informative only
        return ""


def _on_backend(apply: Callable, backend: str | None) -> Callable:
    """``apply`` with ``backend`` forced (the op's backward follows the forward's choice)."""
    if backend is None:
        return apply

    def forced(q, k):
        import vlmkernels

        with vlmkernels.use_backend(backend):
            return apply(q, k)

    return forced


def _kernel_backend(args: BuildArgs, cuda: bool) -> str | None:
    """Which backend a vlmkernels provider forces: on a GPU the Triton or the CUDA C++
    kernels, so both are measured whatever ``vlmkernels tune`` made the default; on the CPU
    none (the PyTorch path, the only one there)."""
    if args.device.type != "cuda":
        return None
    return "cuda" if cuda else "triton"


def build_vlmkernels(args: BuildArgs, cuda: bool = False) -> Prepared:
    import vlmkernels

    cfg, inp = CONFIGS[args.op], make_inputs(args)
    if cfg.vision:
        apply = lambda q, k: vlmkernels.vision_rope(q, k, inp.cos, inp.sin)
        what = "vision_rope from fp32 (S, D) tables"
    else:
        apply = lambda q, k: vlmkernels.mrope(
            q, k, inp.cos, inp.sin, list(inp.section), interleaved=cfg.interleaved,
            pairs=cfg.pairs,
        )  # fmt: skip
        r = "D" if cfg.rotary_dim == cfg.head_dim else cfg.rotary_dim
        what = f"mrope from (3, B, S, {r}) tables" + (", pairs=True" if cfg.pairs else "")
    backend = _kernel_backend(args, cuda)
    note = "; ".join(x for x in (what, _backend_note(inp.leaves[0], backend)) if x)
    return _prepared(inp, _on_backend(apply, backend), note)


def build_vlmkernels_positions(args: BuildArgs, cuda: bool = False) -> Prepared:
    import vlmkernels

    cfg, inp = CONFIGS[args.op], make_inputs(args)

    def apply(q, k):
        return vlmkernels.mrope_from_positions(
            q, k, inp.positions, inp.inv_freq, list(inp.section), interleaved=cfg.interleaved,
            pairs=cfg.pairs,
        )  # fmt: skip

    what = "mrope_from_positions, angles in the kernel" + (", pairs=True" if cfg.pairs else "")
    if cfg.vision:
        what += f"; vision as chunked M-RoPE, section {list(inp.section)}, positions (0, h, w)"
    backend = _kernel_backend(args, cuda)
    note = "; ".join(x for x in (what, _backend_note(inp.leaves[0], backend)) if x)
    return _prepared(inp, _on_backend(apply, backend), note)


def cuda_extension_available(device: torch.device) -> str | None:
    """None where the CUDA C++ kernels can run on ``device``, else the reason."""
    if device.type != "cuda":
        return "the CUDA C++ backend runs on CUDA tensors only"
    from vlmkernels.core import cuda as _cuda

    ok, why = _cuda.status()
    return None if ok else why


# Ops the CUDA C++ kernels do not take: their providers are unavailable with this reason,
# wherever the suite runs
CUDA_MISSING = {
    "mrope_pairs": "the CUDA C++ kernels rotate halves only: paired lanes (pairs=True) run on "
    "the Triton backend (vlmkernels.ops.rope.cuda.fits is False for them, a forced 'cuda' "
    "backend raises)",
}


def cuda_available(op: str) -> Callable[[torch.device], str | None]:
    def check(device: torch.device) -> str | None:
        return CUDA_MISSING.get(op) or cuda_extension_available(device)

    return check


def build_eager(args: BuildArgs) -> Prepared:
    inp = make_inputs(args)
    fn, note = eager_function(args.op, inp.section)
    return _prepared(inp, lambda q, k: fn(q, k, inp.cos, inp.sin), note)


def build_compile(args: BuildArgs) -> Prepared:
    backend = args.options.get("compile_backend", "inductor")
    torch._dynamo.reset()
    inp = make_inputs(args)
    fn, note = eager_function(args.op, inp.section)
    compiled = torch.compile(fn, backend=backend, dynamic=False)
    note = (
        f"torch.compile(backend={backend}, dynamic=False) of eager ({note}); compile time excluded"
    )
    return _prepared(inp, lambda q, k: compiled(q, k, inp.cos, inp.sin), note)


LIGER_FUNCTIONS = {
    "mrope": ("liger_kernel.transformers.qwen2vl_mrope", "liger_multimodal_rotary_pos_emb"),
    "mrope_interleaved": ("liger_kernel.transformers.rope", "liger_rotary_pos_emb"),
    "vision_rope": ("liger_kernel.transformers.rope", "liger_rotary_pos_emb_vision"),
}
# Ops Liger has no function for: the provider is unavailable with this reason, wherever it runs
LIGER_MISSING = {
    "mrope_partial": "Liger has no partial-rotary (M-)RoPE: its RoPE kernel rotates the whole "
    "head (cos/sin as wide as q) and apply_liger_kernel_to_qwen3_5(rope=True) raises "
    "NotImplementedError (liger-kernel 0.8.2 source)",
    "mrope_pairs": "Liger has no paired-lane (GPT-J, lanes 2j and 2j + 1) RoPE: its RoPE and "
    "M-RoPE kernels rotate halves (lane j with j + D/2, cos/sin as wide as q) and "
    "apply_liger_kernel_to_glm4v(rope=True) raises NotImplementedError (Liger-Kernel source)",
}
LIGER_NOTES = {
    "mrope": "liger_multimodal_rotary_pos_emb on the (3, B, S, D) tables; in place",
    "mrope_interleaved": "Liger has no interleaved M-RoPE: torch recomposition (timed) + "
    "liger_rotary_pos_emb, as its Qwen3-VL patch runs; in place",
    "vision_rope": "liger_rotary_pos_emb_vision: fp32 upcast copies, rotated in place",
}


def liger_function(op: str) -> tuple[Callable | None, str]:
    """(Liger's function for ``op``, '') or (None, why not)."""
    if op in LIGER_MISSING:
        return None, LIGER_MISSING[op]
    module_name, name = LIGER_FUNCTIONS[op]
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - a broken install is a reason, not a crash
        return None, f"{module_name} not importable ({type(exc).__name__}: {exc})"
    fn = getattr(module, name, None)
    if fn is None:
        try:
            version = importlib.import_module("liger_kernel").__version__
        except Exception:  # noqa: BLE001
            version = "?"
        return None, f"{module_name}.{name} missing in liger_kernel {version}"
    return fn, ""


def liger_available(op: str) -> Callable[[torch.device], str | None]:
    def check(device: torch.device) -> str | None:
        if op in LIGER_MISSING:
            return LIGER_MISSING[op]
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel is not importable (pip install liger-kernel)"
        if device.type != "cuda":
            return "Liger's Triton kernels need CUDA"
        return liger_function(op)[1] or None

    return check


def build_liger(args: BuildArgs) -> Prepared:
    fn, reason = liger_function(args.op)
    if fn is None:
        raise Skip(reason)
    inp = make_inputs(args)
    section = inp.section
    if args.op == "mrope":
        apply = lambda q, k: fn(q, k, inp.cos, inp.sin, list(section))
    elif args.op == "mrope_interleaved":
        apply = lambda q, k: fn(
            q, k, merge_interleaved(inp.cos, section), merge_interleaved(inp.sin, section)
        )
    else:
        apply = lambda q, k: fn(q, k, inp.cos, inp.sin)
    return _prepared(inp, apply, LIGER_NOTES[args.op])


def _providers(op: str) -> tuple[Provider, ...]:
    return (
        Provider("vlmkernels", build_vlmkernels),
        Provider("vlmkernels_positions", build_vlmkernels_positions),
        Provider(
            "vlmkernels_cuda",
            functools.partial(build_vlmkernels, cuda=True),
            available=cuda_available(op),
        ),
        Provider(
            "vlmkernels_cuda_positions",
            functools.partial(build_vlmkernels_positions, cuda=True),
            available=cuda_available(op),
        ),
        Provider("eager", build_eager),
        Provider("compile", build_compile),
        Provider("liger", build_liger, available=liger_available(op)),
    )


# --------------------------------------------------------------------------------------
# Cost models, grid, suite
# --------------------------------------------------------------------------------------

_PASSES = {"fwd": 1, "bwd": 1, "fwd+bwd": 2}


def qk_elements(op: str, shape: Mapping[str, int]) -> int:
    """Elements of q and k together: (Hq + Hk) B S D."""
    cfg = CONFIGS[op]
    return (cfg.heads_q + cfg.heads_k) * shape["B"] * shape["S"] * cfg.head_dim


def table_bytes(op: str, shape: Mapping[str, int], itemsize: int) -> int:
    """Bytes of the table lanes a table provider must read per pass (not in the byte model):
    cos and sin over the rotary dim R, each lane from one axis; fp32 for vision."""
    cfg = CONFIGS[op]
    return 2 * shape["B"] * shape["S"] * cfg.rotary_dim * (4 if cfg.vision else itemsize)


def flop_model(op: str) -> Callable[[Mapping[str, int], str], float]:
    def flops(shape: Mapping[str, int], mode: str) -> float:
        """6 (Hq + Hk) B S R per pass, R the rotary dim (pass-through lanes are copies; not
        for percent claims: the op is memory-bound)."""
        cfg = CONFIGS[op]
        rotated = qk_elements(op, shape) // cfg.head_dim * cfg.rotary_dim
        return float(6 * _PASSES[mode] * rotated)

    return flops


def byte_model(op: str) -> Callable[[Mapping[str, int], str, int], float]:
    def nbytes(shape: Mapping[str, int], mode: str, itemsize: int) -> float:
        """2 (Hq + Hk) B S D e per pass: q, k read and outputs written over the whole head
        dim D, pass-through lanes included (gradients in bwd)."""
        return float(2 * _PASSES[mode] * qk_elements(op, shape) * itemsize)

    return nbytes


def grid(profile: str) -> dict[str, list[int]]:
    if profile == "cpu":
        return {"B": [1], "S": [2048]}
    if profile == "quick":
        return {"B": [1], "S": [1024, 16384, 65536]}
    return {"B": [1], "S": [1024, 4096, 16384, 65536]}


OPS = tuple(OpSpec(op, _providers(op), flop_model(op), byte_model(op)) for op in CONFIGS)

# --------------------------------------------------------------------------------------
# Targets (benchmarks/targets.py), evaluated on this run's measurements only
# --------------------------------------------------------------------------------------


def _case(op: str, provider: str, mode: str, s: int) -> Case:
    return Case(op, provider, mode, (("B", 1), ("S", s)), "bfloat16")


def _shown(t: Target, cfg: RunConfig) -> bool:
    """The CUDA C++ providers' targets are printed on a GPU only."""
    return cfg.device.type == "cuda" or not t.provider.startswith("vlmkernels_cuda")


def _bandwidth_line(results: Results, t: Target) -> str:
    s = t.shape_dict["S"]
    label = f"  {t.mode} S={s} {t.provider} % of copy ceiling: target {t.text} (issue {t.issue})"
    verdict = t.evaluate(results)
    if not verdict.measured:
        return f"{label}: not measured ({verdict.reason})"
    pct = verdict.value
    gbps = results.get(t.case(), "gbps").value
    extra = ""
    if t.provider in ("vlmkernels", "vlmkernels_cuda") and gbps:
        shape = t.shape_dict
        qk = byte_model(t.op)(shape, t.mode, 2)
        with_tables = pct * (qk + table_bytes(t.op, shape, 2)) / qk
        extra = f"; {with_tables:.1f} % counting the used table lanes"
    return (
        f"{label}: {pct:.1f} ({gbps:.0f} GB/s of q/k bytes{extra}): "
        f"{'HIT' if verdict.hit else 'MISS'}"
    )


def _speed_line(results: Results, t: Target) -> str:
    s = t.shape_dict["S"]
    label = f"  {t.mode} S={s} {t.provider} ms / {t.baseline} ms: target {t.text} (issue {t.issue})"
    verdict = t.evaluate(results)
    if not verdict.measured:
        return f"{label}: not measured ({verdict.reason})"
    return (
        f"{label}: {verdict.value:.3g} (= {verdict.num.value:.4g} / {verdict.den.value:.4g}): "
        f"{'HIT' if verdict.hit else 'MISS'}"
    )


def _backend_comparison(results: Results) -> list[str]:
    """The CUDA C++ providers' time over the Triton ones' (per op, angle source and mode)
    at the shape of the issue's "at least as fast" target."""
    found = targets.for_suite("rope", baseline="vlmkernels") + targets.for_suite(
        "rope", baseline="vlmkernels_positions"
    )
    found = sorted(found, key=targets.TARGETS.index)
    first = found[0]
    lines = [
        f"CUDA C++ / Triton time at S={first.shape_dict['S']} (target {first.text}, "
        f"{targets.issues(found)}):"
    ]
    for t in found:
        label = f"  {t.op} {t.mode} {t.provider} / {t.baseline}"
        verdict = t.evaluate(results)
        if not verdict.measured:
            lines.append(f"{label}: not measured ({verdict.reason})")
            continue
        ratio, a, b = verdict.value, verdict.num.value, verdict.den.value
        margin = "" if verdict.hit else f" by {100 * (ratio / t.bound - 1):.1f} %"
        lines.append(f"{label}: {ratio:.3f} ({a:.4g} / {b:.4g} ms): "
                     f"{'HIT' if verdict.hit else 'MISS'}{margin}")  # fmt: skip
    return lines


def summarize(results: Results, cfg: RunConfig) -> list[str]:
    """The targets of :mod:`benchmarks.targets` for this suite (``mrope`` on the
    Qwen2-VL-7B shapes, B = 1, bf16; on a GPU also the CUDA C++ / Triton comparison)."""
    bandwidth = targets.for_suite("rope", metric="pct_copy_ceiling")
    speed = targets.for_suite("rope", metric="ms", baseline="compile")
    op = bandwidth[0].op
    lines = [
        f"Targets ({op}: {CONFIGS[op].model} shapes, B=1, bfloat16; "
        f"{targets.issues(bandwidth + speed)}, benchmarks/targets.py):"
    ]
    lines += [_bandwidth_line(results, t) for t in bandwidth if _shown(t, cfg)]
    lines += [_speed_line(results, t) for t in speed if _shown(t, cfg)]
    if cfg.device.type == "cuda":
        lines += _backend_comparison(results)
    else:
        lines.append(
            "  (no CUDA device: this run was a CPU sweep, whose shapes and dtype "
            "differ from the targets')"
        )
    return lines


SUITE = Suite(
    name="rope",
    ops=OPS,
    grid=grid,
    x_name="S",
    default_modes=("fwd", "bwd", "fwd+bwd"),
    summarize=summarize,
    host_shape={"B": 1, "S": 8},
)
