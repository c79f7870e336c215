"""Targets beyond one-hot InfoNCE, against float64 references written from the papers' code:
BLIP's multi-positive ``idx`` targets, label smoothing (torch's ``label_smoothing``), ALBEF's
momentum distillation with a queue of extra negative keys, rectangular blocks with an
offset diagonal, and the GradCache functional forms.

Tolerances as in test_contrastive.py: fp32 1e-5 relative (L2) for losses and feature
gradients, scale/bias gradients relative to max(|ref|, 0.1).
"""

import pytest
import torch
import torch.nn.functional as F
from test_contrastive import spy_general_grads

import vlmkernels

BACKENDS = ["triton", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with vlmkernels.use_backend(request.param):
        yield request.param


def rel(a, b, floor=0.0):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / max(b.norm().item(), floor, 1e-30)).item()


def feats(n, d, device, dtype=torch.float32):
    return F.normalize(torch.randn(n, d, device=device), dim=-1).to(dtype)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def soft_ce(logits, targets):
    """-(log_softmax(logits) * targets).sum(1): cross-entropy with soft targets."""
    return -(F.log_softmax(logits, 1) * targets).sum(1)


def grads_of(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t.requires_grad])


def compare(ours, ref, tensors, ref_tensors, tol=1e-5, weight=1.0):
    """Loss and gradients; scale/bias gradients relative to max(|ref|, 0.1 * weight), the
    loss's total weight (the bias gradient of a cross-entropy is 0 in exact arithmetic)."""
    assert rel(ours, ref) < tol, (ours.item(), ref.item())
    for i, (g, rg) in enumerate(
        zip(grads_of(ours, tensors), grads_of(ref, ref_tensors), strict=True)
    ):
        floor = 0.1 * weight if g.dim() == 0 else 0.0
        assert rel(g, rg, floor) < tol, (i, rel(g, rg, floor))


def as64(*ts):
    return [t.detach().double().cpu().requires_grad_(t.requires_grad) for t in ts]


@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_multi_positive_ids(with_bias, device, backend):
    """BLIP: pos = (idx == idx^T), targets pos / pos.sum(1), both directions."""
    n, d = 37, 24
    x, y = leaf(feats(n, d, device)), leaf(feats(n, d, device))
    s = leaf(torch.tensor(12.0, device=device))
    b = leaf(torch.tensor(-1.0, device=device)) if with_bias else None
    ids = torch.randint(0, 9, (n,), device=device)
    ours = vlmkernels.clip_loss(x, y, s, b, ids=ids)
    tensors = [x, y, s] + ([b] if b is not None else [])
    xr, yr, sr, *br = as64(*tensors)
    logits = sr * xr @ yr.T + (br[0] if br else 0)
    pos = (ids[:, None] == ids[None, :]).double().cpu()
    targets = pos / pos.sum(1, keepdim=True)
    ref = (soft_ce(logits, targets).mean() + soft_ce(logits.T, targets.T).mean()) / 2
    compare(ours, ref, tensors, [xr, yr, sr, *br])


def test_clip_label_smoothing(device, backend):
    n, d = 41, 24
    x, y = leaf(feats(n, d, device)), leaf(feats(n, d, device))
    s = leaf(torch.tensor(10.0, device=device))
    ours = vlmkernels.clip_loss(x, y, s, label_smoothing=0.1)
    xr, yr, sr = as64(x, y, s)
    logits, labels = sr * xr @ yr.T, torch.arange(n)
    ref = (
        F.cross_entropy(logits, labels, label_smoothing=0.1)
        + F.cross_entropy(logits.T, labels, label_smoothing=0.1)
    ) / 2
    compare(ours, ref, [x, y, s], [xr, yr, sr])


