# addressmap.pyx: AddressMap, sorted virtual-address intervals ->
# (storage key, file offset).  Fields and invariants: addressmap.pxd.
#
# Concurrency: no locks; a map belongs to one thread at a time.  Errors
# follow docs/core.md; the plain-Python twin is poolsvc/_pure/tables.py.
from libc.stdlib cimport realloc, free
from libc.string cimport memmove
from libc.stdint cimport uint64_t, int64_t

cdef inline Py_ssize_t am_upper_bound(const uint64_t *starts, Py_ssize_t n, uint64_t addr) noexcept nogil:
    # number of intervals with start <= addr; branch-free halving (the
    # compiler turns the select into a cmov), ceil(log2(n)) steps
    cdef const uint64_t *base = starts
    cdef Py_ssize_t half
    if n == 0:
        return 0
    while n > 1:
        half = n >> 1
        base = base + half if base[half] <= addr else base
        n -= half
    return (base - starts) + (base[0] <= addr)


@cython.auto_pickle(False)
cdef class AddressMap:
    """Sorted, non-overlapping virtual-address intervals -> (storage key, file offset)."""

    def __cinit__(self):
        self.starts = NULL
        self.ends = NULL
        self.keys = NULL
        self.offsets = NULL
        self.n = 0
        self.cap = 0

    def __dealloc__(self):
        free(self.starts)
        free(self.ends)
        free(self.keys)
        free(self.offsets)

    cdef int grow(self) except -1:
        cdef Py_ssize_t cap = max(16, 2 * self.cap)
        cdef void *p
        p = realloc(self.starts, cap * sizeof(uint64_t))
        if p == NULL:
            raise OutOfMemory(f"cannot grow the address map to {cap} intervals")
        self.starts = <uint64_t *>p
        p = realloc(self.ends, cap * sizeof(uint64_t))
        if p == NULL:
            raise OutOfMemory(f"cannot grow the address map to {cap} intervals")
        self.ends = <uint64_t *>p
        p = realloc(self.keys, cap * sizeof(int64_t))
        if p == NULL:
            raise OutOfMemory(f"cannot grow the address map to {cap} intervals")
        self.keys = <int64_t *>p
        p = realloc(self.offsets, cap * sizeof(uint64_t))
        if p == NULL:
            raise OutOfMemory(f"cannot grow the address map to {cap} intervals")
        self.offsets = <uint64_t *>p
        self.cap = cap
        return 0

    def add(self, start, end, key, file_offset):
        """Add ``[start, end)`` -> ``(key, file_offset)``.

        Params: ``0 <= start < end < 2**64``; ``key`` an int64; ``file_offset >= 0``
        with ``file_offset + (end - start) <= 2**64``.
        Errors: BadParameters (bad values, or overlapping an existing interval).
        """
        cdef unsigned long long s = 0, e = 0, off = 0
        cdef long long k = 0
        cdef Py_ssize_t i, tail
        if (psv_u64_from_obj(start, &s) == 0 or psv_u64_from_obj(end, &e) == 0
                or s >= e):
            raise BadParameters(f"interval [{start:#x}, {end:#x}) is empty or outside "
                                "the 64-bit address space")
        if psv_i64_from_obj(key, &k) == 0:
            raise BadParameters(f"key {key} does not fit in 64 bits")
        if psv_u64_from_obj(file_offset, &off) == 0 or off > 0xffffffffffffffff - (e - s) + 1:
            raise BadParameters(f"file offset {file_offset:#x} for [{s:#x}, {e:#x}) is out of range")
        i = am_upper_bound(self.starts, self.n, s)
        if i > 0 and self.ends[i - 1] > s:
            raise BadParameters(f"interval [{s:#x}, {e:#x}) overlaps [{self.starts[i - 1]:#x}, "
                                f"{self.ends[i - 1]:#x})")
        if i < self.n and self.starts[i] < e:
            raise BadParameters(f"interval [{s:#x}, {e:#x}) overlaps [{self.starts[i]:#x}, "
                                f"{self.ends[i]:#x})")
        if self.n == self.cap:
            self.grow()
        tail = self.n - i
        memmove(&self.starts[i + 1], &self.starts[i], tail * sizeof(uint64_t))
        memmove(&self.ends[i + 1], &self.ends[i], tail * sizeof(uint64_t))
        memmove(&self.keys[i + 1], &self.keys[i], tail * sizeof(int64_t))
        memmove(&self.offsets[i + 1], &self.offsets[i], tail * sizeof(uint64_t))
        self.starts[i] = s
        self.ends[i] = e
        self.keys[i] = k
        self.offsets[i] = off
        self.n += 1

    def remove(self, start):
        """Remove the interval that starts exactly at ``start``.

        Errors: ItemNotFound when no interval starts there.
        """
        cdef unsigned long long s = 0
        cdef Py_ssize_t i, tail
        if psv_u64_from_obj(start, &s) == 0:
            raise ItemNotFound(f"no interval starts at {start:#x}")
        i = am_upper_bound(self.starts, self.n, s) - 1
        if i < 0 or self.starts[i] != s:
            raise ItemNotFound(f"no interval starts at {s:#x}")
        tail = self.n - i - 1
        memmove(&self.starts[i], &self.starts[i + 1], tail * sizeof(uint64_t))
        memmove(&self.ends[i], &self.ends[i + 1], tail * sizeof(uint64_t))
        memmove(&self.keys[i], &self.keys[i + 1], tail * sizeof(int64_t))
        memmove(&self.offsets[i], &self.offsets[i + 1], tail * sizeof(uint64_t))
        self.n -= 1

    def lookup(self, addr):
        """``(key, file_offset + addr - start)`` of the interval holding ``addr``, or None."""
        cdef unsigned long long a = 0
        cdef Py_ssize_t i
        if psv_u64_from_obj(addr, &a) == 0:
            return None
        i = am_upper_bound(self.starts, self.n, a) - 1
        if i < 0 or a >= self.ends[i]:
            return None
        return (self.keys[i], self.offsets[i] + (a - self.starts[i]))

    def clear(self):
        """Remove every interval."""
        self.n = 0

    def __len__(self):
        return self.n

    def intervals(self):
        """``[(start, end, key, file_offset), ...]`` ascending."""
        cdef Py_ssize_t i
        return [(self.starts[i], self.ends[i], self.keys[i], self.offsets[i])
                for i in range(self.n)]
