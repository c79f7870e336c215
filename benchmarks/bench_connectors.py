r"""Connector family: the LLaVA projector, the Idefics3 connector (pixel shuffle + Linear),
InternVL's connector (pixel shuffle + LayerNorm + MLP), the Qwen2.5-VL patch merger, Gemma
3's projector (pooling + RMSNorm + matmul), Aya Vision's SwiGLU projector and Qwen3-VL's
DeepStack add.

Ops (model shapes on a GPU; tiny ones on the CPU, where only the PyTorch paths run):

- ``llava_projector``: Linear(K -> N) + exact GELU + Linear(N -> N) over M tokens
  (LLaVA-1.5: K 1024, N 4096, 576 tokens per image).
- ``idefics3_connector``: B images of S x S patches, C channels, pixel shuffle by 2, then
  Linear(4C -> N) without bias (Idefics3: S 32, C 1152, N 4096).
- ``internvl_connector``: IB images of S x S patches, IC channels, InternVL's pixel shuffle
  (scale 0.5: two permuted copies), then LayerNorm(4 IC) + Linear(4 IC -> IN) + GELU +
  Linear(IN -> IN) (InternVL2.5/3 with InternViT-300M: S 32, IC 1024, IN 4096; 64 images
  in ``../shared/notes/fusion.md``); vlmkernels runs it as one merger, the shuffle as the
  GEMM's addressing (what the patched ``InternVLModel`` runs).
- ``qwen_merger``: P patches of C channels, RMSNorm per patch, 2 x 2 merge, Linear(4C ->
  4C) + GELU + Linear(4C -> N) (Qwen2.5-VL-7B: C 1280, N 3584, shape keys QC and QN; 4
  images of 1024 x 1024 are P = 4 x 5476 patches).
- ``gemma3_projector``: GB images of GS x GS patches, GC channels, Gemma 3's projector:
  AvgPool2d(GK) of the patch grid, Gemma's RMSNorm (x / rms(x) (1 + w), fp32), @ W (GC x
  GN) (Gemma 3 4B: GS 64, GK 4, GC 1152, GN 2560; 8 pan-and-scan crops); vlmkernels runs
  what the patched ``Gemma3MultiModalProjector`` runs, ``pool_tokens(kind="avg")`` then one
  merger with the norm in the GEMM.
- ``swiglu_projector``: AB tiles of AS x AS patches, AC channels, Aya Vision's projector:
  pixel shuffle by 2 (Idefics3's order), LayerNorm(4 AC), Linear(4 AC -> 2 AI), the SwiGLU
  v SiLU(g) of its halves, Linear(AI -> AN), at Command A Vision's sizes (transformers'
  ``Cohere2VisionConfig`` defaults: 512 / 16 = 32 patches a side, AC 1152,
  alignment_intermediate_size 2 AI = 36864, AN 8192; its projector is Aya's without the
  norm) for 8 tiles; vlmkernels runs what the patched ``AyaVisionMultiModalProjector``
  runs, one merger with ``activation="swiglu"``.
- ``deepstack``: hidden (B, L, D), half the positions visual (Qwen3-VL-8B: D 4096); bytes:
  the hidden states read and written and the visual half's embeddings read, 2.5 B L D e.

Inputs: random normal in the run's dtype (bf16 on a GPU, fp32 on the CPU), the features
``requires_grad``, the weights too (their gradients are part of fwd+bwd). Each call ends in
L = sum(y * G) with a fixed random G, so the backward pass starts from G.

Providers: ``vlmkernels`` (the ops; the Triton kernels on CUDA, the PyTorch path on the
CPU), ``eager`` (the transformers modules' formulas written out: ``pixel_shuffle`` with
view / permute / reshape (InternVL's with its two ``.contiguous()`` copies),
``F.layer_norm``, ``F.linear``, ``F.gelu``, the RMSNorm in fp32 then rounded, Gemma 3's
channels-first copy, ``F.avg_pool2d`` and ``torch.matmul``,
``_deepstack_process`` with its clone), ``compile`` (``torch.compile`` of the eager
function; CUDA only, to keep the CPU suite quick).

Cost models: FLOPs of the GEMMs (2 M K N per linear per pass, x3 for fwd+bwd); bytes: the
features read and the output written once per pass.

Saved activations (metric ``saved_mb``, every provider, on the CPU too: sizes only): the op
call alone runs once under ``torch.autograd.graph.saved_tensors_hooks``; the metric is the
sum of the ``nbytes`` of the unique storages of the tensors autograd packs for the backward,
the storages of the op's inputs and parameters excluded (every provider holds those), in
MiB. Eager's LLaVA projector keeps h and GELU(h) (2 M N elements); vlmkernels' none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

import vlmkernels.ops.connectors as C
from vlmkernels.ops.tokens import pool_tokens

from . import targets
from .harness import BuildArgs, OpSpec, Prepared, Provider, Suite, checksummed

_CUDA_ONLY = "torch.compile is timed on CUDA only (the CPU suite times the PyTorch paths)"


def _gen(args: BuildArgs):
    gen = torch.Generator(device="cpu").manual_seed(args.seed)

    def randn(*shape, scale=1.0, grad=True):
        t = (torch.randn(*shape, generator=gen) * scale).to(args.device, args.dtype)
        return t.requires_grad_(grad)

    return randn


def _inputs(args: BuildArgs) -> tuple[dict, torch.Tensor]:
    """(tensors, output gradient G) for the op's shape."""
    s, r = args.shape, _gen(args)
    if args.op == "llava_projector":
        m, k, n = s["M"], s["K"], s["N"]
        t = dict(x=r(m, k), w1=r(n, k, scale=k**-0.5), b1=r(n), w2=r(n, n, scale=n**-0.5),
                 b2=r(n))  # fmt: skip
        out = (m, n)
    elif args.op == "idefics3_connector":
        b, side, c, n = s["B"], s["S"], s["C"], s["N"]
        t = dict(x=r(b, side * side, c), w=r(n, 4 * c, scale=(4 * c) ** -0.5))
        out = (b, side * side // 4, n)
    elif args.op == "internvl_connector":
        b, side, c, n = s["IB"], s["S"], s["IC"], s["IN"]
        k = 4 * c
        t = dict(x=r(b, side * side, c), lw=r(k), lb=r(k), w1=r(n, k, scale=k**-0.5),
                 b1=r(n), w2=r(n, n, scale=n**-0.5), b2=r(n))  # fmt: skip
        out = (b, side * side // 4, n)
    elif args.op == "qwen_merger":
        p, c, n = s["P"], s["QC"], s["QN"]
        k = 4 * c
        t = dict(x=r(p, c), nw=r(c), w1=r(k, k, scale=k**-0.5), b1=r(k),
                 w2=r(n, k, scale=k**-0.5), b2=r(n))  # fmt: skip
        out = (p // 4, n)
    elif args.op == "swiglu_projector":
        b, side, c, i, n = s["AB"], s["AS"], s["AC"], s["AI"], s["AN"]
        k = 4 * c
        t = dict(x=r(b, side * side, c), lw=r(k), lb=r(k), w1=r(2 * i, k, scale=k**-0.5),
                 b1=r(2 * i), w2=r(n, i, scale=i**-0.5), b2=r(n))  # fmt: skip
        out = (b, side * side // 4, n)
    elif args.op == "gemma3_projector":
        b, side, k, c, n = s["GB"], s["GS"], s["GK"], s["GC"], s["GN"]
        t = dict(x=r(b, side * side, c), nw=r(c, scale=0.1), w=r(c, n, scale=c**-0.5))
        out = (b, (side // k) ** 2, n)
    else:
        b, length, d = s["B"], s["L"], s["D"]
        gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
        mask = (torch.rand(b, length, generator=gen) < 0.5).to(args.device)
        t = dict(hidden=r(b, length, d), mask=mask, embeds=r(int(mask.sum()), d))
        out = (b, length, d)
    return t, _gen(args)(*out, grad=False)


def _pixel_shuffle_eager(x, s):
    b, n, c = x.shape
    h = w = int(n**0.5)
    x = x.view(b, h, w // s, c * s).permute(0, 2, 1, 3)
    x = x.reshape(b, w // s, h // s, c * s * s).permute(0, 2, 1, 3)
    return x.reshape(b, n // (s * s), c * s * s)


def _internvl_shuffle_eager(x, scale_factor=0.5):
    """InternVLModel.get_image_features' reshape + pixel_shuffle + reshape."""
    b, n, c = x.shape
    side = int(n**0.5)
    x = x.reshape(b, side, side, c)
    x = x.view(b, side, int(side * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(b, int(side * scale_factor), int(side * scale_factor),
               int(c / scale_factor**2))  # fmt: skip
    x = x.permute(0, 2, 1, 3).contiguous()
    return x.reshape(b, -1, x.shape[-1])


def _rms_eager(x, w, eps=1e-6):
    v = x.float()
    v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    return w * v.to(x.dtype)


def _gemma3_eager(x, nw, w, k):
    """Gemma3MultiModalProjector.forward with its Gemma3RMSNorm (eps 1e-6)."""
    b, n, c = x.shape
    side = int(n**0.5)
    g = x.transpose(1, 2).reshape(b, c, side, side).contiguous()
    p = F.avg_pool2d(g, k).flatten(2).transpose(1, 2)
    v = p.float()
    v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
    return torch.matmul((v * (1.0 + nw.float())).type_as(p), w).type_as(x)


def _gemma3_ours(x, nw, w, k):
    """What the patched Gemma3MultiModalProjector runs."""
    b, n, c = x.shape
    side = int(n**0.5)
    t = side // k
    pooled = pool_tokens(x, (side, side), "avg", (t, t))
    y = C.merger(pooled.reshape(-1, c), w.t(), norm="rmsnorm", norm_weight=1.0 + nw.float(),
                 merge_size=1)  # fmt: skip
    return y.view(b, t * t, w.shape[1]).type_as(x)


def _eager(op: str, shape: Mapping[str, int]) -> Callable:
    if op == "gemma3_projector":
        return lambda x, nw, w: _gemma3_eager(x, nw, w, shape["GK"])
    if op == "llava_projector":
        return lambda x, w1, b1, w2, b2: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    if op == "idefics3_connector":
        return lambda x, w: F.linear(_pixel_shuffle_eager(x, 2), w)
    if op == "internvl_connector":

        def internvl(x, lw, lb, w1, b1, w2, b2):
            h = F.layer_norm(_internvl_shuffle_eager(x), (lw.shape[0],), lw, lb, 1e-5)
            return F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2)

        return internvl
    if op == "swiglu_projector":

        def aya(x, lw, lb, w1, b1, w2, b2):
            h = F.layer_norm(_pixel_shuffle_eager(x, 2), (lw.shape[0],), lw, lb, 1e-6)
            v, gate = F.linear(h, w1, b1).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * v, w2, b2)

        return aya
    if op == "qwen_merger":

        def merger(x, nw, w1, b1, w2, b2):
            h = _rms_eager(x, nw).view(-1, 4 * x.shape[-1])
            return F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2)

        return merger

    def deepstack(hidden, mask, embeds):
        hidden = hidden.clone()
        hidden[mask, :] = hidden[mask, :] + embeds
        return hidden

    return deepstack


def _ours(op: str, shape: Mapping[str, int]) -> Callable:
    if op == "gemma3_projector":
        return lambda x, nw, w: _gemma3_ours(x, nw, w, shape["GK"])
    if op == "llava_projector":
        return C.mlp_projector
    if op == "idefics3_connector":
        return lambda x, w: C.merger(x, w, layout="grid")
    if op == "internvl_connector":
        return lambda x, lw, lb, w1, b1, w2, b2: C.merger(
            x, w1, b1, w2, b2, layout="grid", norm="layernorm", norm_weight=lw, norm_bias=lb,
            eps=1e-5, norm_before_merge=False)  # fmt: skip
    if op == "swiglu_projector":
        return lambda x, lw, lb, w1, b1, w2, b2: C.merger(
            x, w1, b1, w2, b2, layout="grid", norm="layernorm", norm_weight=lw, norm_bias=lb,
            norm_before_merge=False, activation="swiglu")  # fmt: skip
    if op == "qwen_merger":
        return lambda x, nw, w1, b1, w2, b2: C.merger(x, w1, b1, w2, b2, norm="rmsnorm",
                                                      norm_weight=nw)  # fmt: skip
    return C.deepstack_add


def saved_bytes(call: Callable[[], object], exclude: Iterable[torch.Tensor]) -> int:
    """Bytes autograd keeps for the backward of ``call()``: the sum of ``nbytes`` of the
    unique storages of the tensors packed while it runs (its graph kept alive until they are
    counted), the storages of ``exclude`` (the inputs and parameters) left out."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call()
    del out
    return sum(kept.values())


def _prepared(args: BuildArgs, fn: Callable, note: str) -> Prepared:
    tensors, grad = _inputs(args)
    values = list(tensors.values())

    def call():
        return fn(*values)

    def metrics():
        return {"saved_mb": saved_bytes(call, values) / 2**20}

    # the timed calls pay for the op alone (G passed to its backward as it is), as in the
    # other suites; a loss built as (out * G).sum() added a cast, a product and a sum per call
    timed = checksummed(call, lambda outs: (grad,))
    leaves = tuple(t for t in values if t.requires_grad)
    return Prepared(timed, leaves, note, call=call, metrics=metrics)


def build_vlmkernels(args: BuildArgs) -> Prepared:
    return _prepared(args, _ours(args.op, args.shape), "")


def build_eager(args: BuildArgs) -> Prepared:
    return _prepared(args, _eager(args.op, args.shape), "transformers' formulas")


def build_compile(args: BuildArgs) -> Prepared:
    torch._dynamo.reset()
    fn = torch.compile(_eager(args.op, args.shape))
    return _prepared(args, fn, "torch.compile, static shapes")


def _cuda_only(device: torch.device) -> str | None:
    return None if device.type == "cuda" else _CUDA_ONLY


PROVIDERS = (
    Provider("vlmkernels", build_vlmkernels),
    Provider("eager", build_eager),
    Provider("compile", build_compile, available=_cuda_only),
)

_PASSES = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}


def _gemms(op: str, s: Mapping[str, int]) -> list[tuple[int, int, int]]:
    if op == "llava_projector":
        return [(s["M"], s["K"], s["N"]), (s["M"], s["N"], s["N"])]
    if op == "idefics3_connector":
        return [(s["B"] * s["S"] ** 2 // 4, 4 * s["C"], s["N"])]
    if op == "internvl_connector":
        m = s["IB"] * s["S"] ** 2 // 4
        return [(m, 4 * s["IC"], s["IN"]), (m, s["IN"], s["IN"])]
    if op == "swiglu_projector":
        m = s["AB"] * s["AS"] ** 2 // 4
        return [(m, 4 * s["AC"], 2 * s["AI"]), (m, s["AI"], s["AN"])]
    if op == "qwen_merger":
        k = 4 * s["QC"]
        return [(s["P"] // 4, k, k), (s["P"] // 4, k, s["QN"])]
    if op == "gemma3_projector":
        return [(s["GB"] * (s["GS"] // s["GK"]) ** 2, s["GC"], s["GN"])]
    return []


def _flops(op: str):
    def flops(shape: Mapping[str, int], mode: str) -> float:
        """2 M K N per linear, x1 fwd, x2 bwd, x3 fwd+bwd."""
        return float(2 * _PASSES[mode] * sum(m * k * n for m, k, n in _gemms(op, shape)))

    return flops


def leaf_linear_bytes(x: int, y: int, w: int, mode: str, itemsize: int) -> float:
    """The least traffic of ``x`` input, ``y`` output and ``w`` weight elements of linear
    layers whose weights are leaves: forward, X and W read, Y written; backward, dY and X
    read and dX written (2 X), W read and dW written (2 W)."""
    fwd, bwd = x + y + w, y + 2 * x + 2 * w
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode] * itemsize)


def _bytes(op: str):
    def nbytes(shape: Mapping[str, int], mode: str, itemsize: int) -> float:
        """The least traffic (:func:`leaf_linear_bytes`: every weight is a leaf in the
        suite). DeepStack: hidden read and written, the visual half's embeds read, per
        pass."""
        s = shape
        if op == "deepstack":
            passes = 2 if mode == "fwd+bwd" else 1
            return float(passes * 2.5 * s["B"] * s["L"] * s["D"] * itemsize)
        if op == "gemma3_projector":  # the features are read before the pooling
            (m, k, n), x = _gemms(op, s)[0], s["GB"] * s["GS"] ** 2 * s["GC"]
            return leaf_linear_bytes(x, m * n, k * n + k, mode, itemsize)
        gemms = _gemms(op, s)
        x, y = gemms[0][0] * gemms[0][1], gemms[-1][0] * gemms[-1][2]
        return leaf_linear_bytes(x, y, sum(k * n for _, k, n in gemms), mode, itemsize)

    return nbytes


def grid(profile: str) -> dict[str, list[int]]:
    if profile == "cpu":
        return {"M": [64], "K": [64], "N": [128], "B": [2], "S": [8], "C": [32], "P": [256],
                "QC": [32], "QN": [64], "L": [64], "D": [64], "IB": [2], "IC": [16],
                "IN": [48], "GB": [2], "GS": [8], "GK": [4], "GC": [32], "GN": [48],
                "AB": [2], "AS": [8], "AC": [16], "AI": [48], "AN": [40]}  # fmt: skip
    return {"M": [4608], "K": [1024], "N": [4096], "B": [32], "S": [32], "C": [1152],
            "P": [21904], "QC": [1280], "QN": [3584], "L": [4096], "D": [4096], "IB": [64],
            "IC": [1024], "IN": [4096], "GB": [8], "GS": [64], "GK": [4], "GC": [1152],
            "GN": [2560], "AB": [8], "AS": [32], "AC": [1152], "AI": [18432],
            "AN": [8192]}  # fmt: skip


OPS = tuple(
    OpSpec(op, PROVIDERS, _flops(op), _bytes(op))
    for op in (
        "llava_projector",
        "idefics3_connector",
        "internvl_connector",
        "qwen_merger",
        "gemma3_projector",
        "swiglu_projector",
        "deepstack",
    )  # fmt: skip
)


summarize = targets.summarizer(
    "connectors",
    "no CUDA device: a CPU sweep at tiny shapes in fp32; GPU rows owed",
    heading=", the GPU shapes of grid('full')",
)


SUITE = Suite(name="connectors", ops=OPS, grid=grid, x_name="M", summarize=summarize)
