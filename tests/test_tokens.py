"""select_tokens / tome_merge / pool_tokens against float64 references.

References: the selection rule written out (a stable descending sort, lower index first on
ties); ToMe's ``bipartite_soft_matching`` + ``merge_wavg`` + ``merge_source`` as published
(facebookresearch/ToMe ``tome/merge.py``), written here in float64 with its two unspecified
tie orders made explicit (lowest B index as the match, stable argsort of the best scores);
one documented deviation: a zero metric row scores -inf where ToMe computes NaN;
transformers' LLaVA-OneVision ``apply_pooling`` (called on the installed class) and
``F.interpolate`` / ``avg_pool2d`` in float64 for the pooling.

Tolerances (max abs error relative to max |ref|): fp32 1e-5, fp16 2e-3, bf16 1e-2, float64
1e-12. The gathers are exact copies and are compared bitwise.
"""

import math
import types

import pytest
import torch
import torch.nn.functional as F

import vlmkernels
from vlmkernels.ops import tokens as T

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=["triton", "torch"])
def backend(request):
    with vlmkernels.use_backend(request.param):
        yield request.param


def close(got, ref, dtype, what=""):
    ref = ref.double()
    err = (got.double() - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-30)
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} vs {TOL[dtype] * scale:.3g}"


# ------------------------------------------------------------------------- select_tokens


def ref_select(scores, keep):
    """Indices (B, keep) of the kept tokens, increasing: rank by (-score, index)."""
    out = []
    for row in scores.tolist():
        ranked = sorted(range(len(row)), key=lambda i: (-row[i], i))
        out.append(sorted(ranked[:keep]))
    return torch.tensor(out, dtype=torch.int64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_values_indices_grads(dtype, device, backend):
    B, N, C, keep = 3, 13, 37, 6
    base = torch.randn(B, C, N, device=device).to(dtype)
    x = base.transpose(1, 2).requires_grad_()  # strided: channels not contiguous
    scores = torch.randn(B, N, device=device, requires_grad=True)
    out, idx = T.select_tokens(x, scores, keep)
    ref_idx = ref_select(scores.detach().cpu(), keep)
    assert idx.dtype == torch.int64 and torch.equal(idx.cpu(), ref_idx)
    expect = torch.stack([x.detach()[b, ref_idx[b]] for b in range(B)])
    assert out.dtype == dtype and torch.equal(out, expect)
    g = torch.randn_like(out)
    out.backward(g)
    dx = torch.zeros(B, N, C, dtype=dtype, device=device)
    for b in range(B):
        dx[b, ref_idx[b]] = g[b]
    assert torch.equal(x.grad, dx)
    assert scores.grad is None


def test_select_ties_and_keep_all(device, backend):
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]],
                          device=device)  # fmt: skip
    x = torch.randn(2, 6, 4, device=device)
    _, idx = T.select_tokens(x, scores, 2)
    assert idx.tolist() == [[1, 2], [0, 1]]  # equal scores: the lower indices are kept
    _, idx = T.select_tokens(x, scores, 4)
    assert idx.tolist() == [[1, 2, 3, 4], [0, 1, 2, 3]]
    out, idx = T.select_tokens(x, scores, 6)
    assert idx.tolist() == [list(range(6))] * 2 and torch.equal(out, x)
    ints = torch.tensor([[2, 7, 7, 1, 9, 0]] * 2, device=device)
    assert T.select_tokens(x, ints, 3)[1].tolist() == [[1, 2, 4]] * 2


def test_select_nan_scores_rank_first(device, backend):
    nan = float("nan")
    scores = torch.tensor([[0.1, nan, 3.0, nan, 1.0]], device=device)
    assert T.select_tokens(torch.randn(1, 5, 2, device=device), scores, 3)[1].tolist() == [
        [1, 2, 3]
    ]


def test_empty_batch(device, backend):
    for n, grid in ((10, (2, 5)), (16, (4, 4))):
        x = torch.randn(0, n, 4, device=device, requires_grad=True)
        outs = (
            T.select_tokens(x, torch.randn(0, n, device=device), 3)[0],
            T.tome_merge(x, torch.randn(0, n, 4, device=device), 3)[0],
            T.pool_tokens(x, grid, "bilinear"),
        )
        assert [tuple(o.shape) for o in outs] == [
            (0, 3, 4),
            (0, n - 3, 4),
            (0, 3 if n == 10 else 4, 4),
        ]
        sum(o.sum() for o in outs).backward()
        assert x.grad.shape == x.shape


