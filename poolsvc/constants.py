"""Constants of the Linux TEE subsystem, OP-TEE's message ABI and GlobalPlatform.

These are facts of the interfaces poolsvc models (``include/linux/tee_core.h``,
``drivers/tee/optee/optee_msg.h``, ``optee_smc.h``, the GP TEE Client API); the
names follow the originals without their prefixes where that stays clear.
"""
from __future__ import annotations

from enum import IntEnum, IntFlag

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT  # 4096
PAGE_MASK = PAGE_SIZE - 1

#: u64 entries per OP-TEE non-contiguous list page; the 512th slot holds ``next``.
PAGELIST_ENTRIES_PER_PAGE = PAGE_SIZE // 8 - 1  # 511


class ShmFlags(IntFlag):
    """``TEE_SHM_*`` flags of ``struct tee_shm``."""

    DYNAMIC = 1 << 0      # dynamic shared memory, registered with the TEE
    USER_MAPPED = 1 << 1  # backed by user space pages
    POOL = 1 << 2         # allocated from a pool
    PRIV = 1 << 3         # private to the driver, never registered


class SecCaps(IntFlag):
    """``OPTEE_SMC_SEC_CAP_*`` bits the secure world reports."""

    HAVE_RESERVED_SHM = 1 << 0
    UNREGISTERED_SHM = 1 << 1
    DYNAMIC_SHM = 1 << 2
    MEMREF_NULL = 1 << 4
    RPC_ARG = 1 << 6


class GenCaps(IntFlag):
    """``TEE_GEN_CAP_*`` bits of the generic driver."""

    GP = 1 << 0
    PRIVILEGED = 1 << 1
    REG_MEM = 1 << 2
    MEMREF_NULL = 1 << 3


class MsgCmd(IntEnum):
    """``OPTEE_MSG_CMD_*``."""

    OPEN_SESSION = 0
    INVOKE_COMMAND = 1
    CLOSE_SESSION = 2
    CANCEL = 3
    REGISTER_SHM = 4
    UNREGISTER_SHM = 5


class Attr(IntEnum):
    """``OPTEE_MSG_ATTR_TYPE_*`` (the low byte of a parameter's ``attr``)."""

    NONE = 0x0
    VALUE_INPUT = 0x1
    VALUE_OUTPUT = 0x2
    VALUE_INOUT = 0x3
    RMEM_INPUT = 0x5
    RMEM_OUTPUT = 0x6
    RMEM_INOUT = 0x7
    TMEM_INPUT = 0x9
    TMEM_OUTPUT = 0xA
    TMEM_INOUT = 0xB


ATTR_TYPE_MASK = 0xFF
ATTR_META = 1 << 8
ATTR_NONCONTIG = 1 << 9

#: Parameters that may reach a trusted application.
TEE_NUM_PARAMS = 4


class RpcCmd(IntEnum):
    """``OPTEE_RPC_CMD_*`` the secure world asks of the normal world."""

    SHM_ALLOC = 6
    SHM_FREE = 7


class RpcShmType(IntEnum):
    """``OPTEE_RPC_SHM_TYPE_*``."""

    APPL = 0
    KERNEL = 1
    GLOBAL = 2


class Origin(IntEnum):
    """``TEEC_ORIGIN_*``: which layer produced a return code."""

    API = 1
    COMMS = 2
    TEE = 3
    TRUSTED_APP = 4


#: Size of ``struct optee_msg_arg`` without parameters, and of one parameter.
MSG_ARG_HEADER_SIZE = 32
MSG_PARAM_SIZE = 32
#: Parameters of the RPC argument the driver preallocates after each call's message
#: when the secure world reports SEC_CAP RPC_ARG (OP-TEE's THREAD_RPC_MAX_NUM_PARAMS,
#: answered in a3 of EXCHANGE_CAPABILITIES).
RPC_MAX_PARAMS = 4
