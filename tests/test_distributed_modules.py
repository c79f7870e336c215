"""vlmkernels.nn.ClipLoss / SigLipLoss with world_size > 1, against open_clip's modules.

Each configuration (world sizes 2 and 4 with the Triton kernels through the interpreter,
world size 2 with ``VLMKERNELS_BACKEND=torch``, and 5 ranks for the SigLIP ring exchanges)
spawns its ranks once (spawn start method, gloo, a FileStore in a temporary directory,
collective timeout 30 s, ``TRITON_INTERPRET=1`` set in each rank before vlmkernels is
imported) and every rank runs its cases in order, recording a traceback per failed case;
the ranks' reports come back through a queue and each (configuration, case) is one pytest
test. About 30 s on 2 CPU cores.

In each case every rank builds its own fp32 features (d = 24, b = 11, or 8 to 13 where
the sizes differ; L2-normalised, deterministic from the rank), a learnable log-scale and
bias, runs open_clip's module (loaded from the installed ``open_clip/loss.py``) and ours on
identical inputs, calls ``backward`` on the loss times a rank-dependent weight (so that
gradients sent to other ranks must carry their sender's upstream gradient) and compares the
loss and the gradients of its features, log-scale and bias. Tolerance: relative error
``||ours - theirs|| / ||theirs|| < 1e-5`` (fp32; both sides sum in a different order; measured
up to ~3e-7 for the loss and feature gradients). The log-scale and bias gradients are
compared relative to ``max(|theirs|, 0.1 w)``, w the rank's upstream weight, as in
test_contrastive.py: CLIP's bias gradient is exactly 0 in exact arithmetic (each softmax row
sums to one; both sides leave ~1e-7 of rounding noise), and SigLIP's scale gradient is a
small sum of large cancelling terms (the Triton kernel recovers it from sum(g S) - b sum(g),
~1e-5 relative to a -0.06 gradient with b = -10).
Local batch sizes that differ (ClipLoss only; open_clip cannot run them) are compared with a
float64 single-process emulation of every rank's loss instead.

Error cases check that every rank raises (no rank left waiting in an exchange) and that the
process group still works afterwards.
"""

import datetime
import itertools
import math
import multiprocessing
import os
import queue
import time
import traceback
import warnings

import _open_clip
import pytest
import torch
import torch.nn.functional as F

D = 24
B = 11
UNEQUAL_SIZES = (9, 12, 8, 13)
TOL = 1e-5
# SigLIP's scale gradient is sum(G S) - b sum(G) over every block: with b = -10 the two
# terms cancel to about 1e-6 of their size in fp32 (launchers.py), so summed over a
# world's blocks it lands near 1e-5 (1.3e-5 measured with 5 ranks); a wrong kernel is O(1)
SCALE_TOL = 3e-5
SCALAR_FLOOR = 0.1
COLLECTIVE_TIMEOUT_S = 30
WORLD_TIMEOUT_S = 300
# name: (world size, VLMKERNELS_BACKEND, the cases it runs: None for all). Five ranks make
# two bidirectional hops, where the two gradients of an exchange travel different routes.
CONFIGS = {
    "world2": (2, "triton", None),
    "world4": (4, "triton", None),
    "world2-torch": (2, "torch", None),
    "world5": (5, "triton", ("siglip-bidir", "siglip-shift")),
}
DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
MAX_ERRORS = []  # per rank: the largest relative error of each comparison


# ------------------------------------------------------------------ helpers (run in the ranks)


def _open_clip_loss_path():
    return _open_clip.loss_path()


def _load_open_clip_loss():
    return _open_clip.load_loss()


def rel_err(actual, expected, floor=0.0):
    """||actual - expected|| / max(||expected||, floor)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    den = max(expected.norm().item(), floor)
    return ((actual - expected).norm() / (den if den > 0 else 1.0)).item()


def features(rank, b, d=D, seed=0):
    """This rank's (image, text) features: fp32, L2-normalised, deterministic from the rank."""
    g = torch.Generator().manual_seed(7919 * seed + rank)
    x, y = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    return F.normalize(x, dim=-1), F.normalize(y, dim=-1)


def upstream(rank):
    return 1.0 + 0.5 * rank


def run(module, rank, x, y, log_scale, bias):
    """Loss and gradients after ``(loss * upstream(rank)).backward()``."""
    xi, yi, ls = (t.detach().clone().requires_grad_(True) for t in (x, y, log_scale))
    bi = bias.detach().clone().requires_grad_(True) if bias is not None else None
    loss = module(xi, yi, ls.exp(), bi)
    (loss * upstream(rank)).backward()
    grads = {"image": xi.grad, "text": yi.grad, "logit_scale": ls.grad}
    if bi is not None:
        grads["logit_bias"] = bi.grad
    return loss.detach(), grads