def test_select_bad_input(device):
    x = torch.randn(2, 5, 3, device=device)
    s = torch.randn(2, 5, device=device)
    for keep in (0, 6, -1):
        with pytest.raises(ValueError, match="keep must be in \\[1, 5\\]"):
            T.select_tokens(x, s, keep)
    with pytest.raises(TypeError, match="keep must be an int"):
        T.select_tokens(x, s, 2.0)
    with pytest.raises(ValueError, match="scores must have shape"):
        T.select_tokens(x, s[:, :4], 2)
    with pytest.raises(ValueError, match="x must be 3-D"):
        T.select_tokens(x[0], s, 2)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        T.select_tokens(x.long(), s, 2)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor"):
        T.select_tokens(x, [1, 2], 2)


# ------------------------------------------------------------------------------- ToMe


def ref_tome(x, metric, r, size=None, class_token=False):
    """ToMe's bipartite soft matching + merge_wavg + merge_source in float64."""
    x, metric = x.double(), metric.double()
    B, N, _ = x.shape
    size = torch.ones(B, N, 1, dtype=torch.float64) if size is None else size.double()
    if r == 0:
        return x, size, torch.arange(N).expand(B, N)
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = m[..., ::2, :], m[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    # vlmkernels' rule where ToMe has NaN: a zero metric row scores -inf (no-op otherwise)
    valid = metric.norm(dim=-1) > 0
    scores = scores.masked_fill(~(valid[:, ::2, None] & valid[:, None, 1::2]), -math.inf)
    if class_token:
        scores[..., 0, :] = -math.inf
    node_max = scores.amax(dim=-1)
    cols = torch.arange(scores.shape[-1])
    node_idx = torch.where(scores == node_max[..., None], cols, scores.shape[-1]).amin(-1)
    node_idx = node_idx.clamp_max(scores.shape[-1] - 1)
    if class_token:  # the class token ranks last, also among other -inf scores
        rest = node_max[..., 1:].argsort(dim=-1, descending=True, stable=True) + 1
        edge_idx = torch.cat((rest, rest.new_zeros(B, 1)), dim=-1)[..., None]
    else:
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]

    def merge(t):
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    out = merge(x * size)
    sizes = merge(size)
    source = merge(torch.eye(N, dtype=torch.float64).expand(B, N, N))  # merge_source
    return out / sizes, sizes, source.argmax(dim=1)


def tome_inputs(B, N, C, Cm, dtype, device, size=False):
    x = torch.randn(B, N, C, device=device).to(dtype).requires_grad_()
    metric = torch.randn(B, N, Cm, device=device).to(dtype)
    s = None
    if size:
        s = torch.randint(1, 4, (B, N, 1), device=device).to(dtype).requires_grad_()
    return x, metric, s


def check_tome(x, metric, r, size, class_token, dtype, grads=True):
    out, sizes, source = T.tome_merge(x, metric, r, size=size, class_token=class_token)
    leaves = [x] + ([size] if size is not None else [])
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    ref_out, ref_sizes, ref_source = ref_tome(ref_leaves[0], metric.cpu(), r,
                                              ref_leaves[1] if size is not None else None,
                                              class_token)  # fmt: skip
    B, N, C = x.shape
    assert out.shape == (B, N - r, C) and sizes.shape == (B, N - r, 1)
    assert source.dtype == torch.int64 and torch.equal(source.cpu(), ref_source)
    assert out.dtype == dtype and sizes.dtype == (size.dtype if size is not None else dtype)
    close(out, ref_out, dtype, "merged")
    close(sizes, ref_sizes, dtype, "sizes")
    if not grads:
        return
    g, gs = torch.randn_like(out), torch.randn_like(sizes)
    torch.autograd.backward((out, sizes), (g, gs))
    pairs = [(t, d.cpu().double()) for t, d in ((ref_out, g), (ref_sizes, gs)) if t.requires_grad]
    torch.autograd.backward(*zip(*pairs, strict=True))
    for t, ref, what in zip(leaves, ref_leaves, ("dx", "dsize")[: len(leaves)], strict=True):
        close(t.grad, ref.grad, dtype, what)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tome_values_and_grads(dtype, device, backend):
    x, metric, _ = tome_inputs(2, 23, 20, 24, dtype, device)
    check_tome(x, metric, 7, None, False, dtype)


