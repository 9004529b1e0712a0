"""Write each harness's seed inputs into ``tests/fuzz/corpus/<target>/``.

Run: ``python tests/fuzz/make_corpus.py [--check] [target ...]`` (default:
every target).  The seeds are valid inputs made with the project's own
encoders (each harness's ``seeds()``), named ``seed-<what they hold>``;
other files in the folder (inputs the fuzzer added) stay as they are.
``--check`` writes nothing and exits 1 if a seed file is missing or differs
from what the encoders make today.
"""
from __future__ import annotations

import importlib
import sys

import fuzzlib


def main(argv: list[str]) -> int:
    check = "--check" in argv
    targets = [a for a in argv if a != "--check"] or fuzzlib.TARGETS
    stale = []
    for target in targets:
        harness = importlib.import_module(f"fuzz_{target}")
        folder = fuzzlib.CORPUS / target
        for name, data in harness.seeds().items():
            path = folder / f"seed-{name}"
            if check:
                if not path.is_file() or path.read_bytes() != data:
                    stale.append(path)
                continue
            folder.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            print(f"{path}: {len(data)} bytes")
    for path in stale:
        print(f"{path}: missing or stale; run python tests/fuzz/make_corpus.py")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