def assert_close(rank, ours, theirs):
    (loss, grads), (ref_loss, ref_grads) = ours, theirs
    errors = {"loss": rel_err(loss, ref_loss)}
    for name, ref in ref_grads.items():
        assert grads[name] is not None, f"rank {rank}: no gradient for {name}"
        floor = SCALAR_FLOOR * upstream(rank) if name.startswith("logit_") else 0.0
        errors[name] = rel_err(grads[name], ref, floor)
    MAX_ERRORS.append(max(errors.values()))
    bad = {k: v for k, v in errors.items() if not v < (SCALE_TOL if k == "logit_scale" else TOL)}
    assert not bad, f"rank {rank}: relative errors above {TOL}: {bad} (all: {errors})"


def expect_error(problems, fn, exc, match):
    """Runs ``fn``; appends to ``problems`` unless it raises ``exc`` with ``match`` in its
    message. Cases collect problems and raise at the end, so that one rank's failed check
    does not make it skip the collectives the other ranks go on to."""
    try:
        fn()
    except exc as e:
        if match not in str(e):
            problems.append(f"{exc.__name__} without {match!r}: {e}")
        return
    except Exception as e:
        problems.append(f"{type(e).__name__} instead of {exc.__name__}: {e}")
        return
    problems.append(f"no {exc.__name__} ({match!r}) raised")


def raise_problems(rank, problems):
    assert not problems, f"rank {rank}:\n" + "\n".join(problems)


# ------------------------------------------------------------------ cases


def clip_parity(local_loss, gather_with_grad, with_bias):
    def case(rank, n, oc, vk):
        kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=n)
        x, y = features(rank, B)
        log_scale = torch.tensor(math.log(1 / 0.07))
        bias = torch.tensor(-1.5) if with_bias else None
        theirs = run(oc.ClipLoss(**kw), rank, x, y, log_scale, bias)
        ours = run(vk.nn.ClipLoss(**kw), rank, x, y, log_scale, bias)
        assert_close(rank, ours, theirs)

    return case


def clip_logits(rank, n, oc, vk):
    """get_logits and get_ground_truth in every (local_loss, gather_with_grad) mode match
    open_clip's: values and the gradient each rank's features receive. With a bias and
    neither local loss nor one process, open_clip's logits carry it twice (an in-place add
    to a transposed view): ours once."""
    x, y = features(rank, B)
    bias = torch.tensor(-1.5)
    problems = []
    for local_loss in (False, True):
        for gather_with_grad in (False, True):
            kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                      world_size=n)  # fmt: skip
            ours, theirs = vk.nn.ClipLoss(**kw), oc.ClipLoss(**kw)
            got, grads = [], []
            for module in (ours, theirs):
                xi = x.clone().requires_grad_(True)
                logits = module.get_logits(xi, y, 10.0, bias)
                sum((t * torch.linspace(0.5, 1.5, t.numel()).view_as(t)).sum()
                    for t in logits).backward()  # fmt: skip
                got.append([t.detach() for t in logits])
                grads.append(xi.grad)
            if not local_loss:
                got[1] = [t - bias for t in got[1]]  # open_clip's second bias
            errors = [rel_err(a, b) for a, b in zip(*got, strict=True)]
            errors.append(rel_err(*grads))
            labels = ours.get_ground_truth("cpu", B), theirs.get_ground_truth("cpu", B)
            if not (max(errors) < TOL and torch.equal(*labels)):
                problems.append(f"{kw}: relative errors {errors}, labels {labels}")
    raise_problems(rank, problems)


