"""vlmkernels.patch on transformers' IdeficsGatedCrossAttentionLayer (tiny config, random
weights, fp32): outputs and parameter and input gradients against the transformers module,
with IDEFICS's additive image-by-image masks (immediate and cumulative) and without a mask;
undo restores the instance exactly; bad masks refused; attention dropout in training runs
in the kernel (finite, reproducible under torch.manual_seed, gradients flow)."""

import copy
import warnings
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.idefics import modeling_idefics as M  # noqa: E402

from vlmkernels.integrations.tables.attention import _mask_ranges, mask_ranges  # noqa: E402
from vlmkernels.integrations.transformers import patch  # noqa: E402


def tiny_layer(qk_layer_norms, alpha_type):
    config = M.IdeficsConfig(hidden_size=32, num_attention_heads=2, intermediate_size=48,
                             alpha_type=alpha_type, alpha_initializer="ones",
                             alphas_initializer_range=1.0, qk_layer_norms=qk_layer_norms,
                             dropout=0.0, vision_config={"embed_dim": 24})  # fmt: skip
    torch.manual_seed(3)
    layer = M.IdeficsGatedCrossAttentionLayer(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return layer


def idefics_inputs(immediate, batch=2, tokens=11, images=3, latents=4):
    """IDEFICS's mask: image i's latents are seen from its token on (immediate: until the
    next image), as (1 - allowed) * finfo.min; the gate marks tokens seeing any image."""
    x = torch.randn(batch, tokens, 32, requires_grad=True)
    img = torch.randn(batch, images * latents, 24, requires_grad=True)
    starts = torch.tensor([[1, 4, 5], [0, 6, 20]])  # row 1 never reaches image 3
    t = torch.arange(tokens)
    seen = t[None, :, None] >= starts[:, None, :]  # (B, T, images)
    if immediate:
        nxt = torch.cat([starts[:, 1:], torch.full((batch, 1), 10**6)], 1)
        seen &= t[None, :, None] < nxt[:, None, :]
    allowed = seen.repeat_interleave(latents, dim=-1)
    mask = (1.0 - allowed[:, None].float()) * torch.finfo(torch.float32).min
    gate = allowed.any(-1).float()
    return x, img, mask, gate


def run(layer, x, img, mask, gate):
    out = layer(x, image_hidden_states=img, image_attention_mask=mask, cross_attention_gate=gate)
    g = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    grads = torch.autograd.grad((out * g).sum(), [x, img, *layer.parameters()])
    return out, grads


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def same_grads(got, want, tol=1e-4):
    """Gradient by gradient; those that are zero up to rounding (key biases, whose shift
    the softmax ignores) must be so on both sides."""
    for a, b in zip(got, want, strict=True):
        if b.abs().max() < 1e-6:
            assert a.abs().max() < 1e-6
        else:
            assert rel(a, b) < tol


@pytest.mark.parametrize("immediate,qk_norms,alpha_type,masked", [
    (True, False, "float", True), (False, True, "vector", True), (True, False, "float", False),
])  # fmt: skip
def test_idefics_gated_cross_attention(immediate, qk_norms, alpha_type, masked):
    layer = tiny_layer(qk_norms, alpha_type)
    before = dict(layer.__dict__)
    x, img, mask, gate = idefics_inputs(immediate)
    mask = mask if masked else None
    gate = gate if masked else torch.ones_like(gate)
    want, want_grads = run(layer, x, img, mask, gate)
    handle = patch(layer)
    assert "forward" in layer.__dict__
    got, got_grads = run(layer, x, img, mask, gate)
    assert rel(got, want) < 1e-5
    for a, b in zip(got_grads, want_grads, strict=True):
        assert rel(a, b) < 1e-4
    handle.undo()
    assert layer.__dict__ == before
    again, _ = run(layer, x, img, mask, gate)
    assert torch.equal(again, want)


def test_idefics_data_parallel_replica_runs_the_fused_forward(cpu_replicate):
    """An nn.DataParallel replica (its parameters plain attributes, ``_parameters`` empty)
    runs the fused layer on its own weights, without falling back, and passes them their
    gradients."""
    from vlmkernels.integrations.patching import PatchFallbackWarning

    ref = tiny_layer(False, "float")
    mine = copy.deepcopy(ref)
    x, img, mask, gate = idefics_inputs(True)
    with patch(mine):
        want, got = (cpu_replicate(m, ["cpu", "cpu"])[1] for m in (ref, mine))
        with warnings.catch_warnings():
            warnings.simplefilter("error", PatchFallbackWarning)
            out = got(x, image_hidden_states=img, image_attention_mask=mask,
                      cross_attention_gate=gate)  # fmt: skip
        ref_out = want(x, image_hidden_states=img, image_attention_mask=mask,
                       cross_attention_gate=gate)  # fmt: skip
        out, ref_out = (o[0] if isinstance(o, tuple) else o for o in (out, ref_out))
        assert rel(out, ref_out) < 1e-4
        weights = [got.cross_attn.q_proj.weight, want.cross_attn.q_proj.weight]
        g, g_ref = (torch.autograd.grad(o.square().sum(), w)[0]
                    for o, w in zip((out, ref_out), weights, strict=True))  # fmt: skip
        same_grads([g], [g_ref])


def test_idefics_cross_attn_hooked_or_replaced_runs_the_class_forward():
    """The fused layer reads cross_attn's projections instead of calling it: a hook on it
    (or a module put in its place) makes the layer run transformers' forward, with a
    PatchFallbackWarning, so the hook runs and its effect is kept."""
    from vlmkernels.integrations.patching import PatchFallbackWarning

    layer = tiny_layer(False, "float")
    x, img, mask, gate = idefics_inputs(True)
    calls = []

    def ablate(module, args, out):
        calls.append(1)
        return (out[0] * 0.5, *out[1:]) if isinstance(out, tuple) else out * 0.5

    hook = layer.cross_attn.register_forward_hook(ablate)
    want, _ = run(layer, x, img, mask, gate)
    with patch(layer), pytest.warns(PatchFallbackWarning, match="cross_attn has hooks"):
        got, _ = run(layer, x, img, mask, gate)
    assert calls == [1, 1] and rel(got, want) < 1e-6
    hook.remove()


def test_fallback_warning_points_at_the_modules_caller():
    """The PatchFallbackWarning names the line that called the module, not a frame of
    vlmkernels' patched method or of torch.nn.Module.__call__."""
    from vlmkernels.integrations.patching import PatchFallbackWarning

    layer = tiny_layer(False, "float")
    x, img, mask, gate = idefics_inputs(True)
    layer.cross_attn.register_forward_hook(lambda module, args, out: out)
    with patch(layer), pytest.warns(PatchFallbackWarning) as record:
        layer(x, image_hidden_states=img, image_attention_mask=mask, cross_attention_gate=gate)
    assert [w.filename for w in record] == [__file__]


def check_dropout(module, call, leaves, plain):
    """``call()`` in training mode (attention dropout > 0): finite, not ``plain`` (the
    output in eval mode: dropped, not skipped), the same bits again from one seed, finite
    nonzero gradients of out.sum() for ``leaves`` (none: no backward)."""
    module.train()
    torch.manual_seed(21)
    out = call()
    grads = torch.autograd.grad(out.sum(), leaves) if leaves else ()
    torch.manual_seed(21)
    with torch.no_grad():
        assert torch.equal(call(), out)
    module.eval()
    assert torch.isfinite(out).all() and rel(out, plain) > 1e-3
    assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in grads)


