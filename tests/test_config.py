"""Config: defaults, TOML loading, and one fixture file per configuration error."""
from __future__ import annotations

from pathlib import Path

import pytest

from poolsvc import Config
from poolsvc.config import parse_size
from poolsvc.constants import GenCaps, SecCaps
from poolsvc.errors import ConfigError

CONFIGS = Path(__file__).parent / "configs"


def test_defaults_match_the_design():
    cfg = Config()
    assert (cfg.secure_base, cfg.secure_size) == (0x0E000000, 16 << 20)
    assert (cfg.static_base, cfg.static_size) == (0x42000000, 4 << 20)
    assert (cfg.dynamic_base, cfg.dynamic_size) == (0x50000000, 1 << 30)
    assert cfg.min_alloc_order == 9
    assert cfg.sec_caps == SecCaps.HAVE_RESERVED_SHM | SecCaps.DYNAMIC_SHM | SecCaps.MEMREF_NULL | SecCaps.RPC_ARG
    assert cfg.gen_caps & GenCaps.REG_MEM


def test_reg_mem_only_with_dynamic_shm():
    assert not Config(dynamic_shm=False).gen_caps & GenCaps.REG_MEM
    assert not Config(dynamic_shm=False).sec_caps & SecCaps.DYNAMIC_SHM


def test_from_toml_good():
    cfg = Config.from_toml(CONFIGS / "good.toml")
    assert cfg.dynamic_size == 64 << 20 and cfg.static_size == 2 << 20
    assert not cfg.dynamic_shm and cfg.arena_step == 1 << 20


def test_from_toml_sectioned():
    cfg = Config.from_toml(CONFIGS / "sectioned.toml")
    assert cfg.max_contig_order == 8


@pytest.mark.parametrize("name,field", [
    ("bad_misaligned_base", "static_base"),
    ("bad_overlap", "static_base"),
    ("bad_no_shm", "dynamic_shm/reserved_shm"),
    ("bad_size_text", "dynamic_size"),
    ("bad_unknown_key", "dynamic_sise"),
    ("bad_policy", "static_policy"),
    ("bad_min_order", "min_alloc_order"),
    ("bad_bool", "dynamic_shm"),
    ("bad_zero_size", "static_size"),
    ("bad_toml_syntax", "not valid TOML"),
])
def test_each_bad_file_names_its_field(name, field):
    with pytest.raises(ConfigError) as info:
        Config.from_toml(CONFIGS / f"{name}.toml")
    assert field in str(info.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="No such file"):
        Config.from_toml(CONFIGS / "nope.toml")


@pytest.mark.parametrize("text,value", [("4096", 4096), ("16MiB", 16 << 20), ("4k", 4096),
                                         ("0x1000", 4096), ("1 GiB", 1 << 30), (8192, 8192),
                                         ("64TiB", 64 << 40), ("2t", 2 << 40), ("1_024 KiB", 1 << 20)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "12 parsecs", "-5", True, 1.5])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError):
        parse_size(text)