def clip_reference(rank, n, sizes, local_loss, gather_with_grad, log_scale):
    """float64 emulation of every rank's open_clip loss (labels at each row's global index),
    with the gradients rank ``rank`` would receive."""
    leaves = [[t.double().requires_grad_(True) for t in features(k, sizes[k])] for k in range(n)]
    scales = [log_scale.double().requires_grad_(True) for _ in range(n)]
    total, mine = 0.0, None
    for k in range(n):
        if not gather_with_grad and k != rank:
            continue
        keep = lambda j, k=k: gather_with_grad or (j == k and not local_loss)  # noqa: E731
        all_x = torch.cat([x if keep(j) else x.detach() for j, (x, _) in enumerate(leaves)])
        all_y = torch.cat([y if keep(j) else y.detach() for j, (_, y) in enumerate(leaves)])
        s = scales[k].exp()
        if local_loss:
            x, y = leaves[k]
            labels = torch.arange(sizes[k]) + sum(sizes[:k])
            loss = (
                F.cross_entropy(s * x @ all_y.T, labels) + F.cross_entropy(s * y @ all_x.T, labels)
            ) / 2
        else:
            logits = s * all_x @ all_y.T
            labels = torch.arange(sum(sizes))
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        total = total + upstream(k) * loss
        if k == rank:
            mine = loss
    total.backward()
    x, y = leaves[rank]
    return mine.detach(), {"image": x.grad, "text": y.grad, "logit_scale": scales[rank].grad}


def clip_unequal(local_loss, gather_with_grad):
    def case(rank, n, oc, vk):
        sizes = UNEQUAL_SIZES[:n]
        log_scale = torch.tensor(math.log(1 / 0.07))
        x, y = features(rank, sizes[rank])
        kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=n)
        ours = run(vk.nn.ClipLoss(**kw), rank, x, y, log_scale, None)
        ref = clip_reference(rank, n, sizes, local_loss, gather_with_grad, log_scale)
        assert_close(rank, ours, ref)

    return case


def siglip_parity(dist_impl, with_bias=True):
    def case(rank, n, oc, vk):
        x, y = features(rank, B)
        log_scale = torch.tensor(math.log(10.0))
        bias = torch.tensor(-10.0) if with_bias else None
        kw = dict(rank=rank, world_size=n, dist_impl=dist_impl)
        theirs = run(oc.SigLipLoss(**kw), rank, x, y, log_scale, bias)
        ours = run(vk.nn.SigLipLoss(**kw), rank, x, y, log_scale, bias)
        assert_close(rank, ours, theirs)

    return case


def autocast_bf16(rank, n, oc, vk):
    """Under CPU autocast the fp32 features are multiplied in bf16 and the loss is fp32, as
    open_clip's would be (open_clip also rounds its logits to bf16: 2e-2); text features
    already in bf16 (a bf16 tower beside an fp32 one) are taken as open_clip takes them."""
    x, y = features(rank, B)
    modules = (
        (dict(local_loss=True, gather_with_grad=True), "ClipLoss", 14.3, None),
        (dict(), "ClipLoss", 14.3, -1.0),
        (dict(dist_impl="bidir"), "SigLipLoss", 10.0, -10.0),
    )
    problems = []
    for (kw, cls, s, b), text in itertools.product(modules, (y, y.bfloat16())):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = getattr(vk.nn, cls)(rank=rank, world_size=n, **kw)(x, text, s, b)
            theirs = getattr(oc, cls)(rank=rank, world_size=n, **kw)(x, text, torch.tensor(s), b)
        if ours.dtype != torch.float32 or not rel_err(ours, theirs) < 2e-2:
            problems.append(f"{cls}({kw}, text {text.dtype}): ours {ours.item()} "
                            f"({ours.dtype}), theirs {theirs}")  # fmt: skip
    raise_problems(rank, problems)


def siglip_unequal_sizes(rank, n, oc, vk):
    x, y = features(rank, 8 + rank % 2)
    sizes = str([8 + k % 2 for k in range(n)])
    problems = []
    for impl in DIST_IMPLS:
        loss = vk.nn.SigLipLoss(rank=rank, world_size=n, dist_impl=impl)
        expect_error(problems, lambda: loss(x, y, 10.0, -10.0), ValueError, sizes)  # noqa: B023
    raise_problems(rank, problems)


def dims_differ(rank, n, oc, vk):
    x, y = features(rank, B, d=D if rank == 0 else D + 8)
    match = f"feature dim by rank: {[D] + [D + 8] * (n - 1)}"
    problems = []
    for loss in (
        vk.nn.ClipLoss(rank=rank, world_size=n, local_loss=True),
        vk.nn.SigLipLoss(rank=rank, world_size=n),
    ):
        expect_error(problems, lambda: loss(x, y, 10.0, -10.0), ValueError, match)  # noqa: B023
    raise_problems(rank, problems)


def bad_features_on_one_rank(rank, n, oc, vk):
    x, y = features(rank, B)
    if rank == n - 1:
        y = y[:-1]
    match = "same shape" if rank == n - 1 else f"rank(s) [{n - 1}] rejected their arguments"
    problems = []
    for loss in (
        vk.nn.ClipLoss(rank=rank, world_size=n),
        vk.nn.SigLipLoss(rank=rank, world_size=n),
    ):
        expect_error(problems, lambda: loss(x, y, 10.0, -10.0), ValueError, match)  # noqa: B023
    raise_problems(rank, problems)


