"""What the shared tools need of the rotary family: its kernel and compile-time variants,
tuning shapes and workload, CUDA C++ ops and how the tuner times them, benchmark suites."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ...core.family import CompileCase, Family, register
from ...core.tuning import torch_dtype
from . import cuda, kernels
from .kernels import CHUNKED, INTERLEAVED, PAIRS, PLAIN, POSITIONS, TABLE

# Realistic shapes: the text attention of each Qwen-VL model and the vision towers.
_TEXT = [  # model, heads_q, heads_k, head_dim, lane rule, mrope section, rotary dim
    ("Qwen2-VL-2B", 12, 2, 128, "chunked", (16, 24, 24), 128),
    ("Qwen2.5-VL-3B", 16, 2, 128, "chunked", (16, 24, 24), 128),
    ("Qwen2-VL-7B, Qwen2.5-VL-7B", 28, 4, 128, "chunked", (16, 24, 24), 128),
    ("Qwen2-VL-72B, Qwen2.5-VL-72B", 64, 8, 128, "chunked", (16, 24, 24), 128),
    ("Qwen3-VL-2B", 16, 8, 128, "interleaved", (24, 20, 20), 128),
    ("Qwen3-VL-4B, Qwen3-VL-8B", 32, 8, 128, "interleaved", (24, 20, 20), 128),
    # partial rotary (factor 0.25): lanes 64..255 pass through (copied out of place); the
    # heads of transformers' default Qwen3_5TextConfig (the bench suite's mrope_partial)
    ("Qwen3.5 text (default Qwen3_5TextConfig)", 16, 4, 256, "interleaved", (11, 11, 10), 64),
]
# paired lanes (2j, 2j + 1), GPT-J's pairing, partial rotary (factor 0.5): GLM-4.1V-9B's text
# attention, heads of transformers' default Glm4vTextConfig (the bench suite's mrope_pairs)
_PAIRED_TEXT = [
    ("GLM-4.1V-9B text (default Glm4vTextConfig)", 32, 2, 128, "chunked", (8, 12, 12), 64),
]
_VISION = [("Qwen2-VL, Qwen2.5-VL vision", 16, 80), ("Qwen3-VL vision", 16, 72)]

TUNE_SHAPES = tuple(
    [
        {"model": m, "heads_q": hq, "heads_k": hk, "head_dim": d, "mode": mode,
         "sections": sec, "source": src, "tokens": 16384, "dtype": "bf16",
         **({"rotary_dim": rot} if rot != d else {}), **({"pairs": True} if pairs else {})}
        for rows, pairs in ((_TEXT, False), (_PAIRED_TEXT, True))
        for m, hq, hk, d, mode, sec, rot in rows
        for src in ("table", "positions")
    ] + [
        {"model": m, "heads_q": h, "heads_k": h, "head_dim": d, "mode": "plain",
         "source": "table", "table_dtype": "fp32", "tokens": 16384, "dtype": "bf16"}
        for m, h, d in _VISION
    ] + [
        {"model": m, "heads_q": h, "heads_k": h, "head_dim": d, "mode": "chunked",
         "sections": (0, d // 4, d // 4), "source": "positions", "tokens": 16384,
         "dtype": "bf16"}
        for m, h, d in _VISION
    ]
)  # fmt: skip


def tune_inputs(spec: Mapping, device: torch.device):
    """(q, k, q_out, k_out, launch kwargs) for a tuning spec: {"heads_q", "heads_k",
    "head_dim", "rotary_dim" (default head_dim), "tokens" (16384), "batch" (1), "mode"
    ("plain", "chunked", "interleaved"), "pairs" (False: lanes (2j, 2j + 1) rotate
    together, GLM-4V), "sections", "source" ("table", "positions"), "dtype", "table_dtype"
    (default dtype)}."""
    b, s = int(spec.get("batch", 1)), int(spec.get("tokens", 16384))
    hq, hk, d = int(spec["heads_q"]), int(spec["heads_k"]), int(spec["head_dim"])
    rot = int(spec.get("rotary_dim", d))
    half = rot // 2
    mode = {"plain": PLAIN, "chunked": CHUNKED, "interleaved": INTERLEAVED}[
        spec.get("mode", "chunked")
    ]
    sections = tuple(spec.get("sections") or (0, 0, 0))
    if mode == CHUNKED and sum(sections) != half:
        raise ValueError(f"rope spec {dict(spec)}: chunked sections must add up to {half}")
    dtype = torch_dtype(spec.get("dtype", "bf16"))
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dt)

    q, k = randn(b, s, hq, d), randn(b, s, hk, d)
    options: dict[str, Any] = dict(mode=mode | (PAIRS if spec.get("pairs") else 0),
                                   sections=sections)  # fmt: skip
    if spec.get("source", "table") == "table":
        table_dtype = torch_dtype(spec.get("table_dtype", dtype))
        angle = randn(1 if mode == PLAIN else 3, b, s, rot, dt=torch.float32)
        options["table"] = (angle.cos().to(table_dtype), angle.sin().to(table_dtype))
    else:
        pos = torch.randint(0, s, (3, b, s), generator=gen, device=device, dtype=torch.int64)
        options["positions"] = pos
        options["inv_freq"] = 1e6 ** -(torch.arange(half, device=device, dtype=torch.float32)
                                       / half)  # fmt: skip
    return q, k, torch.empty_like(q), torch.empty_like(k), options


def tune_workload(spec: Mapping, device: torch.device, names: Iterable[str]) -> None:
    q, k, qo, ko, options = tune_inputs(spec, device)
    kernels.launch(q, k, qo, ko, **options)


def compare_backends(shapes, device, bench, log) -> dict[str, dict]:
    """Total Triton and CUDA C++ times over the tuning shapes both launchers take."""
    totals, compared = {"triton": 0.0, "cuda": 0.0}, 0
    for spec in shapes:
        *tensors, options = tune_inputs(spec, device)
        try:
            times = {
                backend: float(bench(lambda f=launch, t=tensors, kw=options: f(*t, **kw)))
                for backend, launch in (("triton", kernels.launch), ("cuda", cuda.rope_launch))
            }
        except Exception as exc:  # a shape one launcher does not take: not compared
            log(f"backends: rope {dict(spec)} not compared ({type(exc).__name__}: {exc})")
            continue
        compared += 1
        for backend, ms in times.items():
            totals[backend] += ms
    return {"rope": {**totals, "shapes": compared}}


# What Triton's launcher specialises for a typical call: unit last-dim strides become
# constants, 16-byte-aligned pointers and multiples of 16 get a divisibility hint.
_UNIT = ("sqd", "skd", "sqod", "skod", "std")
_ALIGNED = ("D", "sqb", "sqs", "sqh", "skb", "sks", "skh", "sqob", "sqos", "sqoh", "skob",
            "skos", "skoh", "stb", "sts")  # fmt: skip
_QK = dict(q_ptr="*{elem}", k_ptr="*{elem}", qo_ptr="*{elem}", ko_ptr="*{elem}")
_COMMON = dict(BACKWARD=False, COPY_PASS=False, PAIRS=False, half=64, BLOCK_HALF=64, BLOCK_PASS=64)


def compile_cases() -> list[CompileCase]:
    """The table, positions and vision variants (head dim 128, bf16 / fp32 inputs),
    Qwen3.5's partial rotary (head dim 256) and GLM-4V's paired lanes (head dim 128)."""

    def case(name, pointers, constexprs):
        return CompileCase(name, kernels._rope_kernel, {**_QK, **pointers}, constexprs,
                           unit_strides=_UNIT, aligned=_ALIGNED, scalars={"scaling": "fp32"},
                           expect=("no_spill",))  # fmt: skip

    unused = "*{elem}"
    return [
        case("rope_table", dict(cos_ptr="*{elem}", sin_ptr="*{elem}", pos_ptr=unused,
                                freq_ptr=unused),
             dict(_COMMON, SOURCE=TABLE, MODE=CHUNKED, SEC_T=16, SEC_H=24, SEC_W=24)),
        case("rope_positions", dict(cos_ptr=unused, sin_ptr=unused, pos_ptr="*i64",
                                    freq_ptr="*fp32"),
             dict(_COMMON, SOURCE=POSITIONS, MODE=INTERLEAVED, SEC_T=24, SEC_H=20, SEC_W=20,
                  BACKWARD=True)),
        case("rope_vision", dict(cos_ptr="*fp32", sin_ptr="*fp32", pos_ptr=unused,
                                 freq_ptr=unused),
             dict(_COMMON, SOURCE=TABLE, MODE=PLAIN, SEC_T=0, SEC_H=0, SEC_W=0)),
    ] + [
        # the vision towers' head dims 80 (Qwen2/2.5-VL) and 72 (Qwen3-VL): rotary half 40
        # and 36, in a 64-lane block
        case(f"rope_vision{2 * half}", dict(cos_ptr="*fp32", sin_ptr="*fp32", pos_ptr=unused,
                                            freq_ptr=unused),
             dict(_COMMON, SOURCE=TABLE, MODE=PLAIN, SEC_T=0, SEC_H=0, SEC_W=0, half=half))
        for half in (40, 36)
    ] + [
        # Qwen3.5's partial rotary: 64 of 256 lanes rotate (half 32), the rest are copied
        case("rope_partial", dict(cos_ptr="*{elem}", sin_ptr="*{elem}", pos_ptr=unused,
                                  freq_ptr=unused),
             dict(_COMMON, SOURCE=TABLE, MODE=INTERLEAVED, SEC_T=11, SEC_H=11, SEC_W=10,
                  half=32, BLOCK_HALF=32, COPY_PASS=True)),
        # GLM-4V's: 64 of 128 lanes rotate in pairs (2j, 2j + 1), chunked [8, 12, 12]
        case("rope_pairs", dict(cos_ptr="*{elem}", sin_ptr="*{elem}", pos_ptr=unused,
                                freq_ptr=unused),
             dict(_COMMON, SOURCE=TABLE, MODE=CHUNKED, SEC_T=8, SEC_H=12, SEC_W=12,
                  half=32, BLOCK_HALF=32, COPY_PASS=True, PAIRS=True)),
        case("rope_pairs_positions", dict(cos_ptr=unused, sin_ptr=unused, pos_ptr="*i64",
                                          freq_ptr="*fp32"),
             dict(_COMMON, SOURCE=POSITIONS, MODE=CHUNKED, SEC_T=8, SEC_H=12, SEC_W=12,
                  half=32, BLOCK_HALF=32, COPY_PASS=True, PAIRS=True)),
    ]  # fmt: skip


FAMILY = register(
    Family(
        name="rope",
        kernels=(kernels._rope_kernel,),
        compile_cases=compile_cases,
        aliases={
            name: ("rope",)
            for name in ("mrope", "mrope_interleaved", "mrope_from_positions", "vision_rope")
        },
        tune_shapes=TUNE_SHAPES,
        tune_workload=tune_workload,
        cuda_ops=("rope",),
        compare_backends=compare_backends,
        bench_suite="bench_rope",
    )  # fmt: skip
)
