"""Build script for poolsvc's compiled core.

The core is one extension, ``poolsvc._core``, built from ``ext/_core.pyx``,
which textually includes one ``.pyx`` per concern (allocators, tables, page
lists, copies); ``ext/_core.pxd`` includes their ``.pxd`` twins.  A second,
small one, ``poolsvc._sigguard`` (``ext/guard/sigguard.c``), is the SIGBUS guard over
registered client memory, which both backends use.

Environment switches:
  POOLSVC_DEBUG=1   build with C assertions, Cython bounds/wraparound checks
                    and ``-O0 -g`` (slow; for chasing memory errors).
"""
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("POOLSVC_DEBUG", "") not in ("", "0")

compile_args = ["-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unused-function",
                "-Wno-missing-field-initializers", "-Wno-cast-function-type"]
macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
directives = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}
if DEBUG:
    compile_args += ["-O0", "-g", "-UNDEBUG"]
    macros.append(("POOLSVC_DEBUG", "1"))
else:
    compile_args += ["-O3"]

extensions = [
    Extension(
        "poolsvc._core",
        ["ext/_core.pyx"],
        include_dirs=[numpy.get_include(), "ext"],
        define_macros=macros,
        extra_compile_args=compile_args,
    )
]
# The SIGBUS guard over registered client memory: plain C, a module of its own
# so that both backends use it (ext/guard/sigguard.c says why).
guard = Extension("poolsvc._sigguard", ["ext/guard/sigguard.c"], extra_compile_args=compile_args)

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        compile_time_env={"POOLSVC_DEBUG": DEBUG},
        include_path=["ext"],
    ) + [guard],
)
