"""The static inspection (``vlmkernels inspect``): the SASS reader, the occupancy and time
models, the checks, and the CI checks on the real kernels.

The real-kernel test compiles every family's default configs (bf16 and fp32) for sm_90a in
a subprocess without the interpreter (``vlmkernels inspect --configs default --check``) and
requires: no spill, shared memory within the limit, instructions per tile within the budget
file's (``vlmkernels/kernel_budgets.json``), every failure listed there with a reason, no
stale entry. The compiled records are cached (``build/inspect-cache``, shared with
``scripts/compile_check.py``, whose sm_90 check of ``tests/test_kernels_compile.py`` the
same test runs after the inspection): cold it compiles each default variant once; warm it
takes seconds. Shared memory of the other
configs the tuner may pick is checked by ``vlmkernels inspect --check`` (every config).
"""

import builtins
import contextlib
import errno
import io
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from test_kernels_compile import compile_check_passes

from vlmkernels.core import estimate, inspection, sass

# A loop nest as cuobjdump prints it: an outer tile loop (0x40 .. 0x100) around a k-loop
# with an HGMMA (0x60 .. 0x90), a loads-only loop after it, and the trap self-branch.
_SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
        /*0010*/                   STL [R1+0x4], R2 ;                     /* 0x0 */
        /*0020*/                   STL.64 [R1+0x8], R4 ;                  /* 0x0 */
        /*0030*/                   MOV R3, RZ ;                           /* 0x0 */
        /*0040*/                   LDL R7, [R1+0x4] ;                     /* 0x0 */
        /*0050*/                   LDG.E.128.CONSTANT R8, desc[UR4][R2.64] ;  /* 0x0 */
        /*0060*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;  /* 0x0 */
        /*0070*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;  /* 0x0 */
        /*0080*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;          /* 0x0 */
        /*0090*/               @P0 BRA 0x60 ;                             /* 0x0 */
        /*00a0*/                   MUFU.EX2 R5, R5 ;                      /* 0x0 */
        /*00b0*/                   FFMA.FTZ R5, R5, R6, R7 ;              /* 0x0 */
        /*00c0*/                   SHFL.BFLY PT, R9, R5, 0x1, 0x1f ;      /* 0x0 */
        /*00d0*/                   STG.E.U16 desc[UR4][R2.64], R5 ;       /* 0x0 */
        /*00e0*/                   NOP ;                                  /* 0x0 */
        /*00f0*/                   FADD R5, R5, R9 ;                      /* 0x0 */
        /*0100*/              @!P1 BRA 0x40 ;                             /* 0x0 */
        /*0110*/                   LDG.E.U16 R4, desc[UR4][R2.64] ;       /* 0x0 */
        /*0120*/                   STS.128 [R3], R8 ;                     /* 0x0 */
        /*0130*/               @P2 BRA 0x110 ;                            /* 0x0 */
        /*0140*/                   EXIT ;                                 /* 0x0 */
        /*0150*/                   BRA 0x150;                             /* 0x0 */
"""


def test_sass_loops_and_tile_region():
    code = sass.parse(_SASS)
    assert len(code) == 21  # the NOP is padding, not an instruction
    assert [(r.start, r.end) for r in sass.loops(code)] == [(0x40, 0x100), (0x60, 0x90),
                                                            (0x110, 0x130)]  # fmt: skip
    tile = sass.hot_region(code)
    assert (tile.start, tile.end, tile.kind) == (0x40, 0x100, "tile")
    mix = sass.mix(tile.of(code))
    assert mix == {"BAR": 1, "BRA": 2, "FADD": 1, "FFMA": 1, "LDG.128": 1, "LDGSTS.128": 1,
                   "LDL.32": 1, "MMA": 1, "MUFU": 1, "MUFU.EX2": 1, "SHFL": 1, "STG.16": 1,
                   "total": 12}  # fmt: skip
    assert sass.local_memory_bytes(code) == (4 + 8, 4)


def test_ptxas_spills_from_the_log():
    """Spills are what ptxas reports, not all local memory: libdevice's sinf / cosf keep a
    table for large arguments in a local array (Triton 3.6: 32 B stack, 16 B stored, no
    spill); ptxas 13 prints no stack line for a kernel without one; no log: None (the
    caller then counts all local-memory traffic)."""
    rope_36 = """ptxas info    : Compiling entry function '_rope_kernel' for 'sm_90a'
