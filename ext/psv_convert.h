/* psv_convert.h: a Python int-like object as a C u64 / i64 without raising
 * OverflowError, so that every caller reports an out-of-range value with the
 * error its contract names (declared in psv_convert.pxd; the Cython-level
 * argument converters built on these are in convert.pyx).  They hold the GIL. */
#ifndef PSV_CONVERT_H
#define PSV_CONVERT_H

#include <Python.h>

/* An int-like object as a u64.
   1: it is an int in [0, 2**64), stored in *out;
   0: it is an int outside that range (no exception set);
  -1: it is not an int (TypeError set by PyNumber_Index). */
static inline int psv_u64_from_obj(PyObject *o, unsigned long long *out) {
    unsigned long long v;
    PyObject *idx;
    if (PyLong_CheckExact(o)) {
        v = PyLong_AsUnsignedLongLong(o);
        if (v == (unsigned long long)-1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
            PyErr_Clear();
            return 0;
        }
        *out = v;
        return 1;
    }
    idx = PyNumber_Index(o);
    if (idx == NULL) return -1;
    v = PyLong_AsUnsignedLongLong(idx);
    Py_DECREF(idx);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
        PyErr_Clear();
        return 0;
    }
    *out = v;
    return 1;
}

/* The same for a signed 64-bit value: 1 in range; 0 outside, with *out
   clamped to INT64_MIN or INT64_MAX by the sign; -1 not an int. */
static inline int psv_i64_from_obj(PyObject *o, long long *out) {
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && !overflow && PyErr_Occurred()) return -1;
    if (overflow) {
        *out = overflow > 0 ? 0x7fffffffffffffffLL : (-0x7fffffffffffffffLL - 1);
        return 0;
    }
    *out = v;
    return 1;
}

#endif
