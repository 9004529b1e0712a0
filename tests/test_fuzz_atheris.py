"""Bounded coverage-guided fuzzing (atheris) of the parsers, as part of the tests.

Each harness ``tests/fuzz/fuzz_<target>.py`` runs in a subprocess for
``POOLSVC_FUZZ_RUNS`` inputs (default 2000) with a fixed libFuzzer seed
(``POOLSVC_FUZZ_SEED``, default 1), starting from its seed corpus
``tests/fuzz/corpus/<target>/``; the inputs it adds go to a temporary
directory, never into the repository.  A finding (an exception that is not a
PoolsvcError, a disagreement between the compiled and the pure-Python
kernels, a crash, a hang past libFuzzer's ``-timeout``) fails the test with
the harness's report and the input in base64.

A fixed finding's reproducer stays in its target's corpus.  docs/fuzzing.md
describes the harnesses and how to run them for longer.

atheris is in the ``test`` extra; these tests skip only when it cannot be imported.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("atheris")

FUZZ = pathlib.Path(__file__).resolve().parent / "fuzz"
TARGETS = sorted(p.stem.removeprefix("fuzz_") for p in FUZZ.glob("fuzz_*.py"))
RUNS = int(os.environ.get("POOLSVC_FUZZ_RUNS", "2000"))
SEED = int(os.environ.get("POOLSVC_FUZZ_SEED", "1"))
#: Bound on one harness process; libFuzzer's own -timeout (per input) catches hangs first.
PROCESS_TIMEOUT = 600


def _harness(target: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FUZZ / f"fuzz_{target}.py"), *args],
                          capture_output=True, text=True, timeout=PROCESS_TIMEOUT,
                          env={**os.environ, **(env or {})})


def _report(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in (proc.stdout + proc.stderr).splitlines()
             if not line.startswith(("INFO: Instrumenting", "WARNING: Failed to find function"))]
    return "\n".join(lines[-60:])


def test_targets_found():
    assert set(TARGETS) == {"msg", "pagelist", "protocol", "smc", "wire"}, TARGETS


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz(target, compiled, tmp_path):
    corpus = FUZZ / "corpus" / target
    assert any(corpus.iterdir()), f"no seed corpus in {corpus}"
    proc = _harness(target, f"-runs={RUNS}", f"-seed={SEED}", "-timeout=20", "-rss_limit_mb=2048",
                    f"-artifact_prefix={tmp_path}/", str(tmp_path), str(corpus))
    assert proc.returncode == 0, f"fuzz_{target} found something:\n{_report(proc)}"
    assert f"Done {RUNS} runs" in proc.stderr, _report(proc)


def test_seed_corpus_is_current(compiled):
    """The seed files are what the harnesses' encoders make today (``make_corpus.py --check``)."""
    proc = subprocess.run([sys.executable, str(FUZZ / "make_corpus.py"), "--check"],
                          capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