ptxas info    : Function properties for _rope_kernel
    32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 31 registers, used 1 barriers, 32 bytes cumulative stack size
"""
    fused_39 = """ptxas-blackwell info    : Function properties for _clip_fused_grad_kernel
    672 bytes stack frame, 696 bytes spill stores, 796 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 1 barriers, 672 bytes cumulative stack size
"""
    plain_39 = "ptxas-blackwell info    : Used 31 registers, used 1 barriers\n"
    assert inspection.ptxas_spills(rope_36) == (0, 0)
    assert inspection.ptxas_spills(fused_39) == (696, 796)
    assert inspection.ptxas_spills(plain_39) == (0, 0)
    assert inspection.ptxas_spills("") is None


def test_sass_hot_region_without_mma():
    no_mma = _SASS.replace("HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24", "FMUL R5, R5, R5")
    code = sass.parse(no_mma)
    loop = sass.hot_region(code)  # innermost loops: 0x60..0x90 (1 load) and 0x110..0x130 (2)
    assert (loop.start, loop.end, loop.kind) == (0x110, 0x130, "loop")
    straight = sass.parse(no_mma.replace("BRA 0x60", "BRA 0xa0").replace("BRA 0x40", "BRA 0x110")
                          .replace("BRA 0x110 ;", "BRA 0x140 ;"))  # fmt: skip
    whole = sass.hot_region(straight)
    assert (whole.start, whole.end, whole.kind) == (0, 0x150, "program")


def test_occupancy_against_the_sm90_limits():
    # 255 registers x 256 threads: 65,280 of 65,536 registers -> one CTA
    assert inspection.occupancy(255, 96 * 1024, 8, "sm_90a") == (1, "registers")
    # 32 registers, 2 warps: 32 CTAs is the cap (registers would allow 32, warps 32)
    assert inspection.occupancy(32, 256, 2, "sm_90a")[0] == 32
    # shared memory: 100 KB + 1 KB reserved per CTA -> two in 228 KB
    assert inspection.occupancy(64, 100 * 1024, 4, "sm_90a") == (2, "shared memory")
    assert inspection.occupancy(64, 256 * 1024, 4, "sm_90a") == (
        0, "shared memory over the per-block limit")  # fmt: skip
    assert inspection.occupancy(64, 64, 4, "sm_80")[0] == 8  # 64 regs x 128 threads
    with pytest.raises(ValueError, match="unknown architecture"):
        inspection.normalise_arch("sm_70")


def _record(**over):
    base = dict(kernel="k", case="c", config="BM=128,BN=128,BK=64 w8 s3", default=True,
                dtype="bf16", arch="sm_90a", triton="3.9.0", num_warps=8, num_stages=3,
                constexprs={"BM": 128, "BN": 128, "BK": 64}, registers=128, spill_bytes=0,
                spill_load_bytes=0, shared_bytes=96 * 1024, ctas_per_sm=1, region="tile",
                instructions_per_tile=1000, inner_loop_instructions=100,
                instructions_total=1200, mix={"MMA": 4, "MUFU": 64, "total": 1000})  # fmt: skip
    return {**base, **over}


def test_estimate_tile_model():
    r = _record()
    (h100, h200) = estimate.estimate(r, [dict(shape="s", M=1280, N=1280, K=768, out_bytes=2)])
    tiles, k_steps = 100, 12
    tensor = 2 * 128 * 128 * 768 / 4096
    issue = 8 * (1000 + (k_steps - 1) * 100) / 4
    mufu = 8 * 64 * 32 / 16
    to_ms = tiles / (132 * 1.83e6)
    assert h100["device"] == "H100" and h200["device"] == "H200"
    assert h100["tensor_ms"] == pytest.approx(tensor * to_ms, rel=1e-3)
    assert h100["issue_ms"] == pytest.approx(issue * to_ms, rel=1e-3)
    assert h100["mufu_ms"] == pytest.approx(mufu * to_ms, rel=1e-3)
    assert h100["low_ms"] == pytest.approx(max(tensor, issue, mufu) * to_ms, rel=1e-3)
    assert h100["high_ms"] == pytest.approx((tensor + issue) * to_ms, rel=1e-3)
    assert h100["bound"] == "tensor"  # 6144 tensor clocks per tile against 4200 issue
    fp32 = estimate.estimate(_record(dtype="fp32"), [dict(shape="s", M=1280, N=1280, K=768)])
    assert fp32[0]["tensor_ms"] == pytest.approx(6 * h100["tensor_ms"], rel=1e-3)
    assert estimate.estimate(r, [dict(shape="s", dtype="fp32", M=1, N=1, K=1)]) == []
    assert any("TB/s" in line for line in estimate.assumptions())


def test_estimate_memory_model():
    r = _record(region="loop", constexprs={"BLOCK_H": 4}, num_warps=2,
                instructions_per_tile=60, instructions_total=400, mix={})  # fmt: skip
    work = dict(shape="s", programs=16384, bytes=3e8, trips={"count": 32, "per": "BLOCK_H"})
    h100, h200 = estimate.estimate(r, [work])
    assert h200["memory_ms"] == pytest.approx(3e8 / 4.3e9, rel=1e-3)
    executed = 400 + 7 * 60
    assert h200["issue_ms"] == pytest.approx(16384 * 2 * executed / 4 / (132 * 1.83e6), rel=1e-3)
    assert h200["low_ms"] == max(h200["memory_ms"], h200["issue_ms"])
    assert h100["memory_ms"] > h200["memory_ms"]


def test_estimate_looped_model():
    """Attention-like programs: t trips over BM x BN score tiles; per trip the smallest inner
    loop (the full-block one), the program's own instructions once."""
    r = _record(
        region="program",
        constexprs={"BM": 64, "BN": 64},
        num_warps=4,
        instructions_total=1700,
        inner_loops=[350, 500],
        inner_loop_instructions=850,
    )
    work = dict(shape="s", programs=1024, trips={"count": 4096, "per": "BN"},
                mma_flops_per_score=256, bytes=1e9)  # fmt: skip
    h100, h200 = estimate.estimate(r, [work])
    to_ms = 1024 / (132 * 1.83e6)
    scores = 64 * 64 * 64
    assert h200["tensor_ms"] == pytest.approx(scores * 256 / 4096 * to_ms, rel=1e-3)
    assert h200["issue_ms"] == pytest.approx(4 * (1700 + 63 * 350) / 4 * to_ms, rel=1e-3)
    assert h200["mufu_ms"] == pytest.approx(scores / 16 * to_ms, rel=1e-3)
    assert h200["memory_ms"] == pytest.approx(1e9 / 4.3e9, rel=1e-3)
    assert h200["bound"] == "memory" and h200["low_ms"] == h200["memory_ms"]
    few = estimate.estimate(r, [{**work, "programs": 16, "bytes": 1e6}])[1]
    assert few["bound"] == "issue"  # 22,750 issue clocks per program against 16,384 tensor
    assert few["high_ms"] == pytest.approx(few["tensor_ms"] + few["issue_ms"], rel=1e-3)