def test_idefics_patch_anywhere_dropout_and_refusals():
    layer = tiny_layer(False, "float")
    outer = torch.nn.Sequential(torch.nn.Identity(), copy.deepcopy(layer))
    x, img, mask, gate = idefics_inputs(True)
    handle = patch(outer)
    assert "forward" in outer[1].__dict__
    layer = outer[1]
    with torch.no_grad():
        plain = layer(x, image_hidden_states=img, image_attention_mask=mask,
                      cross_attention_gate=gate)  # fmt: skip
    layer.cross_attn.dropout = 0.1  # attention dropout in the kernel (media ranges)
    check_dropout(outer, lambda: layer(x, image_hidden_states=img, image_attention_mask=mask,
                                       cross_attention_gate=gate),
                  [x, img, layer.cross_attn.k_proj.weight], plain)  # fmt: skip
    layer.cross_attn.dropout = 0.0
    holes = mask.clone()
    holes[0, 0, 3, 1] = torch.finfo(torch.float32).min  # image 1 minus one latent
    holes[0, 0, 3, 0] = 0.0
    with pytest.raises(ValueError, match="not one interval per text token"):
        outer[1](x, image_hidden_states=img, image_attention_mask=holes,
                 cross_attention_gate=gate)  # fmt: skip
    handle.undo()
    assert "forward" not in outer[1].__dict__