@pytest.mark.parametrize("class_token", [False, True])
def test_tome_sizes_class_token_strided(class_token, device, backend):
    B, N = 2, 18
    base = torch.randn(B, 40, N, device=device)
    x = base[:, ::2].transpose(1, 2).requires_grad_()  # (B, N, 20), strides (.., 1, 80)
    metric = torch.randn(B, N, 48, device=device)[..., ::2]
    size = torch.randint(1, 5, (B, N, 1), device=device).float().requires_grad_()
    check_tome(x, metric, 5, size, class_token, torch.float32)


def test_tome_size_dtype_differs(device, backend):
    """fp32 sizes with bf16 tokens: sizes keep their dtype, both get gradients."""
    x = torch.randn(2, 15, 8, device=device).bfloat16().requires_grad_()
    metric = torch.randn(2, 15, 8, device=device)
    size = torch.randint(1, 4, (2, 15, 1), device=device).float().requires_grad_()
    out, sizes, _ = T.tome_merge(x, metric, 5, size=size)
    assert out.dtype == torch.bfloat16 and sizes.dtype == torch.float32
    x64 = x.detach().cpu().double().requires_grad_()
    s64 = size.detach().cpu().double().requires_grad_()
    ref_out, ref_sizes, _ = ref_tome(x64, metric.cpu(), 5, s64)
    close(out, ref_out, torch.bfloat16, "merged")
    close(sizes, ref_sizes, torch.float32, "sizes")
    g = torch.randn_like(out)
    out.backward(g)
    ref_out.backward(g.cpu().double())
    assert size.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    close(size.grad, s64.grad, torch.bfloat16, "dsize")
    close(x.grad, x64.grad, torch.bfloat16, "dx")


def test_tome_float64(device):
    x, metric, size = tome_inputs(2, 9, 5, 6, torch.float64, device, size=True)
    check_tome(x, metric, 3, size, True, torch.float64)


@pytest.mark.parametrize("n, class_token", [(12, False), (13, False), (12, True), (13, True)])
def test_tome_r_limits(n, class_token, device, backend):
    limit = (n - int(class_token)) // 2
    x, metric, _ = tome_inputs(2, n, 8, 16, torch.float32, device)
    check_tome(x, metric, limit, None, class_token, torch.float32, grads=False)
    out, sizes, source = T.tome_merge(x, metric, 0, class_token=class_token)
    assert out is x and torch.equal(sizes, torch.ones(2, n, 1, device=device))
    assert torch.equal(source, torch.arange(n, device=device).expand(2, n))
    what = "non-class " if class_token else ""
    with pytest.raises(ValueError, match=f"r must be in \\[0, {limit}\\].*{what}tokens"):
        T.tome_merge(x, metric, limit + 1, class_token=class_token)


def test_tome_ties(device, backend):
    """Equal scores: a B column and an A row repeated exactly (the kernel's scores for them
    are computed by the same operations, so they tie exactly too)."""
    B, N, C = 2, 14, 16
    metric = torch.randn(B, N, C, device=device)
    metric[:, 5] = metric[:, 3]  # B tokens 1 and 2 identical: every A row ties on them
    metric[:, 9] = metric[:, 3]
    metric[:, 4] = metric[:, 2]  # A tokens 1 and 2 identical: their best scores tie
    metric[:, 8] = 2 * metric[:, 2]
    x = torch.randn(B, N, 24, device=device, requires_grad=True)
    for r in (1, 2, 3, 6):
        check_tome(x, metric, r, None, False, torch.float32, grads=False)
    metric = torch.ones(B, N, C, device=device)  # every score ties
    out, _, source = T.tome_merge(x, metric, 3)
    # A tokens 0, 1, 2 (lowest indices first) merge into B token 0 (the lowest column)
    assert source[0].tolist() == [4, 4, 4, 5, 4, 6, 0, 7, 1, 8, 2, 9, 3, 10]
    check_tome(x, metric, 3, None, True, torch.float32, grads=False)


