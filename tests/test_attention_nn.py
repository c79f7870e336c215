"""vlmkernels.nn.attention.GatedCrossAttentionBlock against a float64 re-implementation of
open_flamingo's published formula (helpers.py: LayerNorm, bias-free projections, the
text_time / media_time mask with -finfo.max, zeroed rows before the first media item,
tanh gates, LN -> Linear -> GELU -> Linear feed-forward): outputs, input and parameter
gradients in fp32; the state_dict keys open_flamingo's block has."""

import pytest
import torch
import torch.nn.functional as F

from vlmkernels.nn.attention import GatedCrossAttentionBlock

OPEN_FLAMINGO_KEYS = [
    "attn_gate", "ff_gate", "attn.norm.weight", "attn.norm.bias", "attn.to_q.weight",
    "attn.to_kv.weight", "attn.to_out.weight", "ff.0.weight", "ff.0.bias", "ff.1.weight",
    "ff.3.weight",
]  # fmt: skip


def flamingo_block_f64(p, x, media, media_locations, heads, dim_head, only_immediate,
                       use_cached_media=False):  # fmt: skip
    """The published formula in float64, from the parameters ``p`` (a state_dict)."""
    x, media = x.double(), media.double()
    b, t, _ = x.shape
    t_img, n = media.shape[1:3]
    y = F.layer_norm(x, x.shape[-1:], p["attn.norm.weight"], p["attn.norm.bias"])
    q = (y @ p["attn.to_q.weight"].T).view(b, t, heads, dim_head).transpose(1, 2)
    kv = media.reshape(b, t_img * n, -1) @ p["attn.to_kv.weight"].T
    k, v = kv.chunk(2, dim=-1)
    k = k.reshape(b, -1, heads, dim_head).transpose(1, 2)
    v = v.reshape(b, -1, heads, dim_head).transpose(1, 2)
    sim = (q * dim_head**-0.5) @ k.transpose(-1, -2)
    if media_locations is not None:
        text_time = media_locations.cumsum(-1)
        if use_cached_media:  # every token after the prompt: its count of media tokens
            text_time = media_locations.sum(-1, keepdim=True).expand(b, t)
        media_time = torch.arange(t_img).repeat_interleave(n) + 1
        op = torch.eq if only_immediate else torch.ge
        mask = op(text_time[:, None, :, None], media_time[None, None, None, :])
        sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
    attn = (sim - sim.amax(-1, keepdim=True)).softmax(-1)
    if media_locations is not None and only_immediate:
        attn = attn.masked_fill((text_time == 0)[:, None, :, None], 0.0)
    a = (attn @ v).transpose(1, 2).reshape(b, t, heads * dim_head) @ p["attn.to_out.weight"].T
    x = a * p["attn_gate"].tanh() + x
    z = F.layer_norm(x, x.shape[-1:], p["ff.0.weight"], p["ff.0.bias"])
    z = F.gelu(z @ p["ff.1.weight"].T) @ p["ff.3.weight"].T
    return z * p["ff_gate"].tanh() + x


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("only_immediate,with_locations", [(True, True), (False, True),
                                                           (True, False)])  # fmt: skip
def test_block_matches_open_flamingo_formula(only_immediate, with_locations, device):
    torch.manual_seed(1)
    dim, dim_visual, heads, dim_head = 24, 20, 2, 16
    block = GatedCrossAttentionBlock(
        dim=dim, dim_visual=dim_visual, dim_head=dim_head, heads=heads, ff_mult=2,
        only_attend_immediate_media=only_immediate,
    ).to(device)  # fmt: skip
    assert sorted(block.state_dict()) == sorted(OPEN_FLAMINGO_KEYS)
    with torch.no_grad():
        for prm in block.parameters():
            prm.copy_(torch.randn_like(prm) * 0.5)
    b, t, t_img, n = 2, 13, 3, 4
    x = torch.randn(b, t, dim, device=device, requires_grad=True)
    media = torch.randn(b, t_img, n, dim_visual, device=device, requires_grad=True)
    loc = torch.zeros(b, t, dtype=torch.bool, device=device)
    loc[0, [0, 5, 6]] = True
    loc[1, [0, 9]] = True  # every row starts with a media token (open_flamingo's cumulative
    # mode answers tokens before the first one with a uniform average; see the module doc)
    if only_immediate:
        loc[0, 0] = False  # tokens 0..4 of row 0 see no media: exactly 0 attention
    loc = loc if with_locations else None
    out = block(x, media, loc)
    params = {k: v.detach().double().requires_grad_(True) for k, v in block.state_dict().items()}
    x64 = x.detach().double().requires_grad_(True)
    m64 = media.detach().double().requires_grad_(True)
    ref = flamingo_block_f64(params, x64, m64, loc, heads, dim_head, only_immediate)
    assert rel(out, ref) < 1e-5
    g = torch.randn_like(ref)
    out.backward(g.float())
    ref.backward(g)
    assert rel(x.grad, x64.grad) < 1e-5 and rel(media.grad, m64.grad) < 1e-5
    named = dict(block.named_parameters())
    for name, p64 in params.items():
        assert rel(named[name].grad, p64.grad) < 1e-5, name


