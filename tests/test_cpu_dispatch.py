"""The CPU kernels' variants (csrc/cpu/variants/, csrc/cpu/cpu_dispatch.cpp): one library that
loads on any x86-64 CPU, the variant chosen at load, SPECKLE_CPU_CAPABILITY's override, and the
case kit on every variant this CPU runs.

The library's promise is checked on its machine code: objdump disassembles it, and no function
outside the variants' namespaces (speckle::cpu::AVX2, speckle::cpu::AVX512_256 and ATen's vectors
in them) may hold an AVX instruction, nor an AVX2 one an AVX-512 instruction. An inline function
of torch's or the standard library's headers emitted out of line by a variant's translation unit
and kept by the linker over the baseline's copy would show up here (_build.py's link order).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from speckle_kernels import _build, _ext
from speckle_kernels.__main__ import cpu_flags

pytestmark = pytest.mark.skipif(not _ext.HAS_CPU_EXT, reason="the C++ CPU extension is not available")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEGACY_PREFIXES = {0x66, 0x67, 0xF2, 0xF3, 0x2E, 0x3E, 0x26, 0x64, 0x65, 0x36, 0xF0}


def _variant_env(capability: str | None) -> dict:
    env = dict(os.environ)
    env.pop("SPECKLE_CPU_CAPABILITY", None)
    if capability is not None:
        env["SPECKLE_CPU_CAPABILITY"] = capability
    return env


def _probe(capability: str | None) -> dict:
    """What a fresh process reports under SPECKLE_CPU_CAPABILITY=capability (None: unset)."""
    code = ("import json, warnings, torch\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    from speckle_kernels import _ext\n"
            "    ok = _ext.HAS_CPU_EXT\n"
            "ops = torch.ops.speckle_kernels\n"
            "print(json.dumps({'ok': ok, 'error': _ext.cpu_status()['error'],\n"
            "    'warnings': [str(x.message) for x in w],\n"
            "    'in_use': ops.cpu_capability() if ok else None,\n"
            "    'runs': list(ops.cpu_capabilities()) if ok else None,\n"
            "    'lanes': list(ops.cpu_noise_lane_widths()) if ok else None}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=_variant_env(capability), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_best_variant_the_cpu_runs_is_chosen():
    ops = torch.ops.speckle_kernels
    runs = list(ops.cpu_capabilities())
    assert runs[0] == "default" and set(runs) <= {"default", "avx2", "avx512"}
    if os.environ.get("SPECKLE_CPU_CAPABILITY"):
        pytest.skip("SPECKLE_CPU_CAPABILITY is set in this run")
    assert ops.cpu_capability() == runs[-1]
    flags = cpu_flags()
    if flags:  # what Linux reports agrees with libgcc's reading of cpuid
        assert ("avx2" in runs) == {"avx2", "fma", "f16c"} <= flags
        assert ("avx512" in runs) == {"avx2", "avx512f", "avx512dq", "avx512bw", "avx512vl"} <= flags


def test_default_is_chosen_by_name_and_runs_the_portable_paths():
    probe = _probe("default")
    assert probe["ok"] and probe["in_use"] == "default" and probe["lanes"] == [1], probe


def test_asking_for_more_than_the_cpu_has_runs_the_best_and_says_so():
    runs = list(torch.ops.speckle_kernels.cpu_capabilities())
    if "avx512" in runs:
        pytest.skip("this CPU runs every variant")
    probe = _probe("AVX512")  # case does not matter, as for ATEN_CPU_CAPABILITY
    assert probe["ok"] and probe["in_use"] == runs[-1], probe
    assert any("SPECKLE_CPU_CAPABILITY=avx512 asks for more than this CPU has (no avx512f" in w
               and f"running {runs[-1]}" in w for w in probe["warnings"]), probe["warnings"]


def test_an_unknown_variant_is_refused_by_name():
    probe = _probe("avx3")
    assert not probe["ok"], probe
    assert "SPECKLE_CPU_CAPABILITY must be one of the built variants (default, avx2, avx512), got 'avx3'" \
        in probe["error"], probe
    assert any("C++ CPU kernels unavailable" in w and "avx3" in w for w in probe["warnings"]), probe


def test_global_flags_hold_no_instruction_set_option():
    cflags, ldflags = _build.cpu_flags()
    assert not [f for f in cflags + ldflags if f.startswith(("-m", "-march", "-mtune"))], cflags + ldflags


def _functions(objdump_text: str):
    """(name, [(first opcode byte, assembly)]) per function of `objdump -d -w -C`."""
    name, insns = None, []
    head = re.compile(r"^[0-9a-f]+ <(.*)>:$")
    for line in objdump_text.splitlines():
        match = head.match(line)
        if match:
            if name is not None:
                yield name, insns
            name, insns = match.group(1), []
            continue
        parts = line.split("\t")
        if name is None or len(parts) < 3:
            continue
        raw = [int(b, 16) for b in parts[1].split()]
        i = 0
        while i < len(raw) and (raw[i] in LEGACY_PREFIXES or 0x40 <= raw[i] <= 0x4F):
            i += 1  # legacy prefixes and REX; what follows is the opcode (or VEX/EVEX)
        insns.append((raw[i] if i < len(raw) else None, parts[2]))
    if name is not None:
        yield name, insns


def _violation(isa: str, first: int | None, asm: str) -> str | None:
    evex = first == 0x62 or "%zmm" in asm or re.search(r"%k[0-7]\b", asm)
    if isa == "avx512":
        return None
    if evex:
        return "AVX-512"
    if isa == "avx2":
        return None
    if first in (0xC4, 0xC5) or "%ymm" in asm:
        return "AVX"
    if asm.split()[0] in ("popcnt", "lzcnt"):
        return "SSE4.2/ABM"
    return None


def _isa_of(name: str) -> str:
    if "::AVX512_256::" in name:
        return "avx512"
    if "::AVX2::" in name:
        return "avx2"
    return "baseline"


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_no_wide_instruction_outside_the_variants():
    path = _ext.cpu_status()["path"]
    text = subprocess.run(["objdump", "-d", "-w", "-C", path], capture_output=True, text=True, check=True).stdout
    bad, seen = [], {"avx2": 0, "avx512": 0}
    for name, insns in _functions(text):
        isa = _isa_of(name)
        for first, asm in insns:
            if isa in seen and (first in (0xC4, 0xC5, 0x62)):
                seen[isa] += 1
            why = _violation(isa, first, asm)
            if why:
                bad.append(f"{name}: {why}: {asm}")
                break
    assert not bad, f"{len(bad)} functions outside their variant use wider instructions:\n" + "\n".join(bad[:20])
    # The variants are there (the check is not vacuous): AVX code in each x86 variant.
    if _build.variant_set() == "default+avx2+avx512":
        assert seen["avx2"] > 1000 and seen["avx512"] > 1000, seen


KIT_FILES = ["tests/test_batch_renorm.py", "tests/test_batch_renorm_act.py", "tests/test_noise.py",
             "tests/test_batch_renorm_cpu.py", "tests/test_batch_renorm_act_cpu.py", "tests/test_noise_cpu.py"]


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_case_kit_on_each_other_variant(capability):
    """This run's own tests judge the variant in use; the others the CPU runs are judged here, each
    in a fresh process (the variant is chosen once, at load), on the kits' CPU tests less the two
    headline shapes (minutes each, and no path of their own)."""
    ops = torch.ops.speckle_kernels
    if capability not in list(ops.cpu_capabilities()):
        pytest.skip(f"this CPU does not run the {capability} variant")
    if capability == ops.cpu_capability():
        pytest.skip(f"{capability} is the variant this run's own tests judge")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "-k", "cpu and not headline", *KIT_FILES],
                         capture_output=True, text=True, timeout=1800, env=_variant_env(capability), cwd=ROOT)
    tail = "\n".join(out.stdout.splitlines()[-15:])
    assert out.returncode == 0, f"the kit fails on the {capability} variant:\n{tail}\n{out.stderr[-2000:]}"
    assert re.search(r"\d+ passed", tail), tail
