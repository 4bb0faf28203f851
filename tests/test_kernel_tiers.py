"""The instruction-set tiers: which ones this host runs, how a forced tier is chosen or refused,
and that every tier's byte dot compiles to the instructions it is meant to use on its CPU, also
for CPUs this host is not (the arithmetic of each tier the host executes is checked against the
numpy twins in test_kernels.py)."""

from __future__ import annotations

import llvmlite.binding as llvm
import pytest
from llvmlite import ir

from mixcli import kernels
from mixcli.kernels import isa
from mixcli.kernels.irgen import _i32, _vec

# tier -> (LLVM CPU that has it, instructions its dot must use, instructions it must not use)
CPUS = {
    "avx512vnni": ("sapphirerapids", ["vpdpbusd", "zmm"], ["vpmaddubsw"]),
    "avxvnni": ("alderlake", ["{vex}\tvpdpbusd", "ymm"], ["zmm", "vpmaddubsw"]),
    "avx2": ("znver2", ["vpmaddubsw", "vpmaddwd"], ["vpdpbusd", "zmm"]),
    "generic": ("znver2", [], ["vpdpbusd", "zmm"]),
}


def _dot_asm(tier_name: str, cpu: str, umax: int, nterms: int, q8: bool = False) -> str:
    """Assembly of one function: acc + tier.dot over nterms (u, s) pairs of <16 x i32>."""
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    t = isa.tier(tier_name)
    v16 = _vec(_i32, 16)
    mod = ir.Module(name="dot")
    mod.triple = "x86_64-unknown-linux-gnu"
    fn = ir.Function(mod, ir.FunctionType(v16, [v16] * (1 + 2 * nterms)), name="dot")
    b = ir.IRBuilder(fn.append_basic_block())
    acc, *rest = fn.args
    terms = []
    for i in range(nterms):
        u, s = rest[2 * i], rest[2 * i + 1]
        if q8:
            w = u
            u, umax = t.q8_weights(b, w)
            s = t.q8_act(b, s, w)
        terms.append((u, s))
    b.ret(t.dot(b, acc, terms, umax, chains=2))
    target = llvm.Target.from_triple(mod.triple).create_target_machine(cpu=cpu, opt=2)
    parsed = llvm.parse_assembly(str(mod))
    parsed.verify()
    return target.emit_assembly(parsed)


@pytest.mark.parametrize("tier_name", list(CPUS))
@pytest.mark.parametrize("q8", [False, True])
def test_each_tier_emits_its_instructions(tier_name, q8):
    cpu, want, avoid = CPUS[tier_name]
    asm = _dot_asm(tier_name, cpu, 15, 8, q8=q8)
    for w in want:
        assert w in asm, (tier_name, w)
    for a in avoid:
        assert a not in asm, (tier_name, a)
    if tier_name == "avx2" and q8:
        assert "vpsignb" in asm and "vpabsb" in asm  # Q8_0 by the sign trick, no + 128


def test_host_tiers_and_resolution(monkeypatch):
    tiers = kernels.host_tiers()
    assert tiers[-1] == "generic" and list(tiers) == [t for t in kernels.TIERS if t in tiers]
    monkeypatch.delenv("MIXCLI_ISA", raising=False)
    assert isa.resolve() == tiers[0]
    monkeypatch.setenv("MIXCLI_ISA", "generic")
    assert isa.resolve() == "generic" and kernels.select().isa == "generic"
    assert isa.resolve("avx2" if "avx2" in tiers else "generic") in tiers  # an argument beats the environment
    with pytest.raises(kernels.IsaError, match="must be one of"):
        isa.resolve("sse9")


def test_tiers_follow_the_features_they_need():
    avx2 = {"avx2", "fma", "f16c"}
    assert isa.host_tiers(avx2) == ("avx2", "generic")
    assert isa.host_tiers(avx2 | {"avxvnni"}) == ("avxvnni", "avx2", "generic")
    assert isa.host_tiers(avx2 | {"avx512vnni", "avx512vl", "avx512bw"}) == ("avx512vnni", "avx2", "generic")
    assert isa.host_tiers({"neon", "dotprod"}) == ("generic",)  # aarch64: the generic tier
    assert isa.host_tiers(set()) == ("generic",)