def test_checks_budgets_and_expected_failures():
    records = [
        _record(),
        _record(config="other", default=False, spill_bytes=64, shared_bytes=256 * 1024),
        _record(case="d", spill_bytes=8, spill_load_bytes=8, instructions_per_tile=2000),
        dict(
            kernel="k",
            case="e",
            dtype="bf16",
            config="x",
            arch="sm_90a",
            default=True,
            error="CompilationError: boom",
        ),
    ]
    budgets = {"triton": "3.9.0", "instructions_per_tile": {"c/bf16": 1000, "d/bf16": 1500}}
    found = {(f["check"], f["case"], f["config"]) for f in inspection.failures(records, budgets)}
    assert found == {("shared", "c", "other"), ("no_spill", "d", records[2]["config"]),
                     ("budget", "d", records[2]["config"]), ("compiles", "e", "x")}  # fmt: skip
    # another Triton: the budgets are not compared, the rest is
    other = inspection.failures(records, dict(budgets, triton="3.6.0"))
    assert "budget" not in {f["check"] for f in other} and len(other) == 3

    budgets["expected_failures"] = [
        dict(check="shared", case="c", dtype="bf16", config="other", reason="issue 14: 256 KB"),
        dict(check="no_spill", case="c", dtype="bf16", reason="fixed meanwhile"),
    ]
    unexpected, expected, stale = inspection.check(records, budgets)
    assert [(f["check"], f["reason"]) for f in expected] == [("shared", "issue 14: 256 KB")]
    assert {f["check"] for f in unexpected} == {"no_spill", "budget", "compiles"}
    assert [e["reason"] for e in stale] == ["fixed meanwhile"]

    new = inspection.new_budgets(records, budgets)
    assert new["instructions_per_tile"] == {"c/bf16": 1028, "d/bf16": 2048}  # +2% + 8
    assert new["measured"] == {"c/bf16": 1000, "d/bf16": 2000}
    reasons = {(e["check"], e["case"]): e["reason"] for e in new["expected_failures"]}
    assert reasons[("shared", "c")] == "issue 14: 256 KB"  # kept
    assert reasons[("no_spill", "d")].startswith("TODO")  # new: someone must explain it
    assert ("no_spill", "c") not in reasons  # fixed: dropped
    assert new["triton"] == "3.9.0" and new["arch"] == "sm_90a"


