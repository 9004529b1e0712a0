# convert.pyx: the argument converters of the whole extension, in one place;
# included first, so that every later file uses them instead of its own copy.
#
# Owns: Python arguments -> C values and the error each contract names for a
# bad one (docs/core.md).  The C primitives under them (an int-like object as
# a u64 / i64 without OverflowError) are in psv_convert.h.  One converter per
# contract style, so each kernel keeps the messages and error classes it has:
#
#   arg_i64        int64 with a three-way answer (fits / above / below) and
#                  BadParameters for a non-int: the allocators and the arena
#   clamp_i64      int64 clamped to its range, TypeError for a non-int: the
#                  tables, page lists and copies (their range checks follow)
#   try_u64        u64 or "no" (0), never raising: the message-call kernels
#   try_in_range   an int in [lo, hi] or "no" (0), never raising
#   arg_u64        u64 or BadParameters("<what> ... is not a u64")
#   as_int         operator.index with BadParameters for a non-int
#   as_int_pairs   (base, size) pairs of ints, BadParameters otherwise
#   as_page_array  a 1-D C-contiguous native uint64 array; values are cast as
#                  numpy casts them (a negative int64 becomes a huge address)
#   as_page_array_nonneg  the same, refusing negative entries with BadParameters
#   hex_of         an integer in hex for a message
#
# Concurrency: pure functions of their arguments; they hold the GIL.
from cpython.long cimport PyLong_Check, PyLong_AsLongLongAndOverflow
from libc.stdint cimport uint64_t, int64_t, INT64_MAX

import operator as _operator
import numpy as np

# Every address an allocator hands out or accepts is below this bound, so that
# every address, size and unit index fits an int64.
cdef int64_t ADDR_LIMIT = INT64_MAX

# 2**64: the end of the 64-bit physical address space.
cdef object U64_LIMIT = 1 << 64


cdef object as_int(object value, str what):
    """operator.index(value), with a non-integer reported as BadParameters."""
    try:
        return _operator.index(value)
    except TypeError:
        raise BadParameters(
            f"{what} must be an int, got {type(value).__name__}") from None


cdef inline int arg_i64(object value, int64_t* out, str what) except -1:
    """Convert a Python integer for C use.

    Returns ARG_FITS (value stored in out[0]), ARG_ABOVE or ARG_BELOW.
    Errors: BadParameters if value is not an integer (no __index__).
    """
    cdef int overflow = 0
    cdef long long x
    if not PyLong_Check(value):
        value = as_int(value, what)
    x = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow > 0:
        return ARG_ABOVE
    if overflow < 0:
        return ARG_BELOW
    out[0] = x
    return ARG_FITS


cdef inline int64_t clamp_i64(object value) except? -1:
    """An int argument clamped to int64 (TypeError for a non-int)."""
    cdef long long v = 0
    psv_i64_from_obj(value, &v)
    return v


cdef int try_u64(object value, unsigned long long *out) except -1:
    """1 if ``value`` is an int (``__index__``) in [0, 2**64), stored in ``*out``; else 0."""
    try:
        return psv_u64_from_obj(value, out)
    except TypeError:
        return 0


cdef int try_in_range(object value, long long lo, long long hi, long long *out) except -1:
    """1 if ``value`` is an int in [lo, hi], stored in ``*out``; else 0."""
    try:
        if psv_i64_from_obj(value, out) != 1:
            return 0
    except TypeError:
        return 0
    return lo <= out[0] <= hi


cdef inline uint64_t arg_u64(object value, str what) except? 0:
    """``value`` as a u64; BadParameters naming ``what`` if it is not one."""
    cdef unsigned long long v = 0
    if try_u64(value, &v) != 1:
        raise BadParameters(f"{what} {value!r} is not a u64")
    return v


cdef list as_int_pairs(object pairs, str what):
    """``pairs`` as a list of ``(int, int)``; BadParameters(``what``: the reason) otherwise."""
    try:
        return [(int(b.__index__()), int(s.__index__())) for b, s in pairs]
    except (TypeError, ValueError, AttributeError) as exc:
        raise BadParameters(f"{what}: {exc}") from None


cdef object hex_of(object value):
    """value in hex for an error message (value is known to be an integer)."""
    return f"{_operator.index(value):#x}"


cdef object _as_page_array_slow(object pages, str what):
    try:
        arr = np.asarray(pages, dtype=np.uint64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadParameters(f"{what} is not convertible to uint64: {exc}") from None
    if arr.ndim != 1:
        raise BadParameters(f"{what} must be 1-D, got {arr.ndim} dimensions")
    return np.ascontiguousarray(arr)


cdef inline cnp.ndarray as_page_array(object pages, str what):
    """``pages`` as a 1-D C-contiguous native uint64 array (no copy if it is one).

    BadParameters if it cannot be converted or is not 1-D.
    """
    cdef cnp.ndarray arr
    if cnp.PyArray_Check(pages):
        arr = <cnp.ndarray>pages
        if (cnp.PyArray_NDIM(arr) == 1 and cnp.PyArray_TYPE(arr) == cnp.NPY_UINT64
                and cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISNOTSWAPPED(arr)):
            return arr
    return <cnp.ndarray>_as_page_array_slow(pages, what)


cdef object as_page_array_nonneg(object pages):
    """pages as a 1-D C-contiguous uint64 array (no copy if already one).

    Errors: BadParameters if pages is not 1-D or holds anything other than
    non-negative integers below 2**64.
    """
    if isinstance(pages, np.ndarray) and pages.dtype == np.uint64 and pages.ndim == 1:
        return np.ascontiguousarray(pages)
    try:
        arr = np.asarray(pages)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadParameters(f"pages is not an array of page addresses: {exc}") from None
    if arr.ndim != 1:
        raise BadParameters(f"pages must be 1-D, got {arr.ndim} dimensions")
    if arr.size == 0:
        return np.empty(0, dtype=np.uint64)
    if arr.dtype.kind == "i":
        if (arr < 0).any():
            raise BadParameters(f"pages holds a negative address: {int(arr.min())}")
    elif arr.dtype.kind != "u":
        raise BadParameters(f"pages must hold integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.uint64)