def test_clip_teacher_distillation(device, backend):
    """ALBEF in-batch: targets alpha softmax(s_t I_m T_m^T) + (1 - alpha) one-hot."""
    n, d, alpha = 33, 24, 0.4
    x, y = leaf(feats(n, d, device)), leaf(feats(n, d, device))
    xm, ym = feats(n, d, device), feats(n, d, device)
    s = leaf(torch.tensor(14.0, device=device))
    ours = vlmkernels.clip_loss(x, y, s, teacher=(xm, ym), teacher_logit_scale=11.0, alpha=alpha)
    xr, yr, sr = as64(x, y, s)
    teacher = 11.0 * xm.double().cpu() @ ym.double().cpu().T
    onehot = torch.eye(n, dtype=torch.float64)
    logits = sr * xr @ yr.T
    t_i2t = alpha * F.softmax(teacher, 1) + (1 - alpha) * onehot
    t_t2i = alpha * F.softmax(teacher.T, 1) + (1 - alpha) * onehot
    ref = (soft_ce(logits, t_i2t).mean() + soft_ce(logits.T, t_t2i).mean()) / 2
    compare(ours, ref, [x, y, s], [xr, yr, sr])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_default_teacher_scale_gets_no_gradient(reduction, device, backend):
    """The teacher's scale defaults to the student's s, which requires a gradient: that
    gradient is the student's alone (the teacher targets are constants, as ALBEF's under
    torch.no_grad), for clip_loss and for contrastive_cross_entropy's queue form."""
    n, q, d, alpha = 12, 9, 16, 0.4
    x, y = leaf(feats(n, d, device)), leaf(feats(n, d, device))
    xm, ym = feats(n, d, device), feats(n, d, device)
    queue = feats(q, d, device)
    s = leaf(torch.tensor(9.0, device=device))
    weights = torch.rand(2, n, device=device)
    xr, yr, sr = as64(x, y, s)
    teacher = sr.detach() * xm.double().cpu() @ ym.double().cpu().T
    onehot = torch.eye(n, dtype=torch.float64)
    logits = sr * xr @ yr.T
    t_i2t = alpha * F.softmax(teacher, 1) + (1 - alpha) * onehot
    t_t2i = alpha * F.softmax(teacher.T, 1) + (1 - alpha) * onehot
    ours = vlmkernels.clip_loss(x, y, s, teacher=(xm, ym), alpha=alpha, reduction=reduction)
    ref = torch.stack((soft_ce(logits, t_i2t), soft_ce(logits.T, t_t2i)))
    if reduction == "mean":
        compare(ours, ref.mean(1).sum() / 2, [x, y, s], [xr, yr, sr])
    else:
        w = weights.double().cpu()
        compare((ours * weights).sum(), (ref * w).sum(), [x, y, s], [xr, yr, sr])

    keys = torch.cat((y.detach(), queue))
    t_keys = torch.cat((ym, queue))
    ours = vlmkernels.contrastive_cross_entropy(
        x, keys, s, teacher_queries=xm, teacher_keys=t_keys, alpha=alpha, reduction=reduction
    )
    kr = keys.double().cpu()
    teacher = sr.detach() * xm.double().cpu() @ t_keys.double().cpu().T
    hard = torch.eye(n, n + q, dtype=torch.float64)
    ref = soft_ce(sr * xr @ kr.T, alpha * F.softmax(teacher, 1) + (1 - alpha) * hard)
    if reduction == "mean":
        compare(ours, ref.mean(), [x, s], [xr, sr])
    else:
        w = weights[0].double().cpu()
        compare((ours * weights[0]).sum(), (ref * w).sum(), [x, s], [xr, sr])