def test_budget_file_is_well_formed():
    budgets = inspection.load_budgets()
    assert budgets, f"{inspection.BUDGET_FILE} is missing"
    cases = {case.name for _, case in inspection.all_cases()}
    for key, value in budgets["instructions_per_tile"].items():
        case, dtype = key.split("/")
        assert case in cases and dtype in ("bf16", "fp16", "fp32") and value > 0, key
    for entry in budgets["expected_failures"]:
        assert entry["check"] in ("compiles", "no_spill", "shared", "budget"), entry
        assert entry["case"] in cases, entry
        assert entry["reason"] and not entry["reason"].startswith("TODO"), (
            f"write why this check fails (or fix the kernel): {entry}")  # fmt: skip
    for case, works in budgets.get("workloads", {}).items():
        assert case in cases, case
        for w in works:
            assert ("K" in w and {"M", "N"} <= set(w)) or {"programs", "bytes"} <= set(w), w


def test_a_budget_file_given_must_exist_and_hold_an_object(tmp_path, monkeypatch):
    """--budgets names a file: missing (a typo), corrupt or not an object is a ValueError
    the command prints as one line (a missing file was taken for "no budgets", so --check
    passed with nothing checked); the package's file is read when none is given. The cache
    folder from the environment expands ~."""
    with pytest.raises(ValueError, match="no such file"):
        inspection.load_budgets(tmp_path / "typo.json")
    for text, why in (("{bad", "not a budget file"), ("[1]", "a JSON list")):
        (tmp_path / "b.json").write_text(text)
        with pytest.raises(ValueError, match=why):
            inspection.load_budgets(tmp_path / "b.json")
    for doc, why in (({"instructions_per_tile": []}, "'instructions_per_tile' must be"),
                     ({"measured": {"a/bf16": "many"}}, "'measured' must be"),
                     ({"expected_failures": [{"case": "x"}]}, "'expected_failures' must be"),
                     ({"workloads": [1]}, "'workloads' must be")):  # fmt: skip
        (tmp_path / "b.json").write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=why):
            inspection.load_budgets(tmp_path / "b.json")
    assert inspection.load_budgets() == json.loads(inspection.BUDGET_FILE.read_text())
    monkeypatch.setenv("VLMKERNELS_INSPECT_CACHE", "~/vk-inspect")
    assert inspection.cache_dir() == pathlib.Path.home() / "vk-inspect"


def test_a_damaged_cache_entry_is_compiled_again(tmp_path):
    """A cache entry that is valid JSON but no record (a list, an empty or partial object)
    is ignored, and the variant compiles again: it was reported as a compile failure, or
    a KeyError traceback."""
    path = tmp_path / "entry.json"
    record = dict.fromkeys(inspection._RECORD_KEYS, 1)
    for doc in ([], {}, {k: v for k, v in record.items() if k != "mix"}, "text"):
        path.write_text(json.dumps(doc))
        assert inspection._read_cached(path) is None, doc
    path.write_text("{cut")
    assert inspection._read_cached(path) is None
    path.write_text(json.dumps(record))
    assert inspection._read_cached(path) == record
    assert inspection._read_cached(tmp_path / "missing.json") is None


@contextlib.contextmanager
def _full_disk():
    """While it is open, a file opened for writing takes half of the first write, then
    raises ENOSPC (a disk that fills part-way through a write)."""
    real_open = builtins.open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return FullDisk(f) if "w" in mode or "x" in mode else f

    builtins.open = io.open = open_  # the name the code calls, and pathlib's
    try:
        yield
    finally:
        builtins.open = io.open = real_open


