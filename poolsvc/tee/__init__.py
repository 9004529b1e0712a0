"""The TEE: the normal world's driver end and an OP-TEE-like simulated secure world.

Normal world: ``driver`` (message page, kernel pages, calls), ``params`` (the
GP parameter codec), ``session`` (sessions with trusted apps), ``rpc`` (the
RPC server the secure world calls), ``daemon`` (the secure world served over a
socket).  Secure world: ``secure`` (dispatch, entry points, registration),
``secure_sessions``, ``secure_params``, ``secure_rpc``, ``ta`` (trusted apps).
Both: ``msg`` (the message ABI).
"""