def test_tome_zero_metric_rows(device, backend):
    """A zero metric row has no cosine: its scores are -inf (never merged while others
    are, never a match)."""
    B, N = 2, 16
    x, metric, _ = tome_inputs(B, N, 8, 12, torch.float32, device)
    metric = metric.clone()
    metric[:, 4] = 0  # A token 2
    metric[:, 7] = 0  # B token 3
    out, sizes, source = T.tome_merge(x, metric, 7)
    na_unmerged = (N + 1) // 2 - 7
    assert (source[:, 4] < na_unmerged).all()  # A token 2 is the one left unmerged
    assert (source[:, 7] == na_unmerged + 3).all() and (sizes[:, na_unmerged + 3] == 1).all()
    assert out.isfinite().all()
    check_tome(x, metric, 7, None, False, torch.float32, grads=False)


@pytest.mark.parametrize("n", [5, 9])
def test_tome_class_token_never_merged_among_minus_inf(n, device, backend):
    """With every metric row zero all scores are -inf: the class token still ranks last
    (a plain stable sort would put A token 0 first among the ties and merge it)."""
    x = torch.randn(2, n, 4, device=device)
    r = (n - 1) // 2
    out, sizes, source = T.tome_merge(x, torch.zeros(2, n, 3, device=device), r, class_token=True)
    assert (source[:, 0] == 0).all() and (sizes[:, 0] == 1).all()
    assert torch.equal(out[:, 0], x[:, 0])
    check_tome(x, torch.zeros(2, n, 3, device=device), r, None, True, torch.float32, grads=False)


