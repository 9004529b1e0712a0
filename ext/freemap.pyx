# freemap.pyx: FreeMap, the indexed free-run structure under RangeAllocator
# and FrameAllocator (fields and invariants in freemap.pxd).
#
# Owns: a bitmap of `nbits` units (1 = used) and a segment tree over its
# 64-bit words.  Each tree node keeps the free prefix, free suffix and longest
# free run of its span, so "lowest run of n free units at or after `start`"
# is answered in O(log N) and a range update costs O(n/64 + log N).
# The plain-Python twin is a bytearray plus bytearray.find (poolsvc/_pure/
# alloc.py); both give the addresses of a plain first-fit scan.
#
# Concurrency: a FreeMap is owned by one allocator and used by one thread at a
# time (the GIL is held by callers; the primitives themselves are nogil and
# touch nothing but this object's own arrays).
#
# Error style: primitives whose preconditions the callers establish are
# `noexcept`; the range writers check bounds anyway and raise InternalError
# (return -1) if a caller broke them -- that is a bug, not bad input.
cimport cython
from libc.stdlib cimport malloc, calloc, free as c_free, qsort
from libc.string cimport memset
from libc.stdint cimport uint64_t, int64_t, int32_t


cdef inline int32_t _max3(int32_t a, int32_t b, int32_t c) noexcept nogil:
    if b > a:
        a = b
    if c > a:
        a = c
    return a


cdef inline int32_t _longest_ones(uint64_t x) noexcept nogil:
    """Longest run of consecutive 1 bits in x, for x != ~0 (so < 64).

    a_k has bit i set iff bits i..i+k-1 of x are all set; a binary search
    over the run length then needs six shift-ands and six probes.
    """
    cdef uint64_t a1 = x
    cdef uint64_t a2 = a1 & (a1 >> 1)
    cdef uint64_t a4 = a2 & (a2 >> 2)
    cdef uint64_t a8 = a4 & (a4 >> 4)
    cdef uint64_t a16 = a8 & (a8 >> 8)
    cdef uint64_t a32 = a16 & (a16 >> 16)
    cdef uint64_t cur, t
    cdef int32_t run = 0
    if x == 0:
        return 0
    # cur == positions where a run of length >= run starts (never empty)
    cur = a1
    run = 1
    t = cur & (a32 >> run)
    if t:
        cur = t
        run += 32
    t = cur & (a16 >> run)
    if t:
        cur = t
        run += 16
    t = cur & (a8 >> run)
    if t:
        cur = t
        run += 8
    t = cur & (a4 >> run)
    if t:
        cur = t
        run += 4
    t = cur & (a2 >> run)
    if t:
        cur = t
        run += 2
    t = cur & (a1 >> run)
    if t:
        run += 1
    return run


cdef inline void _leaf_of(fm_node* out, uint64_t w) noexcept nogil:
    """Describe one bitmap word (1 = used) as a tree leaf."""
    if w == 0:
        out.pref = 64
        out.suf = 64
        out.mx = 64
    elif w == <uint64_t>0xFFFFFFFFFFFFFFFF:
        out.pref = 0
        out.suf = 0
        out.mx = 0
    else:
        out.pref = poolsvc_ctz64(w)
        out.suf = poolsvc_clz64(w)
        out.mx = _longest_ones(~w)


cdef inline void _combine(fm_node* out, const fm_node* l, const fm_node* r,
                          int32_t half) noexcept nogil:
    """out = the node over two adjacent children of span `half` each."""
    out.pref = l.pref + r.pref if l.pref == half else l.pref
    out.suf = r.suf + l.suf if r.suf == half else r.suf
    out.mx = _max3(l.mx, r.mx, l.suf + r.pref)


cdef inline bint _node_eq(const fm_node* a, const fm_node* b) noexcept nogil:
    return a.pref == b.pref and a.suf == b.suf and a.mx == b.mx


cdef inline uint64_t _run_starts(uint64_t freebits, int64_t n) noexcept nogil:
    """Bit i of the result is set iff bits i..i+n-1 of freebits are all set.

    1 <= n <= 64.  The shift-and doubling trick: after the loop `have` bits
    are covered, doubling each step until n (log2(n) steps).
    """
    cdef uint64_t m = freebits
    cdef int64_t have = 1, step
    while have < n and m:
        step = have if have <= n - have else n - have
        m &= m >> step
        have += step
    return m


