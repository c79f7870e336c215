"""Ring mode of clip_loss / siglip_loss (``process_group=``) against the single-process loss.

World sizes 2 and 4 are spawned on the CPU with gloo (a file store in a temporary
directory). Every child builds the same global batch from a seed, passes its shard to the
ring, and compares its loss and the gradients autograd gives to its shard, to the learnable
scale and to the bias with:
- the single-process vlmkernels loss of the whole global batch, computed in the same child
  on the same backend;
- on rank 0, a float64 naive formula (full logits, autograd).
A miniature CLIP model under DistributedDataParallel checks the recipe of the docstring of
``clip_loss_ring`` (backward ``loss * world_size``, the scale's gradient divided by the
world size in a hook): every parameter gets its single-process gradient.
Backends: the Triton kernels through Triton's interpreter (TRITON_INTERPRET=1 set in the
child before vlmkernels is imported) and the PyTorch path (VLMKERNELS_BACKEND=torch): one
spawned world per size runs every case on each backend in turn (VLMKERNELS_BACKEND set
before each; it is read at every call), saving the start-up of a second world.

Tolerance (fp32 inputs): max |ring - reference| <= 1e-5 * max(max |reference|, floor) per
tensor; floor 1 for losses, 1e-12 for feature gradients and, for the scale and bias
gradients, the total weight of the loss (1 for a mean, N for a sum, sum |upstream| for
"none"): CLIP's bias gradient is zero in exact arithmetic, a cancellation of N^2 terms of
that weight. Measured: at most 6e-7 of that scale, against either reference. A wrong
block offset, a missing hop or a lost accumulator is off by O(1).

Children report each case's traceback in a JSON file per rank; a child that has not
finished within the timeout is killed and reported as a hang. The error paths check that
every rank raises (and that a good call still works afterwards: no stray messages).
"""

import datetime
import functools
import json
import math
import multiprocessing
import os
import time
import traceback

import pytest
import torch

RTOL = 1e-5
D = 24
EQUAL = 13
UNEQUAL = [13, 6, 9, 1]
TIMEOUT_S = 240

CASES = {
    "clip_mean": dict(loss="clip", reduction="mean"),
    "clip_sum_bias": dict(loss="clip", reduction="sum", bias=True),
    "clip_none_bias": dict(loss="clip", reduction="none", bias=True),
    "clip_ids": dict(loss="clip", reduction="mean", bias=True, ids=True),
    "clip_ids_smoothing_none": dict(loss="clip", reduction="none", ids=True, smoothing=0.1),
    "clip_smoothing_sum": dict(loss="clip", reduction="sum", bias=True, smoothing=0.2),
    "clip_unequal": dict(loss="clip", reduction="mean", bias=True, sizes=UNEQUAL),
    "clip_unequal_ids_none_chunked": dict(
        loss="clip", reduction="none", ids=True, sizes=UNEQUAL, chunk=4
    ),
    "clip_subgroup": dict(loss="clip", reduction="mean", bias=True, subgroup=True),
    "clip_no_grad": dict(loss="clip", reduction="mean", bias=True, grad=False),
    "siglip_mean_bias": dict(loss="siglip", reduction="mean", bias=True),
    "siglip_sum": dict(loss="siglip", reduction="sum"),
    "siglip_none_bias": dict(loss="siglip", reduction="none", bias=True),
    "siglip_unequal_chunked": dict(
        loss="siglip", reduction="mean", bias=True, sizes=UNEQUAL, chunk=4
    ),
    "siglip_unequal_none": dict(loss="siglip", reduction="none", bias=True, sizes=UNEQUAL),
    "siglip_no_grad": dict(loss="siglip", reduction="sum", bias=True, grad=False),
}

CONFIGS = [(2, "triton"), (4, "triton"), (2, "torch"), (4, "torch")]


# ------------------------------------------------------------------ float64 reference


