"""The whole-loss path with targets (``vlmkernels.ops.contrastive.whole_targets``): a mean or
sum cross-entropy with ids (several positives per row, or none), label smoothing and / or a
teacher (ALBEF's distillation, alpha in (0, 1]) as one op, ``contrastive_ce_targets_reduced``,
whose backward is one op, in prepared launches finished by Triton kernels.

Checked here against float64 math on fresh random inputs: ``contrastive_cross_entropy``
(one direction, M x N with a queue, offsets) and ``clip_loss`` (both directions), odd
sizes, both reductions, fp32 and bf16; that the path is taken (and the fallbacks where it
does not apply agree with it); NaN for a query without a positive; no gradient for the
teacher; opcheck of the new ops. The interpreter's finishing blocks are 32 samples and 8
rows, so M = 37 runs several programs of each.
"""

import pytest
import torch
import torch.nn.functional as F
from test_contrastive import features, leaf, rel_err

import vlmkernels
from vlmkernels.core import tuning
from vlmkernels.kernels.blocks import TILE_ROWS_MAX
from vlmkernels.ops.contrastive import ops as C
from vlmkernels.ops.contrastive import whole_targets


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of the targets' whole-loss path that returned a result."""
    counts = {"forward": 0, "backward": 0}

    def counting(name, attr):
        fn = getattr(whole_targets, f"ce_targets_{name}")

        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            counts[name] += out is not None
            return out

        monkeypatch.setattr(C, attr, wrapped)

    counting("forward", "_ce_targets_forward_whole")
    counting("backward", "_ce_targets_backward_whole")
    return counts


def _soft_ce(logits, targets):
    return -(F.log_softmax(logits, 1) * targets).sum(1)


def _targets64(logits, pos, eps, alpha, teacher):
    """(1 - alpha)((1 - eps) pos / count + eps / n) + alpha softmax(teacher), float64; NaN
    rows where a row has no positive and alpha < 1 (as the loss)."""
    hard = pos / pos.sum(1, keepdim=True)  # 0 / 0 = NaN for a row without a positive
    t = (1 - eps) * hard + eps / logits.shape[1]
    if alpha:
        t = (1 - alpha) * t + alpha * F.softmax(teacher, 1)
    return t


def _reference(q, k, s, b, pos, eps, alpha, teacher, reduction, cols):
    """The float64 loss (the caller's leaves) with positives ``pos`` (M x N, 0 / 1)."""
    logits = s * q @ k.T + (b if b is not None else 0.0)
    losses = _soft_ce(logits, _targets64(logits, pos, eps, alpha, teacher))
    if not cols:
        return losses.mean() if reduction == "mean" else losses.sum()
    t = teacher.T if teacher is not None else None
    col_losses = _soft_ce(logits.T, _targets64(logits.T, pos.T, eps, alpha, t))
    both = torch.stack((losses, col_losses))
    return both.mean() if reduction == "mean" else both.sum() / 2


def _check(out, expected, tensors, refs, dtype, weight):
    """Loss and gradients (of the tensors that require one) against float64."""
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype
    assert rel_err(out, expected) < tol, (out.item(), expected.item())
    for t, r in zip(tensors, refs, strict=True):
        if r is None or r.grad is None:
            assert t is None or t.grad is None
            continue
        floor = 0.1 * weight if r.dim() == 0 else 0.0  # the bias gradient is 0 exactly
        err = rel_err(t.grad, r.grad, floor)
        assert err < (tol if r.dim() else max(tol, 1e-4)), (r.shape, err)


def _run_and_check(loss_fn, leaves, kw, calls, pos, eps, alpha, teacher, reduction, cols,
                   dtype, rows):  # fmt: skip
    """``loss_fn(*leaves, **kw)`` and its backward on the Triton backend, each one op (the
    whole-loss path), against :func:`_reference` in float64."""
    with vlmkernels.use_backend("triton"):
        out = loss_fn(*leaves, **kw)
        out.backward()
    assert calls == {"forward": 1, "backward": 1}
    refs = _as64(*leaves)
    expected = _reference(*refs, pos, eps, alpha, teacher, reduction, cols)
    expected.backward()
    _check(out, expected, leaves, refs, dtype, 1.0 if reduction == "mean" else rows)


def _as64(*ts):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad)
            for t in ts]  # fmt: skip


