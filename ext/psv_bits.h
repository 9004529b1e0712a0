/* psv_bits.h: bit scans of a u64 word (declared in psv_bits.pxd).
 * ctz / clz give 64 for a zero word. */
#ifndef PSV_BITS_H
#define PSV_BITS_H

static inline int poolsvc_ctz64(unsigned long long x) { return x ? __builtin_ctzll(x) : 64; }
static inline int poolsvc_clz64(unsigned long long x) { return x ? __builtin_clzll(x) : 64; }
static inline int poolsvc_popcount64(unsigned long long x) { return __builtin_popcountll(x); }

#endif