@pytest.mark.parametrize("targets", ["plain", "all"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_clip_with_a_frozen_image_tower(targets, chunk_size, device, backend, monkeypatch):
    """LiT: the image features need no gradient. The reduced loss is symmetric in the two
    sides, so the text side goes first and the backward skips the image gradient's
    product, in one pass or chunk by chunk; loss and gradients are the formula's."""
    from vlmkernels.ops.contrastive import ops as C

    n, d, alpha, eps = 13, 16, 0.3, 0.05
    x, y = feats(n, d, device), leaf(feats(n, d, device))
    xm, ym = feats(n, d, device), feats(n, d, device)
    s = leaf(torch.tensor(9.0, device=device))
    ids = torch.randint(0, 4, (n,), device=device)
    asked = []
    whole = C._ce_targets_backward_whole
    monkeypatch.setattr(C, "_ce_targets_backward_whole",
                        lambda *a: asked.append(a[-1]) or whole(*a))  # fmt: skip
    general = spy_general_grads(monkeypatch, "clip")
    kw = {} if targets == "plain" else dict(ids=ids, label_smoothing=eps, teacher=(xm, ym),
                                            teacher_logit_scale=7.0, alpha=alpha)  # fmt: skip
    ours = vlmkernels.clip_loss(x, y, s, chunk_size=chunk_size, **kw)
    xr, yr, sr = as64(x, y, s)
    logits = sr * xr @ yr.T
    if targets == "plain":
        t_i2t = t_t2i = torch.eye(n, dtype=torch.float64)
    else:
        teacher = 7.0 * xm.double().cpu() @ ym.double().cpu().T
        pos = (ids[:, None] == ids[None, :]).double().cpu()
        hard = (1 - eps) * pos / pos.sum(1, keepdim=True) + eps / n
        t_i2t = alpha * F.softmax(teacher, 1) + (1 - alpha) * hard
        t_t2i = alpha * F.softmax(teacher.T, 1) + (1 - alpha) * hard.T
    ref = (soft_ce(logits, t_i2t).mean() + soft_ce(logits.T, t_t2i).mean()) / 2
    compare(ours, ref, [y, s], [yr, sr])
    assert x.grad is None
    if backend == "triton":
        assert asked == [False]  # the image side second, its gradient not asked for
    if backend == "torch" or chunk_size:  # the general pass: no dy product either
        assert general == [(False, None)]
    else:
        assert general == []


def test_clip_all_targets_together(device, backend):
    n, d, alpha, eps = 29, 16, 0.3, 0.05
    x, y = leaf(feats(n, d, device)), leaf(feats(n, d, device))
    xm, ym = feats(n, d, device), feats(n, d, device)
    s, b = leaf(torch.tensor(9.0, device=device)), leaf(torch.tensor(0.5, device=device))
    ids = torch.randint(0, 6, (n,), device=device)
    ours = vlmkernels.clip_loss(
        x, y, s, b, ids=ids, label_smoothing=eps, teacher=(xm, ym), alpha=alpha,
        reduction="none",
    )  # fmt: skip
    weights = torch.rand(2, n, device=device)
    xr, yr, sr, br = as64(x, y, s, b)
    logits = sr * xr @ yr.T + br
    teacher = sr.detach() * xm.double().cpu() @ ym.double().cpu().T
    pos = (ids[:, None] == ids[None, :]).double().cpu()
    hard = pos / pos.sum(1, keepdim=True)
    t_i2t = alpha * F.softmax(teacher, 1) + (1 - alpha) * ((1 - eps) * hard + eps / n)
    t_t2i = alpha * F.softmax(teacher.T, 1) + (1 - alpha) * ((1 - eps) * hard.T + eps / n)
    ref = torch.stack((soft_ce(logits, t_i2t), soft_ce(logits.T, t_t2i)))
    assert rel(ours, ref) < 1e-5
    compare((ours * weights).sum(), (ref * weights.double().cpu()).sum(), [x, y, s, b],
            [xr, yr, sr, br], weight=weights.sum().item())  # fmt: skip


@pytest.mark.parametrize("offset", [0, 5, -3])
def test_rectangular_offset(offset, device, backend):
    """Queries i against keys with the positive at key i + offset (local rows x global
    columns, as in open_clip's local_loss)."""
    m, n, d = 19, 47, 24
    q, k = leaf(feats(m, d, device)), leaf(feats(n, d, device))
    s = leaf(torch.tensor(13.0, device=device))
    offset = offset if offset >= 0 else n - m + offset  # all positives inside
    ours = vlmkernels.contrastive_cross_entropy(q, k, s, offset=offset)
    qr, kr, sr = as64(q, k, s)
    ref = F.cross_entropy(sr * qr @ kr.T, torch.arange(m) + offset)
    compare(ours, ref, [q, k, s], [qr, kr, sr])


def test_albef_with_queue(device, backend):
    """ALBEF ITC, image-to-text: keys = [momentum texts; no-grad queue], soft targets from
    the momentum image features against the same keys; gradients to the queries only."""
    b, q_len, d, alpha = 16, 48, 24, 0.4
    img = leaf(feats(b, d, device))
    img_m, txt_m = feats(b, d, device), feats(b, d, device)
    queue = feats(q_len, d, device)
    keys = torch.cat((txt_m, queue))
    temp = leaf(torch.tensor(0.07, device=device))
    ours = vlmkernels.contrastive_cross_entropy(
        img, keys, 1 / temp, teacher_queries=img_m, teacher_logit_scale=1 / 0.07, alpha=alpha
    )
    imgr, tempr = as64(img, temp)
    keys64 = keys.double().cpu()
    sim = imgr @ keys64.T / tempr
    sim_m = img_m.double().cpu() @ keys64.T / 0.07
    onehot = torch.zeros_like(sim_m)
    onehot[:, :b] = torch.eye(b)
    targets = alpha * F.softmax(sim_m, 1) + (1 - alpha) * onehot
    ref = soft_ce(sim, targets).mean()
    compare(ours, ref, [img, temp], [imgr, tempr])


def test_blip_ids_with_queue(device, backend):
    """BLIP retrieval ITC: positives where idx_queue matches idx (image_id)."""
    b, q_len, d = 12, 36, 16
    img, txt = leaf(feats(b, d, device)), leaf(feats(b, d, device))
    queue = feats(q_len, d, device)
    idx = torch.randint(0, 20, (b,), device=device)
    idx_queue = torch.randint(0, 20, (q_len,), device=device)
    keys = torch.cat((txt, queue))
    key_ids = torch.cat((idx, idx_queue))
    ours = vlmkernels.contrastive_cross_entropy(img, keys, 10.0, query_ids=idx, key_ids=key_ids)
    imgr, txtr = as64(img, txt)
    sim = 10.0 * imgr @ torch.cat((txtr, queue.double().cpu())).T
    pos = (idx[:, None].cpu() == key_ids[None, :].cpu()).double()
    ref = soft_ce(sim, pos / pos.sum(1, keepdim=True)).mean()
    compare(ours, ref, [img, txt], [imgr, txtr])


def test_clip_loss_with_grads_matches_autograd(device, backend):
    n, d = 31, 24
    x, y = feats(n, d, device), feats(n, d, device)
    s, b = torch.tensor(11.0, device=device), torch.tensor(-2.0, device=device)
    ids = torch.randint(0, 7, (n,), device=device)
    for reduction in ("mean", "sum"):
        loss, dx, dy, ds, db = vlmkernels.clip_loss_with_grads(
            x, y, s, b, reduction=reduction, ids=ids, label_smoothing=0.1
        )
        assert not loss.requires_grad and not dx.requires_grad
        xl, yl, sl, bl = leaf(x), leaf(y), leaf(s), leaf(b)
        ref = vlmkernels.clip_loss(xl, yl, sl, bl, reduction=reduction, ids=ids,
                                   label_smoothing=0.1)  # fmt: skip
        ref.backward()
        assert rel(loss, ref) < 1e-6
        for g, rg in ((dx, xl.grad), (dy, yl.grad)):
            assert rel(g, rg) < 1e-6
        assert rel(ds, sl.grad, 0.1) < 1e-6 and rel(db, bl.grad, 0.1) < 1e-6
    _, _, _, _, no_bias = vlmkernels.clip_loss_with_grads(x, y, s)
    assert no_bias is None


def test_siglip_loss_with_grads_matches_autograd(device, backend):
    n, d = 31, 24
    x, y = feats(n, d, device), feats(n, d, device)
    s, b = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
    loss, dx, dy, ds, db = vlmkernels.siglip_loss_with_grads(x, y, s, b)
    xl, yl, sl, bl = leaf(x), leaf(y), leaf(s), leaf(b)
    ref = vlmkernels.siglip_loss(xl, yl, sl, bl)
    ref.backward()
    assert rel(loss, ref) < 1e-6
    for g, rg in ((dx, xl.grad), (dy, yl.grad), (ds, sl.grad), (db, bl.grad)):
        assert rel(g, rg) < 1e-6


@pytest.mark.parametrize("shape", [(1,), (1, 1)])
def test_with_grads_scale_and_bias_gradients_take_their_shapes(shape):
    """GradCache pushes d_scale / d_bias into the parameters they came from: transformers'
    SigLIP keeps logit_scale and logit_bias as (1,) parameters, and autograd.backward
    refuses a () gradient for them."""
    n, d = 9, 8
    x, y = feats(n, d, "cpu"), feats(n, d, "cpu")
    s, b = torch.full(shape, 10.0), torch.full(shape, -3.0, dtype=torch.float64)
    for fn, plain in ((vlmkernels.clip_loss_with_grads, vlmkernels.clip_loss),
                      (vlmkernels.siglip_loss_with_grads, vlmkernels.siglip_loss)):  # fmt: skip
        _, _, _, ds, db = fn(x, y, s, b)
        sl, bl = leaf(s), leaf(b)
        plain(x, y, sl, bl).backward()
        assert ds.shape == sl.grad.shape == shape and db.shape == bl.grad.shape == shape
        assert ds.dtype == sl.grad.dtype and db.dtype == bl.grad.dtype
        assert rel(ds, sl.grad) < 1e-6 and rel(db, bl.grad) < 1e-6
        torch.autograd.backward([sl, bl], [ds, db])  # accepted


def test_siglip_negative_only(device, backend):
    n, d = 23, 24
    x, y = leaf(feats(n, d, device)), leaf(feats(n, d, device))
    s, b = leaf(torch.tensor(10.0, device=device)), leaf(torch.tensor(-5.0, device=device))
    ours = vlmkernels.siglip_loss(x, y, s, b, negative_only=True)
    xr, yr, sr, br = as64(x, y, s, b)
    ref = -F.logsigmoid(-(sr * xr @ yr.T + br)).sum() / n
    compare(ours, ref, [x, y, s, b], [xr, yr, sr, br])


def test_bf16_targets(device, backend):
    n, d = 40, 32
    x, y = leaf(feats(n, d, device, torch.bfloat16)), leaf(feats(n, d, device, torch.bfloat16))
    ids = torch.randint(0, 10, (n,), device=device)
    ours = vlmkernels.clip_loss(x, y, 10.0, ids=ids, label_smoothing=0.1)
    xr, yr = as64(x, y)
    logits = 10.0 * xr @ yr.T
    pos = (ids[:, None] == ids[None, :]).double().cpu()
    hard = pos / pos.sum(1, keepdim=True)
    t = 0.9 * hard + 0.1 / n
    ref = (soft_ce(logits, t).mean() + soft_ce(logits.T, t.T).mean()) / 2
    assert rel(ours, ref) < 1e-2
    for g, rg in zip(grads_of(ours, [x, y]), grads_of(ref, [xr, yr]), strict=True):
        assert rel(g, rg) < 1e-2


def test_target_argument_errors(device):
    x, y = feats(8, 16, device), feats(8, 16, device)
    cases = [
        (dict(ids=torch.zeros(7, dtype=torch.long)), ValueError, "ids must have shape"),
        (dict(ids=torch.zeros(8)), TypeError, "ids must be an integer"),
        (dict(label_smoothing=1.0), ValueError, "label_smoothing"),
        (dict(alpha=0.5), ValueError, "needs teacher"),
        (dict(teacher=(x, y[:4]), alpha=0.5), ValueError, "teacher"),
        # a teacher's parts without the teacher would be ignored: refused
        (dict(teacher_logit_scale=5.0), ValueError, "teacher_logit_scale given without teacher"),
    ]
    for kwargs, exc, message in cases:
        with pytest.raises(exc, match=message):
            vlmkernels.clip_loss(x, y, 1.0, **kwargs)
    for kwargs in (dict(teacher_keys=y), dict(teacher_logit_scale=5.0)):
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))} given without teacher_queries"):
            vlmkernels.contrastive_cross_entropy(x, y, 1.0, **kwargs)
    with pytest.raises(ValueError, match="go together"):
        vlmkernels.contrastive_cross_entropy(x, y, 1.0, query_ids=torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="feature dim"):
        vlmkernels.contrastive_cross_entropy(x, y[:, :8], 1.0)
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        vlmkernels.clip_loss_with_grads(x, y, 1.0, reduction="none")


