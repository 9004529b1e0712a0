# copy.pxd: declarations for copy.pyx (gather / scatter through a FrameTable).
#
# copy.pyx keeps no state of its own: it resolves pages with FrameTable's
# frame_bytes and counts a copy without the GIL with ft_copy_begin /
# ft_copy_end (frametable.pxd).

cdef enum:
    # copies of at least this many bytes run with the GIL released
    CP_NOGIL_BYTES = 256 * 1024