def _naive(loss, x, y, s, b, ids, smoothing, reduction):
    """The global loss from the full logits, plain torch (float64 in the tests)."""
    logits = s * x @ y.T
    if b is not None:
        logits = logits + b
    n = x.shape[0]
    eye = torch.eye(n, dtype=logits.dtype)
    if loss == "siglip":
        rows = -torch.nn.functional.logsigmoid((2 * eye - 1) * logits).sum(1)
        return {"mean": rows.sum() / n, "sum": rows.sum(), "none": rows}[reduction]
    hard = (ids[:, None] == ids[None, :]).to(logits.dtype) if ids is not None else eye
    t_row = (1 - smoothing) * hard / hard.sum(1, keepdim=True) + smoothing / n
    t_col = (1 - smoothing) * hard / hard.sum(0, keepdim=True) + smoothing / n
    rows = torch.logsumexp(logits, 1) - (t_row * logits).sum(1)
    cols = torch.logsumexp(logits, 0) - (t_col * logits).sum(0)
    losses = torch.stack((rows, cols))
    return {"mean": losses.mean(), "sum": losses.sum() / 2, "none": losses}[reduction]


def _assert_close(what, got, want, floor):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    bound = RTOL * max(want.abs().max().item(), floor)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


# ------------------------------------------------------------------ one case, in a child