def test_state_dict_round_trip():
    a = GatedCrossAttentionBlock(dim=16, dim_visual=8, dim_head=8, heads=2)
    b = GatedCrossAttentionBlock(dim=16, dim_visual=8, dim_head=8, heads=2)
    b.load_state_dict(a.state_dict())
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    with pytest.raises(ValueError, match="media must be"):
        a(torch.randn(1, 3, 16), torch.randn(1, 4, 8))
    # media of another batch would mix samples' keys: refused (4 or 1 for x's 2)
    for media_batch in (4, 1):
        with pytest.raises(ValueError, match=r"media's batch must be x's \(2\)"):
            a(torch.randn(2, 3, 16), torch.randn(media_batch, 1, 3, 8))


@pytest.mark.parametrize(("kwargs", "exc", "message"), [
    (dict(heads=0), ValueError, "heads must be >= 1, got 0"),
    (dict(heads=2.0), TypeError, "heads must be an int, got 2.0"),
    (dict(dim_head=0), ValueError, "dim_head must be >= 1, got 0"),
    (dict(dim_head=320), ValueError, "dim_head must be at most 256"),
    (dict(dim=-4), ValueError, "dim must be >= 1, got -4"),
    (dict(dim_visual=None), TypeError, "dim_visual must be an int"),
    (dict(only_attend_immediate_media=1), TypeError, "only_attend_immediate_media must be True"),
    (dict(ff_mult=0), ValueError, "ff_mult must give the feed-forward at least one channel"),
    (dict(ff_mult="4"), TypeError, "ff_mult must be a float"),
    (dict(ff_mult=float("inf")), ValueError, "ff_mult must be in"),
])  # fmt: skip
def test_constructor_errors_name_the_argument(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        GatedCrossAttentionBlock(**{"dim": 16, "dim_visual": 8, "dim_head": 8, "heads": 2,
                                    **kwargs})  # fmt: skip


def test_gate_and_empty_batch(device):
    """A Python float gate is refused by name; an empty batch gives an empty result (and
    gradients) like every op below the block."""
    block = GatedCrossAttentionBlock(dim=16, dim_visual=8, dim_head=8, heads=2).to(device)
    x, media = torch.randn(1, 3, 16, device=device), torch.randn(1, 1, 2, 8, device=device)
    with pytest.raises(TypeError, match="gate must be a one-element tensor, got float"):
        block.attn(x, media, gate=0.5)
    for bad in (x[0], x[None], x[..., :8]):  # x is (B, T, dim=16)
        with pytest.raises(ValueError, match=r"x must be a \(B, T, dim=16\) tensor"):
            block(bad, media)
    for bad in (x.tolist(), None):  # not a tensor at all: a TypeError, as the ops'
        with pytest.raises(TypeError, match=r"x must be a \(B, T, dim=16\) tensor, got"):
            block(bad, media)
    with pytest.raises(ValueError, match=r"media must be a \(B, T_img, n, dim_visual=8\)"):
        block(x, media[..., :4])
    locations = torch.ones(1, 3, dtype=torch.bool, device=device)
    with pytest.raises(TypeError, match="use_cached_media must be True or False"):
        block(x, media, locations, use_cached_media="no")
    for cached in (False, True):  # 0/1 integers: the same TypeError on both paths
        with pytest.raises(TypeError, match="media_locations must be a .*bool tensor"):
            block(x, media, locations.long(), use_cached_media=cached)
    x = torch.randn(0, 3, 16, device=device, requires_grad=True)
    media = torch.randn(0, 2, 4, 8, device=device)
    locations = torch.zeros(0, 3, dtype=torch.bool, device=device)
    for kw in (dict(media_locations=locations), {}):
        out = block(x, media, **kw)
        assert out.shape == (0, 3, 16)
        out.sum().backward()
        assert x.grad.shape == x.shape


def test_block_at_initialisation_gate_gradient(device):
    """Gates at 0 (open_flamingo's initial value): the block is the identity and the gate
    gradients are those of the float64 formula (the tanh gate runs in the attention kernel's
    epilogue, so tanh(0) = 0 must not lose d attn_gate)."""
    torch.manual_seed(2)
    block = GatedCrossAttentionBlock(dim=16, dim_visual=12, dim_head=8, heads=2,
                                     ff_mult=2).to(device)  # fmt: skip
    x = torch.randn(2, 7, 16, device=device, requires_grad=True)
    media = torch.randn(2, 2, 3, 12, device=device)
    loc = torch.zeros(2, 7, dtype=torch.bool, device=device)
    loc[:, [0, 4]] = True
    out = block(x, media, loc)
    assert torch.equal(out, x)
    params = {k: v.detach().double().requires_grad_(True) for k, v in block.state_dict().items()}
    ref = flamingo_block_f64(params, x.detach().double(), media.double(), loc, 2, 8, True)
    g = torch.randn_like(ref)
    out.backward(g.float())
    ref.backward(g)
    assert block.attn_gate.grad.abs().item() > 0
    assert rel(block.attn_gate.grad, params["attn_gate"].grad) < 1e-5
    assert rel(block.ff_gate.grad, params["ff_gate"].grad) < 1e-5


def test_block_keeps_open_flamingos_contract_with_its_attention(device):
    """Where the gate fused into the attention kernel would show, the block multiplies by
    tanh(attn_gate) after ``attn``, as open_flamingo's does: a hook on ``attn`` sees the
    ungated attention; an attention module of open_flamingo's signature (no ``gate``) can
    be swapped in; a 16-bit x beside fp32 gates (autocast) gets an fp32 residual; fp16
    autocast; a ``to_q`` wrapped in a module without ``in_features`` is called as given."""
    torch.manual_seed(3)
    block = GatedCrossAttentionBlock(dim=16, dim_visual=12, dim_head=8, heads=2,
                                     ff_mult=2).to(device)  # fmt: skip
    with torch.no_grad():
        for prm in block.parameters():
            prm.copy_(torch.randn_like(prm) * 0.5)
    x, media = torch.randn(2, 7, 16, device=device), torch.randn(2, 2, 3, 12, device=device)
    loc = torch.zeros(2, 7, dtype=torch.bool, device=device)
    loc[:, [0, 4]] = True

    def open_flamingo(x):  # its block's forward, on this block's submodules
        h = block.attn(x, media, loc) * block.attn_gate.tanh() + x
        return block.ff(h) * block.ff_gate.tanh() + h

    assert block._gate_fuses(x)  # the usual case keeps the fused gate
    seen = []
    hook = block.attn.register_forward_hook(lambda module, args, out: seen.append(out))
    assert not block._gate_fuses(x)
    out = block(x, media, loc)
    hook.remove()
    assert torch.equal(seen[0], block.attn(x, media, loc)) and torch.equal(out, open_flamingo(x))
    for dtype, x_in in ((torch.bfloat16, x.bfloat16()), (torch.float16, x)):
        with torch.autocast(device.type, dtype=dtype):
            out = block(x_in, media, loc)
            assert torch.equal(out, open_flamingo(x_in)) and out.dtype == torch.float32

    class OpenFlamingoAttention(torch.nn.Module):  # open_flamingo's forward signature
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, media, media_locations=None, use_cached_media=False):
            return self.inner(x, media, media_locations, use_cached_media)

    want = block(x, media, loc)
    inner = block.attn
    inner.to_q = torch.nn.Sequential(inner.to_q)  # a wrapper without in_features
    assert torch.equal(block(x, media, loc), want)
    block.attn = OpenFlamingoAttention(inner)
    assert rel(block(x, media, loc), want) < 1e-6