def bad_scalars_on_one_rank(rank, n, oc, vk):
    """A logit_scale or logit_bias that the loss op refuses on one rank only: that rank
    raises the op's error, the others say which rank it was, instead of waiting for it in
    the gather until the collective timeout."""
    x, y = features(rank, B)
    last = rank == n - 1
    other = ValueError, f"rank(s) [{n - 1}] rejected their arguments"
    problems = []
    for loss in (
        vk.nn.ClipLoss(rank=rank, world_size=n, gather_with_grad=True),
        vk.nn.ClipLoss(rank=rank, world_size=n, local_loss=True),
        vk.nn.SigLipLoss(rank=rank, world_size=n),
    ):
        scale = torch.tensor([10.0, 10.0]) if last else 10.0
        exc, match = (ValueError, "logit_scale must be a scalar") if last else other
        expect_error(problems, lambda: loss(x, y, scale, -10.0), exc, match)  # noqa: B023
        bias = "-10" if last else -10.0
        exc, match = (TypeError, "logit_bias must be a float") if last else other
        expect_error(problems, lambda: loss(x, y, 10.0, bias), exc, match)  # noqa: B023
    raise_problems(rank, problems)


def wrong_rank(rank, n, oc, vk):
    x, y = features(rank, B)
    loss = vk.nn.ClipLoss(rank=0, world_size=n)
    problems = []
    expect_error(problems, lambda: loss(x, y, 10.0), ValueError, str([(0, n)] * n))
    raise_problems(rank, problems)


def second_order(rank, n, oc, vk):
    """First-order gradients with create_graph=True match those without; differentiating
    them (next to a differentiable term) raises on every rank instead of coming out partial
    (test_contrastive_grad2.py for the single-process losses)."""
    x, y = features(rank, B)
    kw = dict(rank=rank, world_size=n)
    modules = (
        vk.nn.ClipLoss(local_loss=True, gather_with_grad=True, **kw),
        vk.nn.ClipLoss(**kw),
        vk.nn.SigLipLoss(dist_impl="bidir", **kw),
        vk.nn.SigLipLoss(dist_impl="gather", **kw),
    )
    problems = []
    for module in modules:
        xi, yi = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        ls = torch.tensor(math.log(10.0), requires_grad=True)
        (plain,) = torch.autograd.grad(module(xi, yi, ls.exp(), -1.0), xi)
        (gx,) = torch.autograd.grad(module(xi, yi, ls.exp(), -1.0), xi, create_graph=True)
        if not rel_err(gx, plain) < TOL:
            problems.append(f"{module}: create_graph changed the gradient")
        expect_error(problems, lambda: torch.autograd.grad((gx * gx).sum() + ls * ls, ls),  # noqa: B023
                     NotImplementedError, "second-order gradients")  # fmt: skip
    raise_problems(rank, problems)


CASES = {}
for _local in (False, True):
    for _grad in (False, True):
        for _bias in (False, True):
            _name = f"clip-local{int(_local)}-gathergrad{int(_grad)}-bias{int(_bias)}"
            CASES[_name] = clip_parity(_local, _grad, _bias)
        CASES[f"clip-unequal-sizes-local{int(_local)}-gathergrad{int(_grad)}"] = clip_unequal(
            _local, _grad
        )
for _impl in DIST_IMPLS:
    CASES[f"siglip-{_impl}"] = siglip_parity(_impl)
CASES["siglip-shift-nobias"] = siglip_parity("shift", with_bias=False)
CASES["clip-logits"] = clip_logits
CASES["autocast-bf16"] = autocast_bf16
CASES["error-siglip-unequal-sizes"] = siglip_unequal_sizes
CASES["error-dims-differ"] = dims_differ
CASES["error-bad-features-on-one-rank"] = bad_features_on_one_rank
CASES["error-bad-scalars-on-one-rank"] = bad_scalars_on_one_rank
CASES["error-wrong-rank"] = wrong_rank
CASES["error-second-order"] = second_order
CASES["after-errors-clip-local1-gathergrad1"] = clip_parity(True, True, True)
CASES["after-errors-siglip-bidir"] = siglip_parity("bidir")


# ------------------------------------------------------------------ the ranks


