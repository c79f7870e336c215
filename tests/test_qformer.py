"""The fused Q-Former (part ``qformer`` of vlmkernels.patch): bias + residual + LayerNorm
(``vlmkernels::qformer_add_layernorm``) against float64 on odd, strided inputs in every
dtype, bad input, opcheck and torch.compile; the batched K / V GEMM; BLIP-2 and
InstructBLIP Q-Formers (tiny random configs, cross-attention every 2nd layer) patched
against transformers: outputs and gradients (image features, queries, every weight) in
fp32 and bf16, the one-GEMM K / V actually used, the weight cache following in-place
updates, undo restoring the instances bitwise; a training step with attention dropout in
the kernel; layers that must project their own K / V (checkpointed, FSDP2-sharded, hooked,
handed other image features by a hook)."""

import contextlib
import copy
import importlib
import math
import re
import warnings

import pytest
import torch

from vlmkernels.core.backend import use_backend
from vlmkernels.ops.attention.qformer import add_layernorm, stacked_kv

transformers = pytest.importorskip("transformers")
from vlmkernels.integrations.patching import (  # noqa: E402
    PatchFallbackWarning,
    WrappedLayerError,
    is_patched,
)
from vlmkernels.integrations.transformers import patch  # noqa: E402


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def reference(x, r, w, b, c, eps):
    """float64 LayerNorm(x + c + r) and its inputs' gradients for grad ``g``."""
    xs = [t.detach().double().requires_grad_() for t in (x, r, w, b)]
    cs = c.detach().double().requires_grad_() if c is not None else None
    z = xs[0] + xs[1] + (cs if cs is not None else 0)
    y = torch.nn.functional.layer_norm(z, (z.shape[-1],), xs[2], xs[3], eps)
    return y, xs, cs


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2),
                                       (torch.float16, 2e-3)])  # fmt: skip
@pytest.mark.parametrize("strided,biased", [(False, True), (True, False), (True, True)])
def test_add_layernorm_values_and_grads(dtype, tol, strided, biased):
    torch.manual_seed(1)
    m, n = 37, 51
    if strided:  # x a transposed view, the residual every other column of a wider tensor
        x = torch.randn(n, m).to(dtype).t()
        r = torch.randn(m, 2 * n).to(dtype)[:, ::2]
    else:
        x, r = torch.randn(m, n).to(dtype), torch.randn(m, n).to(dtype)
    x.requires_grad_()
    r.requires_grad_()
    w, b = torch.randn(n) + 1, torch.randn(n)
    c = torch.randn(n) if biased else None
    if strided:  # the vectors as views: every other element, one element expanded
        w = torch.stack([w, torch.randn(n)], 1)[:, 0]
        b = torch.randn(2 * n)[::2]
        c = torch.randn(1).expand(n) if biased else None
    w.requires_grad_()
    b.requires_grad_()
    if biased:
        c.requires_grad_()
    y = add_layernorm(x, r, w, b, x_bias=c, eps=1e-5)
    assert y.dtype == dtype and y.shape == (m, n)
    g = torch.randn(m, n).to(dtype)
    leaves = [x, r, w, b] + ([c] if biased else [])
    got = torch.autograd.grad(y, leaves, g)
    want_y, xs, cs = reference(x, r, w, b, c, 1e-5)
    want = torch.autograd.grad(want_y, xs + ([cs] if biased else []), g.double())
    assert rel(y, want_y) < tol
    for name, a, e in zip(("x", "residual", "weight", "bias", "x_bias"), got, want, strict=False):
        assert a.dtype == (dtype if name in ("x", "residual") else torch.float32), name
        assert rel(a, e) < tol * 2, name


def test_add_layernorm_3d_and_float64():
    """(B, L, N) inputs, the float64 path (PyTorch in float64), both backends agree."""
    torch.manual_seed(2)
    x, r = torch.randn(3, 5, 40), torch.randn(3, 5, 40)
    w, b, c = torch.randn(40), torch.randn(40), torch.randn(40)
    want, _, _ = reference(x, r, w, b, c, 1e-12)
    for backend in ("torch", "triton"):
        with use_backend(backend):
            assert rel(add_layernorm(x, r, w, b, x_bias=c), want) < 1e-5
    leaves = [t.double().requires_grad_() for t in (x, r, w, b, c)]
    got64 = add_layernorm(*leaves[:4], x_bias=leaves[4])
    assert got64.dtype == torch.float64 and rel(got64, want) < 1e-12
    g = torch.randn(3, 5, 40, dtype=torch.float64)
    want_y, xs, cs = reference(x, r, w, b, c, 1e-12)
    want_grads = torch.autograd.grad(want_y, [*xs, cs], g)
    got_grads = torch.autograd.grad(got64, leaves, g)
    assert all(rel(a, e) < 1e-10 for a, e in zip(got_grads, want_grads, strict=True))


@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 16)])
def test_add_layernorm_leaf_grads_are_separate_buffers(shape):
    """x and residual both leaves: their .grad are separate buffers (as for
    LayerNorm(x + r) in PyTorch), so a second backward accumulates into each correctly."""
    torch.manual_seed(4)
    x, r = torch.randn(shape, requires_grad=True), torch.randn(shape, requires_grad=True)
    w, b = torch.randn(16) + 1, torch.randn(16)
    g = torch.randn(shape)
    for _ in range(2):
        (add_layernorm(x, r, w, b) * g).sum().backward()
    want_y, xs, _ = reference(x, r, w, b, None, 1e-12)
    want = torch.autograd.grad(want_y, xs[:2], 2 * g.double())
    assert x.grad.data_ptr() != r.grad.data_ptr()
    assert rel(x.grad, want[0]) < 1e-5 and rel(r.grad, want[1]) < 1e-5


