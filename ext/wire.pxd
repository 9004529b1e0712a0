# wire.pxd: declarations for wire.pyx (framing of BATCH / BATCH_REPLY bodies).
#
# Header of a frame (docs/protocol.md): u32 length, u16 type, u16 flags,
# little-endian, then ``length`` body bytes.  wire.pyx keeps no state.

cdef enum:
    WIRE_HEADER_SIZE = 8
    WIRE_REPLY_OK = 3               # MsgType.OK
    WIRE_REPLY_ERROR = 4            # MsgType.ERROR
    WIRE_PING = 8                   # MsgType.PING
    WIRE_SHM_CLOSE = 18             # MsgType.SHM_CLOSE
    WIRE_DESC_SIZE = 72             # DESC "<QqQQQQQIIIHBB" (docs/protocol.md)
    WIRE_DESC_EXTRAS = 8 | 4        # DescBits.PAGES_FOLLOW | NEW_SEGMENT
    WIRE_CLOSED_SIZE = 8            # CLOSED "<II"

# Offsets of the client Shm's slots (poolsvc/service/objects.py) that _batch_results stores.
ctypedef struct wire_shm_slots:
    Py_ssize_t context, id, size, cookie, desc, pages, refs, user_view, views

ctypedef struct wire_frame:
    Py_ssize_t start                # first body byte
    Py_ssize_t end                  # one past the last
    unsigned int msg_type