def test_write_budgets_on_a_full_disk_leaves_the_budget_file_whole(tmp_path, monkeypatch,
                                                                    capsys):  # fmt: skip
    """``--write-budgets`` whose write fails part-way (a full disk, an interrupt) leaves the
    budget file as it was, and no temporary beside it, and says so in one line: the file
    was rewritten in place, so half of it stayed, and every later ``vlmkernels inspect``
    (and the package's own budget check) failed on the JSON."""
    from vlmkernels import cli
    from vlmkernels.core import runtime

    budgets = tmp_path / "budgets.json"
    budgets.write_text(inspection.BUDGET_FILE.read_text())
    before = budgets.read_text()
    monkeypatch.setattr(runtime, "INTERPRETED", False)
    monkeypatch.setattr(inspection, "inspect_cases", lambda *args, **kwargs: [])
    with _full_disk():
        status = cli.main(["inspect", "--write-budgets", "--budgets", str(budgets)])
    assert status == 2
    assert "No space left on device" in capsys.readouterr().err
    assert budgets.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["budgets.json"]
    assert inspection.load_budgets(budgets) == json.loads(before)


def _stub_compiles(monkeypatch, cache, registers) -> tuple:
    """(case, config) of the first variant, whose compile_case into the inspection cache
    ``cache`` runs no compiler: each record's register count is ``registers()``, every
    other analysed field 1."""
    import types

    from vlmkernels.core import runtime

    monkeypatch.setenv("VLMKERNELS_INSPECT_CACHE", str(cache))
    monkeypatch.setattr(runtime, "INTERPRETED", False)
    monkeypatch.setattr(
        inspection, "source", lambda case, dtype, config: types.SimpleNamespace(hash=lambda: "h")
    )
    compiled = types.SimpleNamespace(
        asm={"ptx": "", "ttgir": "", "cubin": b""}, metadata=types.SimpleNamespace(shared=0)
    )
    monkeypatch.setattr(inspection, "_compile_logged", lambda *args: (compiled, ""))
    monkeypatch.setattr(inspection, "_analyse", lambda *args: {
        k: registers() if k == "registers" else 1
        for k in inspection._RECORD_KEYS if k not in ("arch", "triton")
    })  # fmt: skip
    _, case = inspection.all_cases()[0]
    return case, case.kernel.default_for("bf16", case.constants("bf16"))


def test_a_cache_entry_whose_write_fails_leaves_no_temporary(tmp_path, monkeypatch):
    """A record whose cache write fails part-way (a full disk) is still returned, and
    leaves neither a half entry nor its temporary in the cache folder (each failure left a
    ``<key>.<pid>.tmp`` there); the next compile stores it."""
    case, config = _stub_compiles(monkeypatch, tmp_path, lambda: 1)
    with _full_disk():
        record = inspection.compile_case(case, "bf16", config)
    assert record["case"] == case.name and record["registers"] == 1
    assert list(tmp_path.iterdir()) == []
    assert inspection.compile_case(case, "bf16", config) == record
    (entry,) = tmp_path.iterdir()
    assert entry.suffix == ".json" and inspection._read_cached(entry) is not None


def test_the_cache_keeps_apart_the_records_of_another_ptxas(tmp_path, monkeypatch):
    """A record compiled with TRITON_PTXAS_PATH or TRITON_PTXAS_BLACKWELL_PATH pointing at
    another assembler is cached under its own key: the same PTX gets other registers and
    spills from CUDA 12's ptxas than from CUDA 13's, and a cached record of one answered
    for the other. The same setting finds its record again."""
    for variable in ("TRITON_PTXAS_PATH", "TRITON_PTXAS_BLACKWELL_PATH"):
        monkeypatch.delenv(variable, raising=False)
    registers = iter(range(1, 10))  # each compile a new register count
    case, config = _stub_compiles(monkeypatch, tmp_path, lambda: next(registers))
    default = inspection.compile_case(case, "bf16", config)["registers"]
    monkeypatch.setenv("TRITON_PTXAS_BLACKWELL_PATH", "/opt/cuda-12/bin/ptxas")
    legacy = inspection.compile_case(case, "bf16", config)["registers"]
    monkeypatch.setenv("TRITON_PTXAS_PATH", "/opt/cuda-12/bin/ptxas")
    both = inspection.compile_case(case, "bf16", config)["registers"]
    assert len({default, legacy, both}) == 3 and len(list(tmp_path.iterdir())) == 3
    assert inspection.compile_case(case, "bf16", config)["registers"] == both  # cached
    monkeypatch.delenv("TRITON_PTXAS_PATH")
    monkeypatch.delenv("TRITON_PTXAS_BLACKWELL_PATH")
    assert inspection.compile_case(case, "bf16", config)["registers"] == default


