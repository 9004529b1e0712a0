"""TEE return codes and origins get their GlobalPlatform names (poolsvc/teecodes.py)."""
from __future__ import annotations

from poolsvc import errors, teecodes
from poolsvc.constants import Origin
from poolsvc.teecodes import TeeResult


def test_errors_module_codes_agree_with_the_name_table():
    codes = {name: value for name, value in vars(errors).items() if name.startswith("TEE_")}
    assert codes
    for name, value in codes.items():
        assert TeeResult[name] == value, name


def test_describe_names_code_and_origin():
    assert teecodes.describe(0xFFFF0008, Origin.TEE) == \
        "TEE_ERROR_ITEM_NOT_FOUND (0xffff0008) from TEEC_ORIGIN_TEE (3)"
    assert teecodes.describe(0xFFFF000C, 4) == \
        "TEE_ERROR_OUT_OF_MEMORY (0xffff000c) from TEEC_ORIGIN_TRUSTED_APP (4)"
    assert teecodes.describe(0x1234, 9) == "unknown TEE code 0x1234 from unknown origin 9"


def test_annotate_replaces_numbers_in_place():
    msg = "secure world answered 0xffff0006 (origin 3) to command 4"
    assert teecodes.annotate(msg, 0xFFFF0006, 3) == (
        "secure world answered TEE_ERROR_BAD_PARAMETERS (0xffff0006) from TEEC_ORIGIN_TEE (3) "
        "to command 4")


def test_annotate_appends_when_the_message_lacks_the_numbers():
    assert teecodes.annotate("sha256 refused", 0xFFFF0010, 4) == (
        "sha256 refused: TEE_ERROR_SHORT_BUFFER (0xffff0010) from TEEC_ORIGIN_TRUSTED_APP (4)")
    named = "TEE_ERROR_SHORT_BUFFER: need 64 bytes"
    assert teecodes.annotate(named, 0xFFFF0010, 4) == named


def test_negative_codes_read_as_u32():
    assert teecodes.code_name(-0x10000 + 8) == "TEE_ERROR_ITEM_NOT_FOUND"
