# idtable.pyx: IdTable, the kernel's idr as the TEE subsystem uses it (the
# lowest free id from 1 up).  Fields and invariants: idtable.pxd.
#
# Concurrency: no locks; a table belongs to one thread at a time.  Errors
# follow docs/core.md; the plain-Python twin is poolsvc/_pure/tables.py.
from libc.stdlib cimport realloc, free
from libc.stdint cimport int64_t, int32_t
from cpython.list cimport PyList_GET_ITEM, PyList_SET_ITEM
from cpython.ref cimport Py_INCREF, Py_DECREF
from cpython.number cimport PyIndex_Check

cdef object _IDT_FREE = object()       # objects[i] of a free id
cdef object _IDT_RESERVED = object()   # objects[i] of an id allocated without object


@cython.auto_pickle(False)
cdef class IdTable:
    """The kernel's ``idr``: ids from 1 up, always the lowest free one.

    ``IdTable(max_id=2**31 - 1)``; ``max_id`` in 1..2**31-1 else BadParameters.
    """

    def __cinit__(self):
        self.heap = NULL
        self.heap_len = 0
        self.heap_cap = 0
        self.objects = [_IDT_FREE]       # slot 0: id 0 is never handed out
        self.hwm = 1
        self.count = 0
        self.id_limit = 0

    def __init__(self, max_id=2**31 - 1):
        cdef int64_t m = clamp_i64(max_id)
        if m < 1 or m > 0x7fffffff:
            raise BadParameters(f"max_id is {max_id}, must be in 1..{0x7fffffff}")
        self.id_limit = m

    def __dealloc__(self):
        free(self.heap)

    cdef bint allocated(self, int64_t i) noexcept:
        return 1 <= i < self.hwm and (<object>PyList_GET_ITEM(self.objects, i)) is not _IDT_FREE

    cdef int64_t heap_pop(self) noexcept:
        # remove and return the smallest free id (heap_len > 0)
        cdef int32_t top = self.heap[0], moved
        cdef Py_ssize_t i = 0, child, n
        self.heap_len -= 1
        n = self.heap_len
        if n == 0:
            return top
        moved = self.heap[n]
        while True:
            child = 2 * i + 1
            if child >= n:
                break
            if child + 1 < n and self.heap[child + 1] < self.heap[child]:
                child += 1
            if self.heap[child] >= moved:
                break
            self.heap[i] = self.heap[child]
            i = child
        self.heap[i] = moved
        return top

    cdef int heap_push(self, int32_t value) except -1:
        cdef Py_ssize_t i, parent, cap
        cdef int32_t *grown
        if self.heap_len == self.heap_cap:
            cap = max(16, 2 * self.heap_cap)
            grown = <int32_t *>realloc(self.heap, cap * sizeof(int32_t))
            if grown == NULL:
                raise OutOfMemory(f"cannot grow the free-id heap to {cap} entries")
            self.heap = grown
            self.heap_cap = cap
        i = self.heap_len
        self.heap_len += 1
        while i > 0:
            parent = (i - 1) >> 1
            if self.heap[parent] <= value:
                break
            self.heap[i] = self.heap[parent]
            i = parent
        self.heap[i] = value
        return 0

    def alloc(self, obj=None):
        """Allocate the lowest free id ``>= 1`` for ``obj``.

        ``obj=None`` reserves the id: ``find`` gives None until ``replace``.
        Returns the id.  Errors: OutOfMemory when all ``max_id`` ids are in use.
        """
        return self.alloc_id(_IDT_RESERVED if obj is None else obj)

    cdef int64_t alloc_id(self, object stored) except -1:
        """``alloc`` storing ``stored`` (``_IDT_RESERVED`` for None)."""
        cdef int64_t i
        cdef object old
        if self.heap_len > 0:
            i = self.heap_pop()
            old = <object>PyList_GET_ITEM(self.objects, i)
            Py_INCREF(stored)
            PyList_SET_ITEM(self.objects, i, stored)
            Py_DECREF(old)
        elif self.hwm <= self.id_limit:
            i = self.hwm
            self.objects.append(stored)
            self.hwm += 1
        else:
            raise OutOfMemory(f"no free id: all {self.id_limit} ids are in use")
        self.count += 1
        return i

    def replace(self, id, obj):
        """Set the object of allocated ``id``; return the old one (None if reserved).

        ``obj=None`` makes the id reserved again.  Errors: ItemNotFound.
        """
        cdef int64_t i = 0
        if psv_i64_from_obj(id, <long long *>&i) == 0 or not self.allocated(i):
            raise ItemNotFound(f"id {id} is not allocated")
        return self.replace_id(i, obj)

    cdef object replace_id(self, int64_t i, object obj):
        """``replace`` of an allocated id ``i`` (the caller checked ``allocated(i)``)."""
        cdef object old = self.objects[i]
        self.objects[i] = _IDT_RESERVED if obj is None else obj
        return None if old is _IDT_RESERVED else old

    def remove(self, id):
        """Free ``id`` and return its object (None if it was reserved).

        Errors: ItemNotFound when ``id`` is not allocated.
        """
        cdef int64_t i = 0
        if psv_i64_from_obj(id, <long long *>&i) == 0 or not self.allocated(i):
            raise ItemNotFound(f"id {id} is not allocated")
        return self.remove_id(i)

    cdef object remove_id(self, int64_t i):
        """``remove`` of an allocated id ``i`` (the caller checked ``allocated(i)``)."""
        cdef object old
        self.heap_push(<int32_t>i)
        old = self.objects[i]
        self.objects[i] = _IDT_FREE
        self.count -= 1
        return None if old is _IDT_RESERVED else old

    def find(self, id):
        """The object of ``id``, or None (reserved, free or out of range; any int)."""
        cdef long long i = 0
        cdef object obj
        if psv_i64_from_obj(id, &i) == 0 or i < 1 or i >= self.hwm:
            return None
        obj = <object>PyList_GET_ITEM(self.objects, i)
        if obj is _IDT_FREE or obj is _IDT_RESERVED:
            return None
        return obj

    def __contains__(self, id):
        cdef long long i = 0
        if not PyIndex_Check(id):
            return False
        if psv_i64_from_obj(id, &i) == 0:
            return False
        return self.allocated(i)

    def __len__(self):
        return self.count

    def ids(self):
        """The allocated ids (reserved included), ascending."""
        cdef Py_ssize_t i
        objects = self.objects
        return [i for i in range(1, self.hwm) if objects[i] is not _IDT_FREE]

    @property
    def max_id(self):
        """The largest id this table hands out."""
        return self.id_limit
