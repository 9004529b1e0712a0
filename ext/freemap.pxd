# freemap.pxd: typed fields of FreeMap, the indexed free-run structure under
# both allocators (logic in freemap.pyx).  Included textually from _core.pxd;
# freemap.pyx is included from _core.pyx, so nothing here is cimported.
#
# Concurrency: a FreeMap belongs to the allocator that created it; no locks.
cimport cython
from libc.stdint cimport uint64_t, int64_t, int32_t

# One node of the segment tree, describing the bits [lo, lo + span) it covers.
# Lengths are in bits (units: frames or chunks), all 0 <= x <= span:
#   pref == length of the free run starting at lo
#   suf  == length of the free run ending at lo + span
#   mx   == longest free run inside the span  (mx >= max(pref, suf))
#   pref == span  <=>  suf == span  <=>  mx == span  (the span is all free)
cdef struct fm_node:
    int32_t pref
    int32_t suf
    int32_t mx

# Largest number of bits a FreeMap holds: the tree's int32 lengths must hold
# the span of the root (a power of two times 64 words).
cdef enum:
    FM_MAX_BITS = 1 << 30


@cython.final
cdef class FreeMap:
    # words[w] bit b (value 1 << b) is unit 64*w + b; 1 = used, 0 = free.
    # Invariants:
    #   units >= nbits are used (tail of the last word, padding leaves)
    #   nfree == nbits - (set bits of words below nbits)
    #   tree[nleaves + w] describes words[w] (w < nwords) or is all used
    #   tree[i] == combine(tree[2i], tree[2i+1]) for 1 <= i < nleaves
    #   nleaves == 1 << depth >= nwords;  tree has 2 * nleaves entries, [0] unused
    cdef uint64_t* words
    cdef fm_node* tree
    cdef int64_t nbits
    cdef int64_t nwords
    cdef int64_t nleaves
    cdef int depth
    cdef int64_t nfree

    cdef int64_t find(self, int64_t n, int64_t start) noexcept nogil
    cdef int64_t _find_first(self, int64_t n) noexcept nogil
    cdef int64_t _find_node(self, int64_t node, int64_t lo, int64_t span,
                            int64_t start, int64_t n, int64_t* carry) noexcept nogil
    cdef int set_range(self, int64_t p, int64_t n) except -1 nogil
    cdef int clear_range(self, int64_t p, int64_t n) except -1 nogil
    cdef void _write_range(self, int64_t p, int64_t n, bint used) noexcept nogil
    cdef void _fix_span(self, int64_t w0, int64_t w1) noexcept nogil
    cdef int fix_words(self, int64_t* widx, int64_t k) except -1
    cdef int take_lowest(self, int64_t n, uint64_t* out, uint64_t base, int shift) except -1
    cdef void used_bytes(self, unsigned char* out) noexcept nogil
    cdef bint test(self, int64_t p) noexcept nogil
    cdef void mark(self, int64_t p, bint used) noexcept nogil
    cdef int64_t first_used(self, int64_t p, int64_t n) noexcept nogil
    cdef int64_t first_free(self, int64_t p, int64_t n) noexcept nogil
    cdef int64_t next_run(self, int64_t pos, int64_t* run_end) noexcept nogil
    cdef int64_t longest(self) noexcept nogil