def test_cli_rejects_an_unknown_kernel(capfd):
    from vlmkernels import cli

    assert cli.main(["inspect", "no_such_kernel"]) == 2
    assert "unknown kernels ['no_such_kernel']" in capfd.readouterr().err


def test_default_configs_pass_the_checks():
    """Every family's default configs for sm_90a, bf16 and fp32: no spill, shared memory
    within the limit, within budget; every exception is in the budget file with a reason.
    Then, without a GPU, ``scripts/compile_check.py`` on the same records: the sm_90 compile
    check of :mod:`test_kernels_compile`, here so that one test compiles the variants (two
    tests that xdist runs side by side would each compile all of them); it reads the
    records from the inspect cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "vlmkernels", "inspect", "--configs", "default", "--json",
         "--check"],
        env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.stdout.strip(), result.stderr[-2000:]
    records = json.loads(result.stdout)
    assert {(r["case"], r["dtype"]) for r in records} == {
        (case.name, dtype) for _, case in inspection.all_cases() for dtype in ("bf16", "fp32")
    }
    for r in records:
        assert r["default"] and r["arch"] == "sm_90a", r
        if "error" not in r:
            for key in ("registers", "spill_bytes", "shared_bytes", "ctas_per_sm",
                        "instructions_per_tile"):  # fmt: skip
                assert isinstance(r[key], int), (key, r)
            assert r["mix"]["total"] == r["instructions_per_tile"]
            # ptxas's spills are part of the local-memory traffic the SASS shows
            assert r["spill_bytes"] <= r["local_store_bytes"], r
    unexpected, _, stale = inspection.check(records, inspection.load_budgets())
    assert not unexpected, "\n".join(f"{f['check']} {f['case']}/{f['dtype']}: {f['message']}"
                                     for f in unexpected)  # fmt: skip
    assert not stale, f"these pass now; drop them from the budget file: {stale}"
    assert result.returncode == 0, result.stderr[-2000:]
    if not torch.cuda.is_available():  # with a GPU the tests compile and run the kernels
        for dtype in ("bf16", "fp32"):
            compile_check_passes(dtype, env)


def test_grads_finalize_does_not_spill_with_the_ptxas_of_triton_3_6_to_3_8(tmp_path):
    """Triton 3.6 to 3.8 assemble sm_90 with their bundled CUDA 12.x ``ptxas``; 3.9 with
    ``ptxas-blackwell`` (CUDA 13.x), so CI's Triton 3.9 missed that with 4 warps the 16-bit
    CLIP finishing kernel spilled 8 B per thread there (96 registers; Triton 3.7 and 3.8,
    and 3.9's own code assembled by 12.9). 3.9 still ships the 12.x assembler as ``ptxas``:
    every finishing variant's default compiles without a spill through it (for sm_90 3.9
    takes it from TRITON_PTXAS_BLACKWELL_PATH; 3.6 to 3.8 use it anyway). Compiled afresh
    (``--no-cache``): a record of an earlier run says nothing about this source."""
    import triton

    legacy = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not legacy.is_file():
        pytest.skip(f"this Triton ({triton.__version__}) ships no CUDA 12 ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_PTXAS_BLACKWELL_PATH": str(legacy), "TRITON_PTXAS_PATH": str(legacy),
            "VLMKERNELS_INSPECT_CACHE": str(tmp_path)}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "vlmkernels", "inspect", "grads_finalize", "--configs",
         "default", "--json", "--no-cache"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip(), result.stderr[-2000:]
    records = json.loads(result.stdout)
    assert {(r["case"], r["dtype"]) for r in records} == {
        (case, dtype)
        for case in ("clip_grads_finalize", "siglip_grads_finalize",
                     "siglip_grads_finalize_fp32_grads")
        for dtype in ("bf16", "fp32")
    }  # fmt: skip
    spilled = [(r["case"], r["dtype"], r["config"], r["registers"], r["spill_bytes"])
               for r in records if r["spill_bytes"] or r["spill_load_bytes"]]  # fmt: skip
    assert not spilled, spilled