# ------------------------------------------------------------------ rows without a positive


def _rows_without_positives(kind, m, n, device):
    """(keyword arguments, (M, N) float64 positives) for queries of which some have no
    positive key: an offset past the end of the keys for rows 7.., or query ids that no
    key carries."""
    if kind == "offset":
        offset = n - 7
        pos = (torch.arange(m)[:, None] + offset == torch.arange(n)[None, :]).double()
        return dict(offset=offset), pos
    key_ids = torch.arange(n, device=device) % 17
    query_ids = torch.randint(0, 26, (m,), device=device)
    query_ids[:3] = torch.tensor([0, 5, 30])  # some positives, and at least one none
    pos = (query_ids[:, None] == key_ids[None, :]).double().cpu()
    return dict(query_ids=query_ids, key_ids=key_ids), pos


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees NaN
@pytest.mark.parametrize("kind", ["offset", "ids"])
def test_rows_without_positive_are_nan(kind, device, backend):
    """A query with no positive key has no target: its loss is NaN (not the row's
    log-sum-exp), so are the mean and the sum, and so are the gradients its loss reaches;
    the other rows are exact. Rows left out by the upstream gradient (masked) do not
    poison the gradients."""
    m, n, d = 19, 47, 24
    q, k = leaf(feats(m, d, device)), leaf(feats(n, d, device))
    s, b = leaf(torch.tensor(13.0, device=device)), leaf(torch.tensor(-0.5, device=device))
    kw, pos = _rows_without_positives(kind, m, n, device)
    has = pos.sum(1) > 0
    assert 0 < int(has.sum()) < m
    fn = vlmkernels.contrastive_cross_entropy
    rows = fn(q, k, s, b, reduction="none", **kw)
    qr, kr, sr, br = as64(q, k, s, b)
    ref = soft_ce(sr * qr @ kr.T + br, pos / pos.sum(1, keepdim=True).clamp_min(1))
    assert torch.isnan(rows[~has.to(device)]).all()
    assert rel(rows[has.to(device)], ref[has]) < 1e-5
    for reduction in ("mean", "sum"):
        assert torch.isnan(fn(q, k, s, b, reduction=reduction, **kw))
    gq, gk, gs, gb = torch.autograd.grad(fn(q, k, s, b, **kw), [q, k, s, b])
    assert torch.isnan(gq[~has.to(device)]).all(dim=1).all()
    assert torch.isnan(gk).any() and torch.isnan(gs) and torch.isnan(gb)
    # masked out (zero upstream gradient), the rows without positives change nothing
    keep = has.to(device)
    ours = torch.where(keep, rows, 0.0).sum()
    compare(ours, ref[has].sum(), [q, k, s, b], [qr, kr, sr, br], weight=float(has.sum()))