def test_add_layernorm_bad_input():
    x, r, w = torch.randn(4, 6), torch.randn(4, 6), torch.randn(6)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        add_layernorm(x, r[:, :5], w, w)
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        add_layernorm(x, r.double(), w, w)
    with pytest.raises(ValueError, match=r"weight must be a floating \(6,\)"):
        add_layernorm(x, r, w[:5], w)
    with pytest.raises(ValueError, match=r"x_bias must be a floating \(6,\)"):
        add_layernorm(x, r, w, w, x_bias=torch.ones(6, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        add_layernorm(x.long(), r, w, w)
    with pytest.raises(ValueError, match=r"eps must be in \[0, inf\], got -1.0"):
        add_layernorm(x, r, w, w, eps=-1.0)
    with pytest.raises(ValueError, match=r"eps must be in \[0, inf\], got nan"):
        add_layernorm(x, r, w, w, eps=math.nan)
    with pytest.raises(TypeError, match=r"add_layernorm: eps must be a float in \[0, inf\]"):
        add_layernorm(x, r, w, w, eps="1e-5")


def test_add_layernorm_second_order_raises():
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    y = add_layernorm(x, torch.randn(3, 8), w, torch.randn(8))
    (gx,) = torch.autograd.grad((y * torch.randn(3, 8)).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="second-order"):
        gx.sum().backward()


def test_opcheck_and_compile():
    torch.manual_seed(3)
    x, r = torch.randn(5, 24, requires_grad=True), torch.randn(5, 24, requires_grad=True)
    w, b = torch.randn(24, requires_grad=True), torch.randn(24, requires_grad=True)
    c = torch.randn(24, requires_grad=True)
    op = torch.ops.vlmkernels.qformer_add_layernorm
    x3 = torch.randn(2, 3, 24).transpose(0, 1).requires_grad_()  # (..., N), strided rows
    cases = (("triton", (x, c, r, w, b, 1e-6)), ("torch", (x, None, r, w, b, 0.1)),
             ("triton", (x3, None, x3.detach().clone(), w, b, 1e-6)))  # fmt: skip
    for backend, args in cases:
        with use_backend(backend):
            torch.library.opcheck(op, args)
            # the statistics are the backward's, not differentiable results
            out, mean, rstd = op(*args)
            assert out.requires_grad and not (mean.requires_grad or rstd.requires_grad)

    def f(x, r, w, b, c):
        return add_layernorm(x, r, w, b, x_bias=c).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got, want = compiled(x, r, w, b, c), f(x, r, w, b, c)
    g1 = torch.autograd.grad(got, [x, r, w, b, c])
    g2 = torch.autograd.grad(want, [x, r, w, b, c])
    assert rel(got, want) < 1e-6
    assert all(rel(a, e) < 1e-6 for a, e in zip(g1, g2, strict=True))


def test_stacked_kv_matches_separate_linears():
    torch.manual_seed(4)
    lins = [torch.nn.Linear(24, n) for n in (16, 16, 8, 8)]
    x = torch.randn(2, 13, 24, requires_grad=True)
    got = stacked_kv(x, lins)
    want = [lin(x) for lin in lins]
    g = [torch.randn_like(t) for t in want]
    leaves = [x, *(p for lin in lins for p in lin.parameters())]
    dg = torch.autograd.grad(got, leaves, g)
    dw = torch.autograd.grad(want, leaves, g)
    assert all(rel(a, e) < 1e-6 for a, e in zip(got, want, strict=True))
    assert all(rel(a, e) < 1e-6 for a, e in zip(dg, dw, strict=True))
    with torch.no_grad():
        first = stacked_kv(x, lins)
        lins[2].weight.data.mul_(2)  # through .data: no version counter moves
        again = stacked_kv(x, lins)
        assert torch.equal(first[0], again[0]) and rel(again[2], lins[2](x)) < 1e-6
        assert rel(again[2], first[2]) > 0.1
    no_bias = [torch.nn.Linear(24, n, bias=False) for n in (8, 8)]
    assert rel(stacked_kv(x, no_bias)[1], no_bias[1](x)) < 1e-6
    # one key linear without a bias among biased ones (a pruned or variant checkpoint)
    mixed = [lins[0], no_bias[0], lins[3]]
    got = stacked_kv(x, mixed)
    assert all(rel(a, lin(x)) < 1e-6 for a, lin in zip(got, mixed, strict=True))
    leaves = [x, *(p for lin in mixed for p in lin.parameters())]
    g = [torch.randn_like(t) for t in got]
    for a, e in zip(
        torch.autograd.grad(got, leaves, g),
        torch.autograd.grad([lin(x) for lin in mixed], leaves, g),
        strict=True,
    ):
        assert rel(a, e) < 1e-6
    with pytest.raises(ValueError, match=r"linears\[1\] takes 7 features"):
        stacked_kv(x, [lins[0], torch.nn.Linear(7, 4)])


# ------------------------------------------------------------------ the patched Q-Former


def tiny_qformer(which, layers=4):
    prefix = {
        "blip_2": "Blip2",
        "instructblip": "InstructBlip",
        "instructblipvideo": "InstructBlipVideo",
    }[which]
    module = importlib.import_module(f"transformers.models.{which}.modeling_{which}")
    config = getattr(module, f"{prefix}QFormerConfig")(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=48,
        encoder_hidden_size=24, cross_attention_frequency=2, attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(5)
    model = getattr(module, f"{prefix}QFormerModel")(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def inputs(which, dtype=torch.float32, masked=True, b=2, nq=5, n=13):
    # drawn in fp32 and rounded: a 16-bit randn draws other values than fp32's in torch 2.11
    # (2.13: the same), and the bf16 tests compare against the fp32 model on these inputs
    torch.manual_seed(6)
    query = torch.randn(b, nq, 32).to(dtype).requires_grad_()
    image = torch.randn(b, n, 24).to(dtype).requires_grad_()
    kwargs = dict(query_embeds=query, encoder_hidden_states=image)
    if masked:
        image_mask = torch.ones(b, n, dtype=torch.long)
        image_mask[1, 9:] = 0
        kwargs["encoder_attention_mask"] = image_mask
    if which.startswith("instructblip"):  # instruction tokens after the queries, one padded
        text_mask = torch.ones(b, nq + 4, dtype=torch.long)
        text_mask[1, -1] = 0
        kwargs |= dict(input_ids=torch.randint(0, 100, (b, 4)), attention_mask=text_mask)
    return kwargs, [query, image]


def run(model, kwargs, leaves):
    out = model(**kwargs).last_hidden_state
    g = torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype)
    grads = torch.autograd.grad((out * g).sum(), [*leaves, *model.parameters()])
    return out, grads


def backward_step(model, kwargs, leaves):
    """``run`` through ``.backward()`` (reentrant checkpoints refuse torch.autograd.grad):
    the output and the .grad of the leaves and every parameter."""
    tensors = [*leaves, *model.parameters()]
    for t in tensors:
        t.grad = None
    out = model(**kwargs).last_hidden_state
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), [t.grad for t in tensors]


def count_kv_calls(model, monkeypatch):
    """Calls of the cross-attention key / value Linears, counted in ``nn.Linear.forward``
    (a hook on them would make the patched encoder compute their K / V one by one, as a
    hooked layer must run: see test_hooked_or_replaced_layers_run_as_they_are)."""
    calls, kv = [], set()
    for layer in model.encoder.layer:
        if layer.has_cross_attention:
            a = layer.crossattention.attention
            kv |= {id(a.key), id(a.value)}
    forward = torch.nn.Linear.forward

    def counting(self, x):
        if id(self) in kv:
            calls.append(1)
        return forward(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", counting)
    return calls


@pytest.mark.parametrize("which,masked", [("blip_2", False), ("blip_2", True),
                                          ("instructblip", True),
                                          ("instructblipvideo", True)])  # fmt: skip
def test_patched_qformer_fp32(which, masked, monkeypatch):
    model = tiny_qformer(which)
    before = {n: dict(m.__dict__) for n, m in model.named_modules()}
    kwargs, leaves = inputs(which, masked=masked)
    want, want_grads = run(model, kwargs, leaves)
    calls = count_kv_calls(model, monkeypatch)
    run(model, kwargs, leaves)
    assert len(calls) == 4  # 2 cross layers x (key, value), unpatched
    calls.clear()
    hooked = {n: dict(m.__dict__) for n, m in model.named_modules()}
    handle = patch(model)
    encoder = type(model.encoder).__name__
    patched = {type(m).__name__ for m in model.modules() if "forward" in m.__dict__}
    assert {encoder, encoder.replace("Encoder", "SelfOutput"),
            encoder.replace("Encoder", "Output")} <= patched  # fmt: skip
    got, got_grads = run(model, kwargs, leaves)
    assert not calls  # K / V came from the one stacked GEMM
    assert rel(got, want) < 1e-5
    for a, e in zip(got_grads, want_grads, strict=True):
        assert (a.abs().max() < 1e-6) if e.abs().max() < 1e-6 else rel(a, e) < 1e-5
    with torch.no_grad():  # inference: the cached stacked weights, then an update
        assert rel(model(**kwargs).last_hidden_state, want) < 1e-5
        a = model.encoder.layer[2].crossattention.attention
        saved = a.value.weight.clone()
        a.value.weight.mul_(1.5)
        new = model(**kwargs).last_hidden_state
    handle.undo()
    with torch.no_grad():
        assert rel(new, model(**kwargs).last_hidden_state) < 1e-5
        a.value.weight.copy_(saved)
    assert {n: dict(m.__dict__) for n, m in model.named_modules()} == hooked
    again, _ = run(model, kwargs, leaves)
    assert torch.equal(again, want)
    assert set(before) == set(hooked)


def test_patched_qformer_training_mode_and_parts():
    """Training mode (no dropout) gives the same gradients; the ``qformer`` part alone is
    refused nowhere and the attention part alone leaves the output blocks unpatched."""
    model = tiny_qformer("blip_2").train()
    kwargs, leaves = inputs("blip_2")
    want, want_grads = run(model, kwargs, leaves)
    with patch(model):
        got, got_grads = run(model, kwargs, leaves)
    assert rel(got, want) < 1e-5
    assert all(rel(a, e) < 1e-5 for a, e in zip(got_grads, want_grads, strict=True)
               if e.abs().max() > 1e-6)  # fmt: skip
    with patch(model, qformer=False):
        assert "forward" not in model.encoder.__dict__
        assert rel(run(model, kwargs, leaves)[0], want) < 1e-5
    with patch(model, qformer_attention=False):  # fused outputs, transformers' attention
        assert "forward" not in model.encoder.layer[0].attention.attention.__dict__
        assert rel(run(model, kwargs, leaves)[0], want) < 1e-5


def test_patched_qformer_hidden_dropout_in_training():
    """Hidden dropout > 0 in training mode: the bias goes before the dropout; with the same
    RNG state the patched and transformers' outputs agree."""
    model = tiny_qformer("blip_2", layers=2).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.3
    kwargs, leaves = inputs("blip_2", masked=False)
    torch.manual_seed(7)
    want = model(**kwargs).last_hidden_state
    with patch(model):
        torch.manual_seed(7)
        got = model(**kwargs).last_hidden_state
    assert rel(got, want) < 1e-5


def test_hidden_dropout_follows_the_dropout_modules_mode():
    """An eval-mode Q-Former whose nn.Dropout modules were put in training mode (MC dropout)
    drops as transformers does (each nn.Dropout reads its own flag); in the opposite case
    nothing is dropped."""
    model = tiny_qformer("blip_2", layers=2).eval()
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    for m in dropouts:
        m.p = 0.3
        m.train()
    kwargs, _ = inputs("blip_2", masked=False)
    with torch.no_grad():
        torch.manual_seed(7)
        want = model(**kwargs).last_hidden_state
        model.train()
        for m in dropouts:
            m.eval()
        plain = model(**kwargs).last_hidden_state
        with patch(model):
            assert rel(model(**kwargs).last_hidden_state, plain) < 1e-5
            model.eval()
            for m in dropouts:
                m.train()
            torch.manual_seed(7)
            got = model(**kwargs).last_hidden_state
    assert rel(got, want) < 1e-5 and rel(want, plain) > 1e-3


def test_patched_qformer_trains_with_attention_dropout():
    """One SGD step of the patched Q-Former in training mode with attention dropout 0.1
    (BLIP-2's default), in the kernel. Its masks cannot be transformers' (another RNG), so:
    the output is not the eval one (dropped, not skipped), the loss is finite, exactly the
    parameters that get a gradient in transformers get a finite one, and the step lowers
    the loss under the same seed (same masks). With dropout 0 in training it matches
    transformers (test_patched_qformer_training_mode_and_parts)."""
    model = tiny_qformer("blip_2", layers=2)
    kwargs, leaves = inputs("blip_2")
    plain, want_grads = run(model, kwargs, leaves)
    attention = [m for m in model.modules() if hasattr(m, "attention_dropout")]
    assert len(attention) == 3  # 2 self + 1 cross
    for m in attention:
        m.attention_dropout = 0.1
    model.train()
    params = list(model.parameters())
    with patch(model):
        torch.manual_seed(3)
        out = model(**kwargs).last_hidden_state
        loss = out.square().mean()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= 0.05 * g
            torch.manual_seed(3)
            after = model(**kwargs).last_hidden_state.square().mean()
    assert torch.isfinite(loss) and rel(out, plain) > 1e-3
    for g, e in zip(grads, want_grads[2:], strict=True):
        assert torch.isfinite(g).all() and (g.abs().max() > 0) == (e.abs().max() > 0)
    assert after < loss


def test_patched_qformer_bf16():
    """The bf16 model (weights and inputs) patched, against the fp32 transformers model."""
    model = tiny_qformer("blip_2")
    kwargs, leaves = inputs("blip_2")
    want, want_grads = run(model, kwargs, leaves)
    model16 = model.to(torch.bfloat16)
    kwargs16, leaves16 = inputs("blip_2", dtype=torch.bfloat16)
    base, _ = run(model16, kwargs16, leaves16)
    with patch(model16):
        got, got_grads = run(model16, kwargs16, leaves16)
    assert got.dtype == torch.bfloat16
    assert rel(got, want) < 2e-2 and rel(base, want) < 2e-2
    for a, e in zip(got_grads[:2], want_grads[:2], strict=True):  # query and image grads
        assert rel(a, e) < 4e-2


def _norm_rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def test_qformer_bf16_error_against_the_bf16_floor():
    """Issue 12 asks for a bf16 forward within 1e-3 relative of the fp32 reference. No bf16
    computation can be: rounding the weights and inputs to bf16 and computing everything
    else exactly (float64) already moves the output by about 5e-3 (norm-relative), and
    rounding the exact output alone by about 1.6e-3. The patched model is held to
    within 2.5x of that floor and 1.5x of transformers' own bf16 error (measured: 7.7e-3,
    floor 5.1e-3, transformers 8.6e-3)."""
    torch.manual_seed(0)
    model = tiny_qformer("blip_2")
    kwargs, _ = inputs("blip_2")

    def as_(dtype, d):
        return {k: (v.detach().to(dtype) if torch.is_tensor(v) and v.is_floating_point()
                    else v) for k, v in d.items()}  # fmt: skip

    with torch.no_grad():
        exact = copy.deepcopy(model).double()(**as_(torch.float64, kwargs)).last_hidden_state
        model16 = copy.deepcopy(model).to(torch.bfloat16)
        kwargs16 = as_(torch.bfloat16, kwargs)
        rounded = copy.deepcopy(model16).double()(**as_(torch.float64, kwargs16))
        transformers16 = model16(**kwargs16).last_hidden_state
        with patch(model16):
            ours = model16(**kwargs16).last_hidden_state
    floor = _norm_rel(rounded.last_hidden_state, exact)
    assert floor > 1e-3 and _norm_rel(exact.to(torch.bfloat16), exact) > 1e-3
    assert _norm_rel(ours, exact) < 2.5 * floor
    assert _norm_rel(ours, exact) < 1.5 * _norm_rel(transformers16, exact)


@pytest.mark.parametrize("reentrant", [False, True])
def test_patched_qformer_gradient_checkpointing(reentrant):
    """Each checkpointed layer projects its own K / V (stacked outside the checkpoints, a
    reentrant recompute back-propagated through them a second time and raised)."""
    model = tiny_qformer("blip_2").train()
    # transformers 5.23 renamed it (the old name warns, to be removed in v6)
    options = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    kwargs, leaves = inputs("blip_2")
    want, want_grads = backward_step(model, kwargs, leaves)
    with patch(model):
        got, got_grads = backward_step(model, kwargs, leaves)
    assert rel(got, want) < 1e-5
    assert all(rel(a, e) < 1e-5 for a, e in zip(got_grads, want_grads, strict=True)
               if e is not None and e.abs().max() > 1e-6)  # fmt: skip


def test_qformer_part_under_torch_compile():
    """The whole patched Q-Former (one-GEMM K / V, attention core, fused output blocks)
    under torch.compile, with and without gradients: the fakes give the strides the kernels
    return (attention_core's output is contiguous whatever q's strides)."""
    model = tiny_qformer("blip_2", layers=2)
    kwargs, leaves = inputs("blip_2", masked=False)
    want, want_grads = run(model, kwargs, leaves)
    with patch(model):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        got, got_grads = run(compiled, kwargs, leaves)
        with torch.no_grad():
            again = compiled(**kwargs).last_hidden_state
    assert rel(got, want) < 1e-5 and rel(again, want) < 1e-5
    assert all(rel(a, e) < 1e-5 for a, e in zip(got_grads, want_grads, strict=True)
               if e.abs().max() > 1e-6)  # fmt: skip


def test_image_features_of_another_width_raise_transformers_error():
    """Image features wider than the key / value Linears take: transformers' own error
    (each layer projects its own K / V), where the one-GEMM K / V raised stacked_kv's
    ValueError."""
    model = tiny_qformer("blip_2", layers=2)
    kwargs, _ = inputs("blip_2", masked=False)
    image = kwargs["encoder_hidden_states"].detach()
    kwargs["encoder_hidden_states"] = torch.cat([image, image[..., :1]], dim=-1)
    with pytest.raises(RuntimeError) as want:
        model(**kwargs)
    with patch(model), pytest.raises(RuntimeError, match=re.escape(str(want.value))):
        model(**kwargs)


def test_exported_qformer_keeps_the_one_gemm_kv():
    """torch.export of the patched Q-Former: the cross-attention layers' K / V come from
    the one stacked GEMM (weights and biases concatenated: two ``aten.cat``, and one
    Linear for the four key / value Linears), not from each layer's own; the export's fake
    weights are plain tensors to that check (they were taken for tensor subclasses), and
    the program gives transformers' result."""
    model = tiny_qformer("blip_2", layers=4)  # 2 cross-attention layers
    ref = copy.deepcopy(model)
    kwargs, _ = inputs("blip_2", masked=False)
    q, image = (kwargs[k].detach() for k in ("query_embeds", "encoder_hidden_states"))

    class Call(torch.nn.Module):
        def __init__(self, qformer):
            super().__init__()
            self.qformer = qformer

        def forward(self, q, image):
            return self.qformer(query_embeds=q, encoder_hidden_states=image).last_hidden_state

    counts = []
    for m in (ref, model):
        with patch(m) if m is model else contextlib.nullcontext():
            program = torch.export.export(Call(m), (q, image))
        targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
        counts.append((targets.count("aten.linear.default"), targets.count("aten.cat.default")))
    (linears, _), (fused_linears, cats) = counts
    assert cats == 2 and fused_linears == linears - 3
    assert rel(program.module()(q, image), Call(ref)(q, image)) < 1e-5


@pytest.mark.parametrize("masked", [False, True])
def test_one_image_for_a_batch_of_queries(masked):
    """Image features of batch 1 with queries of batch 2: transformers broadcasts the
    image in its matmul, and so does the patch (values and gradients)."""
    model = tiny_qformer("blip_2", layers=2)
    kwargs, _ = inputs("blip_2", masked=False)
    image = kwargs["encoder_hidden_states"][:1].detach().requires_grad_()
    kwargs["encoder_hidden_states"] = image
    if masked:
        kwargs["encoder_attention_mask"] = torch.tensor([[1] * 9 + [0] * 4])
    leaves = [kwargs["query_embeds"], image]
    want, want_grads = run(model, kwargs, leaves)
    with patch(model):
        got, got_grads = run(model, kwargs, leaves)
    assert got.shape == want.shape == (2, 5, 32)
    assert rel(got, want) < 1e-5
    assert all(rel(a, e) < 1e-5 for a, e in zip(got_grads, want_grads, strict=True)
               if e.abs().max() > 1e-6)  # fmt: skip


def test_masked_qformer_compiles_fullgraph():
    """With an attention mask (BLIP-2 and InstructBLIP always pass one) the patched
    Q-Former compiles without a graph break: under compile transformers keeps the mask as
    one row per query, whose check is then a device assertion, not a host read."""
    model = tiny_qformer("blip_2", layers=2)
    kwargs, leaves = inputs("blip_2")
    assert any("mask" in k for k in kwargs)
    want, want_grads = run(model, kwargs, leaves)
    with patch(model):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        got, got_grads = run(compiled, kwargs, leaves)
    assert rel(got, want) < 1e-5
    assert all(rel(a, e) < 1e-5 for a, e in zip(got_grads, want_grads, strict=True)
               if e.abs().max() > 1e-6)  # fmt: skip


def test_patched_qformer_built_under_inference_mode():
    """A model built (and patched, and run) under ``torch.inference_mode`` (its parameters
    inference tensors, as in serving code) gives transformers' outputs."""
    with torch.inference_mode():
        model = tiny_qformer("blip_2")
        kwargs, _ = inputs("blip_2")
        kwargs = {k: v.detach() for k, v in kwargs.items()}
        want = model(**kwargs).last_hidden_state
        with patch(model):
            got = model(**kwargs).last_hidden_state
    assert rel(got, want) < 1e-5


def test_patched_qformer_sees_weights_changed_through_data():
    """Weights updated in place through ``.data`` between calls without gradients (BLIP's
    copy_params, EMA code): the patched model runs on the new weights (the stacked K / V
    weights are not kept between calls, where such an update would go unseen), and a deep
    copy runs on its own."""
    model = tiny_qformer("blip_2")
    online = tiny_qformer("blip_2")
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    kwargs, _ = inputs("blip_2")
    kwargs = {k: v.detach() for k, v in kwargs.items()}
    with torch.no_grad():
        want = online(**kwargs).last_hidden_state
        base = model(**kwargs).last_hidden_state
        with patch(model):
            twin = copy.deepcopy(model)
            model(**kwargs)
            for pm, p in zip(model.parameters(), online.parameters(), strict=True):
                pm.data.copy_(p.data)
            got = model(**kwargs).last_hidden_state
            twin_got = twin(**kwargs).last_hidden_state
    assert rel(got, want) < 1e-5 and rel(twin_got, base) < 1e-5


def test_hooked_or_replaced_layers_run_as_they_are():
    """A hooked cross-attention key Linear computes its own K / V (the hook fires; the other
    layers stay in the stacked GEMM); an output block whose dense Linear was replaced after
    patching runs its class's forward with the replacement, warning once."""
    from vlmkernels.integrations.patching import PatchFallbackWarning

    model = tiny_qformer("blip_2")
    ref = copy.deepcopy(model)
    kwargs, _ = inputs("blip_2")
    with torch.no_grad(), patch(model):
        seen = []
        model.encoder.layer[0].crossattention.attention.key.register_forward_hook(
            lambda *_: seen.append(1)
        )
        assert rel(model(**kwargs).last_hidden_state, ref(**kwargs).last_hidden_state) < 1e-5
        assert seen == [1]
        for m in (model, ref):
            block = m.encoder.layer[1].output_query
            block.dense = torch.nn.Sequential(block.dense)  # another module, same math + 0
            block.dense.append(torch.nn.Identity())
        with pytest.warns(PatchFallbackWarning, match="dense is now nn.Sequential, not nn.Linear"):
            got = model(**kwargs).last_hidden_state
        assert rel(got, ref(**kwargs).last_hidden_state) < 1e-5


def test_output_block_dropout_and_layernorm_changed_after_patching():
    """The fused output block skips its dropout (an identity in eval mode) and reads its
    LayerNorm's parameters: a hook on the dropout, a dropout replaced after patching (by
    nn.Identity, in training mode) and a LayerNorm of the same class made without bias run
    the class's forward, warning, with transformers' result; a dropout that was already
    nn.Identity when patching is called as it is, without a warning."""
    from vlmkernels.integrations.patching import PatchFallbackWarning

    model = tiny_qformer("blip_2", layers=2)
    ref = copy.deepcopy(model)
    kwargs, _ = inputs("blip_2")

    def blocks(m):
        return m.encoder.layer[0].attention.output, m.encoder.layer[1].output_query

    with torch.no_grad(), patch(model):
        zeroed = [blocks(m)[0].dropout.register_forward_hook(lambda mod, args, out: out * 0)
                  for m in (model, ref)]  # fmt: skip
        with pytest.warns(PatchFallbackWarning, match="dropout has hooks"):
            got = model(**kwargs).last_hidden_state
        want = ref(**kwargs).last_hidden_state
        assert rel(got, want) < 1e-5
        for hook in zeroed:
            hook.remove()
        for m in (model, ref):
            blocks(m)[0].dropout = torch.nn.Identity()
            m.train()
        with pytest.warns(PatchFallbackWarning, match="dropout is now nn.Identity"):
            got = model(**kwargs).last_hidden_state
        assert rel(got, ref(**kwargs).last_hidden_state) < 1e-5
        for m in (model, ref):
            m.eval()
            blocks(m)[0].dropout = torch.nn.Dropout(0.0)
            blocks(m)[1].LayerNorm = torch.nn.LayerNorm(32, eps=1e-12, bias=False)
        with pytest.warns(PatchFallbackWarning, match=r"LayerNorm changed since patching: "
                          r"parameters \(weight\), patched with \(weight, bias\)"):  # fmt: skip
            got = model(**kwargs).last_hidden_state
        assert rel(got, ref(**kwargs).last_hidden_state) < 1e-5
    # patched with nn.Identity in the dropout's place: called, in training mode too
    model, ref = tiny_qformer("blip_2", layers=2), None
    for block in blocks(model):
        block.dropout = torch.nn.Identity()
    ref = copy.deepcopy(model).train()
    with torch.no_grad(), patch(model), warnings.catch_warnings():
        warnings.simplefilter("error", PatchFallbackWarning)
        got = model.train()(**kwargs).last_hidden_state
    assert rel(got, ref(**kwargs).last_hidden_state) < 1e-5


def test_pre_hook_replacing_the_image_states_is_seen():
    """A forward pre-hook on one cross-attention block that replaces the image features it
    receives: that layer attends to the new features, not to the K / V the encoder
    projected from the old ones (the stacked K / V are used only for the very tensor they
    were projected from)."""

    def doubled(module, args, kwargs):
        if kwargs.get("encoder_hidden_states") is not None:
            kwargs = {**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"] * 2}
        return args, kwargs

    model = tiny_qformer("blip_2")
    ref = copy.deepcopy(model)
    for m in (model, ref):
        m.encoder.layer[2].crossattention.register_forward_pre_hook(doubled, with_kwargs=True)
    kwargs, _ = inputs("blip_2")
    with torch.no_grad(), patch(model):
        got = model(**kwargs).last_hidden_state
        want = ref(**kwargs).last_hidden_state
    assert rel(got, want) < 1e-5


def test_pre_hook_changing_the_image_states_in_place_is_seen():
    """A pre-hook that changes the image features in place (no gradients): the layers after
    it attend to the changed features, as in transformers, not to the K / V the encoder
    projected before the change (the same tensor object, a newer version)."""

    def halved(module, args, kwargs):
        kwargs["encoder_hidden_states"].mul_(0.5)

    model = tiny_qformer("blip_2")
    ref = copy.deepcopy(model)
    for m in (model, ref):
        m.encoder.layer[2].crossattention.register_forward_pre_hook(halved, with_kwargs=True)
    kwargs, (_, image) = inputs("blip_2")
    with torch.no_grad(), patch(model):
        got = model(**dict(kwargs, encoder_hidden_states=image.clone())).last_hidden_state
        want = ref(**dict(kwargs, encoder_hidden_states=image.clone())).last_hidden_state
    assert rel(got, want) < 1e-5


def test_output_recorders_keep_the_stacked_kv(monkeypatch):
    """transformers hooks every Q-Former layer for good the first time hidden states are
    asked for (its output recorders: forward hooks); later calls still project K / V in
    the one GEMM, and the recorded hidden states match transformers'. A full backward hook
    on a layer sees the gradient of the image features it was handed, as unpatched."""
    model = tiny_qformer("blip_2")
    ref = copy.deepcopy(model)
    kwargs, (_, image) = inputs("blip_2")
    with torch.no_grad():
        want = ref(**kwargs, output_hidden_states=True).hidden_states
    with patch(model):
        with torch.no_grad():
            got = model(**kwargs, output_hidden_states=True).hidden_states
            assert all(layer._forward_hooks for layer in model.encoder.layer)
            calls = count_kv_calls(model, monkeypatch)
            model(**kwargs)
            assert not calls  # still the one GEMM
        seen = {}
        for name, m in (("got", model), ("want", ref)):

            def keep(module, grad_in, grad_out, name=name):
                seen[name] = grad_in[2]  # the image features' gradient

            m.encoder.layer[2].register_full_backward_hook(keep)
            m(**kwargs).last_hidden_state.sum().backward()
    assert len(got) == len(want)
    assert all(rel(a, b) < 1e-5 for a, b in zip(got, want, strict=True))
    assert rel(seen["got"], seen["want"]) < 1e-5


def test_reentrant_checkpoint_wrapped_layers():
    """Layers wrapped by torch's ``apply_activation_checkpointing`` (reentrant
    CheckpointWrapper) project their own K / V inside their checkpoints: K / V stacked
    outside would be back-propagated through a second time by the recompute. Outputs and
    gradients match the unpatched wrapped model."""
    import functools

    from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as cw

    model = tiny_qformer("blip_2").train()
    layer_cls = type(model.encoder.layer[0])
    cw.apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=functools.partial(
            cw.checkpoint_wrapper, checkpoint_impl=cw.CheckpointImpl.REENTRANT
        ),
        check_fn=lambda m: isinstance(m, layer_cls),
    )
    assert type(model.encoder.layer[0]) is cw.CheckpointWrapper
    kwargs, leaves = inputs("blip_2")
    want, want_grads = backward_step(model, kwargs, leaves)
    with patch(model):
        assert is_patched(model.encoder.layer[0].crossattention.attention.forward)
        got, got_grads = backward_step(model, kwargs, leaves)
    assert rel(got, want) < 1e-5
    assert all(rel(a, e) < 1e-5 for a, e in zip(got_grads, want_grads, strict=True)
               if e is not None and e.abs().max() > 1e-6)  # fmt: skip


def test_fsdp2_sharded_layers(tmp_path):
    """Layers sharded by FSDP2's ``fully_shard`` (world size 1, gloo, in this process): their
    key / value weights are DTensors until each layer's own pre-forward hook gathers them,
    so each layer projects its own K / V; outputs and input gradients match transformers."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard = pytest.importorskip("torch.distributed.fsdp").fully_shard
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    model = tiny_qformer("blip_2").train()
    ref = copy.deepcopy(model)
    kwargs, leaves = inputs("blip_2")
    want, want_grads = run(ref, kwargs, leaves)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.encoder.layer:
            fully_shard(layer, mesh=mesh)
        with warnings.catch_warnings(), patch(model):
            warnings.simplefilter("ignore", UserWarning)  # FSDP2: "returned a view tensor"
            out = model(**kwargs).last_hidden_state
            g = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
            got_grads = torch.autograd.grad((out * g).sum(), leaves)
    finally:
        dist.destroy_process_group()
    assert rel(out.detach(), want) < 1e-5
    assert all(rel(a, e) < 1e-5 for a, e in zip(got_grads, want_grads[:2], strict=True))


class _Adapter(torch.nn.Module):
    """A PEFT-style wrapper: the original linear as ``base_layer``."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base

    def forward(self, x):
        return self.base_layer(x)


# PEFT's LoRA wrapper of an nn.Linear is a class named Linear too
_PeftLinear = type("Linear", (_Adapter,), {"__module__": "peft.tuners.lora.layer"})


@pytest.mark.parametrize("part,wrapper,named", [
    ("dense", _PeftLinear, "peft.tuners.lora.layer.Linear, not torch.nn.Linear"),
    ("LayerNorm", _Adapter, "_Adapter, not nn.LayerNorm"),
])  # fmt: skip
def test_output_block_wrapped_before_or_after_patching(part, wrapper, named):
    """An output block's dense or LayerNorm wrapped before patching (PEFT, FSDP2 on the
    layer) is refused as a wrapped layer, with the advice to patch first, not blamed on
    the transformers version, and nothing is changed; wrapped after patching, the block
    runs its class's forward, warning. Both messages tell a wrapper named like the layer
    (PEFT's lora.Linear) from it."""
    model = tiny_qformer("blip_2")
    ref = copy.deepcopy(model)
    block = model.encoder.layer[1].output_query
    setattr(block, part, wrapper(getattr(block, part)))
    with pytest.raises(WrappedLayerError, match=f"{part} is {named}") as info:
        patch(model)
    assert "patch before wrapping" in str(info.value)
    assert not any("forward" in m.__dict__ for m in model.modules())
    setattr(block, part, getattr(block, part).base_layer)
    kwargs, _ = inputs("blip_2")
    with torch.no_grad(), patch(model):
        setattr(block, part, wrapper(getattr(block, part)))
        with pytest.warns(PatchFallbackWarning, match=f"{part} is now {named}"):
            got = model(**kwargs).last_hidden_state
    assert rel(got, ref(**kwargs).last_hidden_state) < 1e-5


def test_global_module_hooks_see_every_layer():
    """A hook registered for every module (``register_module_forward_hook``, as module
    trackers and FLOP counters do) sees the calls it sees unpatched: the output blocks run
    their class's forward (warning) and the encoder projects K / V layer by layer; without
    the hook the fused forwards run again."""
    model = tiny_qformer("blip_2")
    kwargs, _ = inputs("blip_2")
    names = {id(m): n for n, m in model.named_modules()}
    seen = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.append(names.get(id(m)))
    )
    try:
        with torch.no_grad():
            want = model(**kwargs).last_hidden_state
            unpatched, seen[:] = list(seen), []
            with patch(model):
                with pytest.warns(PatchFallbackWarning, match="global module forward hook"):
                    got = model(**kwargs).last_hidden_state
                hook.remove()
                with warnings.catch_warnings():
                    warnings.simplefilter("error", PatchFallbackWarning)
                    again = model(**kwargs).last_hidden_state
    finally:
        hook.remove()
    assert "encoder.layer.0.crossattention.attention.key" in unpatched
    assert sorted(seen) == sorted(unpatched)
    assert rel(got, want) < 1e-5 and rel(again, want) < 1e-5


def test_full_blip2_model():
    """vlmkernels.patch on a whole (tiny) Blip2ForConditionalGeneration: its Q-Former's
    classes are patched and the image features (vision tower, Q-Former, projection) and
    their gradients match."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    config = Blip2Config(
        vision_config=dict(hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=16, patch_size=8),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=48, encoder_hidden_size=24,
                            cross_attention_frequency=2),
        text_config=dict(model_type="opt", hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, ffn_dim=32, vocab_size=120,
                         max_position_embeddings=64, word_embed_proj_dim=16),
        num_query_tokens=4, image_token_index=100,
    )  # fmt: skip
    torch.manual_seed(8)
    model = Blip2ForConditionalGeneration(config).eval()
    pixels = torch.randn(2, 3, 16, 16, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]

    def features():
        out = model.get_image_features(pixel_values=pixels)
        out = out if isinstance(out, torch.Tensor) else out[0]
        g = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        return out, torch.autograd.grad((out * g).sum(), [pixels, *params], allow_unused=True)

    want, want_grads = features()
    with patch(model):
        patched = {type(m).__name__ for m in model.modules() if "forward" in m.__dict__}
        got, got_grads = features()
    assert {"Blip2QFormerEncoder", "Blip2QFormerOutput", "Blip2QFormerSelfOutput",
            "Blip2QFormerMultiHeadAttention"} <= patched  # fmt: skip
    assert rel(got, want) < 1e-5
    for a, e in zip(got_grads, want_grads, strict=True):
        assert (a is None) == (e is None)
        if e is not None and e.abs().max() > 1e-6:
            assert rel(a, e) < 1e-5


@pytest.mark.parametrize("parts", [{}, {"qformer": False}])
def test_patched_qformer_broadcasts_one_set_of_queries(parts):
    """query_embeds of batch 1 (the learned queries, not expanded) with features of batch 2:
    transformers broadcasts them in its attention's matmul (its "KV has a different bsz
    than Q"); so does the patched Q-Former, values and gradients (the queries' summed over
    the images)."""
    model = tiny_qformer("blip_2")
    kwargs, (query, image) = inputs("blip_2", masked=True)
    query = query[:1].detach().requires_grad_()
    kwargs["query_embeds"] = query
    want, want_grads = run(model, kwargs, [query, image])
    assert want.shape[0] == 2
    with patch(model, **parts):
        got, got_grads = run(model, kwargs, [query, image])
    assert rel(got, want) < 1e-5
    for a, e in zip(got_grads, want_grads, strict=True):
        assert (a.abs().max() < 1e-6) if e.abs().max() < 1e-6 else rel(a, e) < 1e-5


@pytest.mark.parametrize("which", ["blip_2", "instructblip"])
def test_output_attentions_runs_transformers_forward(which):
    """output_attentions=True: transformers records the attention modules' weights, which
    the kernels do not keep, so those calls run transformers' forward (a
    PatchFallbackWarning says so) and return the same attentions; a call without it runs
    the kernels again."""
    model = tiny_qformer(which)
    model.config._attn_implementation = "eager"  # the implementation that has weights
    kwargs, leaves = inputs(which)
    with torch.no_grad():
        want = model(**kwargs, output_attentions=True)
    assert want.attentions and want.cross_attentions
    with patch(model), torch.no_grad():
        with pytest.warns(PatchFallbackWarning, match="output_attentions=True"):
            got = model(**kwargs, output_attentions=True)
        for name in ("attentions", "cross_attentions"):
            assert len(getattr(got, name)) == len(getattr(want, name))
            for a, e in zip(getattr(got, name), getattr(want, name), strict=True):
                assert rel(a, e) < 1e-6
        assert rel(got.last_hidden_state, want.last_hidden_state) < 1e-5
        with warnings.catch_warnings():
            warnings.simplefilter("error", PatchFallbackWarning)
            plain = model(**kwargs)
        assert rel(plain.last_hidden_state, want.last_hidden_state) < 1e-5