@pytest.mark.parametrize("n", [2, 3, 41, 76])
@pytest.mark.parametrize("class_token", [False, True])
def test_tome_plan_kernel_matches_sorts(n, class_token, device):
    """The Triton bookkeeping (ranking, rows, CSR lists in one program per sample) equals the
    PyTorch path's stable sorts, scatters and searchsorted bitwise, on scores full of ties
    and -inf (zero metric rows, the class token), for r from 1 to its limit (several blocks
    of the interpreter's 16-token block at n 41 and 76)."""
    from vlmkernels.ops.tokens import kernels, reference

    na, nb = (n + 1) // 2, n // 2
    limit = (n - class_token) // 2
    gen = torch.Generator().manual_seed(n + 100 * class_token)
    for r in sorted({1, max(limit // 3, 1), limit}):
        if not 1 <= r <= limit:
            continue
        best = (torch.randint(0, 5, (3, na), generator=gen).float() / 5).to(device)
        best[0, 1::3] = float("-inf")
        arg = torch.randint(0, nb, (3, na), generator=gen).to(device)
        if class_token:
            best[:, 0], arg[:, 0] = float("-inf"), 0
        got = kernels.tome_plan(best, arg, n, r, class_token)
        want = reference.tome_plan(best, arg, n, r, class_token)
        for name, g, w in zip(("source", "members", "offsets"), got, want, strict=True):
            assert torch.equal(g, w), (name, n, r, class_token, g, w)
        assert (
            got[2][:, -1].eq(n).all()
            and got[1].sort(dim=1).values.eq(torch.arange(n, device=device)).all()
        )


def test_tome_batch_past_the_grid_limit_is_refused():
    """ToMe's match and merge kernels launch the batch on grid y, at most 65,535 in CUDA
    (the launch failed with "invalid argument"): a larger batch is refused with an error
    naming it (expanded inputs: no memory)."""
    from vlmkernels.ops.tokens import kernels as K

    metric = torch.randn(1, 6, 8).expand(65536, 6, 8)
    with pytest.raises(ValueError, match="batch = 65536 is past 65535"):
        K.tome_match(metric, False)
    members = torch.arange(6).expand(65536, 6)
    offsets = torch.arange(7).expand(65536, 7)
    with pytest.raises(ValueError, match="batch = 65536 is past 65535"):
        K.tome_merge_rows(metric, None, members, offsets, metric.dtype)


def test_tome_second_derivative_raises(device):
    """The merge's backward has no derivative of its own: create_graph use raises."""
    x, metric, _ = tome_inputs(1, 10, 6, 8, torch.float32, device)
    out, _, _ = T.tome_merge(x, metric, 3)
    (dx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="second derivatives are not implemented"):
        (dx.square().sum() + x.sum()).backward()


def test_tome_saves_x_only_for_the_size_gradient(device):
    x, metric, size = tome_inputs(1, 10, 6, 8, torch.float32, device, size=True)
    out, _, _ = T.tome_merge(x, metric, 3, size=size.detach())
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    assert not any(t.shape == x.shape and t.dtype == x.dtype for t in saved)
    out, _, _ = T.tome_merge(x, metric, 3, size=size)
    assert any(t.shape == x.shape for t in out.grad_fn.saved_tensors if t is not None)


def test_tome_metric_gets_no_gradient(device):
    x, metric, _ = tome_inputs(1, 10, 6, 8, torch.float32, device)
    metric.requires_grad_()
    out, sizes, _ = T.tome_merge(x, metric, 3)
    (out.sum() + sizes.sum()).backward()
    assert metric.grad is None and x.grad is not None


def test_tome_bad_input(device):
    x, metric, _ = tome_inputs(2, 10, 6, 8, torch.float32, device)
    with pytest.raises(ValueError, match="r must be in \\[0, 5\\]"):
        T.tome_merge(x, metric, 6)
    with pytest.raises(ValueError, match="r must be in"):
        T.tome_merge(x, metric, -1)
    with pytest.raises(TypeError, match="r must be an int"):
        T.tome_merge(x, metric, True)
    with pytest.raises(ValueError, match="metric must have x's"):
        T.tome_merge(x, metric[:, :8], 2)
    with pytest.raises(ValueError, match="size must have shape"):
        T.tome_merge(x, metric, 2, size=torch.ones(2, 10, device=device))
    with pytest.raises(TypeError, match="size must be a floating"):
        T.tome_merge(x, metric, 2, size=torch.ones(2, 10, 1, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match="class_token must be True or False"):
        T.tome_merge(x, metric, 2, class_token=1)
    with pytest.raises(TypeError, match="metric must be a floating"):
        T.tome_merge(x, metric.int(), 2)


# ---------------------------------------------------------------------------- pooling


def transformers_pooling(x, side):
    """LLaVA-OneVision's apply_pooling from the installed transformers, on a square grid."""
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        LlavaOnevisionModel,
    )

    vision = types.SimpleNamespace(image_size=side * 14, patch_size=14)
    fake = types.SimpleNamespace(config=types.SimpleNamespace(vision_config=vision))
    return LlavaOnevisionModel.apply_pooling(fake, x)


def ref_pool(x, grid, size):
    B, _, C = x.shape
    g = x.double().reshape(B, *grid, C).permute(0, 3, 1, 2)
    y = F.interpolate(g, size=size, mode="bilinear", align_corners=False)
    return y.permute(0, 2, 3, 1).reshape(B, -1, C)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_bilinear_matches_llava_onevision(dtype, device, backend):
    side, C = 7, 12
    x = torch.randn(2, side * side, C, device=device).to(dtype).requires_grad_()
    out = T.pool_tokens(x, (side, side), "bilinear")
    x64 = x.detach().cpu().double().requires_grad_()
    ref = transformers_pooling(x64, side)
    assert out.shape == (2, 16, C) and out.dtype == dtype
    close(out, ref, dtype, "bilinear")
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.cpu().double())
    close(x.grad, x64.grad, dtype, "bilinear grad")


@pytest.mark.parametrize("grid, size", [((5, 8), (3, 3)), ((3, 2), (5, 4)), ((6, 4), (3, 2))])
def test_pool_bilinear_sizes(grid, size, device, backend):
    base = torch.randn(2, 10, grid[0] * grid[1], device=device)
    x = base.transpose(1, 2).requires_grad_()  # strided
    out = T.pool_tokens(x, grid, "bilinear", size=size)
    x64 = x.detach().cpu().double().requires_grad_()
    ref = ref_pool(x64, grid, size)
    close(out, ref, torch.float32, "bilinear")
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.cpu().double())
    close(x.grad, x64.grad, torch.float32, "bilinear grad")


@pytest.mark.parametrize(
    "grid, size", [((13, 11), (7, 6)), ((2, 9), (9, 2)), ((12, 1), (1, 5)), ((7, 3), (3, 7))]
)
def test_pool_bilinear_backward_ratios(grid, size, device, backend):
    """The adjoint (a gather over a window of output tokens in the Triton kernel) at down-
    and upsampling ratios, against F.interpolate's autograd in float64."""
    x = torch.randn(1, grid[0] * grid[1], 2, device=device, requires_grad=True)
    out = T.pool_tokens(x, grid, "bilinear", size=size)
    x64 = x.detach().cpu().double().requires_grad_()
    g = torch.randn_like(out)
    ref_pool(x64, grid, size).backward(g.cpu().double())
    out.backward(g)
    close(x.grad, x64.grad, torch.float32, "bilinear grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_avg2x2(dtype, device, backend):
    H, W, C = 4, 6, 20
    x = torch.randn(3, H * W, C, device=device).to(dtype).requires_grad_()
    out = T.pool_tokens(x, (H, W))
    x64 = x.detach().cpu().double().requires_grad_()
    g64 = x64.reshape(3, H, W, C).permute(0, 3, 1, 2)
    ref = F.avg_pool2d(g64, 2).permute(0, 2, 3, 1).reshape(3, -1, C)
    assert out.shape == (3, 6, C)
    close(out, ref, dtype, "avg2x2")
    close(out, ref_pool(x64.detach(), (H, W), (2, 3)), dtype, "avg2x2 = bilinear at 2x")
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.cpu().double())
    close(x.grad, x64.grad, dtype, "avg2x2 grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid, size", [((8, 8), (2, 2)), ((6, 9), (2, 3)), ((5, 4), (5, 1))])
def test_pool_avg_blocks(grid, size, dtype, device, backend):
    """kind='avg' against nn.AvgPool2d(kernel_size=stride=(H/h, W/w)) in float64: 4 x 4
    (Gemma 3's), 3 x 3 (a divisor that is not a power of two), 1 x 4; on strided x."""
    (H, W), (h, w), C = grid, size, 7
    base = torch.randn(2, C, H * W, device=device).to(dtype)
    x = base.transpose(1, 2).requires_grad_()
    out = T.pool_tokens(x, grid, "avg", size)
    x64 = x.detach().cpu().double().requires_grad_()
    pool = torch.nn.AvgPool2d(kernel_size=(H // h, W // w), stride=(H // h, W // w))
    ref = pool(x64.transpose(1, 2).reshape(2, C, H, W)).flatten(2).transpose(1, 2)
    assert out.shape == (2, h * w, C) and out.dtype == dtype
    close(out, ref, dtype, "avg")
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.cpu().double())
    close(x.grad, x64.grad, dtype, "avg grad")


def test_pool_avg_fp32_bitwise_aten(device, backend):
    """In fp32 the block sums run in AvgPool2d's order, then one division: aten's result."""
    x = torch.randn(2, 12 * 12, 9, device=device)
    out = T.pool_tokens(x, (12, 12), "avg", (4, 4))
    ref = F.avg_pool2d(x.transpose(1, 2).reshape(2, 9, 12, 12), 3).flatten(2).transpose(1, 2)
    assert torch.equal(out, ref)


def test_pool_bad_input(device):
    x = torch.randn(2, 12, 4, device=device)
    with pytest.raises(ValueError, match="grid 3 x 5 = 15 tokens, but x has 12"):
        T.pool_tokens(x, (3, 5))
    with pytest.raises(ValueError, match="avg2x2' needs an even grid, got 3 x 4"):
        T.pool_tokens(x, (3, 4))
    with pytest.raises(ValueError, match="kind must be one of"):
        T.pool_tokens(x, (3, 4), "max")
    with pytest.raises(ValueError, match="kind must be one of"):  # unhashable, from a config
        T.pool_tokens(x, (3, 4), ["bilinear"])
    with pytest.raises(ValueError, match="grid must be a pair of positive ints"):
        T.pool_tokens(x, 12)
    with pytest.raises(ValueError, match="size must be a pair"):
        T.pool_tokens(x, (3, 4), "bilinear", size=(0, 2))
    with pytest.raises(ValueError, match="avg2x2' gives size \\(1, 3\\)"):
        T.pool_tokens(torch.randn(1, 12, 4, device=device), (2, 6), size=(2, 2))
    with pytest.raises(ValueError, match="kind='avg' needs size=\\(h, w\\)"):
        T.pool_tokens(x, (3, 4), "avg")
    with pytest.raises(ValueError, match="size 2 x 2 must divide the grid 3 x 4"):
        T.pool_tokens(x, (3, 4), "avg", (2, 2))


# ----------------------------------------------------------------------- registration


def test_opcheck(device, backend):
    ops = torch.ops.vlmkernels
    x = torch.randn(2, 9, 5, device=device, requires_grad=True)
    index = torch.tensor([[0, 4, 7], [1, 2, 8]], device=device)
    inverse = torch.full((2, 9), -1, device=device).scatter(1, index, torch.arange(3).expand(2, 3))
    torch.library.opcheck(ops.tokens_select_rows, (x, index, inverse))
    metric = torch.randn(2, 9, 16, device=device)
    torch.library.opcheck(ops.tokens_tome_match, (metric, True))
    best, arg = ops.tokens_tome_match(metric, True)
    torch.library.opcheck(ops.tokens_tome_plan, (best, arg, 9, 3, True))
    source = torch.tensor([[4, 0, 1, 1, 5, 2, 6, 3, 2]] * 2, device=device)
    members = source.sort(dim=1, stable=True).indices
    rows = torch.arange(8, device=device).expand(2, 8).contiguous()
    offsets = torch.searchsorted(source.gather(1, members), rows)
    size = torch.rand(2, 9, 1, device=device, requires_grad=True)
    torch.library.opcheck(ops.tokens_tome_merge, (x, size, source, members, offsets))
    torch.library.opcheck(ops.tokens_tome_merge, (x, None, source, members, offsets))
    out, out_size = ops.tokens_tome_merge(x, size, source, members, offsets)
    grads = (torch.randn_like(out), torch.randn_like(out_size))
    for args in ((x.detach(), size.detach(), out.detach(), True), (None, None, None, False)):
        xs, sizes, outs, size_grad = args  # x and out are read only for the sizes' gradient
        torch.library.opcheck(
            ops.tokens_tome_unmerge,
            (*grads, xs, sizes, outs, out_size.detach(), source, size_grad),
        )
    # the bilinear resize on a small grid: its backward kernel, one interpreted program per
    # input token, runs ~10 times under opcheck
    for mode, grid, size in ((T.AVG2X2, [4, 6], [2, 3]), (T.BILINEAR, [2, 3], [3, 2])):
        g = torch.randn(2, grid[0] * grid[1], 5, device=device, requires_grad=True)
        torch.library.opcheck(ops.tokens_pool, (g, grid, size, mode))
        gy = torch.randn(2, size[0] * size[1], 5, device=device, requires_grad=True)
        torch.library.opcheck(ops.tokens_pool_backward, (gy, grid, size, mode))


def test_select_tokens_under_vmap_then_backward(device):
    """select_tokens vmapped over samples, the gradient taken outside the transform (x reads
    requires_grad=False inside vmap while what it wraps requires one): the per-sample
    loop's gradient (the backward read its index map as the inverse one, an invalid
    gradient shape or an out-of-bounds gather)."""
    x = torch.randn(3, 1, 8, 4, device=device, requires_grad=True)
    scores = torch.randn(3, 1, 8, device=device)
    kept, _ = torch.func.vmap(lambda a, b: T.select_tokens(a, b, 3))(x, scores)
    weights = torch.linspace(-1, 1, kept.numel(), device=device).view(kept.shape)
    (kept * weights).sum().backward()
    loop = x.detach().clone().requires_grad_()
    want = torch.stack([T.select_tokens(loop[i], scores[i], 3)[0] for i in range(3)])
    (want * weights).sum().backward()
    assert torch.equal(kept, want) and torch.equal(x.grad, loop.grad)


def test_select_tokens_exported_without_gradients_run_with_them(device):
    """An exported select_tokens traced on inputs that need no gradient, run on ones that
    do: the op's autograd makes the inverse map then (the index map stood in for it, an
    out-of-bounds gather or, where the kept rows come first, silently wrong rows)."""

    class Select(torch.nn.Module):
        def forward(self, x, scores):
            return T.select_tokens(x, scores, 3)[0]

    x, scores = torch.randn(2, 6, 4, device=device), torch.randn(2, 6, device=device)
    program = torch.export.export(Select(), (x, scores))
    weights = torch.linspace(-1, 1, 2 * 3 * 4, device=device).view(2, 3, 4)
    grads = []
    for run in (program.module(), Select()):
        leaf = x.clone().requires_grad_()
        (run(leaf, scores) * weights).sum().backward()
        grads.append(leaf.grad)
    assert torch.equal(*grads)


def test_torch_compile_fullgraph(device):
    def compress(x, metric, scores, grid_x):
        merged, sizes, source = T.tome_merge(x, metric, 4, class_token=True)
        kept, idx = T.select_tokens(merged, scores, 5)
        pooled = T.pool_tokens(grid_x, (4, 4), "bilinear", size=(3, 3))
        return kept, sizes, source, idx, T.pool_tokens(pooled, (3, 3), "bilinear")

    x = torch.randn(2, 13, 8, device=device, requires_grad=True)
    metric = torch.randn(2, 13, 16, device=device)
    scores = torch.randn(2, 9, device=device)
    grid_x = torch.randn(2, 16, 8, device=device, requires_grad=True)
    compiled = torch.compile(compress, backend="aot_eager", fullgraph=True)
    got, ref = compiled(x, metric, scores, grid_x), compress(x, metric, scores, grid_x)
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)
    (got[0].sum() + got[4].sum()).backward()
    gx, ggrid = x.grad.clone(), grid_x.grad.clone()
    x.grad = grid_x.grad = None
    (ref[0].sum() + ref[4].sum()).backward()
    assert torch.equal(gx, x.grad) and torch.equal(ggrid, grid_x.grad)


def test_torch_compile_dynamic_token_counts(device):
    """mark_dynamic on the token dimension: tome_merge (n, r SymInts) and pool_tokens'
    grid and size follow the symbolic shape, no specialisation error, equal to eager."""
    torch._dynamo.reset()

    def f(x, grid_x):
        merged, _, _ = T.tome_merge(x, x.detach(), 3)
        return merged.sum() + T.pool_tokens(grid_x, (4, 4), "avg2x2").sum()

    x = torch.randn(2, 10, 4, device=device, requires_grad=True)
    grid_x = torch.randn(3, 16, 4, device=device, requires_grad=True)
    torch._dynamo.mark_dynamic(x, 1)
    torch._dynamo.mark_dynamic(grid_x, 0)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, grid_x)
    assert torch.allclose(got, f(x, grid_x))
    got.backward()