def test_rows_without_positive_with_full_distillation(device, backend):
    """With alpha = 1 the targets are the teacher's alone: no row needs a positive."""
    m, n, d = 19, 47, 24
    q, k = leaf(feats(m, d, device)), leaf(feats(n, d, device))
    tq, tk = feats(m, d, device), feats(n, d, device)
    s = leaf(torch.tensor(11.0, device=device))
    ours = vlmkernels.contrastive_cross_entropy(
        q, k, s, offset=n - 7, teacher_queries=tq, teacher_keys=tk, teacher_logit_scale=9.0,
        alpha=1.0,
    )  # fmt: skip
    qr, kr, sr = as64(q, k, s)
    teacher = 9.0 * tq.double().cpu() @ tk.double().cpu().T
    ref = soft_ce(sr * qr @ kr.T, F.softmax(teacher, 1)).mean()
    compare(ours, ref, [q, k, s], [qr, kr, sr])


def test_ids_count_matches_pairwise_equality(device):
    """The positive counts with ids (computed from the ids alone, outside the kernels):
    rectangular, repeated ids, ids without a match, int32 and int64."""
    from vlmkernels.ops.contrastive.algebra import ids_count

    for dtype in (torch.int64, torch.int32):
        rows = torch.randint(-5, 20, (37,), device=device).to(dtype)
        cols = torch.randint(0, 25, (53,), device=device).to(dtype)
        eq = rows[:, None] == cols[None, :]
        assert torch.equal(ids_count(rows, cols), eq.sum(1).float())
        assert torch.equal(ids_count(cols, rows), eq.sum(0).float())
        assert ids_count(rows, cols[:0]).tolist() == [0.0] * 37


def test_clip_ids_every_row_matches_itself(device, backend):
    """clip_loss(ids=...) compares the ids with themselves: every row has a positive. With
    distinct ids this is the plain CLIP loss; with repeated ids, finite everywhere."""
    n, d = 37, 24
    x, y = leaf(feats(n, d, device)), leaf(feats(n, d, device))
    s = leaf(torch.tensor(12.0, device=device))
    ids = torch.randperm(n, device=device) * 7 - 100
    ours = vlmkernels.clip_loss(x, y, s, ids=ids)
    xr, yr, sr = as64(x, y, s)
    logits, labels = sr * xr @ yr.T, torch.arange(n)
    ref = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    compare(ours, ref, [x, y, s], [xr, yr, sr])
    rows = vlmkernels.clip_loss(x, y, s, ids=ids % 5, reduction="none")
    assert torch.isfinite(rows).all()


# ------------------------------------------------------------------ argument errors


@pytest.fixture
def no_launch(monkeypatch):
    """Every kernel (and PyTorch-path) entry point fails the test if it is reached: the
    argument errors below must come before any launch."""
    from vlmkernels.ops.contrastive import ops as C

    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched before the argument checks")

    for name in ("block_stats", "_block_grads_triton", "_block_grads_torch",
                 "_siglip_rows_triton", "_siglip_rows_torch", "_siglip_grads_triton",
                 "_siglip_grads_torch"):  # fmt: skip
        monkeypatch.setattr(C, name, launched)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("which", ["both", "queries", "keys"])
def test_cross_entropy_rejects_float8(dtype, which, device, no_launch):
    """float8 features are rejected like clip_loss's, naming the argument, the accepted
    dtypes and the one given (each tensor is checked before the pair)."""
    q, k = feats(19, 24, device), feats(47, 24, device)
    args = {"queries": q, "keys": k}
    for name in args:
        if which in (name, "both"):
            args[name] = args[name].to(dtype)
    named = "keys" if which == "keys" else "queries"
    accepted = r"\(float16, bfloat16, float32, float64\)"
    match = rf"contrastive_cross_entropy: {named} must be a floating tensor {accepted}, got {dtype}"
    with pytest.raises(TypeError, match=match):
        vlmkernels.contrastive_cross_entropy(args["queries"], args["keys"], 10.0)
    with pytest.raises(TypeError, match=rf"clip_loss: image_features .* {accepted}, got {dtype}"):
        vlmkernels.clip_loss(q.to(dtype), q.to(dtype), 10.0)


