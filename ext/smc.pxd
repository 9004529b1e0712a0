# smc.pxd: the layout of the one-parameter ``struct optee_msg_arg`` that both
# ends of the message call exchange (smc_driver.pyx writes it, smc_entry.pyx
# reads and answers it).
#
# Message (little-endian, OP-TEE's ABI): u32 cmd, func, session, cancel_id,
# pad, ret, ret_origin, num_params (32 bytes), then one parameter: u64 attr,
# a, b, c (32 bytes).  ``ret`` is at byte 20, ``ret_origin`` at 24.

cdef enum:
    SMC_ARG1_SIZE = 64              # header (32) + one parameter (32)
    SMC_NUM_PARAMS_OFFSET = 28
    SMC_RET_OFFSET = 20             # ret, then ret_origin at 24
    SMC_PARAM_OFFSET = 32           # attr, a, b, c at 32, 40, 48, 56
    SMC_CMD_REGISTER = 4            # OPTEE_MSG_CMD_REGISTER_SHM
    SMC_CMD_UNREGISTER = 5          # OPTEE_MSG_CMD_UNREGISTER_SHM
    SMC_ATTR_REGISTER = 0x20A       # TMEM_OUTPUT | NONCONTIG
    SMC_ATTR_UNREGISTER = 0x5       # RMEM_INPUT
    SMC_CAP_DYNAMIC_SHM = 1 << 2
    SMC_ORIGIN_TEE = 3
