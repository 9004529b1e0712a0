# cython: language_level=3
"""poolsvc._core: the compiled kernels of poolsvc, one extension in several files.

Each concern lives in its own file, textually included here so that calls
between ``cdef`` functions stay direct C calls; each has a ``.pxd`` twin
(included from ``_core.pxd``) that declares its typed fields and invariants.
A type's fields are written only by its own ``.pyx`` and by the ``cdef
inline`` helpers its ``.pxd`` offers the others.  C kernels are in
``psv_*.h`` headers, declared in the ``psv_*.pxd`` of the same name.

    convert.pyx     argument converters shared by every later file (first)
    freemap.pyx     bitmap + tree of free runs: the indexed first-fit index
    rangealloc.pyx  RangeAllocator: the static pool (genalloc)
    framealloc.pyx  FrameAllocator: page frames of dynamic RAM
    frametable.pyx  FrameTable: frame -> storage page, attached storage, read/write
    idtable.pyx     IdTable: the kernel's idr
    addressmap.pyx  AddressMap: virtual-address intervals -> storage
    arena.pyx       ArenaPages: storage-page runs of an arena; take/give of a dynamic-pool run
    userpages.pyx   UserPages: frames of a registered object's pages, pin/unpin in one call
    pagelist.pyx    OP-TEE non-contiguous page lists: build, parse, segments
    copy.pyx        gather / scatter through the frame table
    pattern.pyx     owner patterns in buffers: the load harness's fill / check (private names)
    smc_entry.pyx   the secure world's end of the one-parameter message call
    smc_driver.pyx  the normal world's end of it (REGISTER/UNREGISTER_SHM)
    wire.pyx        framing of batched requests: split a BATCH body, run it, frame the replies
    clientwire.pyx  ClientSlot, ClientWire: the client's request/reply path of one connection
    fastpath.pyx    ShmRequests: the pool service's ALLOC and SHM_CLOSE, end to end
    slotserve.pyx   serve_slot, ring_doorbell, ready_slots, serve_ready: the daemon's slot requests (last)

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

include "convert.pyx"
include "freemap.pyx"
include "rangealloc.pyx"
include "framealloc.pyx"
include "frametable.pyx"
include "idtable.pyx"
include "addressmap.pyx"
include "arena.pyx"
include "userpages.pyx"
include "pagelist.pyx"
include "copy.pyx"
include "pattern.pyx"
include "smc_entry.pyx"
include "smc_driver.pyx"
include "wire.pyx"
include "clientwire.pyx"
include "fastpath.pyx"
include "slotserve.pyx"
