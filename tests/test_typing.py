"""A user's script type-checks under ``mypy --strict`` against poolsvc's annotations and stubs.

mypy runs from a temporary directory with the package on MYPYPATH and
``--follow-imports=silent`` (as for an installed package: the user sees their
own errors, typed by poolsvc's annotations, ``py.typed`` and ``_core.pyi``).
A script with a deliberate type error must fail, so the types are not Any.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def mypy_strict(path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MYPYPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
                           "--no-incremental", "--cache-dir", os.devnull, str(path)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_package_is_marked_typed():
    assert (ROOT / "poolsvc" / "py.typed").is_file()
    assert (ROOT / "poolsvc" / "_core.pyi").is_file()


#: Mistakes a user might make, each with what mypy must say about it: the plain API
#: (an Shm's size is an int) and the asyncio client (a bad keyword type as well).
BAD_SCRIPTS = {
    "sync": ("from poolsvc import System\n\n"
             "with System() as system:\n"
             "    name: str = system.open_context('x').alloc_user_buf(4096).size\n",
             ("incompatible types in assignment",)),
    "aio": ("from poolsvc import aio\n\n\n"
            "async def main() -> None:\n"
            "    async with await aio.connect('x') as client:\n"
            "        ctx = await client.open_context()\n"
            "        name: str = (await ctx.alloc_user_buf(4096)).size\n"
            "        await aio.connect(spin_us='fast')\n",
            ("incompatible types in assignment", "spin_us")),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted((ROOT / "tests" / "typing").glob("*.py")), ids=lambda p: p.stem)
def test_user_script_passes_mypy_strict(tmp_path, script):
    out = mypy_strict(script, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BAD_SCRIPTS))
def test_a_type_error_in_user_code_is_reported(tmp_path, name):
    text, expected = BAD_SCRIPTS[name]
    bad = tmp_path / "bad.py"
    bad.write_text(text)
    out = mypy_strict(bad, tmp_path)
    assert out.returncode == 1, out.stdout
    assert all(e in out.stdout.lower() for e in expected), out.stdout