def test_idefics_gated_layer_keeps_gradient_checkpointing():
    """transformers (after 5.17) checkpoints a ``GradientCheckpointingLayer`` in its class
    ``forward``, which the instance forward replaces: the patched layer checkpoints itself
    as the class does (through ``_gradient_checkpointing_func``, as often: with gradients,
    and without them where transformers does, 5.16-5.17), with transformers' outputs and
    gradients."""
    from torch.utils.checkpoint import checkpoint

    ref = tiny_layer(False, "float")
    mine = copy.deepcopy(ref)
    patch(mine)
    x, img, mask, gate = idefics_inputs(True)
    results, calls = [], []
    for layer in (ref, mine):
        layer.train()
        layer.gradient_checkpointing = True

        def counted(fn, *args, _layer=layer, **kwargs):
            calls.append(_layer)
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)

        layer._gradient_checkpointing_func = counted
        results.append(run(layer, x, img, mask, gate))
        with torch.no_grad():
            layer(x, image_hidden_states=img, image_attention_mask=mask,
                  cross_attention_gate=gate)  # fmt: skip
    count = {id(ref): 0, id(mine): 0}
    for layer in calls:
        count[id(layer)] += 1
    assert count[id(mine)] == count[id(ref)] >= 1
    (want, want_grads), (got, got_grads) = results
    assert rel(got, want) < 1e-5
    same_grads(got_grads, want_grads)


def test_idefics_attention_dropout_follows_cross_attn_mode():
    """Attention dropout follows cross_attn's training flag, as in transformers (its
    attention reads its own ``self.training``), not the layer's: a training layer with
    cross_attn in eval mode drops nothing, and an eval layer with cross_attn training
    drops."""
    layer = tiny_layer(False, "float")
    x, img, mask, gate = idefics_inputs(True)
    layer.cross_attn.dropout = 0.3

    def call():
        return layer(x, image_hidden_states=img, image_attention_mask=mask,
                     cross_attention_gate=gate)  # fmt: skip

    with torch.no_grad():
        plain = call()
        with patch(layer):
            layer.train()
            layer.cross_attn.eval()
            assert rel(call(), plain) < 1e-5
            layer.eval()
            layer.cross_attn.train()
            dropped = call()
    assert torch.isfinite(dropped).all() and rel(dropped, plain) > 1e-3


def test_idefics_gated_layer_with_a_mask_compiles_fullgraph():
    """With an image mask, the patched layer traces under torch.compile(fullgraph=True)
    (the mask is not read on the host there) and matches transformers; a mask whose
    allowed keys are not one interval per token gives that token NaN when compiled (no
    error can be raised in a graph), a ValueError eagerly."""
    layer = tiny_layer(False, "float")
    x, img, mask, gate = idefics_inputs(True)
    x, img = x.detach(), img.detach()
    kw = dict(image_hidden_states=img, image_attention_mask=mask, cross_attention_gate=gate)
    with torch.no_grad():
        want = layer(x, **kw)
        with patch(layer):
            compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
            assert rel(compiled(x, **kw), want) < 1e-5
            gaps = mask.clone()
            gaps[1, 0, 7, 5] = torch.finfo(torch.float32).min  # a hole in token 7's keys 4-7
            out = compiled(x, **dict(kw, image_attention_mask=gaps))
            assert out[1, 7].isnan().all() and not out[0].isnan().any()
            with pytest.raises(ValueError, match="not one interval"):
                layer(x, **dict(kw, image_attention_mask=gaps))
    torch._dynamo.reset()