CCE_CASES = [
    # m, n, offset, dtype, reduction, ids, eps, alpha
    (7, 23, 5, torch.float32, "mean", False, 0.0, 0.4),  # ALBEF: teacher, queue, offset
    (9, 30, 0, torch.float32, "sum", False, 0.1, 0.0),  # label smoothing alone
    (11, 29, 3, torch.float32, "mean", True, 0.0, 0.0),  # ids alone (several positives)
    (37, 45, 0, torch.float32, "sum", True, 0.1, 0.4),  # BLIP: ids + teacher, + smoothing
    (13, 40, 2, torch.float32, "mean", True, 0.0, 1.0),  # alpha = 1: the teacher alone
    (10, 31, 4, torch.bfloat16, "mean", True, 0.05, 0.4),
    (12, 37, 1, torch.float16, "sum", True, 0.1, 0.4),
]


@pytest.mark.parametrize("m,n,offset,dtype,reduction,ids,eps,alpha", CCE_CASES)
def test_one_direction_with_targets_matches_float64(m, n, offset, dtype, reduction, ids, eps,
                                                    alpha, device, calls):  # fmt: skip
    d = 24
    q, k = leaf(features(m, d, dtype, device)), leaf(features(n, d, dtype, device))
    s, b = leaf(torch.tensor(9.0, device=device)), leaf(torch.tensor(-0.7, device=device))
    kw = dict(offset=offset, label_smoothing=eps, reduction=reduction)
    if ids:
        # about 3 positives per query; every query has at least its key i + offset
        k_ids = torch.randint(0, n // 3, (n,), device=device)
        q_ids = k_ids[offset : offset + m].clone()
        kw.update(query_ids=q_ids, key_ids=k_ids)
        pos = (q_ids[:, None] == k_ids[None, :]).double().cpu()
    else:
        pos = torch.zeros(m, n, dtype=torch.float64)
        pos[torch.arange(m), torch.arange(m) + offset] = 1
    teacher = None
    if alpha:
        tq, tk = features(m, d, dtype, device), features(n, d, dtype, device)
        kw.update(teacher_queries=tq, teacher_keys=tk, teacher_logit_scale=7.0, alpha=alpha)
        teacher = 7.0 * tq.double().cpu() @ tk.double().cpu().T
    _run_and_check(vlmkernels.contrastive_cross_entropy, (q, k, s, b), kw, calls, pos, eps,
                   alpha, teacher, reduction, False, dtype, m)  # fmt: skip


CLIP_CASES = [
    # n, dtype, reduction, ids, eps, alpha, bias
    (13, torch.float32, "mean", True, 0.0, 0.0, True),
    (37, torch.float32, "sum", False, 0.1, 0.0, False),
    (21, torch.float32, "mean", False, 0.0, 0.4, True),
    (19, torch.float32, "sum", True, 0.05, 1.0, True),
    (29, torch.float32, "mean", True, 0.1, 0.3, True),
    (17, torch.bfloat16, "mean", True, 0.1, 0.4, True),
]


@pytest.mark.parametrize("n,dtype,reduction,ids,eps,alpha,bias", CLIP_CASES)
def test_clip_with_targets_matches_float64(n, dtype, reduction, ids, eps, alpha, bias, device,
                                           calls):  # fmt: skip
    d = 20
    x, y = leaf(features(n, d, dtype, device)), leaf(features(n, d, dtype, device))
    s = leaf(torch.tensor(11.0, device=device))
    b = leaf(torch.tensor(0.4, device=device)) if bias else None
    kw = dict(label_smoothing=eps, reduction=reduction)
    if ids:
        id_ = torch.randint(0, n // 3, (n,), device=device)
        kw["ids"] = id_
        pos = (id_[:, None] == id_[None, :]).double().cpu()
    else:
        pos = torch.eye(n, dtype=torch.float64)
    teacher = None
    if alpha:
        tx, ty = features(n, d, dtype, device), features(n, d, dtype, device)
        kw.update(teacher=(tx, ty), alpha=alpha)  # teacher scale: the logit scale's
        teacher = 11.0 * tx.double().cpu() @ ty.double().cpu().T
    _run_and_check(vlmkernels.clip_loss, (x, y, s, b), kw, calls, pos, eps, alpha, teacher,
                   reduction, True, dtype, n)  # fmt: skip


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_query_without_a_positive(alpha, device, calls):
    """A query whose id no key has: NaN loss, and NaN in every gradient its loss reaches
    (its row of dQ, all of dK, the scale's), unless alpha = 1 (its targets are then the
    teacher's alone): as the general path, and as the docstring says."""
    m, n, d = 6, 14, 16
    q, k = features(m, d, torch.float32, device), features(n, d, torch.float32, device)
    s = torch.tensor(8.0, device=device)
    k_ids = torch.arange(n, device=device) % 5
    q_ids = torch.tensor([0, 1, 2, 3, 4, 99], device=device)  # the last has no positive
    kw = dict(query_ids=q_ids, key_ids=k_ids)
    if alpha:
        kw.update(teacher_queries=features(m, d, torch.float32, device), alpha=alpha)
    cce = vlmkernels.contrastive_cross_entropy
    with vlmkernels.use_backend("triton"):
        whole = _grads(cce, q, k, s, **kw)
        assert calls == {"forward": 1, "backward": 1}
        general = _grads(lambda *a, **kw: cce(*a, reduction="none", **kw).mean(), q, k, s, **kw)
    assert calls == {"forward": 1, "backward": 1}
    loss, dq, dk, ds = whole
    if alpha < 1:
        assert torch.isnan(loss) and torch.isnan(ds) and torch.isnan(dk).all()
        assert torch.isnan(dq[5]).all() and torch.isfinite(dq[:5]).all()
    else:
        assert all(torch.isfinite(t).all() for t in whole)
    for got, want in zip(whole, general, strict=True):
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert rel_err(got.nan_to_num(), want.nan_to_num(), floor=1e-2) < 1e-5


def test_teacher_gets_no_gradient(device, calls):
    n, d = 12, 16
    x, y = leaf(features(n, d, torch.float32, device)), leaf(features(n, d, torch.float32,
                                                                      device))  # fmt: skip
    tx, ty = leaf(features(n, d, torch.float32, device)), leaf(features(n, d, torch.float32,
                                                                        device))  # fmt: skip
    with vlmkernels.use_backend("triton"):
        vlmkernels.clip_loss(x, y, 10.0, teacher=(tx, ty), alpha=0.4).backward()
        vlmkernels.contrastive_cross_entropy(x, y, 10.0, teacher_queries=tx, teacher_keys=ty,
                                             alpha=0.4).backward()  # fmt: skip
    assert calls == {"forward": 2, "backward": 2}
    assert tx.grad is None and ty.grad is None
    assert x.grad is not None and y.grad is not None


def test_ramped_alpha_takes_one_plan(device, calls):
    """ALBEF and BLIP ramp alpha every step: each value is the loss of that value, and the
    forward keeps one prepared plan for all of them (the launch takes alpha per call), not
    one more plan, and its host time, per value."""
    n, d = 9, 16
    x, y = leaf(features(n, d, torch.float32, device)), leaf(features(n, d, torch.float32,
                                                                      device))  # fmt: skip
    tx, ty = features(n, d, torch.float32, device), features(n, d, torch.float32, device)
    s = torch.tensor(8.0, device=device)
    whole_targets._PLANS.clear()
    refs = _as64(x, y, s)
    teacher = (s * tx @ ty.T).double()
    for step, alpha in enumerate((0.13, 0.5, 0.97)):
        x.grad = y.grad = None
        for r in refs:
            r.grad = None
        with vlmkernels.use_backend("triton"):
            out = vlmkernels.clip_loss(x, y, s, teacher=(tx, ty), alpha=alpha)
            out.backward()
        assert calls == {"forward": step + 1, "backward": step + 1}
        forward_plans = [k for k in whole_targets._PLANS if k[0] == "ce_targets_fwd"]
        assert len(forward_plans) == 1, forward_plans
        expected = _reference(*refs, None, torch.eye(n, dtype=torch.float64, device=device),
                              0.0, alpha, teacher, "mean", True)  # fmt: skip
        expected.backward()
        _check(out, expected, (x, y, None), (*refs[:2], None), torch.float32, 1.0)


def test_per_call_scalars_are_not_key_arguments():
    """PER_CALL stands for a scalar given per call; a key argument selects the config, so
    it cannot be one (refused when the launch is prepared)."""
    kernel = tuning.all_kernels()["ce_target_parts"]
    args = [torch.empty(1)] * 12 + [tuning.PER_CALL] + [1] * 11
    with pytest.raises(ValueError, match="PER_CALL.*'M'"):
        kernel.prepare((1,), tuple(args), {})


def test_rows_far_apart_are_copied_per_call(device, calls, monkeypatch):
    """Rows 2^23 elements apart: offsets inside a tile would pass 32 bits, so the whole path
    copies such features (tile_addressable); its plans, keyed on the callers' layouts,
    remember that, and a call served by a cached plan copies too."""
    m, n, d = 3, 7, 16
    stride = 2**31 // TILE_ROWS_MAX + 1

    def far_rows():
        t = torch.zeros(2 * stride + d, device=device).as_strided((m, d), (stride, 1))
        return t.copy_(features(m, d, torch.float32, device))

    q, tq = far_rows(), far_rows()
    keys = features(n, d, torch.float32, device)
    ids = torch.randint(0, 3, (n,), device=device)
    copies = []
    real = whole_targets.tile_addressable

    def spy(t):
        out = real(t)
        copies.append(out is not t)
        return out

    monkeypatch.setattr(whole_targets, "tile_addressable", spy)
    kw = dict(alpha=0.4, query_ids=ids[:m], key_ids=ids)
    with vlmkernels.use_backend("triton"):
        for call in range(2):
            copies.clear()
            far = q.requires_grad_()
            far.grad = None
            loss = vlmkernels.contrastive_cross_entropy(far, keys, 9.0, teacher_queries=tq, **kw)
            loss.backward()
            if call:  # the cached plans: one copy of each far tensor per forward and backward
                assert sum(copies) == 4
            near = leaf(q.detach().contiguous())
            want = vlmkernels.contrastive_cross_entropy(
                near, keys, 9.0, teacher_queries=tq.contiguous(), **kw
            )
            want.backward()
            assert rel_err(loss, want) < 1e-6 and rel_err(far.grad, near.grad) < 1e-6
    assert calls == {"forward": 4, "backward": 4}


def _grads(fn, *tensors, **kw):
    tensors = [leaf(t) for t in tensors]
    loss = fn(*tensors, **kw)
    loss.backward()
    return [loss] + [t.grad for t in tensors]


@pytest.mark.parametrize("fallback", ["chunked", "fused_design", "recording"])
def test_fallbacks_agree_with_the_whole_path(fallback, device, calls, monkeypatch):
    """Where the path does not apply (several chunks of rows; the fused backward design for
    the targets it covers, label smoothing alone; a tuner recording launches) the op takes
    the general launchers, with the same results. With ids or a teacher the fused design
    would run the chunked one: the whole path's backward stays."""
    m, n, d = 19, 33, 16
    q, k = features(m, d, torch.float32, device), features(n, d, torch.float32, device)
    s = torch.tensor(9.0, device=device)
    k_ids = torch.randint(0, 8, (n,), device=device)
    kw = dict(offset=2, query_ids=k_ids[2 : 2 + m].clone(), key_ids=k_ids, label_smoothing=0.1,
              teacher_queries=features(m, d, torch.float32, device), alpha=0.4)  # fmt: skip
    ckw = dict(ids=k_ids[:m].clone(), label_smoothing=0.1, alpha=0.3,
               teacher=(features(m, d, torch.float32, device), q.clone()))  # fmt: skip
    skw = dict(label_smoothing=0.2, reduction="sum")
    cce, clip = vlmkernels.contrastive_cross_entropy, vlmkernels.clip_loss

    def run():
        return (_grads(cce, q, k, s, **kw) + _grads(clip, q, k[:m], s, **ckw)
                + _grads(clip, q, k[:m], s, **skw))  # fmt: skip

    with vlmkernels.use_backend("triton"):
        whole = run()
        assert calls == {"forward": 3, "backward": 3}
        if fallback == "chunked":  # several chunks: the general launchers
            kw["chunk_size"] = ckw["chunk_size"] = skw["chunk_size"] = 8
        elif fallback == "fused_design":
            monkeypatch.setenv("VLMKERNELS_CLIP_BACKWARD", "fused")
        else:
            monkeypatch.setattr(tuning, "_RECORDING", [])
            whole_targets._PLANS.clear()
        general = run()
    expected = {"chunked": (6, 3), "fused_design": (6, 5), "recording": (3, 3)}[fallback]
    assert (calls["forward"], calls["backward"]) == expected
    for got, want in zip(general, whole, strict=True):
        assert rel_err(got, want, floor=1e-2) < 1e-5


def test_offset_past_the_keys_without_ids_takes_the_general_path(device, calls):
    """Without ids, queries whose key i + offset does not exist have no target: the general
    launchers handle them (NaN), as before."""
    q, k = features(6, 16, torch.float32, device), features(8, 16, torch.float32, device)
    with vlmkernels.use_backend("triton"):
        mean = vlmkernels.contrastive_cross_entropy(q, k, 5.0, offset=4, label_smoothing=0.1)
    assert calls["forward"] == 0
    assert torch.isnan(mean)


# alpha as the float, or (one case: the interpreter's time) as the tensor torch.compile passes
@pytest.mark.parametrize(
    ("cols", "alpha_as"), [(False, "float"), (True, "float"), (True, "tensor")]
)
def test_targets_ops_opcheck(cols, alpha_as, device):
    m, d = 9, 16
    n = m if cols else 21
    x, y = features(m, d, torch.float32, device), features(n, d, torch.float32, device)
    s, b = torch.tensor(6.0, device=device), torch.tensor(0.2, device=device)
    ids = torch.randint(0, 4, (n,), device=device)
    r_ids = ids if cols else ids[:m].clone()
    teacher = (features(m, d, torch.float32, device), features(n, d, torch.float32, device),
               torch.tensor(5.0, device=device))  # fmt: skip
    # alpha 0.4 as the float, or as the tensor that stands for it (the float then ignored)
    alpha = 0.4
    if alpha_as == "tensor":
        teacher, alpha = (*teacher, torch.tensor(0.4, device=device)), 0.0
    else:
        teacher = (*teacher, None)
    options = (1 / m, 0, 0.1, alpha, cols, 0)
    ops = torch.ops.vlmkernels
    with vlmkernels.use_backend("triton"):
        args = (leaf(x), leaf(y), leaf(s), leaf(b), r_ids, ids, *teacher, *options)
        torch.library.opcheck(ops.contrastive_ce_targets_reduced, args)
        loss, coef = ops.contrastive_ce_targets_reduced(x, y, s, b, r_ids, ids, *teacher,
                                                        *options)  # fmt: skip
        assert coef.shape == (1 + cols, 6, m)
        if alpha_as == "tensor":  # the float form's numbers
            want = ops.contrastive_ce_targets_reduced(x, y, s, b, r_ids, ids, *teacher[:3], None,
                                                      1 / m, 0, 0.1, 0.4, cols, 0)  # fmt: skip
            assert torch.equal(loss, want[0]) and torch.equal(coef, want[1])
        grad = torch.tensor(1.3, device=device)
        bwd = (x, y, s, b, r_ids, ids, *teacher, coef, grad, 1 / m, 0, 0.1, alpha, 0)
        both = ops.contrastive_ce_targets_reduced_backward(*bwd, True)
        for y_grad in (True, False):
            torch.library.opcheck(ops.contrastive_ce_targets_reduced_backward, (*bwd, y_grad))
        # without y_grad: no dy (no G^T x), the other gradients unchanged
        dx, dy, ds, db = ops.contrastive_ce_targets_reduced_backward(*bwd, False)
        assert dy is None and both[1].shape == y.shape
        for got, want in zip((dx, ds, db), (both[0], *both[2:]), strict=True):
            assert rel_err(got, want, floor=1e-2) < 1e-6


def test_torch_backend_agrees(device):
    """The op's PyTorch implementation (fp32 here) gives the Triton path's values."""
    m, n, d = 11, 26, 16
    q, k = features(m, d, torch.float32, device), features(n, d, torch.float32, device)
    k_ids = torch.randint(0, 6, (n,), device=device)
    kw = dict(offset=1, query_ids=k_ids[1 : 1 + m].clone(), key_ids=k_ids, label_smoothing=0.1,
              teacher_queries=features(m, d, torch.float32, device), alpha=0.4,
              reduction="sum")  # fmt: skip
    s = torch.tensor(9.0, device=device)
    got = {}
    for backend in ("triton", "torch"):
        with vlmkernels.use_backend(backend):
            got[backend] = _grads(vlmkernels.contrastive_cross_entropy, q, k, s, **kw)
    for a, b in zip(got["triton"], got["torch"], strict=True):
        assert rel_err(a, b, floor=1e-2) < 1e-5
