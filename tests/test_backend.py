"""Backend selection: POOLSVC_PUREPYTHON picks the reference kernels; no silent fallback."""
from __future__ import annotations

import os
import subprocess
import sys


def run(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "POOLSVC_PUREPYTHON"}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full,
                          timeout=60)


def test_pure_python_is_selected_by_the_variable():
    out = run("import poolsvc, poolsvc._backend as b; print(poolsvc.BACKEND, b.core.__name__)",
              POOLSVC_PUREPYTHON="1")
    assert out.stdout.split() == ["pure-python", "poolsvc._pure"]


def test_compiled_is_the_default():
    out = run("import poolsvc, poolsvc._backend as b; print(poolsvc.BACKEND, b.core.__name__)")
    assert out.stdout.split() == ["compiled", "poolsvc._core"], out.stderr


def test_missing_extension_is_an_error_that_says_how_to_build():
    code = "import sys; sys.modules['poolsvc._core'] = None; import poolsvc"
    out = run(code)
    assert out.returncode != 0
    assert "pip install -e ." in out.stderr and "POOLSVC_PUREPYTHON=1" in out.stderr


def test_both_backends_export_the_same_names():
    from poolsvc import _core, _pure

    for name in _pure.__all__:
        assert hasattr(_core, name), name
