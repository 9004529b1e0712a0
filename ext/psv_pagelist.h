/* psv_pagelist.h: the C kernels of OP-TEE non-contiguous page lists
 * (declared in pagelist.pxd; used by pagelist.pyx and smc_driver.pyx).
 *
 * A list page (4096 bytes) holds PSV_PL_ENTRIES (511) little-endian u64 page
 * addresses at byte 8*i, then one u64 `next` at byte PSV_PL_NEXT_OFFSET
 * (4088).  Pure functions of their arguments: no Python objects, no GIL needed. */
#ifndef PSV_PAGELIST_H
#define PSV_PAGELIST_H

#include <string.h>
#include "psv_bytes.h"

#define PSV_PL_ENTRIES 511
#define PSV_PL_NEXT_OFFSET 4088

/* OR of n host-order u64 values: the alignment check of a whole array in
   one pass (a value with any of the low 12 bits set shows in the OR). */
static inline unsigned long long psv_or_reduce(const unsigned long long *src, Py_ssize_t n) {
    unsigned long long a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    Py_ssize_t i = 0;
    for (; i + 4 <= n; i += 4) {
        a0 |= src[i]; a1 |= src[i + 1]; a2 |= src[i + 2]; a3 |= src[i + 3];
    }
    for (; i < n; i++) a0 |= src[i];
    return a0 | a1 | a2 | a3;
}

/* OR, minimum and maximum of n >= 1 host-order u64 values in one pass. */
static inline unsigned long long psv_or_min_max(const unsigned long long *src, Py_ssize_t n,
                                                unsigned long long *lo, unsigned long long *hi) {
    unsigned long long acc = 0, mn = src[0], mx = src[0], v;
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        v = src[i];
        acc |= v;
        mn = v < mn ? v : mn;
        mx = v > mx ? v : mx;
    }
    *lo = mn;
    *hi = mx;
    return acc;
}

/* The tail of list page dst (at page_pa) after its chunk entries: a full
   page gets next = page_pa + 4096 (the list pages are contiguous, as Linux's
   optee_fill_pages_list writes them); a partial one, the last, zeros in
   its unused slots and its next. */
static inline void psv_pl_close_page(char *dst, Py_ssize_t chunk, unsigned long long page_pa) {
    if (chunk == PSV_PL_ENTRIES) {
        psv_store_le64(dst + PSV_PL_NEXT_OFFSET, page_pa + 4096);
    } else {
        memset(dst + 8 * chunk, 0, 4096 - 8 * (size_t)chunk);
    }
}

/* Write the page list of entries[0:n] into dst (nlist * 4096 bytes,
   nlist = ceil(n / 511)) for list pages at list_pa, list_pa + 4096, ...
   (each closed by psv_pl_close_page).  Entries are not checked here. */
static inline void psv_fill_page_list(char *dst, const unsigned long long *entries,
                                      Py_ssize_t n, unsigned long long list_pa) {
    Py_ssize_t done = 0, chunk;
    unsigned long long page_pa = list_pa;
    while (done < n) {
        chunk = n - done < PSV_PL_ENTRIES ? n - done : PSV_PL_ENTRIES;
        psv_store_le64_array(dst, entries + done, chunk);
        psv_pl_close_page(dst, chunk, page_pa);
        done += chunk;
        dst += 4096;
        page_pa += 4096;
    }
}

/* psv_fill_page_list fused with the alignment check: copies the entries
   and returns the OR of all of them (a misaligned entry shows in the OR;
   the caller then discards dst).  Two bodies, both aiming at the speed of a
   plain memcpy of the same bytes (bench/test_bench_pagelist.py measures it):
   - x86-64 with AVX2 (chosen at run time): one fused load/OR/store pass.
     The same loop compiled for baseline SSE2 runs at memcpy speed or well
     below it depending on code placement, so it is not used.
   - elsewhere: per block of 64 entries, OR them (the block comes into L1)
     and then memcpy it. */
#define PSV_PL_BLOCK 64

static inline unsigned long long psv_fill_page_list_or_blocked(char *dst,
        const unsigned long long *entries, Py_ssize_t n, unsigned long long list_pa) {
    Py_ssize_t done = 0, chunk, i, b;
    unsigned long long page_pa = list_pa, acc = 0;
    while (done < n) {
        chunk = n - done < PSV_PL_ENTRIES ? n - done : PSV_PL_ENTRIES;
        for (i = 0; i < chunk; i += b) {
            b = chunk - i < PSV_PL_BLOCK ? chunk - i : PSV_PL_BLOCK;
            acc |= psv_or_reduce(entries + done + i, b);
            psv_store_le64_array(dst + 8 * i, entries + done + i, b);
        }
        psv_pl_close_page(dst, chunk, page_pa);
        done += chunk;
        dst += 4096;
        page_pa += 4096;
    }
    return acc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && PSV_LITTLE_ENDIAN
#define PSV_PL_HAVE_AVX2_PATH 1
__attribute__((target("avx2")))
static unsigned long long psv_fill_page_list_or_avx2(char *dst,
        const unsigned long long *entries, Py_ssize_t n, unsigned long long list_pa) {
    Py_ssize_t done = 0, chunk, i;
    unsigned long long page_pa = list_pa, acc = 0, v;
    while (done < n) {
        chunk = n - done < PSV_PL_ENTRIES ? n - done : PSV_PL_ENTRIES;
        for (i = 0; i < chunk; i++) {
            v = entries[done + i];
            acc |= v;
            memcpy(dst + 8 * i, &v, 8);
        }
        psv_pl_close_page(dst, chunk, page_pa);
        done += chunk;
        dst += 4096;
        page_pa += 4096;
    }
    return acc;
}
#else
#define PSV_PL_HAVE_AVX2_PATH 0
#endif

static inline unsigned long long psv_fill_page_list_or(char *dst,
        const unsigned long long *entries, Py_ssize_t n, unsigned long long list_pa) {
#if PSV_PL_HAVE_AVX2_PATH
    /* the answer never changes, so a racy first call only repeats it */
    static int have_avx2 = -1;
    if (have_avx2 < 0) have_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
    if (have_avx2) return psv_fill_page_list_or_avx2(dst, entries, n, list_pa);
#endif
    return psv_fill_page_list_or_blocked(dst, entries, n, list_pa);
}

#endif