def test_argument_errors_name_the_argument(device, no_launch):
    """Each bad argument raises, before any launch, an error that names it and says what
    was expected (and, where it helps, what was given)."""
    q, k = feats(19, 24, device), feats(47, 24, device)
    x, y = feats(8, 24, device), feats(8, 24, device)
    ce, clip, siglip = (vlmkernels.contrastive_cross_entropy, vlmkernels.clip_loss,
                        vlmkernels.siglip_loss)  # fmt: skip
    long = dict(dtype=torch.long, device=device)
    cases = [
        (lambda: ce(q, k.double(), 1.0), TypeError,
         "queries and keys must have the same dtype, got torch.float32 and torch.float64"),
        (lambda: ce(q, k.to("meta"), 1.0), ValueError, "queries and keys must be on the same"),
        (lambda: ce(q, k[:, :0], 1.0), ValueError, "keys has feature dim 0"),
        (lambda: ce(q, k[:0], 1.0), ValueError, r"keys is empty \(batch size 0\)"),
        (lambda: ce(q, [[1.0] * 24], 1.0), TypeError, "keys must be a torch.Tensor, got list"),
        (lambda: ce(q[0], k, 1.0), ValueError, r"queries must be 2-D \(batch, dim\), got"),
        (lambda: ce(q, k, 1.0, offset=1.5), TypeError, "offset must be an int, got 1.5"),
        (lambda: ce(q, k, 1.0, offset="3"), TypeError, "offset must be an int, got '3'"),
        (lambda: ce(q, k, 1.0, label_smoothing="a"), TypeError,
         r"label_smoothing must be a float in \[0, 1\), got 'a'"),
        (lambda: ce(q, k, 1.0, alpha=None), TypeError, r"alpha must be a float in \[0, 1\]"),
        (lambda: ce(q, k, 1.0, alpha=1.5), ValueError, r"alpha must be in \[0, 1\], got 1.5"),
        (lambda: ce(q, k, 1.0, teacher_queries=q[:4], alpha=0.5), ValueError,
         r"teacher_queries must be a tensor shaped like the features \(\(19, 24\), "
         r"torch.float32\), got \(\(4, 24\), torch.float32\)"),
        (lambda: ce(q, k, 1.0, teacher_queries=q, teacher_keys=k.double(), alpha=0.5),
         ValueError, "teacher_keys must be a tensor shaped like the features"),
        (lambda: ce(q, k, 1.0, query_ids=torch.zeros(19, device=device),
                    key_ids=torch.zeros(47, **long)), TypeError,
         "query_ids must be an integer tensor, got torch.float32"),
        (lambda: ce(q, k, 1.0, query_ids=torch.zeros(19, **long),
                    key_ids=torch.zeros(46, **long)), ValueError,
         r"key_ids must have shape \(47,\), got \(46,\)"),
        (lambda: clip(x, y, 1.0, label_smoothing="0.1"), TypeError,
         "clip_loss: label_smoothing must be a float"),
        (lambda: clip(x, y, 1.0, teacher=(x.double(), y), alpha=0.5), ValueError,
         r"clip_loss: teacher\[0\] must be a tensor shaped like the features .*, got "
         r"\(\(8, 24\), torch.float64\)"),
        (lambda: clip(x, y, 1.0, teacher=[x], alpha=0.5), TypeError,
         r"clip_loss: teacher must be a pair \(image, text\) of feature tensors, got list"),
        (lambda: clip(x, y, 1.0, ids=[0] * 8), TypeError,
         "clip_loss: ids must be an integer tensor, got list"),
        (lambda: siglip(x, y, 1.0, 0.0, negative_only="yes"), TypeError,
         "siglip_loss: negative_only must be True or False, got 'yes'"),
    ]  # fmt: skip
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


def test_strided_ids_are_read_by_value(device, backend):
    """ids given as a column of an (N, 2) id table or expanded (all equal): the kernels read
    id i at ids + i, so they get a contiguous copy; loss and gradients are those of the
    contiguous ids."""
    n, d = 13, 16
    table = torch.randint(0, 4, (n, 2), device=device)
    for ids in (table[:, 0], torch.zeros(1, dtype=torch.int64, device=device).expand(n)):
        assert not ids.is_contiguous()
        x, y = leaf(feats(n, d, device)), leaf(feats(n, d, device))
        x2, y2 = leaf(x.detach()), leaf(y.detach())
        got = vlmkernels.clip_loss(x, y, 9.0, ids=ids)
        want = vlmkernels.clip_loss(x2, y2, 9.0, ids=ids.contiguous())
        got.backward()
        want.backward()
        assert torch.allclose(got, want, rtol=1e-6)
        assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-7)
        q = vlmkernels.contrastive_cross_entropy(x.detach(), y.detach(), 9.0, query_ids=ids,
                                                 key_ids=ids)  # fmt: skip
        q2 = vlmkernels.contrastive_cross_entropy(x.detach(), y.detach(), 9.0,
                                                  query_ids=ids.contiguous(),
                                                  key_ids=ids.contiguous())  # fmt: skip
        assert torch.allclose(q, q2, rtol=1e-6)


