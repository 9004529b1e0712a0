# psv_limits.pxd: declarations of psv_limits.h, the integer limits and page
# geometry every kernel shares.
cdef extern from "psv_limits.h" nogil:
    unsigned long long PSV_U64_MAX
    enum:
        PSV_PAGE_SHIFT          # PSV_PAGE_SIZE == 1 << PSV_PAGE_SHIFT
        PSV_PAGE_SIZE
        PSV_PAGE_MASK           # PSV_PAGE_SIZE - 1
    unsigned long long PSV_FT_MAX_FRAMES    # frames of all regions of a FrameTable
    long long PSV_FT_MAX_PAGE_INDEX         # 0 <= page_index < PSV_FT_MAX_PAGE_INDEX
