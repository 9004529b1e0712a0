/* psv_limits.h: the integer limits and page geometry every kernel of
 * poolsvc._core shares (declared for Cython in psv_limits.pxd). */
#ifndef PSV_LIMITS_H
#define PSV_LIMITS_H

#define PSV_U64_MAX 0xffffffffffffffffULL

/* A physical page: PSV_PAGE_SIZE == 1 << PSV_PAGE_SHIFT == PSV_PAGE_MASK + 1. */
#define PSV_PAGE_SHIFT 12
#define PSV_PAGE_SIZE 4096
#define PSV_PAGE_MASK 4095

/* FrameTable: frames covered by all regions together <= PSV_FT_MAX_FRAMES;
   page indexes 0 <= page_index < PSV_FT_MAX_PAGE_INDEX, so index * 4096 fits an int64. */
#define PSV_FT_MAX_FRAMES (1ULL << 24)
#define PSV_FT_MAX_PAGE_INDEX (1LL << 51)

#endif
