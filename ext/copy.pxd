# copy.pxd: declarations for copy.pyx (gather / scatter through a FrameTable).
#
# copy.pyx uses FrameTable's typed fields (tables.pxd) directly and keeps no
# state of its own.

cdef enum:
    # copies of at least this many bytes run with the GIL released
    CP_NOGIL_BYTES = 256 * 1024
