# Declarations of poolsvc._core, included in dependency order: the C headers'
# declarations (psv_*.pxd, one per ext/psv_*.h), the converters' result codes,
# then one .pxd per concern with its type's typed fields, invariants and the
# inline helpers it offers the others.
include "psv_limits.pxd"
include "psv_bits.pxd"
include "psv_bytes.pxd"
include "psv_clock.pxd"
include "psv_convert.pxd"
include "convert.pxd"
include "freemap.pxd"
include "rangealloc.pxd"
include "framealloc.pxd"
include "frametable.pxd"
include "idtable.pxd"
include "addressmap.pxd"
include "arena.pxd"
include "userpages.pxd"
include "pagelist.pxd"
include "copy.pxd"
include "smc.pxd"
include "smc_entry.pxd"
include "smc_driver.pxd"
include "wire.pxd"
