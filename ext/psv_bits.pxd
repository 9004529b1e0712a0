# psv_bits.pxd: declarations of psv_bits.h, the bit scans of a u64 word
# (ctz / clz of 0 are 64).
cdef extern from "psv_bits.h" nogil:
    int poolsvc_ctz64(unsigned long long x) noexcept
    int poolsvc_clz64(unsigned long long x) noexcept
    int poolsvc_popcount64(unsigned long long x) noexcept
