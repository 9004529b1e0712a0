# cython: language_level=3
"""poolsvc._core: the compiled kernels of poolsvc, one extension in several files.

Each concern lives in its own file, textually included here so that calls
between ``cdef`` functions stay direct C calls; each has a ``.pxd`` twin
(included from ``_core.pxd``) that declares its typed fields.

    freemap.pyx    bitmap + tree of free runs: the indexed first-fit index
    alloc.pyx      RangeAllocator (static pool, genalloc) and FrameAllocator
    tables.pyx     FrameTable, IdTable, AddressMap
    arena.pyx      ArenaPages: storage-page runs of an arena; take/give of a dynamic-pool run
    pagelist.pyx   OP-TEE non-contiguous page lists: build, parse, segments
    copy.pyx       gather / scatter through the frame table
    smc.pyx        both ends of the one-parameter message call (REGISTER/UNREGISTER_SHM)
    wire.pyx       framing of batched requests: split a BATCH body, run it, frame the replies

Concurrency: nothing here takes a lock.  Every object belongs to one thread at
a time (the System serialises access); the GIL is held throughout except where
a function says it releases it around a pure copy.

The plain-Python twins, with the same names and behaviour, are in
``poolsvc/_pure``; ``docs/core.md`` is the contract both follow.
"""
cimport numpy as cnp
cnp.import_array()

from poolsvc.errors import (
    AddressError, AlignmentError, BadParameters, CorruptionError, DoubleFree,
    InternalError, ItemNotFound, OutOfMemory, ProtocolError, SecureMemoryError, SizeOverflow,
)

include "freemap.pyx"
include "alloc.pyx"
include "tables.pyx"
include "arena.pyx"
include "pagelist.pyx"
include "copy.pyx"
include "smc.pyx"
include "wire.pyx"