def test_jit_trace_is_refused_as_such(device):
    """torch.jit.trace turns the sizes read from shapes into tensors: the trace is refused
    by name, not the number of latents per media item it made a tensor of."""
    block = GatedCrossAttentionBlock(dim=16, dim_visual=12, dim_head=8, heads=2).to(device)
    x, media = torch.randn(2, 7, 16, device=device), torch.randn(2, 2, 3, 12, device=device)
    loc = torch.zeros(2, 7, dtype=torch.bool, device=device)
    loc[:, [0, 4]] = True
    with pytest.raises(RuntimeError, match="torch.jit.trace is not supported"):
        torch.jit.trace(block, (x, media, loc), check_trace=False)


@pytest.mark.parametrize("only_immediate", [True, False])
def test_decoding_with_cached_media(only_immediate, device):
    """open_flamingo's use_cached_media (generation with a KV cache): the new tokens come
    after the prompt, whose media_locations (B, T_prompt) give every token the same text
    time. Against the formula; the last prompt token's output equals a cached step's for
    the same token; prompts with no media get 0 attention, and with immediate media a
    prompt with more media tokens than media items gets NaN (as the prefill path)."""
    torch.manual_seed(3)
    dim, dim_visual, heads, dim_head = 16, 12, 2, 8
    block = GatedCrossAttentionBlock(
        dim=dim, dim_visual=dim_visual, dim_head=dim_head, heads=heads, ff_mult=2,
        only_attend_immediate_media=only_immediate,
    ).to(device)  # fmt: skip
    with torch.no_grad():
        for prm in block.parameters():
            prm.copy_(torch.randn_like(prm) * 0.5)
    b, t_prompt, t_img, n = 3, 7, 3, 4
    prompt = torch.randn(b, t_prompt, dim, device=device)
    media = torch.randn(b, t_img, n, dim_visual, device=device, requires_grad=True)
    loc = torch.zeros(b, t_prompt, dtype=torch.bool, device=device)
    loc[0, [0, 4]] = True
    loc[1, [1, 2, 5]] = True  # sample 2: no media token
    new = torch.randn(b, 2, dim, device=device, requires_grad=True)
    out = block(new, media, loc, use_cached_media=True)
    params = {k: v.detach().double().requires_grad_(True) for k, v in block.state_dict().items()}
    x64 = new.detach().double().requires_grad_(True)
    m64 = media.detach().double().requires_grad_(True)
    ref = flamingo_block_f64(params, x64, m64, loc, heads, dim_head, only_immediate,
                             use_cached_media=True)  # fmt: skip
    # sample 2 has no media: open_flamingo's cumulative mode averages every latent there
    # (its -finfo.max artefact); here, as in the prefill path, it gets 0 attention
    rows = [0, 1] if not only_immediate else [0, 1, 2]
    assert rel(out[rows], ref[rows]) < 1e-5
    no_media = flamingo_block_f64(params, x64, m64, loc[:, :0], heads, dim_head, True,
                                  use_cached_media=True)  # fmt: skip
    assert rel(out[2], no_media[2]) < 1e-5
    g = torch.randn_like(ref)
    out.backward(g.float())
    ref[rows].backward(g[rows])
    assert rel(new.grad[rows], x64.grad[rows]) < 1e-5
    # the last prompt token: prefill's row equals a cached step's
    full = block(prompt, media, loc)
    step = block(prompt[:, -1:], media, loc, use_cached_media=True)
    assert rel(step[:, 0], full[:, -1]) < 1e-6
    if only_immediate:
        many = torch.zeros(b, t_prompt, dtype=torch.bool, device=device)
        many[:, :4] = True  # 4 media tokens, 3 media items
        assert block.attn(new, media, many, use_cached_media=True).isnan().all()