cdef int _cmp_i64(const void* a, const void* b) noexcept nogil:
    cdef int64_t x = (<const int64_t*>a)[0]
    cdef int64_t y = (<const int64_t*>b)[0]
    return (x > y) - (x < y)


@cython.final
@cython.auto_pickle(False)
cdef class FreeMap:
    """Bitmap of `nbits` units plus a tree of free runs (internal).

    Parameters: nbits -- number of units, 1 <= nbits <= FM_MAX_BITS.
    Starts with every unit free.
    """

    def __cinit__(self, int64_t nbits):
        cdef int64_t w, i
        cdef int32_t half
        cdef int level
        self.words = NULL
        self.tree = NULL
        if nbits < 1 or nbits > FM_MAX_BITS:
            raise InternalError(f"freemap size {nbits} outside 1..{FM_MAX_BITS}")
        self.nbits = nbits
        self.nwords = (nbits + 63) >> 6
        self.depth = 0
        while (<int64_t>1 << self.depth) < self.nwords:
            self.depth += 1
        self.nleaves = <int64_t>1 << self.depth
        self.words = <uint64_t*>calloc(<size_t>self.nwords, sizeof(uint64_t))
        self.tree = <fm_node*>calloc(<size_t>(2 * self.nleaves), sizeof(fm_node))
        if self.words == NULL or self.tree == NULL:
            raise MemoryError()
        if nbits & 63:
            # the units past nbits are permanently used
            self.words[self.nwords - 1] = (<uint64_t>0xFFFFFFFFFFFFFFFF) << (nbits & 63)
        self.nfree = nbits
        for w in range(self.nwords):
            _leaf_of(&self.tree[self.nleaves + w], self.words[w])
        # padding leaves stay {0, 0, 0} (used) from calloc
        half = 64
        for level in range(self.depth):
            for i in range(self.nleaves >> (level + 1), self.nleaves >> level):
                _combine(&self.tree[i], &self.tree[2 * i], &self.tree[2 * i + 1], half)
            half <<= 1

    def __dealloc__(self):
        c_free(self.words)
        c_free(self.tree)

    # ---- queries -----------------------------------------------------------

    cdef int64_t find(self, int64_t n, int64_t start) noexcept nogil:
        """Lowest p >= start with units [p, p+n) all free, or -1.  n >= 1.

        O(log N): walks the tree left to right over the nodes at or after
        `start`, carrying the length of the free run that ends where the
        current node begins (counting only units >= start), and descends
        only into the node where a fitting run must begin.
        """
        cdef int64_t carry = 0
        if start < 0:
            start = 0
        if n < 1:
            n = 1
        if start >= self.nbits or n > self.nbits - start or self.tree[1].mx < n:
            return -1
        if start == 0:
            return self._find_first(n)
        return self._find_node(1, 0, <int64_t>64 << self.depth, start, n, &carry)

    cdef int64_t _find_first(self, int64_t n) noexcept nogil:
        """find(n, 0) as one root-to-leaf descent; requires tree[1].mx >= n.

        Invariant at node i over [lo, lo+span): the lowest fit lies wholly
        inside the span, and `carry` (the free run ending at lo) plus the
        node's prefix is < n.  Go left if the left child holds a fit; else
        a fit may straddle the middle; else it lies wholly in the right child.
        """
        cdef int64_t node = 1, lo = 0, carry = 0
        cdef int64_t half = (<int64_t>64 << self.depth) >> 1
        cdef const fm_node* left
        cdef const fm_node* right
        if self.tree[1].pref >= n:
            return 0
        while node < self.nleaves:
            left = &self.tree[2 * node]
            right = &self.tree[2 * node + 1]
            if left.mx >= n:
                node = 2 * node
            else:
                carry = carry + half if left.pref == half else left.suf
                if carry + right.pref >= n:
                    return lo + half - carry
                node = 2 * node + 1
                lo += half
            half >>= 1
        return lo + poolsvc_ctz64(_run_starts(~self.words[node - self.nleaves], n))

    cdef int64_t _find_node(self, int64_t node, int64_t lo, int64_t span,
                            int64_t start, int64_t n, int64_t* carry) noexcept nogil:
        """find() restricted to node's span [lo, lo+span); see find()."""
        cdef fm_node* t
        cdef uint64_t freebits, m
        cdef int64_t r, half
        if lo + span <= start:
            return -1                         # wholly before start: carry stays 0
        t = &self.tree[node]
        if lo >= start:
            if carry[0] + t.pref >= n:
                return lo - carry[0]          # the carried run, extended by pref
            if t.mx < n:
                # no run starts in here; only the suffix can carry onwards
                if t.pref == span:
                    carry[0] += span
                else:
                    carry[0] = t.suf
                return -1
            if node >= self.nleaves:
                # a run of n <= 64 lies inside this word; the lowest one wins
                m = _run_starts(~self.words[node - self.nleaves], n)
                return lo + poolsvc_ctz64(m)
        elif node >= self.nleaves:
            # the leaf holding `start`: units below start count as used
            freebits = ~self.words[node - self.nleaves] & \
                ((<uint64_t>0xFFFFFFFFFFFFFFFF) << (start - lo))
            if n <= 64:
                m = _run_starts(freebits, n)
                if m:
                    return lo + poolsvc_ctz64(m)
            carry[0] = poolsvc_clz64(~freebits)
            return -1
        half = span >> 1
        r = self._find_node(2 * node, lo, half, start, n, carry)
        if r >= 0:
            return r
        return self._find_node(2 * node + 1, lo + half, half, start, n, carry)

    cdef bint test(self, int64_t p) noexcept nogil:
        """True if unit p (0 <= p < nbits) is used."""
        return (self.words[p >> 6] >> (p & 63)) & 1

    cdef int64_t first_used(self, int64_t p, int64_t n) noexcept nogil:
        """Lowest used unit in [p, p+n), or -1.  0 <= p, p + n <= nbits."""
        cdef int64_t end = p + n, w = p >> 6, q
        cdef uint64_t x
        if n <= 0:
            return -1
        x = self.words[w] & ((<uint64_t>0xFFFFFFFFFFFFFFFF) << (p & 63))
        while True:
            if x:
                q = (w << 6) + poolsvc_ctz64(x)
                return q if q < end else -1
            w += 1
            if (w << 6) >= end:
                return -1
            x = self.words[w]

    cdef int64_t first_free(self, int64_t p, int64_t n) noexcept nogil:
        """Lowest free unit in [p, p+n), or -1.  0 <= p, p + n <= nbits."""
        cdef int64_t end = p + n, w = p >> 6, q
        cdef uint64_t x
        if n <= 0:
            return -1
        x = ~self.words[w] & ((<uint64_t>0xFFFFFFFFFFFFFFFF) << (p & 63))
        while True:
            if x:
                q = (w << 6) + poolsvc_ctz64(x)
                return q if q < end else -1
            w += 1
            if (w << 6) >= end:
                return -1
            x = ~self.words[w]

    cdef int64_t next_run(self, int64_t pos, int64_t* run_end) noexcept nogil:
        """Start of the first maximal free run that begins at or after pos.

        Returns -1 if there is none; else sets run_end[0] to the end of that
        run (exclusive).  Iterate with pos = run_end.  O(log N + run/64).
        """
        cdef int64_t s = self.find(1, pos), e
        if s < 0:
            return -1
        e = self.first_used(s, self.nbits - s)
        run_end[0] = self.nbits if e < 0 else e
        return s

    cdef int64_t longest(self) noexcept nogil:
        """Length of the longest free run."""
        return self.tree[1].mx

    # ---- updates -----------------------------------------------------------

    cdef void _write_range(self, int64_t p, int64_t n, bint used) noexcept nogil:
        """Set (used) or clear the bits [p, p+n) of the words; no tree work.

        Precondition: the bits are all clear (used) or all set (not used).
        """
        cdef int64_t w = p >> 6, wend = (p + n - 1) >> 6
        cdef uint64_t mask
        cdef int first = <int>(p & 63)
        cdef int last = <int>((p + n - 1) & 63)
        while w <= wend:
            mask = <uint64_t>0xFFFFFFFFFFFFFFFF
            if w == (p >> 6):
                mask &= (<uint64_t>0xFFFFFFFFFFFFFFFF) << first
            if w == wend:
                mask &= (<uint64_t>0xFFFFFFFFFFFFFFFF) >> (63 - last)
            if used:
                self.words[w] |= mask
            else:
                self.words[w] &= ~mask
            w += 1
        # the callers' precondition (the range was all free / all used) makes
        # the count exact without a popcount per word; check() verifies it
        if used:
            self.nfree -= n
        else:
            self.nfree += n

    cdef void _fix_span(self, int64_t w0, int64_t w1) noexcept nogil:
        """Recompute the leaves of words w0..w1 and their ancestors.

        Level by level; stops early once a whole level comes out unchanged
        (then nothing above it can change).
        """
        cdef int64_t lo = self.nleaves + w0, hi = self.nleaves + w1, i
        cdef int32_t half = 64
        cdef bint changed = False
        cdef fm_node nd
        cdef fm_node* tree = self.tree
        if w0 == w1:
            # one word (the common case): walk its path, stop at the first
            # node that comes out unchanged
            i = lo
            _leaf_of(&nd, self.words[w0])
            while not _node_eq(&nd, &tree[i]):
                tree[i] = nd
                if i == 1:
                    return
                i >>= 1
                _combine(&nd, &tree[2 * i], &tree[2 * i + 1], half)
                half <<= 1
            return
        for i in range(lo, hi + 1):
            _leaf_of(&nd, self.words[i - self.nleaves])
            if not _node_eq(&nd, &self.tree[i]):
                self.tree[i] = nd
                changed = True
        while changed and lo > 1:
            lo >>= 1
            hi >>= 1
            changed = False
            for i in range(lo, hi + 1):
                _combine(&nd, &self.tree[2 * i], &self.tree[2 * i + 1], half)
                if not _node_eq(&nd, &self.tree[i]):
                    self.tree[i] = nd
                    changed = True
            half <<= 1

    cdef int fix_words(self, int64_t* widx, int64_t k) except -1:
        """Recompute the tree after mark() changed the words listed in widx.

        widx holds k word indices in any order, duplicates allowed; it is
        sorted and overwritten.  Works level by level on the set of nodes
        that changed, so it costs O(k log N) at worst and usually far less.
        """
        cdef int64_t i, j, m, node, w, prev
        cdef int32_t half = 64
        cdef fm_node nd
        if k <= 0:
            return 0
        qsort(widx, <size_t>k, sizeof(int64_t), _cmp_i64)
        # leaves: keep (deduplicated) only those whose description changed
        m = 0
        prev = -1
        for i in range(k):
            w = widx[i]
            if w == prev:
                continue
            prev = w
            node = self.nleaves + w
            _leaf_of(&nd, self.words[w])
            if not _node_eq(&nd, &self.tree[node]):
                self.tree[node] = nd
                widx[m] = node
                m += 1
        while m > 0 and widx[0] > 1:
            j = 0
            for i in range(m):
                node = widx[i] >> 1
                if j > 0 and widx[j - 1] == node:
                    continue
                _combine(&nd, &self.tree[2 * node], &self.tree[2 * node + 1], half)
                if not _node_eq(&nd, &self.tree[node]):
                    self.tree[node] = nd
                    widx[j] = node
                    j += 1
            m = j
            half <<= 1
        return 0

    cdef int take_lowest(self, int64_t n, uint64_t* out, uint64_t base, int shift) except -1:
        """Mark the n lowest free units used (0 < n <= nfree) and write
        base + (unit << shift) for each into out[0:n], ascending.

        Word by word: O(n + touched words * log N).
        """
        cdef int64_t k = 0, pos = 0, p, w, nw = 0, bit
        cdef uint64_t x, taken
        cdef int64_t* widx = <int64_t*>malloc(<size_t>n * sizeof(int64_t))
        if widx == NULL:
            raise MemoryError()
        try:
            while k < n:
                # skip used regions through the tree: it is stale for the
                # words taken so far, but find(1, pos) reads only nodes that
                # lie wholly at or after pos, and those are untouched
                p = self.find(1, pos)
                if p < 0:
                    raise InternalError("free unit count disagrees with the bitmap")
                w = p >> 6
                x = ~self.words[w] & ((<uint64_t>0xFFFFFFFFFFFFFFFF) << (p & 63))
                taken = 0
                while x and k < n:
                    bit = poolsvc_ctz64(x)
                    taken |= (<uint64_t>1) << bit
                    x &= x - 1
                    out[k] = base + ((<uint64_t>((w << 6) + bit)) << shift)
                    k += 1
                self.words[w] |= taken
                self.nfree -= poolsvc_popcount64(taken)
                widx[nw] = w
                nw += 1
                pos = (w + 1) << 6
            self.fix_words(widx, nw)
        finally:
            c_free(widx)
        return 0

    cdef void used_bytes(self, unsigned char* out) noexcept nogil:
        """out[0:nbits]: 1 where the unit is used, else 0."""
        cdef int64_t i
        for i in range(self.nbits):
            out[i] = (self.words[i >> 6] >> (i & 63)) & 1

    cdef void mark(self, int64_t p, bint used) noexcept nogil:
        """Set or clear one unit's bit (0 <= p < nbits) without fixing the tree.

        Callers batch these and then call fix_words() on the touched words.
        """
        cdef uint64_t bit = (<uint64_t>1) << (p & 63)
        cdef uint64_t old = self.words[p >> 6]
        if used:
            if not (old & bit):
                self.nfree -= 1
            self.words[p >> 6] = old | bit
        else:
            if old & bit:
                self.nfree += 1
            self.words[p >> 6] = old & ~bit

    cdef int set_range(self, int64_t p, int64_t n) except -1 nogil:
        """Mark units [p, p+n), all free, used and update the tree.
        O(n/64 + log N).

        Errors: InternalError if the range is empty or leaves [0, nbits).
        """
        if n < 1 or p < 0 or p > self.nbits - n:
            with gil:
                raise InternalError(f"freemap set_range({p}, {n}) outside 0..{self.nbits}")
        self._write_range(p, n, True)
        self._fix_span(p >> 6, (p + n - 1) >> 6)
        return 0

    cdef int clear_range(self, int64_t p, int64_t n) except -1 nogil:
        """Mark units [p, p+n), all used, free and update the tree.
        O(n/64 + log N).

        Errors: InternalError if the range is empty or leaves [0, nbits).
        """
        if n < 1 or p < 0 or p > self.nbits - n:
            with gil:
                raise InternalError(f"freemap clear_range({p}, {n}) outside 0..{self.nbits}")
        self._write_range(p, n, False)
        self._fix_span(p >> 6, (p + n - 1) >> 6)
        return 0

    # ---- self-check (tests) ------------------------------------------------

    def check(self):
        """Recompute every node and the free count from the words.

        Returns None.  Errors: CorruptionError naming the first node that
        disagrees (a bug in this file).
        """
        cdef int64_t i, w, nfree = 0
        cdef int32_t half
        cdef int level
        cdef fm_node nd
        cdef uint64_t tail
        for w in range(self.nwords):
            nfree += 64 - poolsvc_popcount64(self.words[w])
            _leaf_of(&nd, self.words[w])
            if not _node_eq(&nd, &self.tree[self.nleaves + w]):
                raise CorruptionError(f"freemap leaf of word {w} is stale")
        for i in range(self.nleaves + self.nwords, 2 * self.nleaves):
            if self.tree[i].mx != 0 or self.tree[i].pref != 0 or self.tree[i].suf != 0:
                raise CorruptionError(f"freemap padding leaf {i} is not used")
        if self.nbits & 63:
            tail = (<uint64_t>0xFFFFFFFFFFFFFFFF) << (self.nbits & 63)
            if (self.words[self.nwords - 1] & tail) != tail:
                raise CorruptionError("freemap tail bits past nbits are not used")
        if nfree != self.nfree:
            raise CorruptionError(f"freemap free count {self.nfree} != {nfree}")
        half = 64
        for level in range(self.depth):
            for i in range(self.nleaves >> (level + 1), self.nleaves >> level):
                _combine(&nd, &self.tree[2 * i], &self.tree[2 * i + 1], half)
                if not _node_eq(&nd, &self.tree[i]):
                    raise CorruptionError(f"freemap node {i} is stale")
            half <<= 1
