"""The just-in-time path of speckle_kernels/_build.py and _ext.py, without compiling: the lock
that lets two processes start at once and build once, a build killed half-way, and an install
with no ahead-of-time build and no compiler (one warning; backend="cpu" says why).

The real compile is CI's (.ci/run: a `pip install .` with build isolation, first use in two
processes at once).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A process that runs jit_build with the compile replaced by a fake: it logs itself, sleeps,
# and writes the library file. argv: log folder, seconds.
FAKE_BUILD = r"""
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("b", sys.argv[3])
b = importlib.util.module_from_spec(spec)
spec.loader.exec_module(b)
def fake_compile(root, key_dir):
    with open(os.path.join(sys.argv[1], "compiles"), "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(float(sys.argv[2]))
    with open(b.library_path(key_dir), "w") as f:
        f.write("library")
b._compile = fake_compile
path = b.jit_build(b.csrc_root(), lambda line: print("ANNOUNCE", line, flush=True))
print("PATH", path, flush=True)
"""


def _start(tmp_path, seconds):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    return subprocess.Popen([sys.executable, "-c", FAKE_BUILD, str(tmp_path), str(seconds),
                             os.path.join(ROOT, "speckle_kernels", "_build.py")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_two_processes_starting_at_once_build_once(tmp_path):
    procs = [_start(tmp_path, 3) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert len((tmp_path / "compiles").read_text().split()) == 1
    assert sum(o[0].count("ANNOUNCE") for o in outs) == 1  # one line says it is building
    paths = {line for o in outs for line in o[0].splitlines() if line.startswith("PATH")}
    assert len(paths) == 1 and os.path.exists(paths.pop().split(" ", 1)[1])


def test_a_build_killed_half_way_does_not_block_the_next(tmp_path):
    first = _start(tmp_path, 600)
    deadline = time.time() + 60
    while not (tmp_path / "compiles").exists() and time.time() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    second = _start(tmp_path, 0)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert len((tmp_path / "compiles").read_text().split()) == 2 and "PATH" in out


NO_COMPILER = r"""
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import speckle_kernels as sk
    x = torch.randn(4, 3, 5, 5)
    state = [torch.zeros(3), torch.ones(3), torch.tensor(0)]
    y = sk.batch_renorm(x, *state)
ours = [str(w.message) for w in caught if "speckle_kernels" in str(w.message)]
assert len(ours) == 1, ours
print("WARNING", ours[0])
assert torch.allclose(y, sk.batch_renorm_reference(x, torch.zeros(3), torch.ones(3), torch.tensor(0)), atol=1e-5)
try:
    sk.batch_renorm(x, *state, backend="cpu")
except RuntimeError as err:
    print("RAISED", err)
"""


def test_no_build_and_no_compiler_warns_once_and_names_why(tmp_path):
    package = tmp_path / "site" / "speckle_kernels"
    shutil.copytree(os.path.join(ROOT, "speckle_kernels"), package,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "_csrc"))
    os.symlink(os.path.join(ROOT, "csrc"), tmp_path / "site" / "csrc")  # as in an editable install
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "CXX": str(tmp_path / "no-such-compiler")}
    out = subprocess.run([sys.executable, "-c", NO_COMPILER], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path), timeout=300)
    assert out.returncode == 0, out.stderr
    warning = next(line for line in out.stdout.splitlines() if line.startswith("WARNING"))
    assert "a C++ compiler" in warning and "no-such-compiler" in warning and "slower" in warning, warning
    raised = next(line for line in out.stdout.splitlines() if line.startswith("RAISED"))
    assert "backend='cpu'" in raised and "a C++ compiler" in raised, raised
    assert not (tmp_path / "cache" / "speckle_kernels").exists() or not any(
        p.suffix == ".so" for p in (tmp_path / "cache").rglob("*")), "nothing may be built"