# ------------------------------------------------------------- alpha under torch.compile


def _compiled(fn):
    """(fn compiled with fullgraph through AOTAutograd (its backward graph too), the list
    of the graphs Dynamo made)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True), graphs


@pytest.mark.parametrize("case", ["clip", "clip_none", "queue"])
def test_ramped_alpha_compiles_twice(case, device, backend):
    """ALBEF's warm-up ramps alpha every step of the first epoch (0 at step 0). A float op
    argument is a constant of the graph: each value compiled again, and with fullgraph the
    recompile limit (8) made it an error. Ten values, as the PyTorch formula
    (1 - alpha) CE(hard) + alpha CE(soft) does: at most two graphs (the first value a
    constant, then alpha dynamic); each loss and gradient the float64 reference's, and
    the eager one's (for the first value, the first of the dynamic graph and the last: the
    interpreter's time). clip: the reduced op; clip_none: the per-sample op and its
    backward; queue: one direction over a queue of extra keys (ALBEF's ITC)."""
    if case == "clip_none" and backend == "triton":
        pytest.skip("the per-sample op's alpha is in the PyTorch algebra on both backends")
    b, q_len, d = 8, 0 if case != "queue" else 8, 16
    x, y = leaf(feats(b, d, device)), leaf(feats(b + q_len, d, device))
    xm, ym = feats(b, d, device), feats(b + q_len, d, device)
    s = leaf(torch.tensor(12.0, device=device))

    def step(x, y, s, alpha):
        if case == "queue":
            return vlmkernels.contrastive_cross_entropy(x, y, s, teacher_queries=xm,
                                                        teacher_keys=ym, alpha=alpha)  # fmt: skip
        reduction = "mean" if case == "clip" else "none"
        loss = vlmkernels.clip_loss(x, y, s, teacher=(xm, ym), teacher_logit_scale=9.0,
                                    alpha=alpha, reduction=reduction)  # fmt: skip
        return loss if case == "clip" else loss.mean()

    compiled, graphs = _compiled(step)
    teacher = (9.0 if case != "queue" else 12.0) * xm.double().cpu() @ ym.double().cpu().T
    onehot = torch.eye(b, b + q_len, dtype=torch.float64)
    for i in range(10):
        alpha = 0.4 * i / 9
        got = compiled(x, y, s, alpha)
        xr, yr, sr = as64(x, y, s)
        logits = sr * xr @ yr.T
        ref = soft_ce(logits, alpha * F.softmax(teacher, 1) + (1 - alpha) * onehot).mean()
        if case != "queue":
            t_cols = alpha * F.softmax(teacher.T, 1) + (1 - alpha) * onehot
            ref = (ref + soft_ce(logits.T, t_cols).mean()) / 2
        grads = torch.autograd.grad(got, [x, y, s])
        if i in (0, 1, 9):
            eager = [leaf(t) for t in (x, y, s)]
            want = step(*eager, alpha)
            assert rel(got, want) < 1e-6, alpha
            for g, w in zip(grads, torch.autograd.grad(want, eager), strict=True):
                assert rel(g, w, 0.1 if g.dim() == 0 else 0.0) < 1e-5, alpha
        # the float64 reference: compare's tolerances
        assert rel(got, ref) < 1e-5, alpha
        for g, w in zip(grads, torch.autograd.grad(ref, [xr, yr, sr]), strict=True):
            assert rel(g, w, 0.1 if g.dim() == 0 else 0.0) < 1e-5, alpha
    assert len(graphs) <= 2, len(graphs)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees NaN
def test_compiled_alpha_one_needs_no_positive(device, backend):
    """With alpha a tensor in the graph, the rule "a query without a positive has no target
    unless alpha = 1" is elementwise: NaN for alpha < 1, the teacher's targets alone at
    alpha = 1, from the same graph."""
    m, n, d = 9, 21, 16
    q, k = feats(m, d, device), feats(n, d, device)
    tq, tk = feats(m, d, device), feats(n, d, device)
    kw, pos = _rows_without_positives("ids", m, n, device)
    has = (pos.sum(1) > 0).to(device)

    def step(q, k, alpha):
        return vlmkernels.contrastive_cross_entropy(q, k, 10.0, teacher_queries=tq,
                                                    teacher_keys=tk, alpha=alpha, **kw)  # fmt: skip

    compiled, graphs = _compiled(step)
    teacher = F.softmax(10.0 * tq.double().cpu() @ tk.double().cpu().T, 1)
    for alpha in (0.5, 0.7, 1.0, 0.3):
        got = compiled(q, k, alpha)
        if alpha < 1:
            assert torch.isnan(got) and torch.isnan(step(q, k, alpha))
        else:
            ref = soft_ce(10.0 * q.double().cpu() @ k.double().cpu().T, teacher).mean()
            assert rel(got, ref) < 1e-5 and rel(got, step(q, k, alpha)) < 1e-6
    assert len(graphs) <= 2, len(graphs)
    assert not has.all()


def test_eager_alpha_stays_a_float(device, monkeypatch):
    """Eager calls pass alpha as the ops' float (no tensor made, no copy to the device per
    call); the tensor form is for traced graphs only."""
    from vlmkernels.ops.contrastive import ops

    seen = []
    # (alpha_tensor, alpha): after the 9 tensors, then (weight,) offset, smoothing, alpha
    for name, alpha_at in (("contrastive_ce_targets_reduced", 13), ("contrastive_ce_forward", 12)):
        op = getattr(ops, name)
        spy = lambda *a, op=op, i=alpha_at: seen.append((a[9], a[i])) or op(*a)  # noqa: E731
        monkeypatch.setattr(ops, name, spy)
    x, y, xm, ym = (feats(6, 8, device) for _ in range(4))
    with vlmkernels.use_backend("torch"):
        vlmkernels.clip_loss(x, y, 5.0, teacher=(xm, ym), alpha=0.3)
        vlmkernels.clip_loss(x, y, 5.0, teacher=(xm, ym), alpha=0.3, reduction="none")
        vlmkernels.contrastive_cross_entropy(x, y, 5.0, teacher_queries=xm, alpha=0.3)
    assert seen == [(None, 0.3)] * 3


def test_alpha_zero_reads_no_teacher(device, monkeypatch):
    """At alpha = 0 the teacher's term is 0: on every path (reduced or per sample, both
    functions) the ops get no teacher, so its logits are not computed, and the loss is the
    one without a teacher."""
    from vlmkernels.ops.contrastive import ops

    seen = []
    for name in ("contrastive_ce_targets_reduced", "contrastive_ce_forward"):
        op = getattr(ops, name)
        spy = lambda *a, op=op: seen.append(a[6:9]) or op(*a)  # noqa: E731
        monkeypatch.setattr(ops, name, spy)
    x, y, xm, ym = (feats(6, 8, device) for _ in range(4))
    ids = torch.tensor([0, 1, 1, 2, 3, 3], device=device)
    with vlmkernels.use_backend("torch"):
        for reduction in ("mean", "none"):
            kw = dict(ids=ids, reduction=reduction)
            got = vlmkernels.clip_loss(x, y, 5.0, teacher=(xm, ym), alpha=0.0, **kw)
            torch.testing.assert_close(got, vlmkernels.clip_loss(x, y, 5.0, **kw))
            kw = dict(query_ids=ids, key_ids=ids, reduction=reduction)
            got = vlmkernels.contrastive_cross_entropy(x, y, 5.0, teacher_queries=xm, **kw)
            want = vlmkernels.contrastive_cross_entropy(x, y, 5.0, **kw)
            torch.testing.assert_close(got, want)
    assert seen == [(None,) * 3] * 8


def test_compiled_alpha_out_of_range_is_refused(device):
    """The range check reads alpha on the host (a Dynamo guard 0 <= alpha <= 1, not a
    specialisation): a value outside fails the guard, and the recompilation raises the
    eager error (with fullgraph=True, Dynamo's error caused by it)."""
    x, y, xm, ym = (feats(6, 8, device) for _ in range(4))

    def step(x, y, alpha):
        return vlmkernels.clip_loss(x, y, 5.0, teacher=(xm, ym), alpha=alpha)

    compiled, graphs = _compiled(step)
    with vlmkernels.use_backend("torch"):
        for alpha in (0.1, 0.2, 0.3):
            compiled(x, y, alpha)
        for bad in (1.5, -0.1):
            with pytest.raises(Exception) as info:
                compiled(x, y, bad)
            errors = [info.value, info.value.__cause__]
            assert any("alpha must be in [0, 1]" in str(e) for e in errors), errors


@pytest.mark.parametrize("targets", [{}, {"ids": torch.tensor([0, 1, 0, 2, 1])}])
def test_clip_loss_with_grads_float64_keeps_float64_accuracy(targets):
    """The mean's weight times the unit gradient was formed in fp32 (1/5 rounded to fp32),
    so float64 GradCache gradients were off by about 1e-8 relative from clip_loss's."""
    g = torch.Generator().manual_seed(3)
    x, y = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(2))
    s, b = torch.tensor(1.7, dtype=torch.float64), torch.tensor(-0.5, dtype=torch.float64)
    with vlmkernels.use_backend("torch"):
        _, dx, dy, ds, db = vlmkernels.clip_loss_with_grads(x, y, s, b, **targets)
        xl, yl, sl, bl = leaf(x), leaf(y), leaf(s), leaf(b)
        vlmkernels.clip_loss(xl, yl, sl, bl, **targets).backward()
    for got, ref in ((dx, xl.grad), (dy, yl.grad), (ds, sl.grad)):
        assert rel(got, ref) < 1e-13


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_with_grads_refuse_dual_tensors(name):
    """The GradCache forms detach their inputs, which drops a forward_ad tangent before any
    op sees it: the loss came back without one (torch.func.jvp raised, a dual tensor gave
    a silently missing tangent). Both raise naming the function."""
    from torch.autograd import forward_ad

    fn = {"clip": vlmkernels.clip_loss_with_grads, "siglip": vlmkernels.siglip_loss_with_grads}
    x, y = feats(5, 3, "cpu"), feats(5, 3, "cpu")
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match=f"{name}_loss_with_grads: forward-mode"):
            fn[name](dual, y, 2.0, -1.0)
        scale = forward_ad.make_dual(torch.tensor(2.0), torch.tensor(1.0))
        with pytest.raises(NotImplementedError, match=f"{name}_loss_with_grads: forward-mode"):
            fn[name](x, y, scale, -1.0)
        assert fn[name](x, y, 2.0, -1.0)[0].isfinite()  # no dual input: as usual