def test_deferred_initialisation_on_the_meta_device():
    """A block built on the meta device, then materialised module by module as FSDP's
    ``param_init_fn`` default does (``to_empty(recurse=False)`` then ``reset_parameters()``
    on every module with parameters of its own), gets its documented initialisation: the
    gates 0 (closed), so the block is the identity, not gates of whatever memory
    ``to_empty`` left (tanh of garbage: an open or NaN gate)."""
    with torch.device("meta"):
        block = GatedCrossAttentionBlock(dim=16, dim_visual=12, dim_head=8, heads=2, ff_mult=2)
    with torch.no_grad():
        for module in block.modules():
            if any(True for _ in module.parameters(recurse=False)):
                module.to_empty(device="cpu", recurse=False)
                for p in module.parameters(recurse=False):
                    p.fill_(float("nan"))  # what to_empty may leave
                module.reset_parameters()
    assert torch.equal(block.attn_gate, torch.zeros(1))
    assert torch.equal(block.ff_gate, torch.zeros(1))
    assert all(p.isfinite().all() for p in block.parameters())
    x, media = torch.randn(2, 5, 16), torch.randn(2, 2, 3, 12)
    loc = torch.zeros(2, 5, dtype=torch.bool)
    loc[:, [0, 3]] = True
    assert torch.equal(block(x, media, loc), x)