def test_double_backward_float64(device):
    x = torch.randn(2, 8, 3, dtype=torch.float64, device=device, requires_grad=True)
    scores = torch.randn(2, 8, device=device)
    torch.autograd.gradgradcheck(lambda t: T.select_tokens(t, scores, 3)[0], (x,))
    y = torch.randn(1, 12, 2, dtype=torch.float64, device=device, requires_grad=True)
    torch.autograd.gradgradcheck(lambda t: T.pool_tokens(t, (3, 4), "bilinear"), (y,))
    torch.autograd.gradgradcheck(lambda t: T.pool_tokens(t, (2, 6)), (y,))


def test_family_tune_workload_launches_every_kernel(device):
    """The tuner's workload, on small versions of the declared shapes, launches the kernels
    the aliases name."""
    from vlmkernels.core.tuning import _record

    family = T.FAMILY
    assert {s["op"] for s in family.tune_shapes} == set(family.aliases)
    small = dict(B=2, N=13, C=16, r=3, keep=4, H=4, W=6, dtype="fp32")
    for spec in family.tune_shapes:
        with _record() as calls:
            family.tune_workload({**spec, **small}, device, family.kernel_names)
        expected = set(family.aliases[spec["op"]])
        if spec["op"] == "pool_tokens":  # the average's backward is a gather
            expected.discard("tokens_gather" if spec["kind"] == "bilinear" else "tokens_pool_bwd")
        assert {c.kernel.name for c in calls} == expected, spec
