"""The rotary functions a patch installs answer the calls their fused path does not serve as
transformers' functions do: the original runs (with a PatchFallbackWarning) and gives its
result or raises its own error (same type and message), where the fused ops would raise
theirs (a table on another device, tables that do not broadcast, an odd head dim that
transformers rotates), rotate what transformers refuses (a bool q, an empty q that its
lane-pair view refuses) or broadcast the tables along another axis (MiniMax-M3-VL's
``cos[:, None, :]`` on tables of another rank). With ``angles="positions"``, positions the
kernel does not take as transformers does (float, int16, another shape) run the rotary
class's forward (transformers' tables). Each function is the one :func:`plan_forward`
installs in its attention's forward; tiny tensors (fp32 results to 1e-5 relative)."""

import importlib
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlmkernels.integrations.patching import (  # noqa: E402
    PatchFallbackWarning,
    UnsupportedLayoutError,
    plan_forward,
)
from vlmkernels.integrations.rebuild import unwrap  # noqa: E402
from vlmkernels.integrations.tables import qwen_vl  # noqa: E402


def installed(key: str, attention: str, replacement):
    """(the function ``attention``'s patched forward calls, transformers' own)."""
    try:
        module = importlib.import_module(f"transformers.models.{key}.modeling_{key}")
    except ModuleNotFoundError:
        pytest.skip(f"transformers {transformers.__version__} has no {key}")
    cls = getattr(module, attention, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {key}.{attention}")
    try:
        forward = plan_forward(cls, (replacement,), "transformers")
    except UnsupportedLayoutError as exc:  # this transformers' attention calls another
        pytest.skip(str(exc))
    name = replacement.__name__
    return unwrap(forward, name)[-1].__globals__[name], getattr(module, name)


def outcome(fn, *args, **kwargs):
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - compared below
        return type(exc), str(exc)


def assert_as_transformers(patched, original, *args, fallback=True):
    """The patched function's result (to 1e-5 relative) or error (type and message) is the
    original's; a PatchFallbackWarning where ``fallback``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = outcome(patched, *args)
    want = outcome(original, *args)
    assert got[0] == want[0], (got, want)
    if want[0] != "ok":
        assert got[1] == want[1]
    else:
        outs = [got[1]] if isinstance(got[1], torch.Tensor) else list(got[1])
        wants = [want[1]] if isinstance(want[1], torch.Tensor) else list(want[1])
        for g, w in zip(outs, wants, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype
            scale = w.abs().max().item() if w.numel() else 0.0
            assert (g - w).abs().max().item() <= 1e-5 * scale if w.numel() else True
    warned = any(issubclass(w.category, PatchFallbackWarning) for w in caught)
    assert warned == fallback


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=_G).to(dtype)


_G = torch.Generator().manual_seed(0)
B, H, HK, S, D = 2, 4, 2, 5, 16
TEXT = {  # key, attention class, replacement
    "full": ("qwen2_vl", "Qwen2VLAttention", qwen_vl.apply_rotary_pos_emb),
    "partial": ("qwen3_5", "Qwen3_5Attention", qwen_vl.apply_partial_rotary_pos_emb),
    "fp32": ("ernie4_5_vl_moe", "Ernie4_5_VLMoeTextAttention",
             qwen_vl.apply_fp32_paired_rotary_pos_emb),
}  # fmt: skip


def _text_cases():
    q, k = _randn(B, H, S, D), _randn(B, HK, S, D)
    cos, sin = _randn(B, S, D), _randn(B, S, D)
    return {
        "plain": ((q, k, cos, sin), False),
        "bool q and k": ((q > 0, k > 0, cos, sin), True),  # transformers: -x raises
        "tables on meta": ((q, k, cos.to("meta"), sin.to("meta")), True),
        "tables wider than the head": ((q, k, _randn(B, S, 2 * D), _randn(B, S, 2 * D)), True),
        "tables of another length": ((q, k, _randn(B, S + 1, D), _randn(B, S + 1, D)), True),
        "odd head dim": ((_randn(B, H, S, 15), _randn(B, HK, S, 15), *_randn(2, B, S, 15)), True),
        "k of batch 1": ((q, _randn(1, HK, S, D), cos, sin), True),
        "unsqueeze_dim of the head dim": ((q, k, cos, sin, 3), True),
    }


@pytest.mark.parametrize("case", list(_text_cases()))
@pytest.mark.parametrize("function", list(TEXT))
def test_text_rotary_functions_answer_as_transformers(function, case):
    key, attention, replacement = TEXT[function]
    patched, original = installed(key, attention, replacement)
    args, fallback = _text_cases()[case]
    assert_as_transformers(patched, original, *args, fallback=fallback)


def test_minimax_vision_tables_of_another_rank_broadcast_as_transformers():
    """MiniMax-M3-VL's ``cos[:, None, :]``: (B, N, R) tables on (B, N, H, hd) q with H = N
    broadcast along N there, not along the heads (a different result, not an error); a
    1-D table raises its IndexError. (Before transformers 5.23 the function indexed
    ``cos[None, :, None, :]``, and a 3-D q with (N, R) tables gives a result patched where
    it raises there: not followed, MiniMax's attention passes 4-D q.)"""
    if tuple(int(p) for p in transformers.__version__.split(".")[:2]) < (5, 23):
        pytest.skip("MiniMax-M3-VL's vision rotary before transformers 5.23 indexes its "
                    "tables otherwise")  # fmt: skip
    patched, original = installed("minimax_m3_vl", "MiniMaxM3VLVisionAttention",
                                  qwen_vl.apply_partial_rotary_pos_emb_vision)  # fmt: skip
    n = 3
    q, k = _randn(2, n, n, 8), _randn(2, n, n, 8)
    assert_as_transformers(patched, original, q, k, _randn(2, n, 8), _randn(2, n, 8))
    assert_as_transformers(patched, original, q[0], k[0], _randn(8), _randn(8))
    assert_as_transformers(patched, original, q[0], k[0], _randn(n, 8), _randn(n, 8),
                           fallback=False)  # fmt: skip


def test_lane_pair_vision_functions_refuse_empty_tensors_as_transformers():
    """Inkling2's and Llama 4's lane-pair views (``view(..., -1, 2)``) raise on a q without
    elements; Gemma 4's split raises on tables wider than the head."""
    patched, original = installed("inkling2", "Inkling2VisionAttention",
                                  qwen_vl.apply_paired_rotary_pos_emb_vision)  # fmt: skip
    empty = _randn(0, 2, 16)
    assert_as_transformers(patched, original, empty, empty, _randn(0, 16), _randn(0, 16))
    patched, original = installed("llama4", "Llama4VisionAttention",
                                  qwen_vl.vision_apply_rotary_emb)  # fmt: skip
    freqs = torch.polar(torch.ones(6, 1, 8), _randn(6, 1, 8))
    assert_as_transformers(patched, original, _randn(0, 6, 2, 16), _randn(0, 6, 2, 16), freqs)
    patched, original = installed("gemma4", "Gemma4VisionAttention",
                                  qwen_vl.apply_multidimensional_rope)  # fmt: skip
    x, wide = _randn(2, 6, 2, 16), _randn(2, 6, 20)
    assert_as_transformers(patched, original, x, wide, wide, torch.zeros(2, 6, 2, dtype=torch.long))


@pytest.mark.parametrize("positions", ["float", "int16", "longer"])
def test_positions_the_kernel_does_not_take_run_the_rotary_class(positions):
    """angles='positions' with position ids of float or int16 (transformers' ``.float()``
    takes them) or of another length than the sequence (transformers' error): the rotary
    class's forward runs (a PatchFallbackWarning), so the model gives transformers' result
    or error."""
    import vlmkernels.integrations.transformers as vt

    config = transformers.Qwen2VLTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
    )  # fmt: skip
    model = transformers.Qwen2VLTextModel(config).eval()
    ids = torch.randint(3, 60, (2, 5), generator=_G)
    length = 6 if positions == "longer" else 5
    pos = torch.arange(length).expand(3, 2, length) * 0.5
    pos = {"float": pos, "int16": pos.to(torch.int16), "longer": pos.long()}[positions]

    def run():
        with torch.no_grad():
            return model(input_ids=ids, position_ids=pos).last_hidden_state

    want = outcome(run)
    with vt.patch(model, angles="positions"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = outcome(run)
    assert any(issubclass(w.category, PatchFallbackWarning) for w in caught)
    assert got[0] == want[0]
    if want[0] == "ok":
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-5 * want[1].abs().max())
    else:
        assert got[1] == want[1]
