# psv_bytes.pxd: declarations of psv_bytes.h, little-endian u32 / u64 loads
# and stores at any alignment (the byte order of every wire format here).
cdef extern from "psv_bytes.h" nogil:
    enum: PSV_LITTLE_ENDIAN
    void psv_store_le32(char *dst, unsigned int v) noexcept
    unsigned int psv_load_le32(const char *src) noexcept
    void psv_store_le64(char *dst, unsigned long long v) noexcept
    unsigned long long psv_load_le64(const char *src) noexcept
    void psv_store_le64_array(char *dst, const unsigned long long *src, Py_ssize_t n) noexcept
    void psv_load_le64_array(unsigned long long *dst, const char *src, Py_ssize_t n) noexcept
