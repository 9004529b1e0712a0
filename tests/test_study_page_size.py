"""Kernel pages of 16 and 64 KiB in the study (``poolsvc bench --page-size``).

The page list of a buffer made of large kernel pages is checked against an
independent oracle: the bytes ``optee_fill_pages_list`` writes, walking each
kernel page in 4 KiB steps, written here with ``struct`` from the frames,
without the project's page-list code.  Then the allocator's aligned blocks,
rounding, the study's cells and the refusal of unsupported sizes.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest

from poolsvc import kernelpages, pagelist, study, studyreport
from poolsvc._backend import core
from poolsvc.cli import main
from poolsvc.errors import AlignmentError, BadParameters, OutOfMemory
from poolsvc.kernelpages import KernelPageAllocator

KiB, MiB = 1 << 10, 1 << 20
BASE = 0x50000000


def fill_pages_list(kernel_pages: list[int], page_size: int, list_pa: int) -> bytes:
    """The oracle: Linux's ``optee_fill_pages_list`` for a buffer of whole kernel pages.

    Each list page holds 511 entries and, in its last u64, the PA of the next
    list page (contiguous list pages: ``list_pa + 4096 * (n + 1)``).
    """
    entries = [pa + step for pa in kernel_pages for step in range(0, page_size, 4096)]
    out = bytearray()
    for n, first in enumerate(range(0, len(entries), 511)):
        chunk = entries[first:first + 511]
        page = struct.pack(f"<{len(chunk)}Q", *chunk) + bytes(8 * (511 - len(chunk)))
        last = first + 511 >= len(entries)
        out += page + struct.pack("<Q", 0 if last else list_pa + 4096 * (n + 1))
    return bytes(out)


@pytest.mark.parametrize("page_size", [16 * KiB, 64 * KiB])
@pytest.mark.parametrize("count", [1, 3, 128, 200])
def test_page_list_of_kernel_pages_is_the_list_of_their_frames(page_size, count):
    rng = np.random.default_rng(count)
    slots = rng.choice(4096, size=count, replace=False)  # scattered, in no order
    kpages = [BASE + int(s) * page_size for s in slots]
    entries = kernelpages.list_entries(kpages, page_size)
    assert len(entries) == count * page_size // 4096
    blob = pagelist.build(entries, 0, 0x60000000)
    assert blob == fill_pages_list(kpages, page_size, 0x60000000)
    assert pagelist.list_pages_needed(len(entries)) * 4096 == len(blob)


def test_list_entries_refuses_a_misaligned_kernel_page():
    with pytest.raises(AlignmentError, match="not aligned to 16 KiB"):
        kernelpages.list_entries([BASE, BASE + 0x1000], 16 * KiB)


@pytest.mark.parametrize("size, page_size, taken", [
    (1, 4 * KiB, 4 * KiB), (4 * KiB, 16 * KiB, 16 * KiB), (16 * KiB + 1, 16 * KiB, 32 * KiB),
    (64 * KiB, 64 * KiB, 64 * KiB), (100 * KiB, 64 * KiB, 128 * KiB)])
def test_rounding_to_kernel_pages(size, page_size, taken):
    assert kernelpages.rounded(size, page_size) == taken
    assert kernelpages.waste(size, page_size) == taken - size


@pytest.mark.parametrize("bad", [0, 4095, 8192, 32 * KiB, 2 * MiB, True, 16.0 * KiB, "16KiB"])
def test_unsupported_page_sizes_are_refused(bad):
    with pytest.raises(BadParameters, match="kernel page size must be one of"):
        kernelpages.check_page_size(bad)


def test_study_refuses_an_unsupported_page_size():
    with pytest.raises(BadParameters, match="got 8192"):
        study.run_study(sizes=[4 * KiB], trials=1, dynamic_size=16 * MiB, page_size=8192,
                        static_daemon=False)


def test_cli_refuses_an_unsupported_page_size(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--quick", "--no-save", "--page-size", "8KiB"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --page-size" in err and "kernel page size must be one of" in err and "'8KiB'" in err


def test_cli_help_names_the_page_size(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "--page-size" in capsys.readouterr().out


def test_kernel_pages_are_aligned_free_blocks():
    frames = core.FrameAllocator(BASE, 64, 10)
    frames.claim(BASE + 1 * 4096, 1)   # spoils kernel page 0
    frames.claim(BASE + 10 * 4096, 2)  # spoils kernel page 2
    kernel = KernelPageAllocator(frames, 16 * KiB)
    pas = kernel.alloc_pages(3)
    assert pas.tolist() == [BASE + 4 * 4096, BASE + 12 * 4096, BASE + 16 * 4096]
    assert frames.used_frames == 3 + 12
    kernel.free_pages(pas)
    assert frames.used_frames == 3
    before = frames.used_map().copy()
    with pytest.raises(OutOfMemory, match="14 free aligned blocks"):
        kernel.alloc_pages(15)
    assert np.array_equal(frames.used_map(), before)  # nothing taken


def test_kernel_page_run_starts_on_a_kernel_page():
    frames = core.FrameAllocator(BASE, 64, 10)
    frames.claim(BASE + 5 * 4096, 1)
    kernel = KernelPageAllocator(frames, 16 * KiB)
    # frames 0..4 and 6..7 are free but no run of 8 starts on a kernel page before frame 8
    pa = kernel.alloc_exact(2)
    assert pa == BASE + 8 * 4096
    kernel.free_exact(pa, 2)
    with pytest.raises(OutOfMemory, match="largest block, order 11"):
        kernel.alloc_exact((1 << 11) + 1)
    frames.free_contig(BASE + 5 * 4096, 1)
    frames.claim(BASE + 1 * 4096, 1)
    frames.claim(BASE + 34 * 4096, 1)  # frames 2..33 are free: 32 in a row, not from a kernel page
    with pytest.raises(OutOfMemory, match="no free run of 8 kernel pages"):
        kernel.alloc_exact(8)
    assert frames.used_frames == 2
    assert frames.alloc_contig(32) == BASE + 2 * 4096  # (the 4 KiB allocator would serve it)


def test_kernel_pages_need_aligned_frames():
    with pytest.raises(BadParameters, match="not on a 64 KiB kernel page"):
        KernelPageAllocator(core.FrameAllocator(BASE + 4096, 64, 10), 64 * KiB)


@pytest.fixture(scope="module")
def report16():
    levels = [lv for lv in study.LEVELS if lv.name in ("fresh", "severe")]
    return study.run_study(sizes=[4 * KiB, 20 * KiB, 1 * MiB], levels=levels, trials=3, seed=7,
                           dynamic_size=32 * MiB, page_size=16 * KiB, static_daemon=False)


def test_cells_count_kernel_pages_frames_and_waste(report16):
    assert report16.page_size == 16 * KiB
    for strategy in study.STRATEGIES:
        small = report16.cell("fresh", 4 * KiB, strategy)
        assert (small.kernel_pages, small.frames, small.waste_bytes) == (1, 4, 12 * KiB), strategy
        odd = report16.cell("fresh", 20 * KiB, strategy)
        assert (odd.kernel_pages, odd.frames, odd.waste_bytes) == (2, 8, 12 * KiB), strategy
    contiguous = report16.cell("fresh", 1 * MiB, "contiguous")
    assert (contiguous.segments, contiguous.list_pages, contiguous.messages) == (1, 1, 2)


def test_scattered_buffers_are_whole_kernel_pages(report16):
    scattered = report16.cell("severe", 1 * MiB, "scattered")
    assert scattered.failures == 0 and scattered.frames == 256 and scattered.kernel_pages == 64
    assert scattered.pinned_pages == 64 and scattered.list_pages == 1 and scattered.messages == 2
    assert 1 < scattered.segments <= 64 and scattered.longest_run_pages % 4 == 0
    assert scattered.access_mb_s is None  # modelled without storage: no SHA-256 figure


def test_summary_says_what_the_page_size_changes(report16):
    text = "\n".join(studyreport.summary_lines(report16))
    assert "kernel pages of 16 KiB: each is 4 frames" in text
    assert "a 4 KiB buffer takes 16 KiB, 12 KiB wasted" in text
    assert "scattered with 16 KiB pages at severe" in text and "(order 2)" in text
    assert "one pinned kernel page per 4 frames" in text
    table = studyreport.format_table(report16)
    assert table.startswith("kernel page size 16 KiB") and "kpages" in table


def test_summary_blames_the_page_list_only_when_the_list_was_refused(report16):
    import copy

    report = copy.deepcopy(report16)
    kernel = study.Result("severe", 32 * MiB, "scattered", 3, 3, None, None, None, None, 0, None, None,
                          None, None, None, None, failure_reason="OutOfMemory: 2048 kernel pages of 16 KiB "
                          "requested, 95 free aligned blocks of 4 frames")
    listed = study.Result("severe", 64 * MiB, "scattered", 3, 3, None, None, None, None, 0, None, None,
                          None, None, None, None, failure_reason="OutOfMemory: no run of 33 free frames: "
                          "100 free, longest run 31")
    report.results += [kernel, listed]
    lines = [x for x in studyreport.summary_lines(report) if " is refused (" in x]
    assert lines[0].endswith("95 free aligned blocks of 4 frames).")
    assert lines[1].endswith("its page list needs 33 contiguous list pages, allocated as Linux does.")


def test_plots_of_a_larger_page_size(report16, tmp_path):
    pytest.importorskip("matplotlib")
    from poolsvc import plots

    for path in plots.plot(report16, str(tmp_path)):
        assert (tmp_path / path.rsplit("/", 1)[-1]).stat().st_size > 10_000
