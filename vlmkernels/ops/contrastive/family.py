"""What the shared tools need of the contrastive family: its kernels and compile-time
variants, tuning shapes and workload, benchmark suite."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch

from ...core.family import CompileCase, Family, register
from ...core.tuning import torch_dtype
from . import finalize, fused_backward, kernels
from .functional import clip_loss, contrastive_cross_entropy, siglip_loss

# Realistic shapes: CLIP / SigLIP batches of 8k to 64k pairs, the embedding widths of the
# ViT-B to SO400M towers.
TUNE_SHAPES = tuple(
    {"N": n, "d": d, "dtype": "bf16"} for n in (8192, 16384, 32768, 65536)
    for d in (512, 768, 1024, 1152)
)  # fmt: skip

_WORKLOAD_OPS = ("clip", "siglip", "i2t", "clip_ids", "clip_teacher", "clip_fused")


def tune_workload(spec: Mapping, device: torch.device, names: Iterable[str]) -> None:
    """Run the contrastive ops of ``spec`` once ({"N", "d", "dtype", "ops"}; ops from
    "clip" (clip_loss forward + backward), "siglip" (with gradients, and the no-grad
    forward), "i2t" (one direction), "clip_ids" (ids + label smoothing), "clip_teacher"
    (ALBEF distillation), "clip_fused" (clip_loss forward + backward with the fused
    backward design and with its deterministic mode, each also with a frozen text tower);
    default ("clip", "siglip"); the fused backward's kernel is also run with "clip" when it
    is among ``names``)."""
    n, d = int(spec["N"]), int(spec["d"])
    dtype = torch_dtype(spec.get("dtype", "bf16"))
    ops = tuple(spec.get("ops", ("clip", "siglip")))
    unknown = set(ops) - set(_WORKLOAD_OPS)
    if unknown:
        raise ValueError(f"contrastive spec {dict(spec)}: unknown ops {sorted(unknown)}")
    gen = torch.Generator(device=device).manual_seed(0)

    def features():
        f = torch.randn(n, d, generator=gen, device=device, dtype=torch.float32)
        return torch.nn.functional.normalize(f, dim=-1).to(dtype)

    x, y = features(), features()

    def leaves():
        return x.clone().requires_grad_(), y.clone().requires_grad_()

    clip = {"clip_stats", "clip_grad"} & set(names)
    if "clip" in ops and clip:
        clip_loss(*leaves(), 14.3).backward()
    if "i2t" in ops and clip:
        contrastive_cross_entropy(*leaves(), 14.3).backward()
    if "clip_ids" in ops and clip:
        ids = torch.arange(n, device=device) // 2
        clip_loss(*leaves(), 14.3, ids=ids, label_smoothing=0.1).backward()
    if "clip_teacher" in ops and clip:
        clip_loss(*leaves(), 14.3, teacher=(x, y), alpha=0.4).backward()
    fused = "clip_fused" in ops or ("clip" in ops and "clip_fused_grad" in names)
    if fused and "clip_fused_grad" in names:
        for design in ("fused", "fused_deterministic"):
            with _design(design):
                clip_loss(*leaves(), 14.3).backward()
                clip_loss(leaves()[0], y, 14.3).backward()  # a frozen tower: no dY product
    if "siglip" in ops and "siglip" in names:
        siglip_loss(*leaves(), 10.0, -10.0).backward()
        with torch.no_grad():
            siglip_loss(x, y, 10.0, -10.0)


class _design:
    """Context manager: $VLMKERNELS_CLIP_BACKWARD set to ``name`` inside, restored after."""

    def __init__(self, name: str):
        self.name, self.previous = name, None

    def __enter__(self):
        self.previous = os.environ.get(fused_backward.ENV_DESIGN)
        os.environ[fused_backward.ENV_DESIGN] = self.name

    def __exit__(self, *exc):
        if self.previous is None:
            os.environ.pop(fused_backward.ENV_DESIGN, None)
        else:
            os.environ[fused_backward.ENV_DESIGN] = self.previous


def compare_backward_designs(shapes, device, bench, log, designs=("chunked", "fused")):
    """Total clip_loss forward + backward times per CLIP backward design over the tuning
    shapes ({"N", "d", "dtype"}), ``bench(fn)`` returning milliseconds (the tuner's):
    {"clip_backward": {design: ms, ..., "shapes": n}}. The forward is the same for every
    design, so the difference is the backward's."""
    totals, compared = dict.fromkeys(designs, 0.0), 0
    for spec in shapes:
        n, d = int(spec["N"]), int(spec["d"])
        dtype = torch_dtype(spec.get("dtype", "bf16"))
        gen = torch.Generator(device=device).manual_seed(0)
        x, y = (torch.nn.functional.normalize(torch.randn(n, d, generator=gen, device=device),
                                              dim=-1).to(dtype) for _ in range(2))  # fmt: skip

        def step(x=x, y=y):
            a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
            clip_loss(a, b, 14.3).backward()

        times = {}
        for design in designs:
            with _design(design):
                times[design] = float(bench(step))
        compared += 1
        log(
            f"clip backward {dict(spec)}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in times.items())
        )
        for design, ms in times.items():
            totals[design] += ms
    return {fused_backward.DESIGN_CHOICE: {**totals, "shapes": compared}}


# What Triton's launcher specialises for a typical call (contiguous tensors with sizes that
# are multiples of 16): unit feature strides become constants, 16-byte-aligned pointers and
# multiples of 16 get a divisibility hint (which enables vector loads and pipelining).
_UNIT = ("stride_xd", "stride_yd")
_ALIGNED = ("N", "D", "stride_xn", "stride_yn", "stride_gm", "n_bucket", "n_rows", "row0")
# the CLIP kernels' teacher features (a contiguous teacher: the same specialisations)
_TEACHER_UNIT = ("stride_txd", "stride_tyd")
_TEACHER_ALIGNED = ("stride_txn", "stride_tyn")
_F32 = "*fp32"
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_FEATURES = dict(x_ptr="*{elem}", y_ptr="*{elem}", scale_ptr=_F32, bias_ptr=_F32)
# Without ids, the launchers pass an fp32 buffer for the unused id pointers.
_NO_IDS = dict(row_ids_ptr=_F32, col_ids_ptr=_F32)
_IDS = dict(row_ids_ptr="*i64", col_ids_ptr="*i64")
_TEACHER = dict(xt_ptr="*{elem}", yt_ptr="*{elem}", tscale_ptr=_F32)
_STATS_OUT = {name: _F32 for name in ("t_lse_row_ptr", "t_lse_col_ptr", "row_max_ptr",
                                       "row_sum_ptr", "col_max_ptr", "col_sum_ptr",
                                       "row_acc_ptr", "col_acc_ptr")}  # fmt: skip
_GRAD_OUT = dict(row_coef_ptr=_F32, col_coef_ptr=_F32, grad_ptr="*{elem}", partial_ptr=_F32)
_PLAIN = dict(HAS_BIAS=True, ROWS=True, COLS=True, IDS=False, SMOOTH=False, TEACHER=False)
_TARGETS = dict(HAS_BIAS=True, ROWS=True, COLS=True, IDS=True, SMOOTH=True, TEACHER=True)
_FUSED = dict(HAS_BIAS=True, ROWS=True, COLS=True, SMOOTH=False, Y_GRAD=True)
_FUSED_PTRS = dict(
    _FEATURES,
    coef_ptr=_F32,
    row_coef_ptr=_F32,
    col_coef_ptr=_F32,
    dx_ptr=_F32,
    dy_ptr=_F32,
    partial_ptr=_F32,
)


def _constexprs(flags: Mapping):
    """The variant's flags and the dot options a launch of ``dtype`` inputs passes."""

    def of(dtype: str) -> dict:
        precision = "tf32x3" if dtype == "fp32" else "tf32"
        return dict(flags, DOT_FP32=False, INPUT_PRECISION=precision, EVEN_K=True)

    return of


def compile_cases() -> list[CompileCase]:
    """The CLIP statistics and gradient kernels with plain and with every kind of target,
    SigLIP with and without the gradient."""

    def case(name, kernel, pointers, flags):
        teacher = "stride_txd" in kernel.arg_names
        unit = _UNIT + (_TEACHER_UNIT if teacher else ())
        aligned = _ALIGNED + (_TEACHER_ALIGNED if teacher else ())
        if "dx_slot" in kernel.arg_names:  # the fused backward's fp32 gradient buffers
            aligned += ("M", "dx_slot", "dy_slot", "stride_dxn", "stride_dyn")
        return CompileCase(name, kernel, pointers, _constexprs(flags), unit_strides=unit,
                           aligned=aligned, expect=("mma", "async"))  # fmt: skip

    siglip = dict(_FEATURES, w_row_ptr=_F32, loss_ptr=_F32, partial_ptr=_F32)
    return [
        case("clip_stats", kernels._clip_stats_kernel, {**_FEATURES, **_NO_IDS, **_TEACHER,
                                                        **_STATS_OUT}, _PLAIN),
        case("clip_stats_targets", kernels._clip_stats_kernel, {**_FEATURES, **_IDS, **_TEACHER,
                                                                **_STATS_OUT}, _TARGETS),
        case("clip_grad", kernels._clip_grad_kernel, {**_FEATURES, **_NO_IDS, **_TEACHER,
                                                      **_GRAD_OUT}, _PLAIN),
        case("clip_grad_targets", kernels._clip_grad_kernel, {**_FEATURES, **_IDS, **_TEACHER,
                                                              **_GRAD_OUT}, _TARGETS),
        case("siglip_grad", kernels._siglip_kernel, dict(siglip, grad_ptr="*{elem}"),
             dict(HAS_BIAS=True, WRITE_GRAD=True)),
        # the fused backward (fp32 gradient buffers; atomics, or the deterministic partials)
        case("clip_fused_grad", fused_backward._clip_fused_grad_kernel, _FUSED_PTRS,
             dict(_FUSED, ATOMIC=True)),
        case("clip_fused_grad_deterministic", fused_backward._clip_fused_grad_kernel,
             _FUSED_PTRS, dict(_FUSED, ATOMIC=False)),
        # a frozen column side (LiT's locked tower, a queue): no dY product, no dY atomics
        case("clip_fused_grad_frozen", fused_backward._clip_fused_grad_kernel, _FUSED_PTRS,
             dict(_FUSED, ATOMIC=True, Y_GRAD=False)),
        # without the gradient the launcher passes the fp32 loss buffer as grad_ptr
        case("siglip_loss", kernels._siglip_kernel, dict(siglip, grad_ptr=_F32),
             dict(HAS_BIAS=True, WRITE_GRAD=False)),
        *_finishing_cases(),
    ]  # fmt: skip


def _finishing_cases() -> list[CompileCase]:
    """The whole-loss path's finishing kernels (:mod:`.finalize`): the partial sums, the
    gradient finishing of the cross-entropy's backward and of the fused SigLIP loss, and
    the cross-entropy's loss kernels (:func:`_target_cases`)."""
    f32 = lambda *names: dict.fromkeys(names, _F32)  # noqa: E731
    grads = dict(x_ptr="*{elem}", dx_ptr="*{elem}", dy_ptr="*{elem}",
                 **f32("gy_ptr", "gtx_ptr", "scale_ptr", "bias_ptr", "grad_ptr", "partial_ptr",
                       "loss_part_ptr", "ds_ptr", "db_ptr", "loss_ptr"))  # fmt: skip
    scalars = f32("partial_ptr", "loss_part_ptr", "scale_ptr", "bias_ptr", "grad_ptr",
                  "ds_ptr", "db_ptr", "loss_ptr")  # fmt: skip
    clip = dict(SIGLIP=False, HAS_BIAS=True, HAS_GRAD=True, HAS_LOSS=False)
    siglip = dict(SIGLIP=True, HAS_BIAS=True, HAS_GRAD=False, HAS_LOSS=True)
    rows = dict(ROWS=finalize.FINAL_ROWS, BD=finalize.FINAL_COLUMNS, BLOCK=finalize.SUM_BLOCK)

    def with_eps(flags):  # G's rounding, per input dtype
        return lambda dtype: dict(flags, G_EPS=finalize.UNIT_ROUNDOFF[_TORCH_DTYPES[dtype]])

    kappa = {"kappa": "fp32"}
    return [
        CompileCase("sum_parts", finalize._sum_parts_kernel, f32("part_ptr", "out_ptr"),
                    dict(BLOCK=finalize.SUM_BLOCK), expect=("no_spill",)),
        CompileCase("clip_grads_finalize", finalize._grads_finalize_kernel, grads,
                    with_eps(dict(clip, **rows)), unit_strides=("stride_xd",),
                    aligned=("D", "stride_xm"), scalars=kappa, expect=("no_spill",)),
        CompileCase("siglip_grads_finalize", finalize._grads_finalize_kernel, grads,
                    with_eps(dict(siglip, **rows)), unit_strides=("stride_xd",),
                    aligned=("D", "stride_xm"), scalars=kappa, expect=("no_spill",)),
        # fp16 features: the forward-computed gradients stay fp32 (forward_grad_dtype)
        CompileCase("siglip_grads_finalize_fp32_grads", finalize._grads_finalize_kernel,
                    {**grads, **f32("dx_ptr", "dy_ptr")}, with_eps(dict(siglip, **rows)),
                    unit_strides=("stride_xd",), aligned=("D", "stride_xm"), scalars=kappa,
                    expect=("no_spill",)),
        CompileCase("clip_grad_scalars", finalize._grad_scalars_kernel, scalars,
                    with_eps(dict(clip, BLOCK=finalize.SUM_BLOCK)), scalars=kappa,
                    expect=("no_spill",)),
        CompileCase("siglip_grad_scalars", finalize._grad_scalars_kernel, scalars,
                    with_eps(dict(siglip, BLOCK=finalize.SUM_BLOCK)), scalars=kappa,
                    expect=("no_spill",)),
        *_target_cases(),
    ]  # fmt: skip


def _target_cases() -> list[CompileCase]:
    """The cross-entropy's loss kernels (:mod:`.whole_targets`): the ids' positive counts,
    the teacher's log-sum-exp, and the loss with its coefficients for every combination of
    ids, label smoothing and teacher (none: one positive per row) in one direction and in
    both."""
    f32 = lambda *names: dict.fromkeys(names, _F32)  # noqa: E731
    parts = f32("row_max_ptr", "row_sum_ptr", "row_acc_ptr", "col_max_ptr", "col_sum_ptr",
                "col_acc_ptr", "count_ptr", "t_lse_r_ptr", "t_lse_c_ptr", "coef_ptr",
                "part_ptr", "loss_ptr")  # fmt: skip
    scalars = dict.fromkeys(("weight", "smoothing", "alpha"), "fp32")
    flags = [(ids, smooth, teacher) for ids in (False, True) for smooth in (False, True)
             for teacher in (False, True)]  # fmt: skip
    lse = f32("row_max_ptr", "row_sum_ptr", "col_max_ptr", "col_sum_ptr", "lse_r_ptr",
              "lse_c_ptr")  # fmt: skip
    return [
        CompileCase("ids_count", finalize._ids_count_kernel,
                    dict(row_ids_ptr="*i64", col_ids_ptr="*i64", count_ptr=_F32),
                    dict(BM=finalize.COUNT_ROWS, BN=finalize.COUNT_COLUMNS), aligned=("N",),
                    expect=("no_spill",)),
        *(
            CompileCase(f"{side}_lse_merge", finalize._lse_merge_kernel, lse,
                        dict(COLS=cols, BLOCK=finalize.PARTS_BLOCK), aligned=("M",),
                        expect=("no_spill",))
            for side, cols in (("ce", False), ("clip", True))
        ),
        *(
            CompileCase(
                "_".join((f"{side}_target_parts", *(
                    name for name, on in zip(("ids", "smooth", "teacher"), flag, strict=True)
                    if on))),
                finalize._ce_target_parts_kernel, parts,
                dict(COLS=cols, IDS=flag[0], SMOOTH=flag[1], TEACHER=flag[2], ALPHA_PTR=False,
                     BLOCK=finalize.PARTS_BLOCK),
                aligned=("M",), scalars=scalars, expect=("no_spill",))
            for side, cols in (("ce", False), ("clip", True)) for flag in flags
        ),
        # a teacher's alpha as a 0-d fp32 tensor (what the ops get under torch.compile)
        *(
            CompileCase(
                f"{side}_target_parts_teacher_alpha_ptr", finalize._ce_target_parts_kernel,
                {**parts, "alpha": _F32},
                dict(COLS=cols, IDS=False, SMOOTH=False, TEACHER=True, ALPHA_PTR=True,
                     BLOCK=finalize.PARTS_BLOCK),
                aligned=("M",), scalars={k: v for k, v in scalars.items() if k != "alpha"},
                expect=("no_spill",))
            for side, cols in (("ce", False), ("clip", True))
        ),
    ]  # fmt: skip


FAMILY = register(
    Family(
        name="contrastive",
        kernels=(
            kernels._clip_stats_kernel,
            kernels._clip_grad_kernel,
            kernels._siglip_kernel,
            fused_backward._clip_fused_grad_kernel,
            finalize._sum_parts_kernel,
            finalize._grads_finalize_kernel,
            finalize._grad_scalars_kernel,
            finalize._ids_count_kernel,
            finalize._lse_merge_kernel,
            finalize._ce_target_parts_kernel,
        ),
        compile_cases=compile_cases,
        aliases={
            # the default design's kernels; the fused backward's is tuned and inspected by
            # its own name, clip_fused_grad
            "clip_loss": ("clip_stats", "clip_grad"),
            "contrastive_cross_entropy": ("clip_stats", "clip_grad"),
            "siglip_loss": ("siglip",),
        },
        tune_shapes=TUNE_SHAPES,
        tune_workload=tune_workload,
        compare_designs=compare_backward_designs,
        bench_suite="bench_contrastive",
    )
)
