# idtable.pxd: typed fields of IdTable (logic in idtable.pyx).
#
# Concurrency: plain data, no locks; see idtable.pyx.
from libc.stdint cimport int64_t, int32_t


cdef class IdTable:
    # Allocated ids: [1, hwm) minus the ids in the heap.
    #   objects[i] is _IDT_FREE      <=> i is free (0 <= i < hwm; slot 0 unused)
    #   objects[i] is _IDT_RESERVED  <=> i allocated without an object
    #   len(objects) == hwm;  count == hwm - 1 - heap_len
    # heap[0:heap_len] is a binary min-heap of the free ids below hwm.
    cdef list objects
    cdef int64_t hwm
    cdef int64_t id_limit        # max_id: 1 <= id <= id_limit; hwm <= id_limit + 1
    cdef int64_t count
    cdef int32_t *heap
    cdef Py_ssize_t heap_len
    cdef Py_ssize_t heap_cap

    cdef bint allocated(self, int64_t i) noexcept
    cdef int64_t heap_pop(self) noexcept
    cdef int heap_push(self, int32_t value) except -1
    # alloc / replace / remove for a compiled caller (fastpath.pyx); replace_id and
    # remove_id take an id the caller checked with allocated()
    cdef int64_t alloc_id(self, object stored) except -1
    cdef object replace_id(self, int64_t i, object obj)
    cdef object remove_id(self, int64_t i)
