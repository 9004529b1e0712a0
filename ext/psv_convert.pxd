# psv_convert.pxd: declarations of psv_convert.h, an int-like object as a C
# u64 / i64 (1: in range; 0: an int out of range, no exception, the i64 form
# clamped; -1 with TypeError raised: not an int).  They need the GIL.  The
# argument converters of the extension (convert.pyx) are built on these.
cdef extern from "psv_convert.h":
    int psv_u64_from_obj(object o, unsigned long long *out) except -1
    int psv_i64_from_obj(object o, long long *out) except -1