def test_mask_ranges():
    allowed = torch.tensor([[[[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]]], dtype=torch.bool)
    lo, hi = mask_ranges(allowed, 2, 3, 4)
    assert lo.tolist() == [[1, 0, 0]] * 2 and hi.tolist() == [[3, 0, 4]] * 2
    with pytest.raises(ValueError, match=r"must be \(B, 1, 1 or 3, 5\)"):
        mask_ranges(allowed, 1, 3, 5)
    # the same mask again (every gated layer of a forward): the ranges computed before,
    # until the mask changes in place
    assert mask_ranges(allowed, 2, 3, 4)[0] is mask_ranges(allowed, 2, 3, 4)[0]
    # read by two gated layers, once each (one forward): once; the first one reading it
    # again starts the next forward, which reads the mask again
    first, second = torch.nn.Identity(), torch.nn.Identity()
    once = mask_ranges(allowed, 2, 3, 4, reader=first)[0]
    assert mask_ranges(allowed, 2, 3, 4, reader=second)[0] is once
    assert mask_ranges(allowed, 2, 3, 4, reader=first)[0] is not once
    allowed[0, 0, 1, 3] = True
    lo, hi = mask_ranges(allowed, 2, 3, 4)
    assert lo.tolist() == [[1, 3, 0]] * 2 and hi.tolist() == [[3, 4, 4]] * 2
    with torch.inference_mode():  # no version counter: read every time
        frozen = allowed.clone()
        assert mask_ranges(frozen, 2, 3, 4)[0] is not mask_ranges(frozen, 2, 3, 4)[0]
    # the last mask checked is not kept alive by the cache
    kept = weakref.ref(allowed)
    mask_ranges(allowed, 2, 3, 4)
    del allowed
    assert kept() is None
    # a shape pass on the meta device (a model built there): ranges of the right shape,
    # nothing read on the host
    lo, hi = mask_ranges(torch.zeros(2, 1, 3, 4, device="meta"), 2, 3, 4)
    assert lo.is_meta and lo.shape == hi.shape == (2, 3)


def test_idefics_mask_values_other_than_masked_refused():
    """transformers adds the image mask to the scores; the kernel keeps the keys where it
    is 0 and drops the others: a masked value whose exp vanishes (-inf, finfo.min, down to
    -1e4) gives transformers' result, any other (a soft bias, a 1 / 0 keep mask, which
    transformers would add) is refused instead of silently read as "masked"."""
    layer = tiny_layer(False, "float")
    x, img, mask, gate = idefics_inputs(True)
    kw = dict(image_hidden_states=img, cross_attention_gate=gate)
    with torch.no_grad():
        want = layer(x, image_attention_mask=mask.clamp_min(-1e4), **kw)
        with patch(layer):
            got = layer(x, image_attention_mask=mask.clamp_min(-1e4), **kw)
            assert rel(got, want) < 1e-5
            for bad in (mask.clamp_min(-3.0), (mask == 0).float(), (mask == 0).long()):
                with pytest.raises(ValueError, match="image_attention_mask holds values"):
                    layer(x, image_attention_mask=bad, **kw)
    # traced (no error can be raised there): the rows holding such a value get lo > hi, NaN
    soft = torch.zeros(1, 1, 2, 3)
    soft[0, 0, 1, 2] = -3.0
    lo, hi = _mask_ranges(soft, 1, 2, 3, traced=True)
    assert lo.tolist() == [[0, 1]] and hi.tolist() == [[3, 0]]


def test_idefics_mask_of_one_row_for_every_token():
    """An image mask of one row (B, 1, 1, N), which transformers broadcasts over the text
    tokens, gives every token that row's image tokens, as in transformers."""
    layer = tiny_layer(False, "float")
    x, img, mask, _ = idefics_inputs(False)
    row = mask[:, :, -1:]  # the last token's: every image of the row
    kw = dict(image_hidden_states=img, image_attention_mask=row,
              cross_attention_gate=torch.ones(x.shape[:2]))  # fmt: skip
    with torch.no_grad():
        want = layer(x, **kw)
        with patch(layer):
            assert rel(layer(x, **kw), want) < 1e-5


def test_idefics_layer_without_image_tokens():
    """No image tokens (N = 0, the mask (B, 1, T, 0)): every token sees none, as in
    transformers (the gate zeroes them), not an argmax error on the empty mask."""
    layer = tiny_layer(False, "float")
    x, img, mask, gate = idefics_inputs(True)
    kw = dict(image_hidden_states=img[:, :0], image_attention_mask=mask[..., :0],
              cross_attention_gate=torch.zeros_like(gate))  # fmt: skip
    with torch.no_grad():
        want = layer(x, **kw)
        with patch(layer):
            assert rel(layer(x, **kw), want) < 1e-5


def test_idefics_mask_changed_through_data_between_forwards():
    """The mask's key ranges are read once per forward: a second call of the same gated
    layer reads the mask again, so a change made through ``mask.data`` (which bumps no
    version counter) shows in the next forward, as it does in transformers'."""
    layer = tiny_layer(False, "float")
    ref = copy.deepcopy(layer)
    x, img, mask, gate = idefics_inputs(True)
    with torch.no_grad(), patch(layer):
        layer(x, image_hidden_states=img, image_attention_mask=mask, cross_attention_gate=gate)
        mask.data[0, 0, 4, 8:12] = 0.0  # token 4 now sees images 2 and 3, not 2 alone
        got = layer(x, image_hidden_states=img, image_attention_mask=mask,
                    cross_attention_gate=gate)  # fmt: skip
        want = ref(x, image_hidden_states=img, image_attention_mask=mask,
                   cross_attention_gate=gate)  # fmt: skip
    assert rel(got, want) < 1e-5


def test_idefics_mask_read_under_inference_mode_then_trained():
    """A frozen teacher run under inference mode, then a student with gradients, both
    given the same image attention mask: the student does not get the ranges the teacher
    read (inference tensors, which autograd cannot save); outputs and gradients are
    transformers'."""
    teacher = tiny_layer(False, "float")
    student, ref = copy.deepcopy(teacher), copy.deepcopy(teacher)
    x, img, mask, gate = idefics_inputs(True)
    kw = dict(image_hidden_states=img, image_attention_mask=mask, cross_attention_gate=gate)
    x_ref = x.detach().requires_grad_()
    want = ref(x_ref, **kw)
    want.square().sum().backward()
    with patch(teacher), patch(student):
        with torch.inference_mode():
            teacher(x, **kw)
        x_mine = x.detach().requires_grad_()
        got = student(x_mine, **kw)
        got.square().sum().backward()
    assert rel(got, want) < 1e-5 and rel(x_mine.grad, x_ref.grad) < 1e-5


def tiny_qformer(module, prefix):
    config = getattr(module, f"{prefix}QFormerConfig")(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        encoder_hidden_size=24, cross_attention_frequency=1, attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(5)
    model = getattr(module, f"{prefix}QFormerModel")(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("which", ["blip_2", "instructblip", "instructblipvideo"])
def test_qformer_attention(which):
    """The Q-Former (self- and cross-attention every layer) with padded image features and,
    for InstructBLIP, padded instruction tokens after the queries: outputs and gradients."""
    import importlib

    prefix = {
        "blip_2": "Blip2",
        "instructblip": "InstructBlip",
        "instructblipvideo": "InstructBlipVideo",
    }[which]
    module = importlib.import_module(f"transformers.models.{which}.modeling_{which}")
    model = tiny_qformer(module, prefix)
    before = {n: dict(m.__dict__) for n, m in model.named_modules()}
    b, nq, n = 2, 5, 13
    query = torch.randn(b, nq, 32, requires_grad=True)
    image = torch.randn(b, n, 24, requires_grad=True)
    image_mask = torch.ones(b, n, dtype=torch.long)
    image_mask[1, 9:] = 0

    kwargs = dict(query_embeds=query, encoder_hidden_states=image,
                  encoder_attention_mask=image_mask)  # fmt: skip
    if which.startswith("instructblip"):  # instruction tokens after the queries, one padded
        text_mask = torch.ones(b, nq + 4, dtype=torch.long)
        text_mask[1, -1] = 0
        kwargs |= dict(input_ids=torch.randint(0, 100, (b, 4)), attention_mask=text_mask)

    def run():
        out = model(**kwargs).last_hidden_state
        g = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        return out, torch.autograd.grad((out * g).sum(), [query, image, *model.parameters()])

    want, want_grads = run()
    handle = patch(model, qformer=False)  # the attention part alone (fused: test_qformer)
    patched = [n for n, m in model.named_modules() if "forward" in m.__dict__]
    assert len(patched) == 4  # 2 layers x (self, cross)
    got, got_grads = run()
    assert rel(got, want) < 1e-5
    same_grads(got_grads, want_grads)
    handle.undo()
    assert {n: dict(m.__dict__) for n, m in model.named_modules()} == before
    again, _ = run()
    assert torch.equal(again, want)


def test_key_mask_forms():
    """A transformers mask becomes the kernels' key padding (bool) or key bias (additive:
    exactly what transformers adds to the scores, other biases too), read on the device
    only; a mask whose rows differ between queries is refused (on the device too)."""
    from vlmkernels.integrations.tables.attention import key_mask

    neg = torch.finfo(torch.float32).min
    mask = torch.zeros(2, 1, 1, 4)
    mask[1, ..., 3] = neg
    pad, bias = key_mask(mask, 2, 3, 4, "here")
    assert pad is None and torch.equal(bias, mask[:, 0, 0])
    pad, bias = key_mask(mask + 0.5, 2, 3, 4, "here")  # any per-key bias
    assert pad is None and torch.equal(bias, mask[:, 0, 0] + 0.5)
    pad, bias = key_mask(mask[:1].expand(1, 1, 3, 4), 2, 3, 4, "here")  # broadcast batch
    assert pad is None and bias.shape == (2, 4) and torch.equal(bias[1], mask[0, 0, 0])
    pad, bias = key_mask(mask == 0, 2, 3, 4, "here")
    assert bias is None and pad.tolist() == [[False] * 4, [False] * 3 + [True]]
    assert key_mask(None, 2, 3, 4, "here") == (None, None)
    rows = torch.zeros(2, 1, 3, 4)
    rows[0, 0, 1, 2] = neg
    # checked on the device (torch._assert_async): RuntimeError on the CPU
    with pytest.raises(RuntimeError, match="here: the attention mask differs between query row"):
        key_mask(rows, 2, 3, 4, "here")
    with pytest.raises(ValueError, match=r"here: attention mask must be \(B, 1, 1 or 3, 4\)"):
        key_mask(torch.zeros(2, 4), 2, 3, 4, "here")
    # rows for other queries than these (transformers' scores do not broadcast with them:
    # BLIP-2's Q-Former masks the image for queries and text, its cross-attention gets the
    # queries alone)
    for rows in (2, 5):
        with pytest.raises(ValueError, match=r"must be \(B, 1, 1 or 3, 4\), got \(2, 1, "):
            key_mask(torch.zeros(2, 1, rows, 4), 2, 3, 4, "here")


def test_idefics_perceiver_resampler():
    """IDEFICS's perceiver resampler (latents attend to [context, latents], q/k norms):
    outputs and gradients, undo."""
    from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

    config = M.IdeficsConfig(hidden_size=32, num_attention_heads=2, intermediate_size=48,
                             vision_config={"embed_dim": 32},
                             perceiver_config={"qk_layer_norms_perceiver": True})  # fmt: skip
    torch.manual_seed(7)
    model = IdeficsPerceiverResampler(config, embed_dim=32, depth=2, n_heads=2, head_dim=16,
                                      n_latents=6).eval()  # fmt: skip
    context = torch.randn(2, 19, 32, requires_grad=True)

    def run():
        out = model(context)
        g = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        return out, torch.autograd.grad((out * g).sum(), [context, *model.parameters()])

    want, want_grads = run()
    handle = patch(model)
    assert sum("forward" in m.__dict__ for m in model.modules()) == 2
    got, got_grads = run()
    assert rel(got, want) < 1e-5
    same_grads(got_grads, want_grads)
    handle.undo()
    assert torch.equal(run()[0], want)


@pytest.mark.parametrize("padded", [False, True])
def test_idefics2_perceiver_resampler(padded):
    """Idefics2's perceiver resampler (grouped-query attention: 6 heads over 2 key/value
    heads, latents attend to [context, latents], the context's padding mask): outputs and
    the gradients of the context and every weight match transformers (eager attention);
    undo restores the instance."""
    from transformers.models.idefics2 import modeling_idefics2 as M2

    config = M2.Idefics2PerceiverConfig(hidden_size=48, resampler_n_heads=6,
                                        resampler_head_dim=8, num_key_value_heads=2,
                                        resampler_n_latents=5, resampler_depth=2,
                                        hidden_act="silu")  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(11)
    model = M2.Idefics2PerceiverResampler(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    context = torch.randn(2, 17, 48, requires_grad=True)
    mask = torch.ones(2, 17, dtype=torch.long)
    if padded:
        mask[1, 11:] = 0

    def run():
        out = model(context, attention_mask=mask)
        g = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
        return out, torch.autograd.grad((out * g).sum(), [context, *model.parameters()])

    want, want_grads = run()
    handle = patch(model)
    assert sum("forward" in m.__dict__ for m in model.modules()) == 2
    got, got_grads = run()
    assert rel(got, want) < 1e-5
    same_grads(got_grads, want_grads)
    if padded:
        attn = model.layers[0].self_attn
        attn.attention_dropout = 0.1  # in the kernel (grouped heads, key padding)
        with torch.no_grad():  # the Q-Former's training step (test_qformer) runs a backward
            check_dropout(model, lambda: model(context, attention_mask=mask), (), got)
        attn.attention_dropout = 0.0
    handle.undo()
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(run()[0], want)


def test_idefics2_perceiver_empty_batch():
    """An empty batch of images through Idefics2's resampler (eager attention, which
    transformers runs on it): an empty result, as transformers returns, not a reshape
    error."""
    from transformers.models.idefics2 import modeling_idefics2 as M2

    config = M2.Idefics2PerceiverConfig(hidden_size=32, resampler_n_heads=4,
                                        resampler_head_dim=8, num_key_value_heads=2,
                                        resampler_n_latents=3, resampler_depth=1)  # fmt: skip
    config._attn_implementation = "eager"
    model = M2.Idefics2PerceiverResampler(config).eval()
    context, mask = torch.randn(0, 7, 32), torch.ones(0, 7, dtype=torch.long)
    with torch.no_grad():
        want = model(context, attention_mask=mask)
        with patch(model):
            got = model(context, attention_mask=mask)
    assert got.shape == want.shape == (0, 3, 32)


@pytest.mark.parametrize("resampler", [False, True])
def test_idefics_greedy_generation_matches_transformers(resampler):
    """A whole (tiny) IdeficsForVisionText2Text, left-padded batch of two rows whose images
    start at different tokens: the patched model's logits match, and generate() (prefill,
    then decode steps each with a one-token image mask, read once per forward by every
    gated layer) gives the unpatched model's tokens, greedy."""
    config = M.IdeficsConfig(
        vocab_size=100, additional_vocab_size=2, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=2, cross_layer_interval=1,
        qk_layer_norms=True, alpha_initializer="ones", use_resampler=resampler,
        vision_config=dict(embed_dim=24, image_size=8, patch_size=4, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32),
        perceiver_config=dict(resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=8),
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(5)
    model = M.IdeficsForVisionText2Text(config).eval()
    ids = torch.randint(3, 100, (2, 9))
    ids[0, :2] = 0
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    images = torch.zeros(2, 9, 2, dtype=torch.long)  # token t sees image i from its start
    images[0, 3:, 0], images[0, 6:, 1], images[1, 1:, 0], images[1, 5:, 1] = 1, 1, 1, 1
    kwargs = dict(input_ids=ids, attention_mask=mask, image_attention_mask=images,
                  pixel_values=torch.randn(2, 2, 3, 8, 8))  # fmt: skip
    with torch.no_grad():
        want_logits = model(**kwargs).logits
        want = model.generate(**kwargs, max_new_tokens=5, do_sample=False)
        with patch(model):
            assert sum("forward" in m.__dict__ for m in model.modules()) >= 2
            got_logits = model(**kwargs).logits
            got = model.generate(**kwargs, max_new_tokens=5, do_sample=False)
    assert rel(got_logits, want_logits) < 1e-5
    assert torch.equal(got, want)
