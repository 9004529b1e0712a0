# smc_entry.pyx: the secure world's end of the one-parameter message call
# (OP-TEE's entry_std) for REGISTER_SHM and UNREGISTER_SHM.
#
#   SmcEntry       copies the 64 bytes of a one-parameter message (layout:
#                  smc.pxd) out of shared memory, and checks a REGISTER_SHM /
#                  UNREGISTER_SHM from that copy in OP-TEE's order
#                  (docs/design.md section 6), the page list with the same
#                  walk as pagelist_parse_frames; writes ret/ret_origin back.
#                  Bound to a secure world it is that world's call_with_arg:
#                  the bookkeeping (cookie table of RegisteredShm, call
#                  counter, refusal counts, the RPC server's call_done) in the
#                  same call; every other message goes to the world's generic path.
#                  Two modes (``strict``, as Config.strict): poolsvc's stricter
#                  rules, or OP-TEE 4.0's (cookie shadowing, no attr check on
#                  UNREGISTER_SHM, size 0 at an offset one page, ret_origin
#                  unwritten); the secure world's Python path has both too.
#   RegisteredShm  the cookie table's value, a C struct the entry fills.
#
# Fields and invariants: smc_entry.pxd.  Policy stays in Python
# (poolsvc/tee/secure.py): every message but the two above, sessions, apps,
# RPC, TeeError.
#
# Errors follow docs/core.md: arguments are checked before anything changes;
# register1/unregister1 raise the error the secure world answers with.
#
# Concurrency: one thread at a time (the System's); the GIL is held
# throughout.  SmcEntry calls Python only through generic() and call_done(),
# after its checks; a nested entry(arg_pa) from there fetches, checks and
# answers its own message (the outer call keeps its address and answer in C
# locals).  The plain-Python twin, same checks in the same order, is
# poolsvc/_pure/smc.py.
cimport cython
from libc.stdint cimport INT64_MAX
from cpython.long cimport PyLong_FromUnsignedLongLong

from poolsvc.errors import Busy, NotSupported, PoolsvcError


cdef object _SMC_MAX_PAGES = 1 << 20     # the page limit of a registration (docs/tee.md)


cdef tuple _smc_window(object window, str what):
    """``(lo, hi)`` of a ``(base, size)`` window; BadParameters unless 0 <= lo <= hi < 2**64."""
    cdef unsigned long long base = 0, size = 0
    try:
        b, s = window
    except (TypeError, ValueError):
        raise BadParameters(f"{what} {window!r} is not a (base, size) pair") from None
    if (try_u64(b, &base) != 1 or try_u64(s, &size) != 1
            or size > PSV_U64_MAX - base):
        raise BadParameters(f"{what} {window!r} is not inside the 64-bit address space")
    return (base, base + size)

@cython.freelist(16)
cdef class RegisteredShm:
    """A shared-memory object the normal world registered (OP-TEE's ``mobj_reg_shm``).

    ``RegisteredShm(cookie, pages, offset, size, inflight=0)``: plain public
    fields, no checks (the secure world fills them from a checked message).
    ``size == len(pages) * 4096 - offset``; ``inflight`` counts running calls'
    parameters that use it (it cannot be unregistered while ``inflight > 0``).
    """

    def __init__(self, cookie, pages, offset, size, inflight=0):
        self.cookie = cookie
        self.pages = pages
        self.offset = offset
        self.size = size
        self.inflight = inflight

    def __repr__(self):
        return (f"RegisteredShm(cookie={self.cookie!r}, pages={self.pages!r}, "
                f"offset={self.offset!r}, size={self.size!r}, inflight={self.inflight!r})")


