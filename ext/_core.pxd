# Declarations of poolsvc._core's typed fields, one twin per concern.
include "bitops.pxd"
include "freemap.pxd"
include "alloc.pxd"
include "tables.pxd"
include "pagelist.pxd"
include "copy.pxd"
include "smc.pxd"
include "wire.pxd"
