# Where Cython looks for the declarations of the module `poolsvc._core`.
#
# setup.py builds ext/_core.pyx as the extension "poolsvc._core", and Cython
# finds a module's .pxd by its qualified name ("poolsvc/_core.pxd" on the
# include path, which is ext/), not by the .pyx file's basename -- so
# ext/_core.pxd alone is never read and every typed field declared in the
# per-concern .pxd files is missing.  This file forwards to it.
include "../_core.pxd"
