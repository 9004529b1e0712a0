"""Write each harness's seed inputs into ``tests/fuzz/corpus/<target>/``.

Run: ``python tests/fuzz/make_corpus.py [target ...]`` (default: every target).
The seeds are valid inputs made with the project's own encoders (each
harness's ``seeds()``); files the fuzzer added, and reproducers of findings,
stay as they are.  A seed is named after what it holds.
"""
from __future__ import annotations

import importlib
import sys

import fuzzlib

TARGETS = ("pagelist", "wire", "smc", "msg", "protocol")


def main(targets: list[str]) -> None:
    for target in targets or TARGETS:
        harness = importlib.import_module(f"fuzz_{target}")
        folder = fuzzlib.CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in harness.seeds().items():
            (folder / f"seed-{name}").write_bytes(data)
            print(f"{folder / f'seed-{name}'}: {len(data)} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
