"""The simulated secure world (an OP-TEE-like TEE) and its message ABI."""
from .msg import MsgArg, MsgParam, unpack  # noqa: F401
from .secure import SecureWorld  # noqa: F401