def _worker(rank, n, store, backend, names, results):
    """One rank: the cases ``names`` in order; reports {case: None or traceback}."""
    os.environ["TRITON_INTERPRET"] = "1"  # before vlmkernels is imported: CPU tensors
    os.environ["VLMKERNELS_BACKEND"] = backend
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed.nn in open_clip
    report = {}
    try:
        import torch.distributed as dist

        import vlmkernels as vk

        oc = _load_open_clip_loss()
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=n,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        for name in names:
            case = CASES[name]
            start = time.perf_counter()
            try:
                case(rank, n, oc, vk)
                report[name] = None
            except Exception:
                report[name] = traceback.format_exc()
            report[f"{name}:seconds"] = time.perf_counter() - start
        report["<max-error>"] = max(MAX_ERRORS, default=0.0)
        dist.destroy_process_group()
    except Exception:
        report["<set-up>"] = traceback.format_exc()
    results.put((rank, report))


def _spawn_world(n, backend, names, tmp):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    store = tmp / "store"
    procs = [
        ctx.Process(
            target=_worker, args=(rank, n, str(store), backend, names, results), daemon=True
        )
        for rank in range(n)
    ]
    for p in procs:
        p.start()
    reports = {}
    deadline = time.monotonic() + WORLD_TIMEOUT_S
    try:
        while len(reports) < n and time.monotonic() < deadline:
            try:
                rank, report = results.get(timeout=1.0)
                reports[rank] = report
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    exit_codes = {rank: p.exitcode for rank, p in enumerate(procs)}
    return reports, exit_codes


def _cases(config):
    return CONFIGS[config][2] or tuple(CASES)


_WORLDS = {}  # config -> (n, reports, exit codes): each configuration is spawned once


def _world_of(config, tmp_path_factory):
    if config not in _WORLDS:
        n, backend, _ = CONFIGS[config]
        start = time.perf_counter()
        tmp = tmp_path_factory.mktemp(config)
        reports, exit_codes = _spawn_world(n, backend, _cases(config), tmp)
        elapsed = time.perf_counter() - start
        worst = max((r.get("<max-error>", 0.0) for r in reports.values()), default=0.0)
        print(f"\n{config}: {n} ranks, {backend}: {elapsed:.1f} s, largest rel. error {worst:.2g}")
        _WORLDS[config] = n, reports, exit_codes
    return _WORLDS[config]


@pytest.mark.parametrize(
    "config,case", [(c, k) for c in CONFIGS for k in _cases(c)], ids=lambda v: v
)
def test_distributed_case(config, case, tmp_path_factory):
    """Every rank of ``config`` ran ``case`` without error (the first failing case of a
    configuration is the one to read: a rank that fails inside an exchange can leave the
    others' later cases failing too)."""
    if _open_clip_loss_path() is None:
        pytest.skip("open_clip_torch is not installed")
    n, reports, exit_codes = _world_of(config, tmp_path_factory)
    problems = []
    for rank in range(n):
        report = reports.get(rank)
        if report is None:
            problems.append(
                f"rank {rank} sent no report within {WORLD_TIMEOUT_S} s (exit code "
                f"{exit_codes[rank]}: it hung or crashed)"
            )
        elif "<set-up>" in report:
            problems.append(f"rank {rank} failed before the cases:\n{report['<set-up>']}")
        elif case not in report:
            problems.append(f"rank {rank} did not run {case}")
        elif report[case] is not None:
            problems.append(f"rank {rank}:\n{report[case]}")
    assert not problems, f"{case} with {n} ranks:\n" + "\n".join(problems)


# ------------------------------------------------------------------ one process


@pytest.mark.parametrize("cls", ["ClipLoss", "SigLipLoss"])
def test_uninitialised_process_group_raises_at_forward(cls):
    import torch.distributed as dist

    import vlmkernels

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    loss = getattr(vlmkernels.nn, cls)(rank=1, world_size=2)
    x, y = features(0, B)
    with pytest.raises(RuntimeError, match="init_process_group"):
        loss(x, y, 10.0, -10.0)


def test_constructor_errors():
    import vlmkernels

    with pytest.raises(NotImplementedError, match="use_horovod"):
        vlmkernels.nn.ClipLoss(rank=0, world_size=2, use_horovod=True)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        vlmkernels.nn.ClipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size >= 1"):
        vlmkernels.nn.SigLipLoss(world_size=0)
    with pytest.raises(TypeError, match="world_size must be an int"):
        vlmkernels.nn.SigLipLoss(world_size=2.0)
    # one process: the arguments open_clip ignores stay ignored
    vlmkernels.nn.ClipLoss(use_horovod=True)
