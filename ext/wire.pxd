# wire.pxd: declarations for wire.pyx (framing of BATCH / BATCH_REPLY bodies).
#
# Header of a frame (docs/protocol.md): u32 length, u16 type, u16 flags,
# little-endian, then ``length`` body bytes.  wire.pyx keeps no state.

cdef enum:
    WIRE_HEADER_SIZE = 8
    WIRE_REPLY_OK = 3               # MsgType.OK
    WIRE_REPLY_ERROR = 4            # MsgType.ERROR

ctypedef struct wire_frame:
    Py_ssize_t start                # first body byte
    Py_ssize_t end                  # one past the last
    unsigned int msg_type
