# convert.pxd: the result codes of arg_i64 (convert.pyx), the argument
# converter the allocators and the arena use.
cdef enum:
    ARG_FITS = 0       # the value is in *out
    ARG_ABOVE = 1      # the value is > INT64_MAX
    ARG_BELOW = 2      # the value is < INT64_MIN