def _global_batch(n, loss, reduction):
    g = torch.Generator().manual_seed(1234)
    x = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1)
    y = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1)
    ids = torch.randint(0, 2 * n // 3, (n,), generator=g)
    ids[-1] = ids[0]  # at least one pair of positives on different ranks
    shape = (2, n) if loss == "clip" else (n,)
    upstream = torch.randn(shape, generator=g) if reduction == "none" else torch.ones(())
    return x, y, ids, upstream


def _evaluate(vk, case, data, rows, group, dtype):
    """(loss, [d features, d text, d log scale, d bias]) for the samples ``rows``."""
    x, y, ids, upstream = data
    grad = case.get("grad", True)
    x = x[rows].to(dtype).requires_grad_(grad)
    y = y[rows].to(dtype).requires_grad_(grad)
    s0, b0 = (10.0, -1.0) if case["loss"] == "clip" else (10.0, -5.0)
    log_s = torch.tensor(math.log(s0), dtype=dtype, requires_grad=grad)
    b = torch.tensor(b0, dtype=dtype, requires_grad=grad) if case.get("bias") else None
    ids = ids[rows] if case.get("ids") else None
    smoothing = case.get("smoothing", 0.0)
    reduction = case["reduction"]
    if group == "naive":
        out = _naive(case["loss"], x, y, log_s.exp(), b, ids, smoothing, reduction)
    else:
        kw = dict(reduction=reduction, chunk_size=case.get("chunk"), process_group=group)
        if case["loss"] == "clip":
            fn, kw = vk.clip_loss, dict(kw, ids=ids, label_smoothing=smoothing)
        else:
            fn = vk.siglip_loss
        with torch.set_grad_enabled(grad):
            out = fn(x, y, log_s.exp(), b, **kw)
    if not grad:
        return out, []
    up = upstream[..., rows] if reduction == "none" else upstream
    (out * up.to(dtype)).sum().backward()
    return out, [x.grad, y.grad, log_s.grad] + ([b.grad] if b is not None else [])


def _run_case(vk, rank, world, case):
    import torch.distributed as dist

    group = dist.group.WORLD
    if case.get("subgroup") and world == 4:  # non-contiguous: group ranks != global ranks
        groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        group = groups[rank % 2]
        rank, world = dist.get_rank(group), 2
    sizes = case.get("sizes", [EQUAL] * 4)[:world]
    lo = sum(sizes[:rank])
    rows = slice(lo, lo + sizes[rank])
    data = _global_batch(sum(sizes), case["loss"], case["reduction"])
    ring_out, ring_grads = _evaluate(vk, case, data, rows, group, torch.float32)
    refs = [("single-process", _evaluate(vk, case, data, slice(None), None, torch.float32))]
    if rank == 0:
        refs.append(("float64", _evaluate(vk, case, data, slice(None), "naive", torch.float64)))
    upstream = data[3]
    weight = {"mean": 1.0, "sum": float(sum(sizes)),
              "none": upstream.abs().sum().item()}[case["reduction"]]  # fmt: skip
    names = ["d image", "d text", "d log_scale", "d bias"]
    for ref_name, (out, grads) in refs:
        want = out[..., rows] if case["reduction"] == "none" else out
        _assert_close(f"loss vs {ref_name}", ring_out, want, 1.0)
        assert len(grads) == len(ring_grads)
        for name, got, ref in zip(names, ring_grads, grads, strict=False):
            is_feature = name in ("d image", "d text")
            want = ref[rows] if is_feature else ref
            _assert_close(f"{name} vs {ref_name}", got, want, 1e-12 if is_feature else weight)


class _Towers(torch.nn.Module):
    """Two linear 'encoders', a learnable log scale and bias: CLIP (no bias) or SigLIP in
    miniature."""

    def __init__(self, with_bias: bool):
        super().__init__()
        self.image = torch.nn.Linear(D, D)
        self.text = torch.nn.Linear(D, D)
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = torch.nn.Parameter(torch.tensor(-5.0)) if with_bias else None

    def forward(self, a, b):
        return self.image(a), self.text(b), self.log_scale.exp(), self.bias


def _ddp_recipe(vk, rank, world, kind):
    """The README's and docstring's DDP recipe (backward ``loss * world_size``, the scale's
    and bias's gradients divided by world_size in hooks) gives every parameter its
    single-process gradient."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    single = _Towers(with_bias=kind == "siglip")
    model = _Towers(with_bias=kind == "siglip")
    model.load_state_dict(single.state_dict())
    ddp = DistributedDataParallel(model)
    for p in (model.log_scale, model.bias):
        if p is not None:
            p.register_hook(lambda g: g / world)
    loss_fn = vk.clip_loss if kind == "clip" else vk.siglip_loss
    a, b, _, _ = _global_batch(EQUAL * world, kind, "mean")
    rows = slice(rank * EQUAL, (rank + 1) * EQUAL)
    loss = loss_fn(*ddp(a[rows], b[rows]), process_group=dist.group.WORLD)
    (loss * world).backward()
    want = loss_fn(*single(a, b))
    want.backward()
    _assert_close("loss", loss, want, 1.0)
    for (name, got), ref in zip(model.named_parameters(), single.parameters(), strict=True):
        _assert_close(f"d {name}", got.grad, ref.grad, 1e-12)


def _siglip_fp16_loss_scale(vk, rank, world):
    """fp16 features with gradients in fp16's subnormal range (entries below 6e-5): the
    ring's forward-computed gradients are rounded to fp16 only after a GradScaler's loss
    scale, so each entry is within fp16 rounding of the float64 gradient."""
    import torch.distributed as dist

    loss_scale = 2.0**12
    x, y, _, _ = _global_batch(EQUAL * world, "siglip", "mean")
    x, y = (2e-4 * x).half(), (2e-4 * y).half()
    rows = slice(rank * EQUAL, (rank + 1) * EQUAL)
    xa, ya = x[rows].clone().requires_grad_(), y[rows].clone().requires_grad_()
    s, b = torch.tensor(10.0), torch.tensor(-10.0)
    loss = vk.siglip_loss(xa, ya, s, b, process_group=dist.group.WORLD)
    (loss.float() * loss_scale).backward()
    xr, yr = x.double().requires_grad_(), y.double().requires_grad_()
    _naive("siglip", xr, yr, s.double(), b.double(), None, 0.0, "mean").backward()
    assert (xr.grad.abs() < 6e-5).float().mean() > 0.9
    for name, got, want in (
        ("d image", xa.grad, xr.grad[rows]),
        ("d text", ya.grad, yr.grad[rows]),
    ):
        assert got.dtype == torch.float16, f"{name}: {got.dtype}"
        err = ((got.double() / loss_scale - want).abs() / want.abs()).max().item()
        assert err < 2e-3, f"{name}: largest relative error {err:.3g}"


def _autocast_precision(vk, rank, world):
    """Under autocast (CPU bf16), on the PyTorch path: the ring computes in the dtypes the
    entry point cast to, as the single-device losses do, not in autocast's 16-bit products;
    the gradients of the scale (and SigLIP's bias) are then exact up to fp32 rounding of a
    float64 loss on the bf16-rounded features."""
    import torch.distributed as dist

    x, y, _, _ = _global_batch(EQUAL * world, "siglip", "mean")
    rows = slice(rank * EQUAL, (rank + 1) * EQUAL)
    for kind, loss_fn in (("clip", vk.clip_loss), ("siglip", vk.siglip_loss)):
        s = torch.tensor(10.0, requires_grad=True)
        b = torch.tensor(-2.0, requires_grad=True)
        with vk.use_backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(x[rows], y[rows], s, b, process_group=dist.group.WORLD)
        loss.backward()
        sr, br = s.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        xr, yr = x.bfloat16().double(), y.bfloat16().double()
        _naive(kind, xr, yr, sr, br, None, 0.0, "mean").backward()
        checked = [("d logit_scale", s.grad, sr.grad)]
        if kind == "siglip":  # CLIP's softmax ignores a bias: its gradient is rounding
            checked.append(("d logit_bias", b.grad, br.grad))
        for name, got, want in checked:
            err = abs(got.item() - want.item()) / abs(want.item())
            assert err < 1e-5, f"{kind} {name}: relative error {err:.3g}"


def _cases_job(rank, world):
    import vlmkernels

    jobs = {name: functools.partial(_run_case, case=case) for name, case in CASES.items()}
    jobs["clip_ddp_recipe"] = functools.partial(_ddp_recipe, kind="clip")
    jobs["siglip_ddp_recipe"] = functools.partial(_ddp_recipe, kind="siglip")
    jobs["siglip_fp16_loss_scale"] = _siglip_fp16_loss_scale
    jobs["autocast_precision"] = _autocast_precision
    report = {}
    for name, job in jobs.items():
        try:
            job(vlmkernels, rank, world)
            report[name] = None
        except Exception:
            report[name] = traceback.format_exc()
    return report


# ------------------------------------------------------------------ error paths, in a child


def _expect(report, name, exc_type, match, fn):
    try:
        fn()
    except exc_type as e:
        report[name] = None if match in str(e) else f"message without {match!r}: {e}"
    except Exception:
        report[name] = "wrong exception type:\n" + traceback.format_exc()
    else:
        report[name] = "did not raise"


def _errors_job(rank, world):
    import torch.distributed as dist

    import vlmkernels as vk

    group = dist.group.WORLD
    report = {}

    def feats(d=D, dtype=torch.float32, grad=False):
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(5, d, generator=g, dtype=dtype), torch.randn(5, d, generator=g)
        return x.requires_grad_(grad), y.to(dtype).requires_grad_(grad)

    def clip(x, y, **kw):
        return vk.clip_loss(x, y, 10.0, process_group=kw.pop("group", group), **kw)

    dim = D if rank == 0 else 16
    _expect(report, "dim_mismatch", ValueError, "feature dim", lambda: clip(*feats(dim)))
    # a local argument error on rank 1 only (x and y disagree there): rank 1 raises its
    # own error, rank 0 learns of it in the consistency exchange instead of hanging
    want = "same feature dim" if rank == 1 else "rejected their arguments"
    _expect(report, "local_error_on_one_rank", ValueError, want,
            lambda: clip(*((feats()[0][:, :8], feats()[1]) if rank == 1 else feats())))  # fmt: skip
    # an empty shard on rank 1: refused as such there, not as an undefined loss
    want = "this rank's image_features are empty" if rank == 1 else "rejected their arguments"
    for name, fn in (("clip", vk.clip_loss), ("siglip", vk.siglip_loss)):
        _expect(report, f"{name}_empty_shard_on_one_rank", ValueError, want,
                lambda fn=fn: fn(*(t[:0] if rank == 1 else t for t in feats()), 10.0, -5.0,
                                 process_group=group))  # fmt: skip
    want = "reduction must be" if rank == 0 else "rejected their arguments"
    _expect(report, "siglip_local_error_on_one_rank", ValueError, want,
            lambda: vk.siglip_loss(*feats(), 10.0, -5.0, process_group=group,
                                   reduction="avg" if rank == 0 else "mean"))  # fmt: skip
    _expect(report, "siglip_dim_mismatch", ValueError, "feature dim",
            lambda: vk.siglip_loss(*feats(dim), 10.0, -5.0, process_group=group))  # fmt: skip
    dtype = torch.float32 if rank == 0 else torch.float64
    _expect(report, "dtype_mismatch", ValueError, "dtype", lambda: clip(*feats(dtype=dtype)))
    ids = torch.arange(5) if rank == 0 else None
    _expect(report, "ids_on_some_ranks", ValueError, "ids", lambda: clip(*feats(), ids=ids))
    _expect(report, "grad_on_some_ranks", ValueError, "gradients",
            lambda: clip(*feats(grad=rank == 0)))  # fmt: skip
    reduction = "mean" if rank == 0 else "none"
    _expect(report, "reduction_mismatch", ValueError, "reduction",
            lambda: clip(*feats(), reduction=reduction))  # fmt: skip
    loss_fn = (lambda x, y: clip(x, y)) if rank == 0 else (
        lambda x, y: vk.siglip_loss(x, y, 10.0, None, process_group=group))  # fmt: skip
    _expect(report, "different_losses", ValueError, "the loss", lambda: loss_fn(*feats()))
    _expect(report, "not_a_group", TypeError, "ProcessGroup",
            lambda: clip(*feats(), group="world"))  # fmt: skip
    # the global loss has one scale and one bias: different values raise on every rank
    scale = torch.tensor([10.0, 12.5][rank], requires_grad=True)
    _expect(report, "scale_mismatch", ValueError,
            "disagree on logit_scale (rank 0: 10.0, rank 1: 12.5)",
            lambda: vk.clip_loss(*feats(grad=True), scale, process_group=group))  # fmt: skip
    bias = [-5.0, -4.0][rank]
    _expect(report, "bias_mismatch", ValueError,
            "disagree on logit_bias (rank 0: -5.0, rank 1: -4.0)",
            lambda: vk.siglip_loss(*feats(), 10.0, bias, process_group=group))  # fmt: skip
    _expect(report, "clip_bias_mismatch", ValueError, "disagree on logit_bias",
            lambda: clip(*feats(), logit_bias=torch.tensor(bias)))  # fmt: skip

    def second_order(loss):
        """First-order gradients with create_graph=True as without it; a gradient of them
        (next to a differentiable term, which a graph-less gradient would leave alone)
        raises on every rank instead of coming out partial."""
        x, y = feats(grad=True)
        s = torch.tensor(10.0, requires_grad=True)
        if loss == "clip":
            fn = lambda: vk.clip_loss(x, y, s, process_group=group)  # noqa: E731
        else:
            fn = lambda: vk.siglip_loss(x, y, s, -5.0, process_group=group)  # noqa: E731
        (plain,) = torch.autograd.grad(fn(), x)
        (gx,) = torch.autograd.grad(fn(), x, create_graph=True)
        _assert_close("first-order gradient under create_graph", gx, plain, 1e-12)
        torch.autograd.grad((gx * gx).sum() + s * s, s)

    _expect(report, "clip_second_order", NotImplementedError, "clip_loss: second-order",
            lambda: second_order("clip"))  # fmt: skip
    _expect(report, "siglip_second_order", NotImplementedError, "siglip_loss: second-order",
            lambda: second_order("siglip"))  # fmt: skip

    # what a compile session sets: the process-wide flag, and in its own thread a context
    from torch._guards import TracingContext, tracing

    real = torch.compiler._is_compiling_flag
    torch.compiler._is_compiling_flag = True
    try:
        with tracing(TracingContext(None)):
            _expect(report, "while_tracing", RuntimeError, "torch.compile",
                    lambda: clip(*feats()))  # fmt: skip
    finally:
        torch.compiler._is_compiling_flag = real
    fullgraph = torch.compile(lambda x, y: clip(x, y), backend="eager", fullgraph=True)
    _expect(report, "compile_fullgraph", Exception, "disable", lambda: fullgraph(*feats()))

    from vlmkernels.distributed import ring

    # a check that needs no other rank failing on rank 1 only (a forced backend that cannot
    # run there, an unknown VLMKERNELS_CLIP_BACKWARD, features on the wrong device): rank 1
    # raises it, rank 0 learns of it in the consistency exchange instead of hanging
    real_check = ring._check_local

    def check_local(op, group, x):
        if rank == 1:
            raise NotImplementedError(f"{op}: a local configuration error")
        return real_check(op, group, x)

    ring._check_local = check_local
    try:
        want = "local configuration error" if rank == 1 else "rejected their arguments"
        exc = NotImplementedError if rank == 1 else ValueError
        _expect(report, "local_config_error_on_one_rank", exc, want, lambda: clip(*feats()))
    finally:
        ring._check_local = real_check
    # an error inside a rotation on every rank (out of memory at the same step, as equal
    # shards give): the transfers already posted are waited for before it propagates, so
    # the next call (a retry with a smaller batch) finds the group in step
    real_stats = ring.block_stats

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    ring.block_stats = out_of_memory
    try:
        _expect(report, "error_inside_the_rotation", torch.OutOfMemoryError, "simulated",
                lambda: clip(*feats()))  # fmt: skip
    finally:
        ring.block_stats = real_stats

    # a process outside the subgroup (new_group gives it a marker, not a group) is told so
    sub = dist.new_group([0])
    if rank == 1:
        _expect(report, "not_a_member", ValueError, "not a member of process_group",
                lambda: clip(*feats(), group=sub))  # fmt: skip
    else:  # rank 0 alone in it: the local loss
        try:
            x, y = feats()
            _assert_close("one-rank subgroup", clip(x, y, group=sub),
                          vk.clip_loss(x, y, 10.0), 1.0)  # fmt: skip
            report["not_a_member"] = None
        except Exception:
            report["not_a_member"] = traceback.format_exc()

    try:  # the group is still in step after all of that
        x, y = feats()
        xs, ys = [torch.empty_like(x) for _ in range(world)], [torch.empty_like(y)
                                                                for _ in range(world)]  # fmt: skip
        dist.all_gather(xs, x)
        dist.all_gather(ys, y)
        want = vk.clip_loss(torch.cat(xs), torch.cat(ys), 10.0)
        _assert_close("loss after the errors", clip(x, y), want, 1.0)
        report["good_call_after_errors"] = None
    except Exception:
        report["good_call_after_errors"] = traceback.format_exc()

    dist.destroy_process_group()
    _expect(report, "uninitialised", RuntimeError, "not initialised", lambda: clip(*feats()))
    return report


# ------------------------------------------------------------------ spawning


JOBS = {"cases": _cases_job, "errors": _errors_job}


def _child(job, rank, world, store, backends, out):
    os.environ["TRITON_INTERPRET"] = "1"  # before vlmkernels is imported
    torch.set_num_threads(1)
    import torch.distributed as dist

    report = {}
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        for backend in backends:
            os.environ["VLMKERNELS_BACKEND"] = backend
            part = JOBS[job](rank, world)
            report |= {f"{backend}/{name}": failure for name, failure in part.items()}
    except BaseException:
        report["<child>"] = traceback.format_exc()
    with open(out, "w") as f:
        json.dump(report, f)
    if dist.is_initialized():
        dist.destroy_process_group()


def _spawn(job, world, backends, tmp_path):
    """{"backend/name": [None or the failure, per rank]} of ``job`` run on ``world`` spawned
    ranks, on each of ``backends`` in turn."""
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"rank{r}.json" for r in range(world)]
    procs = [
        ctx.Process(target=_child, args=(job, r, world, str(tmp_path / "store"), backends, str(o)))
        for r, o in enumerate(outs)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    results = {}
    for r, (p, out) in enumerate(zip(procs, outs, strict=True)):
        if p.is_alive():
            p.kill()
            p.join()
            report = {"<child>": f"did not finish within {TIMEOUT_S} s (a hang?)"}
        elif out.exists():
            report = json.loads(out.read_text())
        else:
            report = {"<child>": f"exited with code {p.exitcode} without a report"}
        for name, failure in report.items():
            results.setdefault(name, [None] * world)[r] = failure
    return results


def _failures(results, name):
    """Every rank's failure of case ``name`` (or of the child as a whole), as text."""
    lines = []
    for key in ("<child>", name):
        for r, failure in enumerate(results.get(key, [])):
            if failure:
                lines.append(f"--- rank {r}, {key}:\n{failure}")
    if name not in results and "<child>" not in results:
        lines.append(f"no rank reported {name}")
    return "\n".join(lines)


_RESULTS = {}


def _results(job, world, backends, tmp_path_factory):
    key = (job, world, backends)
    if key not in _RESULTS:
        tmp = tmp_path_factory.mktemp(f"{job}-{world}")
        _RESULTS[key] = _spawn(job, world, backends, tmp)
    return _RESULTS[key]


@pytest.mark.parametrize(
    "case",
    [
        *CASES,
        "clip_ddp_recipe",
        "siglip_ddp_recipe",
        "siglip_fp16_loss_scale",
        "autocast_precision",
    ],
)
@pytest.mark.parametrize(("world", "backend"), CONFIGS)
def test_ring_matches_single_process(world, backend, case, tmp_path_factory):
    backends = tuple(b for w, b in CONFIGS if w == world)
    results = _results("cases", world, backends, tmp_path_factory)
    failures = _failures(results, f"{backend}/{case}")
    assert not failures, failures


ERRORS = [
    "dim_mismatch",
    "local_error_on_one_rank",
    "clip_empty_shard_on_one_rank",
    "siglip_empty_shard_on_one_rank",
    "siglip_local_error_on_one_rank",
    "siglip_dim_mismatch",
    "dtype_mismatch",
    "ids_on_some_ranks",
    "grad_on_some_ranks",
    "reduction_mismatch",
    "different_losses",
    "not_a_group",
    "scale_mismatch",
    "bias_mismatch",
    "clip_bias_mismatch",
    "clip_second_order",
    "siglip_second_order",
    "while_tracing",
    "compile_fullgraph",
    "local_config_error_on_one_rank",
    "error_inside_the_rotation",
    "not_a_member",
    "good_call_after_errors",
    "uninitialised",
]


@pytest.mark.parametrize("case", ERRORS)
def test_errors_raise_on_every_rank(case, tmp_path_factory):
    results = _results("errors", 2, ("triton",), tmp_path_factory)
    failures = _failures(results, f"triton/{case}")
    assert not failures, failures


def test_single_rank_group_in_process(tmp_path):
    """World size 1 (no transfers at all) in the test process itself."""
    import torch.distributed as dist

    import vlmkernels

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        for loss in ("clip", "siglip"):
            case = dict(loss=loss, reduction="mean", bias=True, ids=loss == "clip")
            _run_case(vlmkernels, 0, 1, case)
    finally:
        dist.destroy_process_group()


def test_ring_loss_takes_in_place_changes(tmp_path):
    """The process-group losses are tensors of their own in float64 too (the reduced pack's
    view came out of the autograd Function there, which refuses in-place changes): a loss
    scaled in place back-propagates the scaled gradients. World size 1, in process."""
    import torch.distributed as dist

    import vlmkernels

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        for loss_fn, args in ((vlmkernels.clip_loss, (2.0,)),
                              (vlmkernels.siglip_loss, (2.0, -1.0))):  # fmt: skip
            x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
            y = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
            (want,) = torch.autograd.grad(loss_fn(x, y, *args, process_group=dist.group.WORLD), x)
            loss = loss_fn(x, y, *args, process_group=dist.group.WORLD)
            loss.mul_(3.0)
            (got,) = torch.autograd.grad(loss, x)
            assert torch.allclose(got, 3 * want, rtol=1e-12, atol=0)
    finally:
        dist.destroy_process_group()


def test_eager_ring_call_loads_no_compiler(tmp_path):
    """An eager ring-mode call (forward and backward) leaves torch._dynamo unloaded, as
    ``import vlmkernels`` does: loading it replaces torch.manual_seed and other torch
    functions behind the caller's back. Run in a fresh interpreter (world size 1)."""
    import subprocess
    import sys
    import textwrap

    store = tmp_path / "store"
    script = textwrap.dedent(
        f"""
        import sys, torch, torch.distributed as dist
        seed = torch.manual_seed
        import vlmkernels
        dist.init_process_group("gloo", init_method="file://{store}", rank=0,
                                world_size=1)
        x = torch.randn(6, 8, requires_grad=True)
        y = torch.randn(6, 8, requires_grad=True)
        for loss in (vlmkernels.clip_loss(x, y, 2.0, process_group=dist.group.WORLD),
                     vlmkernels.siglip_loss(x, y, 2.0, -1.0, process_group=dist.group.WORLD)):
            loss.backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        dist.destroy_process_group()
        assert "torch._dynamo" not in sys.modules
        assert torch.manual_seed is seed
        """
    )
    result = subprocess.run([sys.executable, "-c", script], env=dict(os.environ),
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("indent", ["    ", ""], ids=["indented", "dedented"])
def test_process_group_entry_whatever_the_docstring_indentation(indent):
    """Python 3.13 compiles docstrings without their indentation (3.12 keeps it; importing
    vlmkernels failed on 3.13 when the entry was placed by an indented "Args:"): the
    ``process_group`` entry goes last in Args either way, its continuation kept."""
    from vlmkernels.distributed import contrastive

    def single():
        pass

    def fn():
        pass

    single.__doc__ = (f"One line.\n\n{indent}Args:\n{indent}    x: an input.\n\n"
                      f"{indent}Returns:\n{indent}    y.\n{indent}")  # fmt: skip
    contrastive._document(fn, single, """\
        process_group: a group,
            continued.""")  # fmt: skip
    assert fn.__doc__ == (
        "One line.\n\nArgs:\n    x: an input.\n    process_group: a group,\n"
        "        continued.\n\nReturns:\n    y."
    )
    single.__doc__ = "No arguments."
    with pytest.raises(RuntimeError, match="no Args section"):
        contrastive._document(fn, single, "process_group: a group.")
    import vlmkernels

    for loss in (vlmkernels.clip_loss, vlmkernels.siglip_loss):
        doc = loss.__doc__
        args, entry = doc.index("\nArgs:\n"), doc.index("\n    process_group: ")
        assert args < entry and "\n\n" not in doc[args:entry], doc  # in the Args section