cdef class SmcEntry:
    """The secure world's end: one-parameter REGISTER_SHM / UNREGISTER_SHM, checked
    from a private copy of the message.

    ``SmcEntry(table, nonsecure, static_window, dynamic_window)``: ``table``
    the FrameTable; ``nonsecure`` the ``(base, size)`` ranges of non-secure
    memory (as ``pagelist_parse``); the windows ``(base, size)`` where
    messages are accepted: the static carve-out (8-byte aligned) and dynamic
    RAM (page-aligned).
    Errors: BadParameters (wrong types, bad ranges or windows).

    Bound to a secure world (``bind``), the entry is itself the world's
    ``call_with_arg``: ``entry(arg_pa)`` serves the one-parameter
    REGISTER_SHM / UNREGISTER_SHM completely (checks, cookie table, call
    counter, refusal counts, the RPC server's ``call_done``, the answer) and
    hands every other message to the world's generic path.
    """

    def __cinit__(self):
        self.ranges = NULL
        self.caps_obj = 0
        self.strict_mode = True
        self.shadow = {}

    def __init__(self, table, nonsecure, static_window, dynamic_window):
        cdef pl_range *ranges = NULL
        cdef Py_ssize_t nranges
        cdef uint64_t static_lo, static_hi, dynamic_lo, dynamic_hi
        if not isinstance(table, FrameTable):
            raise BadParameters(f"table must be a FrameTable, not {type(table).__name__}")
        # every argument is checked before a field changes: a refused (re-)__init__
        # must not leave windows without a table (fetch1 would read through NULL)
        static_lo, static_hi = _smc_window(static_window, "static_window")
        dynamic_lo, dynamic_hi = _smc_window(dynamic_window, "dynamic_window")
        nranges = _parse_ranges(nonsecure, &ranges)
        free(self.ranges)
        self.ranges = ranges
        self.nranges = nranges
        self.static_lo, self.static_hi = static_lo, static_hi
        self.dynamic_lo, self.dynamic_hi = dynamic_lo, dynamic_hi
        self.table = <FrameTable>table
        self.fetched = False

    def __dealloc__(self):
        free(self.ranges)

    # -- the secure world's state, for call_with_arg ---------------------------------------------
    def bind(self, dict registered not None, dict rpc_shms not None, generic, stats):
        """Bind the secure world's state that ``entry(arg_pa)`` reads and updates.

        Params: ``registered`` (cookie -> RegisteredShm) and ``rpc_shms`` (its
        keys are the cookies of RPC memory), the dicts ``register1`` /
        ``unregister1`` take; ``generic(arg_pa)`` the world's path for every
        message that is not a one-parameter REGISTER_SHM / UNREGISTER_SHM;
        ``stats`` an object whose ``errors`` dict counts refusals by code.
        Errors: TypeError (not dicts), BadParameters (``generic`` not callable).
        """
        if not callable(generic):
            raise BadParameters(f"generic must be callable, not {type(generic).__name__}")
        self.shms = registered
        self.rpc_cookies = rpc_shms
        self.generic = generic
        self.stats = stats

    @property
    def registered(self):
        """The bound cookie table (cookie -> RegisteredShm), or None."""
        return self.shms

    @registered.setter
    def registered(self, dict value not None):
        self.shms = value

    @property
    def rpc_shms(self):
        """The bound dict whose keys are the cookies of RPC memory, or None."""
        return self.rpc_cookies

    @rpc_shms.setter
    def rpc_shms(self, dict value not None):
        self.rpc_cookies = value

    @property
    def caps(self):
        """The capability bits ``entry(arg_pa)`` checks (DYNAMIC_SHM); 0 at first."""
        return self.caps_obj

    @caps.setter
    def caps(self, value):
        self.dynamic_shm = bool(value & SMC_CAP_DYNAMIC_SHM)
        self.caps_obj = value

    @property
    def strict(self):
        """poolsvc's stricter rules (True, at first) or OP-TEE 4.0's (False): see smc_entry.pxd."""
        return self.strict_mode

    @strict.setter
    def strict(self, value):
        self.strict_mode = bool(value)

    @property
    def shadowed(self):
        """Older registrations a reused cookie shadows (cookie -> list, oldest first)."""
        return self.shadow

    @shadowed.setter
    def shadowed(self, dict value not None):
        self.shadow = value

    @property
    def rpc(self):
        """The RPC server (or None); after each call its ``call_done()``, if it has one."""
        return self.rpc_port

    @rpc.setter
    def rpc(self, value):
        self.rpc_port = value

    @property
    def calls(self):
        """Messages served (the secure world's ``stats.calls``; the generic path adds its own)."""
        return self.ncalls

    @calls.setter
    def calls(self, value):
        cdef long long n = 0
        if try_in_range(value, 0, INT64_MAX, &n) != 1:
            raise BadParameters(f"calls {value!r} is not a count")
        self.ncalls = n

    # -- the message ---------------------------------------------------------------------------------
    cdef int fetch(self, object arg_pa, unsigned long long *pa) except -2:
        """fetch1, with the message's PA stored in ``*pa`` when it is not -1."""
        cdef unsigned long long end
        cdef char msg[SMC_ARG1_SIZE]
        cdef uint32_t cmd
        if type(arg_pa) is not int or psv_u64_from_obj(arg_pa, pa) != 1:
            return -1
        if pa[0] > PSV_U64_MAX - SMC_ARG1_SIZE:
            return -1
        end = pa[0] + SMC_ARG1_SIZE
        if not ((self.dynamic_lo <= pa[0] and end <= self.dynamic_hi and not pa[0] & PSV_PAGE_MASK)
                or (self.static_lo <= pa[0] and end <= self.static_hi and not pa[0] & 7)):
            return -1
        ft_copy_small(self.table, pa[0], msg, SMC_ARG1_SIZE, False)
        self.fetched = False
        cmd = psv_load_le32(msg)
        if psv_load_le32(msg + SMC_NUM_PARAMS_OFFSET) != 1 or (
                cmd != SMC_CMD_REGISTER and cmd != SMC_CMD_UNREGISTER):
            return -1
        self.cmd = cmd
        self.attr = psv_load_le64(msg + SMC_PARAM_OFFSET)
        self.a = psv_load_le64(msg + SMC_PARAM_OFFSET + 8)
        self.b = psv_load_le64(msg + SMC_PARAM_OFFSET + 16)
        self.c = psv_load_le64(msg + SMC_PARAM_OFFSET + 24)
        self.fetched = True
        return <int>cmd

    def fetch1(self, arg_pa):
        """Copy the one-parameter REGISTER_SHM / UNREGISTER_SHM message at ``arg_pa``.

        Params: ``arg_pa`` the message's PA.
        Returns its ``cmd`` (4 or 5) after copying header and parameter into
        this object, or -1, copying nothing, when ``arg_pa`` is not an int
        whose 64 bytes lie in a window (dynamic RAM page-aligned, the
        carve-out 8-byte aligned), and after the copy, when ``num_params`` is
        not 1 or the command is another: the message is for the generic path.
        Errors: AddressError (a page of the message unmapped or unattached,
        as ``FrameTable.read``).
        """
        cdef unsigned long long pa = 0
        return self.fetch(arg_pa, &pa)

    cdef int take(self, uint32_t cmd) except -1:
        if not self.fetched or self.cmd != cmd:
            raise InternalError(f"no command {cmd} fetched")
        self.fetched = False
        return 0

    cdef RegisteredShm check_register(self, bint dynamic_shm, dict registered, dict rpc_shms):
        """REGISTER_SHM's checks on the taken copy; the object to store (nothing changed)."""
        cdef object cookie
        cdef cnp.ndarray pages
        cdef RegisteredShm shm
        cdef uint64_t offset = self.a & PSV_PAGE_MASK
        cdef uint64_t size = self.b
        if not dynamic_shm:
            raise NotSupported("REGISTER_SHM without dynamic shared memory")
        if self.attr != SMC_ATTR_REGISTER:
            raise BadParameters(f"REGISTER_SHM attr {self.attr:#x} is not TMEM_OUTPUT|NONCONTIG")
        cookie = PyLong_FromUnsignedLongLong(self.c)
        if self.strict_mode:
            if cookie in registered or cookie in rpc_shms:
                raise BadParameters(f"cookie {self.c:#x} is already registered (strict)")
        elif size == 0 and offset:  # (size + offset - 1) / 4096 + 1 pages: one, as for 1 byte
            size = 1
        pages = _pl_result(self.a, size, _SMC_MAX_PAGES)
        _pl_walk(pages, self.a, None, self.table, self.ranges, self.nranges)
        shm = RegisteredShm.__new__(RegisteredShm)
        shm.cookie = cookie
        shm.pages = pages
        shm.offset = offset
        # num_pages <= 2**20, so the size fits easily
        shm.size = (<int64_t>cnp.PyArray_DIM(pages, 0) << PSV_PAGE_SHIFT) - <int64_t>offset
        shm.inflight = 0
        return shm

    cdef object check_unregister(self, dict registered):
        """UNREGISTER_SHM's checks on the taken copy; the cookie to remove (nothing changed)."""
        cdef object cookie, entry
        if self.strict_mode and self.attr != SMC_ATTR_UNREGISTER:
            raise BadParameters(f"UNREGISTER_SHM attr {self.attr:#x} is not RMEM_INPUT (strict)")
        cookie = PyLong_FromUnsignedLongLong(self.c)
        entry = registered.get(cookie)
        if entry is None:
            raise BadParameters(f"cookie {self.c:#x} is not registered")
        if entry.inflight:
            raise Busy(f"cookie {self.c:#x} is in use by {entry.inflight} running call(s)")
        return cookie

    def register1(self, caps, dict registered not None, dict rpc_shms not None):
        """REGISTER_SHM's checks on the fetched message, in OP-TEE's order.

        Params: ``caps`` the secure world's capability bits; ``registered``
        and ``rpc_shms`` the dicts whose keys are the cookies in use.
        Returns ``(cookie, pages, offset)``: the cookie (param ``c``), the
        checked pages (``ndarray[uint64]``, the secure side's copy) and the
        buffer's offset in its first page; the object's size is
        ``len(pages) * 4096 - offset``.  Nothing is changed.
        Errors, the answer to the message: NotSupported (no DYNAMIC_SHM);
        BadParameters (attr not TMEM_OUTPUT|NONCONTIG; cookie in use, when
        ``strict``); then those of ``pagelist_parse_frames`` with the
        non-secure ranges and ``max_pages = 2**20`` (not strict: size 0 at an
        offset is parsed as one byte).  InternalError if no REGISTER_SHM was
        fetched.
        """
        cdef RegisteredShm shm
        self.take(SMC_CMD_REGISTER)
        shm = self.check_register(bool(caps & SMC_CAP_DYNAMIC_SHM), registered, rpc_shms)
        return (shm.cookie, shm.pages, shm.offset)

    def unregister1(self, dict registered not None):
        """UNREGISTER_SHM's checks on the fetched message, in OP-TEE's order.

        Params: ``registered`` the dict of registered objects by cookie (each
        with an ``inflight`` count).
        Returns the cookie to remove; nothing is changed.
        Errors, the answer to the message: BadParameters (attr not
        RMEM_INPUT, when ``strict``; unknown cookie); Busy (the object is in
        use by a running call).  InternalError if no UNREGISTER_SHM was fetched.
        """
        self.take(SMC_CMD_UNREGISTER)
        return self.check_unregister(registered)

    def answer(self, arg_pa, ret, origin):
        """Write ``ret`` and ``ret_origin`` (u32s) into the message at ``arg_pa``.

        Errors: BadParameters (not u32s, ``arg_pa`` not a u64); AddressError
        (as ``FrameTable.write``).
        """
        cdef unsigned long long pa = 0, r = 0, o = 0
        cdef char pair[8]
        if self.table is None:      # made by __new__ alone: no table to write through
            raise InternalError("SmcEntry is not initialised")
        if try_u64(arg_pa, &pa) != 1 or pa > PSV_U64_MAX - SMC_ARG1_SIZE:
            raise BadParameters(f"message address {arg_pa!r} is not a u64")
        if (try_u64(ret, &r) != 1 or r > 0xFFFFFFFF
                or try_u64(origin, &o) != 1 or o > 0xFFFFFFFF):
            raise BadParameters(f"ret {ret!r} / origin {origin!r} are not u32s")
        psv_store_le32(pair, <uint32_t>r)
        psv_store_le32(pair + 4, <uint32_t>o)
        ft_copy_small(self.table, pa + SMC_RET_OFFSET, pair, 8, True)

    # -- call_with_arg -------------------------------------------------------------------------------
    cdef object serve(self, object arg_pa):
        """``entry(arg_pa)``: what ``SecureWorld.call_with_arg`` did with fetch1,
        register1 / unregister1 and answer, and its bookkeeping, in one C call.
        Returns the generic path's result for what it does not serve, else None."""
        cdef unsigned long long pa = 0
        cdef int cmd
        cdef RegisteredShm shm
        cdef object ret = None, origin = SMC_ORIGIN_TEE, done, errors, cookie, older
        cdef bint strict = self.strict_mode
        cdef char pair[8]
        # the table this call checks and updates, taken once: Python code that runs
        # between the check and the update (an ``inflight`` property, a finaliser)
        # may rebind ``registered``, and the cookie checked must be the one removed
        cdef dict shms = self.shms
        cdef dict shadow = self.shadow
        if self.generic is None:    # only bind() sets it (the setters set one dict each)
            raise InternalError("SmcEntry is not bound to a secure world")
        cmd = self.fetch(arg_pa, &pa)
        if cmd < 0 or not (strict or self.dynamic_shm):
            self.fetched = False
            return self.generic(arg_pa)
        self.ncalls += 1
        try:
            self.take(<uint32_t>cmd)
            if cmd == SMC_CMD_REGISTER:
                shm = self.check_register(self.dynamic_shm, shms, self.rpc_cookies)
                older = shms.get(shm.cookie)
                if older is not None:   # (not strict) shadowed until the newer is unregistered
                    shadow.setdefault(shm.cookie, []).append(older)
                shms[shm.cookie] = shm
            else:
                cookie = self.check_unregister(shms)
                older = shadow.get(cookie)
                if older:
                    shms[cookie] = older.pop()
                    if not older:
                        del shadow[cookie]
                else:
                    del shms[cookie]
        except PoolsvcError as exc:
            ret = exc.tee_code
            origin = getattr(exc, "origin", SMC_ORIGIN_TEE)
        finally:
            if self.rpc_port is not None:
                done = getattr(self.rpc_port, "call_done", None)
                if done is not None:
                    done()
        if ret is None:     # success: ret 0 (and origin TEE, when strict)
            psv_store_le32(pair, 0)
            psv_store_le32(pair + 4, SMC_ORIGIN_TEE)
            ft_copy_small(self.table, pa + SMC_RET_OFFSET, pair, 8 if strict else 4, True)
            return None
        if ret != 0:
            errors = self.stats.errors
            errors[ret] = errors.get(ret, 0) + 1
        if strict:
            self.answer(arg_pa, ret, origin)
        else:               # OP-TEE leaves ret_origin as the normal world wrote it
            self.answer(arg_pa, ret, self.peek_origin(pa))
        return None

    cdef object peek_origin(self, unsigned long long pa):
        """The ``ret_origin`` word of the message at ``pa``, as the normal world wrote it."""
        cdef char pair[8]
        ft_copy_small(self.table, pa + SMC_RET_OFFSET, pair, 8, False)
        return psv_load_le32(pair + 4)

    def __call__(self, arg_pa):
        """Process the message the normal world placed at ``arg_pa`` (``call_with_arg``).

        A one-parameter REGISTER_SHM / UNREGISTER_SHM inside a window is copied,
        checked (``register1`` / ``unregister1``), applied to the bound cookie
        table (a RegisteredShm stored, or the cookie removed), counted
        (``calls``; a refusal also in ``stats.errors`` by code), followed by the
        RPC server's ``call_done()`` and answered (``ret``, and ``ret_origin``
        when ``strict``).  Anything else, and when not ``strict`` both commands
        without DYNAMIC_SHM, goes to ``generic(arg_pa)``.
        Returns None for what it serves (SMC result OK), else what ``generic``
        returns.
        Errors: InternalError (not bound); AddressError (the message unreadable,
        nothing counted); whatever ``generic`` or ``call_done`` raise.
        """
        return self.serve(arg_pa)
