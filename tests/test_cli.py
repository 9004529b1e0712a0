"""The command line: --version, and every numeric option refused with exit 2 and its reason."""
from __future__ import annotations

import subprocess
import sys

import pytest

import poolsvc
from poolsvc.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"poolsvc {poolsvc.__version__} (") and poolsvc.BACKEND in out


def test_version_from_the_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "poolsvc", "--version"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and poolsvc.__version__ in out.stdout


@pytest.mark.parametrize("argv, reason", [
    (["bench", "--sizes", "0"], "argument --sizes: must be a size > 0, got '0'"),
    (["bench", "--sizes", "4KiB,x"], "argument --sizes: cannot read 'x' as a size"),
    (["bench", "--sizes", ","], "argument --sizes: expected comma-separated sizes"),
    (["bench", "--trials", "0"], "argument --trials: must be a positive integer, got '0'"),
    (["bench", "--trials", "-5"], "argument --trials: must be a positive integer, got '-5'"),
    (["bench", "--trials", "2.5"], "argument --trials: expected an integer, got '2.5'"),
    (["bench", "--seed", "-1"], "argument --seed: must be an integer >= 0, got '-1'"),
    (["bench", "--dynamic-size", "0"], "argument --dynamic-size: must be a size > 0, got '0'"),
    (["bench", "--dynamic-size", "lots"], "argument --dynamic-size: cannot read 'lots' as a size"),
])
def test_bad_numbers_exit_2_with_the_reason(argv, reason, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert reason in capsys.readouterr().err


def test_bad_number_is_a_usage_error_not_a_traceback():
    out = subprocess.run([sys.executable, "-m", "poolsvc", "bench", "--quick", "--sizes", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "must be a size > 0" in out.stderr


def test_tee_errors_are_printed_with_code_and_origin_names(capsys, monkeypatch):
    from poolsvc.commands import demo
    from poolsvc.errors import TeeError

    def refuse(args):
        raise TeeError("secure world answered 0xffff0008 (origin 3) to command 5", 0xFFFF0008, 3)

    monkeypatch.setattr(demo, "run", refuse)
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "TEE_ERROR_ITEM_NOT_FOUND (0xffff0008) from TEEC_ORIGIN_TEE (3)" in err
