"""Everything the repository cites is in the repository, and its text describes, not narrates.

Owns three checks over the tracked tree (``git ls-files``):

- no tracked text file mentions the design notes kept outside the repository
  under their old upper-case name (the project's design document is
  ``docs/design.md``; the pattern is assembled below so this file does not
  match itself);
- no ``*.md``, ``*.py`` or ``*.pyx`` file narrates work sessions
  ("session" and a number): history belongs in git;
- every relative link and image in the user documents (``docs/*.md``,
  ``bench/README.md``, ``README.md``) points at a tracked file or folder, and
  a ``#fragment`` into a Markdown file names one of its headings.

Each failure names the file, the line and what is wrong.  Outside a git
checkout (an unpacked sdist) there is no tracked tree to check: the tests skip.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: The outside design notes' file name, assembled so that this file does not contain it.
OUTSIDE_DESIGN = re.compile(re.escape("DESIGN" + ".md"))
NARRATION = re.compile(r"\b[Ss]ession[ -][0-9]\b")
NARRATION_SUFFIXES = (".md", ".py", ".pyx")

#: Markdown links and images ``[text](target "title")``, reference definitions ``[id]: target``
#: and HTML ``src=`` / ``href=`` attributes.
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_LINK = re.compile(r"\b(?:src|href)=\"([^\"]+)\"")
FENCE = re.compile(r"^\s{0,3}(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def tracked() -> list[str]:
    """The repository's tracked paths that are present in the work tree, relative to its root."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no tracked tree to check")
    return [p for p in out.stdout.decode().split("\0") if p and (ROOT / p).is_file()]


def text_lines(path: str) -> list[str]:
    """The file's lines, or none for a binary file (NUL bytes or not UTF-8)."""
    data = (ROOT / path).read_bytes()
    if b"\0" in data:
        return []
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return []


def user_documents(files: list[str]) -> list[str]:
    return sorted(p for p in files
                  if (p.startswith("docs/") and p.count("/") == 1 and p.endswith(".md"))
                  or p in ("README.md", "bench/README.md"))


def prose_lines(lines: list[str]) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(lines, 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def links(lines: list[str]) -> list[tuple[int, str]]:
    """(line number, target) of every link and image outside code."""
    found = []
    for number, line in prose_lines(lines):
        line = INLINE_CODE.sub("", line)
        for pattern in (INLINE_LINK, HTML_LINK):
            found += [(number, m.group(1)) for m in pattern.finditer(line)]
        m = REFERENCE_LINK.match(line)
        if m:
            found.append((number, m.group(1)))
    return found


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: str) -> set[str]:
    """The anchors of a Markdown file's headings (a repeated heading gets ``-1``, ``-2``, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(text_lines(path)):
        m = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = anchor(m.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def broken_links(files: list[str]) -> list[str]:
    """Every relative link of the user documents whose target is not tracked."""
    paths = set(files)
    folders = {str(Path(p).parent) for p in files} | {
        str(parent) for p in files for parent in Path(p).parents}
    problems = []
    for doc in user_documents(files):
        for number, target in links(text_lines(doc)):
            if SCHEME.match(target) or target.startswith("//"):
                continue  # a URL: not checked here
            path, _, fragment = target.partition("#")
            if path:
                resolved = os.path.normpath(os.path.join(os.path.dirname(doc), path))
                if resolved.startswith(".."):
                    problems.append(f"{doc}:{number}: {target} leaves the repository")
                    continue
                if resolved not in paths and resolved.rstrip("/") not in folders:
                    problems.append(f"{doc}:{number}: {target}: no tracked file {resolved}")
                    continue
            else:
                resolved = doc
            if fragment and resolved.endswith(".md") and fragment not in anchors(resolved):
                problems.append(f"{doc}:{number}: {target}: {resolved} has no heading #{fragment}")
    return problems


def matches(files: list[str], pattern: re.Pattern[str]) -> list[str]:
    return [f"{path}:{number}: {line.strip()}"
            for path in files for number, line in enumerate(text_lines(path), 1)
            if pattern.search(line)]


def test_nothing_cites_the_outside_design_notes():
    found = matches(tracked(), OUTSIDE_DESIGN)
    assert not found, ("cite docs/design.md (it keeps the section numbers) instead of the notes "
                       "outside the repository:\n" + "\n".join(found))


def test_no_session_narration():
    found = matches([p for p in tracked() if p.endswith(NARRATION_SUFFIXES)], NARRATION)
    assert not found, "describe how things are; history is in git:\n" + "\n".join(found)


def test_relative_links_resolve():
    problems = broken_links(tracked())
    assert not problems, "broken links:\n" + "\n".join(problems)


# -- the checks themselves ---------------------------------------------------------------------

def test_link_parser_finds_links_outside_code_only():
    lines = ["See [a](x.md#top) and ![b](img/p.png \"title\").",
             "`[not](code.md)` and <img src=\"pic.png\">",
             "```", "[fenced](no.md)", "```",
             "[ref]: ../other.md"]
    assert links(lines) == [(1, "x.md#top"), (1, "img/p.png"), (2, "pic.png"), (6, "../other.md")]


def test_anchor_follows_github():
    assert anchor("7. Targets") == "7-targets"
    assert anchor("The `shm` slot: what it costs") == "the-shm-slot-what-it-costs"
    assert anchor("Contiguous, reserved or scattered") == "contiguous-reserved-or-scattered"


def test_broken_link_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Top\n[ok](b.md#b-title) [gone](missing.md) [bad](b.md#nope)\n"
                                            "[up](../../outside.md) [self](#top) [web](https://x.org/y)\n")
    (tmp_path / "docs" / "b.md").write_text("# B title\n")
    problems = broken_links(["docs/a.md", "docs/b.md"])
    assert problems == ["docs/a.md:2: missing.md: no tracked file docs/missing.md",
                        "docs/a.md:2: b.md#nope: docs/b.md has no heading #nope",
                        "docs/a.md:3: ../../outside.md leaves the repository"]
