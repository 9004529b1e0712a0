/* psv_bytes.h: little-endian u32 / u64 loads and stores at any alignment,
 * singly and as arrays (declared in psv_bytes.pxd).  The wire formats of
 * poolsvc (OP-TEE messages, page lists, batch frames) are little-endian. */
#ifndef PSV_BYTES_H
#define PSV_BYTES_H

#include <string.h>
#include <Python.h>

/* Host byte order, fixed at compile time; on little-endian hosts the array
   forms are a plain memcpy. */
#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) && \
    __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define PSV_LITTLE_ENDIAN 1
#elif defined(__BYTE_ORDER__) && defined(__ORDER_BIG_ENDIAN__) && \
    __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define PSV_LITTLE_ENDIAN 0
#else
#error "poolsvc: cannot tell the host byte order"
#endif

static inline void psv_store_le32(char *dst, unsigned int v) {
#if !PSV_LITTLE_ENDIAN
    v = __builtin_bswap32(v);
#endif
    memcpy(dst, &v, 4);
}

static inline unsigned int psv_load_le32(const char *src) {
    unsigned int v;
    memcpy(&v, src, 4);
#if !PSV_LITTLE_ENDIAN
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline void psv_store_le64(char *dst, unsigned long long v) {
#if !PSV_LITTLE_ENDIAN
    v = __builtin_bswap64(v);
#endif
    memcpy(dst, &v, 8);
}

static inline unsigned long long psv_load_le64(const char *src) {
    unsigned long long v;
    memcpy(&v, src, 8);
#if !PSV_LITTLE_ENDIAN
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* n host-order u64 values from src as little-endian bytes at dst. */
static inline void psv_store_le64_array(char *dst, const unsigned long long *src, Py_ssize_t n) {
#if PSV_LITTLE_ENDIAN
    memcpy(dst, src, (size_t)n * 8);
#else
    Py_ssize_t i;
    for (i = 0; i < n; i++) psv_store_le64(dst + 8 * i, src[i]);
#endif
}

/* n little-endian u64 values at src into host order at dst. */
static inline void psv_load_le64_array(unsigned long long *dst, const char *src, Py_ssize_t n) {
#if PSV_LITTLE_ENDIAN
    memcpy(dst, src, (size_t)n * 8);
#else
    Py_ssize_t i;
    for (i = 0; i < n; i++) dst[i] = psv_load_le64(src + 8 * i);
#endif
}

#endif
