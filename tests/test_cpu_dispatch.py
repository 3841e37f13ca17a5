"""The CPU kernels' variants (csrc/variants/, csrc/cpu/cpu_dispatch.cpp): one library that
loads on any x86-64 CPU, the variant chosen at load, SPECKLE_CPU_CAPABILITY's override, and the
case kit on every variant this CPU runs.

The library's promise is checked on its machine code: objdump disassembles it, and no chain of
direct calls may lead from code of one level (baseline, AVX2) to an instruction of a higher one,
outside the dispatch's function pointers. An inline function of torch's or the standard library's
headers emitted out of line by a variant's translation unit, and kept by the linker over the
baseline's copy, would show up here (_build.py's link order prevents it).
"""
from __future__ import annotations

import bisect
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
        assert ("avx2" in runs) == ({"avx2", "fma", "f16c"} <= flags)
        assert ("avx512" in runs) == ({"avx2", "avx512f", "avx512dq", "avx512bw", "avx512vl"} <= flags)


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


def test_link_order_is_the_same_for_setuptools_and_the_jit_build():
    # setuptools sorts an extension's sources; _build.CPU_SOURCES is the order the proof needs
    paths = ["csrc/" + s for s in _build.CPU_SOURCES]
    assert paths == sorted(paths)


def test_global_flags_hold_no_instruction_set_option():
    cflags, ldflags = _build.cpu_flags()
    assert not [f for f in cflags + ldflags if f.startswith(("-m", "-march", "-mtune"))], cflags + ldflags


def _functions(objdump_text: str) -> dict:
    """{start address: (mangled name, instruction-set level, addresses it calls, jumps to or takes)}
    from `objdump -d -w`. By address, not name: each translation unit has its own local clones
    (`.constprop.0`) under one name. Level: 0 baseline x86-64, 1 AVX/AVX2 (VEX, ymm, popcnt,
    lzcnt), 2 AVX-512 (EVEX, zmm, mask registers). A call through the PLT goes to the global
    definition of that name (one, after the linker's merge)."""
    functions, start = {}, None
    head = re.compile(r"^([0-9a-f]+) <(.*)>:$")
    target = re.compile(r"([0-9a-f]+) <([^>+]+)(?:\+0x[0-9a-f]+)?>")
    for line in objdump_text.splitlines():
        match = head.match(line)
        if match:
            start = int(match.group(1), 16)
            functions[start] = [match.group(2), 0, set()]
            continue
        parts = line.split("\t")
        if start is None or len(parts) < 3:
            continue
        raw = [int(b, 16) for b in parts[1].split()]
        i = 0
        while i < len(raw) and (raw[i] in LEGACY_PREFIXES or 0x40 <= raw[i] <= 0x4F):
            i += 1  # legacy prefixes and REX; what follows is the opcode, or a VEX/EVEX prefix
        first, asm = (raw[i] if i < len(raw) else None), parts[2]
        if first == 0x62 or "%zmm" in asm or re.search(r"%k[0-7]\b", asm):
            level = 2
        elif first in (0xC4, 0xC5) or "%ymm" in asm or asm.split()[0] in ("popcnt", "lzcnt"):
            level = 1
        else:
            level = 0
        functions[start][1] = max(functions[start][1], level)
        for address, name in target.findall(asm):
            functions[start][2].add(name.removesuffix("@plt") if name.endswith("@plt") else int(address, 16))
    by_name = {}
    for address, (name, _, _) in functions.items():
        by_name.setdefault(name, []).append(address)
    starts = sorted(functions)
    # GCC's `.cold` part of a function is the same function: its level counts for the hot part,
    # which jumps to it (else a hot part without AVX from a variant's unit would pass for baseline)
    for address, (name, level, refs) in functions.items():
        for ref in refs:
            if isinstance(ref, int) and ref in functions and functions[ref][0] == name + ".cold":
                functions[address][1] = max(level, functions[ref][1])
    out = {}
    for address, (name, level, refs) in functions.items():
        edges = set()
        for ref in refs:
            if isinstance(ref, str):  # through the PLT: the one global definition, if in this library
                edges.update(by_name.get(ref, [])[:1] if len(by_name.get(ref, [])) == 1 else [])
            else:
                k = bisect.bisect_right(starts, ref) - 1
                if k >= 0:
                    edges.add(starts[k])
        out[address] = (name, level, edges - {address})
    return out


def _namespace_level(mangled: str) -> int:
    """The level a function may use, by the variant namespace its mangled name holds (a length-
    prefixed identifier; mangled, since GCC's local clones such as `._omp_fn.0.cold` do not
    demangle): 2 in speckle::cpu::AVX512_256 (and ATen's vectors in it), 1 in ...::AVX2, else 0."""
    if re.search(r"(?<!\d)10AVX512_256", mangled):
        return 2
    if re.search(r"(?<!\d)4AVX2", mangled):
        return 1
    return 0


def _demangle(names: list[str]) -> list[str]:
    if shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return out.stdout.splitlines() if out.returncode == 0 else names


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_no_wide_instruction_runs_outside_the_variants():
    """Inside a variant namespace a function may use its variant's instructions and no more. An
    inline function of torch's or the standard library's headers that only a variant's translation
    unit emitted (a std::vector constructor, a c10 string helper) is compiled for that variant; the
    linker then keeps that copy, so it must be called (or its address taken) only from code of that
    variant or a wider one: no path of direct calls may lead from baseline code (or AVX2 code) to an
    AVX (or AVX-512) instruction. The variants' tables are reached through function pointers, which
    is the dispatch; pointers stored in data (vtables) are beyond this check."""
    path = _ext.cpu_status()["path"]
    text = subprocess.run(["objdump", "-d", "-w", path], capture_output=True, text=True, check=True).stdout
    functions = _functions(text)
    bad = [f"{name} (namespace level {_namespace_level(name)}) uses level {lv}"
           for name, lv, _ in functions.values() if _namespace_level(name) > 0 and lv > _namespace_level(name)]
    for limit in (0, 1):
        # every function that code of this level may run: start from the functions of this level
        # (by namespace and by instructions) and follow direct calls, jumps and addresses taken
        parent = {a: None for a, (name, lv, _) in functions.items() if _namespace_level(name) <= limit and lv <= limit}
        todo = list(parent)
        while todo:
            a = todo.pop()
            for callee in functions[a][2]:
                if callee in functions and callee not in parent:
                    parent[callee] = a
                    todo.append(callee)
        for a in parent:
            if functions[a][1] > limit:
                chain = [a]
                while parent[chain[-1]] is not None:
                    chain.append(parent[chain[-1]])
                bad.append(f"level {functions[a][1]} reached from level-{limit} code: "
                           + " <- ".join(_demangle([functions[c][0] for c in chain[:4]])))
    assert not bad, f"{len(bad)} problems:\n" + "\n".join(bad[:20])
    # not vacuous: each x86 variant holds code of its level
    if _build.variant_set() == "default+avx2+avx512":
        levels = {ns: sum(1 for name, lv, _ in functions.values() if _namespace_level(name) == ns and lv == ns)
                  for ns in (1, 2)}
        assert levels[1] > 20 and levels[2] > 20, levels


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
