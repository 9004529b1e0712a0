# psv_clock.pxd: declaration of psv_clock.h, seconds of the monotonic clock.
cdef extern from "psv_clock.h" nogil:
    double psv_monotonic() noexcept
