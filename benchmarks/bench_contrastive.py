r"""Contrastive losses: ``clip_loss`` (symmetric InfoNCE) and ``siglip_loss`` (pairwise sigmoid).

Inputs per shape (N, d): image and text features X, Y of shape (N, d), L2-normalised rows of
fresh Gaussian noise (seeded, identical across providers), cast to the run's dtype, with
``requires_grad``; a learnable 0-d fp32 logit scale s (CLIP: 1/0.07 = exp(log(1/0.07));
SigLIP: 10) and for SigLIP a learnable 0-d fp32 bias b = -10. The scale is the multiplier
itself, as open_clip passes ``logit_scale.exp()``.

Providers:

- ``vlmkernels``: :func:`vlmkernels.clip_loss` / :func:`vlmkernels.siglip_loss` (Triton on
  CUDA; the chunked PyTorch reference on the CPU).
- ``eager``: open_clip's single-device loss written out (:func:`clip_eager`,
  :func:`siglip_eager`), materialising the N x N logits.
- ``compile``: ``torch.compile`` of the same functions (static shapes; compile time excluded
  by the warm-up; dynamo is reset per shape so no recompile limit is hit).
- ``inf_cl``: Inf-CL's ``cal_flash_loss`` made symmetric,
  0.5 (mean(cal_flash_loss(X, Y, scale=s)) + mean(cal_flash_loss(Y, X, scale=s))), with
  ``head_dim`` the largest of 256, 128, 64, 32, 16 dividing d. CLIP only, CUDA only; skipped
  above N = 32768 unless ``--no-limits`` (it is slow).
- ``siglip_kernel``: siglip-kernel 0.1.2's ``fused_siglip_loss(X, Y, log_t, b)`` (router
  ``backend="auto"``: cuBLAS GEMM + Triton BCE for bf16/fp16, its fused Triton kernel for
  fp32). SigLIP only, CUDA only. Its loss is ``-sum_ij logsigmoid(z_ij (e^log_t X_i.Y_j + b)) / N``,
  the same normalisation as :func:`siglip_eager` (sum over all N^2 pairs / N); it takes
  the log of the scale, so the provider's learnable leaf is log_t = log(s) (0-d fp32)
  instead of s, and gradients flow to (X, Y, log_t, b). Like ``vlmkernels`` it computes
  the gradients in the forward pass; its loss comes back in the input dtype.

FLOP model (useful FLOPs of the dense computation; recomputation not counted):
forward 2 N^2 d (S = X Y^T), backward 4 N^2 d (dX = dS Y and dY = dS^T X), fwd+bwd 6 N^2 d.
Byte model: the features are read once per pass and the gradients written once:
forward 2 N d e, backward 4 N d e (read X, Y; write dX, dY), fwd+bwd 6 N d e, e the element
size. With these, TFLOP/s is the figure to compare with the matmul ceiling; GB/s stays far
below the copy ceiling because the losses are compute-bound.

Targets: :mod:`benchmarks.targets` (issue 3), printed after the sweep as measured in this run.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from . import targets
from .harness import BuildArgs, Case, OpSpec, Prepared, Provider, Results, RunConfig, Suite
from .targets import Target, Verdict

CLIP_SCALE = math.exp(math.log(1 / 0.07))
SIGLIP_SCALE = 10.0
SIGLIP_BIAS = -10.0
INF_CL_MAX_N = 32768

# --------------------------------------------------------------------------------------
# Baselines: open_clip's ClipLoss / SigLipLoss on one device, written out
# --------------------------------------------------------------------------------------


def clip_eager(image_features, text_features, logit_scale, logit_bias=None):
    """(CE(s X Y^T + b, arange) + CE(s Y X^T + b, arange)) / 2 with both N x N logits."""
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    if logit_bias is not None:
        logits_per_image += logit_bias
        logits_per_text += logit_bias
    labels = torch.arange(logits_per_image.shape[0], device=image_features.device)
    return (
        F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
    ) / 2


def siglip_eager(image_features, text_features, logit_scale, logit_bias):
    """-sum(logsigmoid(Z * (s X Y^T + b))) / N with Z = 2 I - 1 materialised (N x N)."""
    logits = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        logits += logit_bias
    n = image_features.shape[0]
    labels = -torch.ones((n, n), device=image_features.device, dtype=image_features.dtype)
    labels = 2 * torch.eye(n, device=image_features.device, dtype=image_features.dtype) + labels
    return -F.logsigmoid(labels * logits).sum() / n


EAGER = {"clip_loss": clip_eager, "siglip_loss": siglip_eager}

# --------------------------------------------------------------------------------------
# Inputs and providers
# --------------------------------------------------------------------------------------


def make_inputs(args: BuildArgs) -> tuple[torch.Tensor, ...]:
    """(X, Y, s, b) for one shape; b is None for CLIP. Same seed, same values everywhere."""
    n, d = args.shape["N"], args.shape["d"]
    gen = torch.Generator(device=args.device).manual_seed(args.seed)

    def features():
        x = torch.randn(n, d, device=args.device, generator=gen, dtype=torch.float32)
        return F.normalize(x, dim=-1).to(args.dtype).requires_grad_()

    x, y = features(), features()
    leaf = lambda v: torch.tensor(v, device=args.device, dtype=torch.float32, requires_grad=True)
    if args.op == "clip_loss":
        return x, y, leaf(CLIP_SCALE), None
    return x, y, leaf(SIGLIP_SCALE), leaf(SIGLIP_BIAS)


def _leaves(*tensors) -> tuple[torch.Tensor, ...]:
    return tuple(t for t in tensors if t is not None)


def build_vlmkernels(args: BuildArgs) -> Prepared:
    import vlmkernels

    x, y, s, b = make_inputs(args)
    op = getattr(vlmkernels, args.op)
    notes = []
    try:
        from vlmkernels.core.backend import resolve_backend

        notes.append(f"backend={resolve_backend(args.op, x)}")
    except Exception:  # the backend name is informative only
        pass
    if args.op == "siglip_loss":
        notes.append("gradients computed in the forward pass")
    return Prepared(lambda: op(x, y, s, b), _leaves(x, y, s, b), "; ".join(notes))


def build_eager(args: BuildArgs) -> Prepared:
    x, y, s, b = make_inputs(args)
    fn = EAGER[args.op]
    return Prepared(lambda: fn(x, y, s, b), _leaves(x, y, s, b), "open_clip formula")


def build_compile(args: BuildArgs) -> Prepared:
    backend = args.options.get("compile_backend", "inductor")
    torch._dynamo.reset()
    compiled = torch.compile(EAGER[args.op], backend=backend, dynamic=False)
    x, y, s, b = make_inputs(args)
    return Prepared(
        lambda: compiled(x, y, s, b),
        _leaves(x, y, s, b),
        f"torch.compile(backend={backend}, dynamic=False); compile time excluded",
    )


def inf_cl_head_dim(d: int) -> int:
    for h in (256, 128, 64, 32, 16):
        if d % h == 0:
            return h
    raise ValueError(f"no Inf-CL head_dim divides d={d}")


def inf_cl_available(device: torch.device) -> str | None:
    if importlib.util.find_spec("inf_cl") is None:
        return "inf_cl is not importable (pip install inf-cl)"
    if device.type != "cuda":
        return "Inf-CL's Triton kernels need CUDA"
    return None


def inf_cl_limit(shape: Mapping[str, int]) -> str | None:
    if shape["N"] > INF_CL_MAX_N:
        return f"Inf-CL is slow: capped at N <= {INF_CL_MAX_N} (--no-limits runs it)"
    if not any(shape["d"] % h == 0 for h in (256, 128, 64, 32, 16)):
        return f"Inf-CL needs d divisible by its head_dim; d={shape['d']}"
    return None


def build_inf_cl(args: BuildArgs) -> Prepared:
    from inf_cl import cal_flash_loss

    x, y, s, _ = make_inputs(args)
    h = inf_cl_head_dim(args.shape["d"])

    def fn():
        i2t = cal_flash_loss(x, y, scale=s, head_dim=h).mean()
        t2i = cal_flash_loss(y, x, scale=s, head_dim=h).mean()
        return 0.5 * (i2t + t2i)

    return Prepared(fn, (x, y, s), f"cal_flash_loss symmetric, head_dim={h}")


def siglip_kernel_available(device: torch.device) -> str | None:
    if importlib.util.find_spec("siglip_kernel") is None:
        return "siglip_kernel is not importable (pip install siglip-kernel==0.1.2)"
    if device.type != "cuda":
        return "siglip-kernel's Triton kernels need CUDA"
    return None


def build_siglip_kernel(args: BuildArgs) -> Prepared:
    """siglip-kernel's ``fused_siglip_loss(X, Y, log_temperature, bias)``: loss
    ``-sum_ij logsigmoid(z_ij (exp(log_temperature) X_i . Y_j + b)) / N`` (its
    ``siglip_loss_reference``), which is :func:`siglip_eager` with s = exp(log_temperature).
    The same X, Y and b as the other providers; the scale leaf is replaced by the leaf
    log_t = log(s), so no extra op is timed."""
    from siglip_kernel import fused_siglip_loss

    x, y, s, b = make_inputs(args)
    log_t = s.detach().log().requires_grad_()
    scale = s.detach()

    def as_scale_leaf(grads):  # d/ds = d/dlog_t / s: the other providers' leaf
        gx, gy, g_log_t, gb = grads
        return [gx, gy, None if g_log_t is None else g_log_t / scale, gb]

    return Prepared(
        lambda: fused_siglip_loss(x, y, log_t, b),
        (x, y, log_t, b),
        "fused_siglip_loss(backend='auto'), log_t = log(s) leaf; sum / N",
        grads_as_reference=as_scale_leaf,
    )


VLMKERNELS = Provider("vlmkernels", build_vlmkernels)
EAGER_PROVIDER = Provider("eager", build_eager)
COMPILE = Provider("compile", build_compile)
INF_CL = Provider("inf_cl", build_inf_cl, available=inf_cl_available, limit=inf_cl_limit)
SIGLIP_KERNEL = Provider("siglip_kernel", build_siglip_kernel, available=siglip_kernel_available)

# --------------------------------------------------------------------------------------
# Cost models, grid, suite
# --------------------------------------------------------------------------------------

_FLOP_FACTOR = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}
_BYTE_FACTOR = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}


def flops(shape: Mapping[str, int], mode: str) -> float:
    """2 N^2 d (fwd), 4 N^2 d (bwd), 6 N^2 d (fwd+bwd)."""
    return float(_FLOP_FACTOR[mode] * shape["N"] ** 2 * shape["d"])


def nbytes(shape: Mapping[str, int], mode: str, itemsize: int) -> float:
    """2 N d e (fwd), 4 N d e (bwd), 6 N d e (fwd+bwd)."""
    return float(_BYTE_FACTOR[mode] * shape["N"] * shape["d"] * itemsize)


def grid(profile: str) -> dict[str, list[int]]:
    if profile == "cpu":  # the N sweep at one width: the CPU run stays within 3 minutes
        return {"N": [512, 2048], "d": [768]}
    if profile == "quick":
        return {"N": [8192, 32768], "d": [768]}
    return {"N": [8192, 16384, 32768, 65536], "d": [512, 768, 1024, 1152]}


OPS = (
    OpSpec("clip_loss", (VLMKERNELS, EAGER_PROVIDER, COMPILE, INF_CL), flops, nbytes),
    OpSpec("siglip_loss", (VLMKERNELS, EAGER_PROVIDER, COMPILE, SIGLIP_KERNEL), flops, nbytes),
)

# --------------------------------------------------------------------------------------
# Targets (benchmarks/targets.py), evaluated on this run's measurements only
# --------------------------------------------------------------------------------------

_UNITS = {"ms": "ms", "peak_mem_mb": "MiB"}


def _ratio_line(verdict: Verdict) -> str:
    t = verdict.target
    unit = _UNITS[t.metric]
    label = f"{t.op.removesuffix('_loss')} {t.provider} {unit} / {t.baseline} {unit}"
    if not verdict.measured:
        return f"  {label}: target {t.text}: not measured ({verdict.reason})"
    return (
        f"  {label}: {verdict.value:.3g} (= {verdict.num.value:.4g} / {verdict.den.value:.4g}), "
        f"target {t.text}: {'HIT' if verdict.hit else 'MISS'}"
    )


def _oom_lines(results: Results, t: Target) -> list[str]:
    """The provider runs where the baseline is out of memory, at every d measured at the
    target's N (its d when none was)."""
    n = t.shape_dict["N"]
    dims = sorted(
        {
            dict(r.case.shape).get("d")
            for r in results.records
            if r.case.op == t.op and dict(r.case.shape).get("N") == n
        }
        - {None}
    ) or [t.shape_dict["d"]]
    lines = []
    for d in dims:
        shape = (("N", n), ("d", d))
        label = (
            f"  {t.op.removesuffix('_loss')} N={n} d={d}: {t.provider} runs while {t.baseline} "
            "is out of memory"
        )
        v = results.get(Case(t.op, t.provider, t.mode, shape, t.dtype), "ms")
        e = results.get(Case(t.op, t.baseline, t.mode, shape, t.dtype), "ms")
        if v.value is None and v.record is None:
            lines.append(f"{label}: not measured ({v.reason})")
        elif e.record is None and e.value is None:
            lines.append(f"{label}: not measured ({e.reason})")
        else:
            v_txt = f"{v.value:.4g} ms" if v.value is not None else v.reason
            e_txt = f"{e.value:.4g} ms" if e.value is not None else e.reason
            oom = e.record is not None and e.record.status == "oom"
            hit = v.value is not None and oom
            lines.append(
                f"{label}: {t.provider} {v_txt}; {t.baseline} {e_txt}: {'HIT' if hit else 'MISS'}"
            )
    return lines


def summarize(results: Results, cfg: RunConfig) -> list[str]:
    """The targets of :mod:`benchmarks.targets` for this suite, as measured in this run."""
    found = [t for t in targets.for_suite("contrastive") if t.metric != "host_us"]
    first = found[0]
    lines = [
        f"Targets ({targets.shape_text(first.shape)}, {first.dtype}, {first.mode} unless "
        f"stated; {targets.issues(found)}, benchmarks/targets.py):"
    ]
    for t in found:
        if t.relation == targets.RUNS_WHERE_OOM:
            lines += _oom_lines(results, t)
        else:
            lines.append(_ratio_line(t.evaluate(results)))
    if cfg.device.type != "cuda":
        lines.append(
            "  (no CUDA device: this run was a CPU sweep, whose shapes and dtype "
            "differ from the targets')"
        )
    return lines


SUITE = Suite(
    name="contrastive",
    ops=OPS,
    grid=grid,
    x_name="N",
    summarize=summarize,
    host_shape={"N": 8, "d": 32},
)
