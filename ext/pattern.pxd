# pattern.pxd: declarations for pattern.pyx (owner patterns of the load harness's buffers).
#
# pattern.pyx keeps no state: it writes and reads caller buffers only.

cdef enum:
    # Bytes of a batch tag: an 8-byte prefix, then the handle as a little-endian u64.
    PT_TAG_SIZE = 16
    PT_PREFIX_SIZE = 8
