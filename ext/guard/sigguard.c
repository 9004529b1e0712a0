/* ext/guard/sigguard.c: poolsvc._sigguard, the SIGBUS guard over client memory the
 * process touches (registered buffers).  It owns a process-wide SIGBUS handler
 * and a fixed table of guarded address ranges, one per live registration.
 *
 * A POSIX shm object that its owner truncates leaves the pages of every
 * mapping of it beyond the new end without backing: touching one raises
 * SIGBUS, which kills the process by default.  The handler does what
 * libwayland-server's wl_shm does for a compositor: for a fault (BUS_ADRERR)
 * inside a guarded range it maps anonymous zero pages over the whole range
 * (mmap MAP_FIXED), marks every guarded range that overlaps it dead, and
 * returns, so the access that faulted completes (reading zeros).  Any other
 * SIGBUS goes to the handler that was installed before (pytest's and
 * Python's faulthandler installs one); with none, the default action is
 * restored and the fault repeats, ending the process as it would have.
 *
 * GuardedWindow(buffer, start, end) is the buffer poolsvc/usermem.py attaches
 * to the frame table for one mapping of a client's object: every export of
 * it first probes (reads one byte of each page of) the live guarded ranges
 * inside [start, end), so memory truncated since the last access is found
 * before anyone is handed a view of it, and an export of a window holding a
 * dead range fails with the error set by set_error() (a typed poolsvc error).
 *
 * This is an OS facility, not a kernel with a plain-Python twin: both
 * backends use it (a signal handler that returns from a fault cannot be
 * written in Python).  It is a module of its own so that the pure backend can
 * use it without the compiled core.
 *
 * The handler is installed at the first add, and put back on top by every
 * add, probe and export when another was installed over it since.
 *
 * Concurrency: add/remove/probe are called by one thread at a time (the
 * System's, under the GIL).  The handler runs on whichever thread faults and
 * only reads the table, whose slots are published with release stores
 * (state last) and retired with the state cleared first; the handler calls
 * only async-signal-safe functions (mmap, sigaction).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <signal.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* Slot states.  Invariant: state != SLOT_FREE  =>  start < end, both page-aligned. */
enum { SLOT_FREE = 0, SLOT_LIVE = 1, SLOT_DEAD = 2 };
/* At most this many guarded ranges at once (live registrations of client memory). */
#define GUARD_SLOTS 4096

typedef struct {
    uintptr_t start;
    uintptr_t end;
    int state;
} guard_slot;

static guard_slot slots[GUARD_SLOTS];
static int slots_hi;                 /* slots[i].state == SLOT_FREE for every i >= slots_hi */
static long fault_count;             /* faults recovered since import */
static struct sigaction previous;    /* the SIGBUS action installed before ours */
static int installed;
static volatile sig_atomic_t chaining;
static PyObject *dead_error;         /* raised by an export of a window with a dead range */
static uintptr_t page_size;

static void mark_dead_overlapping(uintptr_t start, uintptr_t end)
{
    int i, hi = __atomic_load_n(&slots_hi, __ATOMIC_ACQUIRE);
    for (i = 0; i < hi; i++) {
        if (__atomic_load_n(&slots[i].state, __ATOMIC_ACQUIRE) != SLOT_FREE
                && slots[i].start < end && start < slots[i].end)
            __atomic_store_n(&slots[i].state, SLOT_DEAD, __ATOMIC_RELEASE);
    }
}

static void on_sigbus(int sig, siginfo_t *info, void *uctx)
{
    uintptr_t addr = (uintptr_t)info->si_addr;
    int i, hi;
    if (info->si_code == BUS_ADRERR) {
        hi = __atomic_load_n(&slots_hi, __ATOMIC_ACQUIRE);
        for (i = 0; i < hi; i++) {
            if (__atomic_load_n(&slots[i].state, __ATOMIC_ACQUIRE) == SLOT_FREE)
                continue;
            if (addr < slots[i].start || addr >= slots[i].end)
                continue;
            if (mmap((void *)slots[i].start, slots[i].end - slots[i].start, PROT_READ | PROT_WRITE,
                     MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) == MAP_FAILED)
                break;                                  /* cannot recover: chain */
            mark_dead_overlapping(slots[i].start, slots[i].end);
            __atomic_add_fetch(&fault_count, 1, __ATOMIC_RELAXED);
            return;
        }
    }
    /* not ours: the previous handler, once (a handler that re-raises into us ends here) */
    if (!chaining) {
        chaining = 1;
        if ((previous.sa_flags & SA_SIGINFO) && previous.sa_sigaction != NULL) {
            previous.sa_sigaction(sig, info, uctx);
            chaining = 0;
            return;
        }
        if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN
                && previous.sa_handler != NULL) {
            previous.sa_handler(sig);
            chaining = 0;
            return;
        }
        chaining = 0;
    }
    {   /* default action: the faulting access repeats and ends the process */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigemptyset(&dfl.sa_mask);
        sigaction(SIGBUS, &dfl, NULL);
        if (info->si_code <= 0)                         /* sent, not a fault: send it again */
            raise(sig);
    }
}

/* Install the handler, or put it back on top if another was installed over it. */
static int ensure_installed(void)
{
    struct sigaction current, ours;
    if (sigaction(SIGBUS, NULL, &current) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (installed && (current.sa_flags & SA_SIGINFO) && current.sa_sigaction == on_sigbus)
        return 0;
    memset(&ours, 0, sizeof ours);
    ours.sa_sigaction = on_sigbus;
    ours.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&ours.sa_mask);
    previous = current;
    if (sigaction(SIGBUS, &ours, NULL) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    installed = 1;
    return 0;
}

static int parse_range(PyObject *args, uintptr_t *start, uintptr_t *end)
{
    unsigned long long s, e;
    if (!PyArg_ParseTuple(args, "KK", &s, &e))
        return -1;
    if (s >= e || (s & (page_size - 1)) || (e & (page_size - 1))) {
        char msg[96];
        snprintf(msg, sizeof msg, "range [%#llx, %#llx) is not a non-empty page-aligned range", s, e);
        PyErr_SetString(PyExc_ValueError, msg);
        return -1;
    }
    *start = (uintptr_t)s;
    *end = (uintptr_t)e;
    return 0;
}

/* Read one byte of every page of the live guarded ranges inside [start, end);
 * return 1 when some guarded range overlapping it is dead (after the probe). */
static int probe_window(uintptr_t start, uintptr_t end)
{
    int i, dead = 0;
    uintptr_t lo, hi, p;
    for (i = 0; i < slots_hi; i++) {
        if (slots[i].state != SLOT_LIVE || slots[i].end <= start || slots[i].start >= end)
            continue;
        lo = slots[i].start > start ? slots[i].start : start;
        hi = slots[i].end < end ? slots[i].end : end;
        for (p = lo; p < hi && __atomic_load_n(&slots[i].state, __ATOMIC_ACQUIRE) == SLOT_LIVE;
             p += page_size)
            (void)*(volatile const char *)p;
    }
    for (i = 0; i < slots_hi; i++)
        if (slots[i].state == SLOT_DEAD && slots[i].start < end && start < slots[i].end)
            dead = 1;
    return dead;
}

static PyObject *guard_add(PyObject *self, PyObject *args)
{
    uintptr_t start, end;
    int i;
    if (parse_range(args, &start, &end) < 0 || ensure_installed() < 0)
        return NULL;
    for (i = 0; i < GUARD_SLOTS; i++) {
        if (slots[i].state != SLOT_FREE)
            continue;
        slots[i].start = start;
        slots[i].end = end;
        __atomic_store_n(&slots[i].state, SLOT_LIVE, __ATOMIC_RELEASE);
        if (i >= slots_hi)
            __atomic_store_n(&slots_hi, i + 1, __ATOMIC_RELEASE);
        return PyLong_FromLong(i);
    }
    return PyLong_FromLong(-1);
}

static int slot_arg(PyObject *args, int *slot)
{
    if (!PyArg_ParseTuple(args, "i", slot))
        return -1;
    if (*slot < 0 || *slot >= GUARD_SLOTS || slots[*slot].state == SLOT_FREE) {
        PyErr_Format(PyExc_ValueError, "guard slot %d is not in use", *slot);
        return -1;
    }
    return 0;
}

static PyObject *guard_remove(PyObject *self, PyObject *args)
{
    int slot;
    if (slot_arg(args, &slot) < 0)
        return NULL;
    __atomic_store_n(&slots[slot].state, SLOT_FREE, __ATOMIC_RELEASE);
    while (slots_hi > 0 && slots[slots_hi - 1].state == SLOT_FREE)
        __atomic_store_n(&slots_hi, slots_hi - 1, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *guard_dead(PyObject *self, PyObject *args)
{
    int slot;
    if (slot_arg(args, &slot) < 0)
        return NULL;
    return PyBool_FromLong(slots[slot].state == SLOT_DEAD);
}

static PyObject *guard_probe(PyObject *self, PyObject *args)
{
    uintptr_t start, end;
    if (parse_range(args, &start, &end) < 0 || ensure_installed() < 0)
        return NULL;
    return PyBool_FromLong(probe_window(start, end));
}

static PyObject *guard_set_error(PyObject *self, PyObject *cls)
{
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, (PyTypeObject *)PyExc_Exception)) {
        PyErr_SetString(PyExc_TypeError, "set_error takes an exception class");
        return NULL;
    }
    Py_INCREF(cls);
    Py_XSETREF(dead_error, cls);
    Py_RETURN_NONE;
}

static PyObject *guard_stats(PyObject *self, PyObject *unused)
{
    int i, live = 0, dead = 0;
    for (i = 0; i < slots_hi; i++) {
        live += slots[i].state == SLOT_LIVE;
        dead += slots[i].state == SLOT_DEAD;
    }
    return Py_BuildValue("{s:i,s:i,s:l,s:i,s:O}", "live", live, "dead", dead, "faults",
                         __atomic_load_n(&fault_count, __ATOMIC_RELAXED), "capacity", GUARD_SLOTS,
                         "installed", installed ? Py_True : Py_False);
}

/* -- GuardedWindow --------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Py_buffer inner;       /* the window's bytes; inner.obj == NULL once released */
    uintptr_t start, end;  /* the address range probed before each export */
    Py_ssize_t exports;
} GuardedWindow;

static int window_init(GuardedWindow *self, PyObject *args, PyObject *kw)
{
    PyObject *buffer;
    unsigned long long s, e;
    if (!PyArg_ParseTuple(args, "OKK", &buffer, &s, &e))
        return -1;
    if (self->inner.obj != NULL) {
        PyErr_SetString(PyExc_TypeError, "GuardedWindow is already initialised");
        return -1;
    }
    if (PyObject_GetBuffer(buffer, &self->inner, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if ((uintptr_t)self->inner.buf < (uintptr_t)s || (uintptr_t)self->inner.buf + self->inner.len > (uintptr_t)e) {
        char msg[96];
        PyBuffer_Release(&self->inner);
        snprintf(msg, sizeof msg, "the buffer is not inside [%#llx, %#llx)", s, e);
        PyErr_SetString(PyExc_ValueError, msg);
        return -1;
    }
    self->start = (uintptr_t)s;
    self->end = (uintptr_t)e;
    return 0;
}

static void window_dealloc(GuardedWindow *self)
{
    if (self->inner.obj != NULL)
        PyBuffer_Release(&self->inner);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int window_getbuffer(GuardedWindow *self, Py_buffer *view, int flags)
{
    if (self->inner.obj == NULL) {
        PyErr_SetString(PyExc_BufferError, "the guarded window was released");
        return -1;
    }
    if (ensure_installed() < 0)    /* a handler installed over ours since (faulthandler.enable) */
        return -1;
    if (probe_window(self->start, self->end)) {
        char msg[160];
        snprintf(msg, sizeof msg, "registered memory in [%#llx, %#llx) was truncated by its owner; "
                 "the registration is dead", (unsigned long long)self->start,
                 (unsigned long long)self->end);
        PyErr_SetString(dead_error != NULL ? dead_error : PyExc_BufferError, msg);
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->inner.buf, self->inner.len, 0, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void window_releasebuffer(GuardedWindow *self, Py_buffer *view)
{
    self->exports--;
}

static PyObject *window_release(GuardedWindow *self, PyObject *unused)
{
    if (self->exports > 0) {
        PyErr_Format(PyExc_BufferError, "the guarded window has %zd exports", self->exports);
        return NULL;
    }
    if (self->inner.obj != NULL)
        PyBuffer_Release(&self->inner);
    Py_RETURN_NONE;
}

static PyObject *window_dead(GuardedWindow *self, PyObject *unused)
{
    int i;
    for (i = 0; i < slots_hi; i++)
        if (slots[i].state == SLOT_DEAD && slots[i].start < self->end && self->start < slots[i].end)
            Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

static PyObject *window_exports(GuardedWindow *self, void *closure)
{
    return PyLong_FromSsize_t(self->exports);
}

static PyBufferProcs window_as_buffer = {
    (getbufferproc)window_getbuffer,
    (releasebufferproc)window_releasebuffer,
};

static PyMethodDef window_methods[] = {
    {"release", (PyCFunction)window_release, METH_NOARGS,
     "Release the window's buffer (BufferError while it has exports)."},
    {"dead", (PyCFunction)window_dead, METH_NOARGS,
     "True when a dead guarded range lies in the window (no probe)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef window_getset[] = {
    {"exports", (getter)window_exports, NULL, "Views of the window alive now.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject GuardedWindowType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "poolsvc._sigguard.GuardedWindow",
    .tp_basicsize = sizeof(GuardedWindow),
    .tp_dealloc = (destructor)window_dealloc,
    .tp_as_buffer = &window_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "GuardedWindow(buffer, start, end): a writable buffer whose exports first probe "
              "the guarded ranges in [start, end) and fail when one is dead.",
    .tp_methods = window_methods,
    .tp_getset = window_getset,
    .tp_init = (initproc)window_init,
    .tp_new = PyType_GenericNew,
};

static PyMethodDef module_methods[] = {
    {"add", guard_add, METH_VARARGS,
     "add(start, end) -> slot: guard the page-aligned range (installs the handler); -1 when full."},
    {"remove", guard_remove, METH_VARARGS, "remove(slot): stop guarding a range."},
    {"dead", guard_dead, METH_VARARGS, "dead(slot) -> bool: the range faulted and was replaced."},
    {"probe", guard_probe, METH_VARARGS,
     "probe(start, end) -> bool: read each page of the live guarded ranges inside; "
     "True when one overlapping it is dead."},
    {"set_error", guard_set_error, METH_O, "set_error(cls): the exception a dead window's export raises."},
    {"stats", guard_stats, METH_NOARGS, "stats() -> dict: live, dead, faults, capacity, installed."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef guard_module = {
    PyModuleDef_HEAD_INIT, "poolsvc._sigguard",
    "The SIGBUS guard over registered client memory (ext/sigguard.c).", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__sigguard(void)
{
    PyObject *m;
    page_size = (uintptr_t)sysconf(_SC_PAGESIZE);
    if (PyType_Ready(&GuardedWindowType) < 0)
        return NULL;
    m = PyModule_Create(&guard_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&GuardedWindowType);
    if (PyModule_AddObject(m, "GuardedWindow", (PyObject *)&GuardedWindowType) < 0
            || PyModule_AddIntConstant(m, "CAPACITY", GUARD_SLOTS) < 0) {
        Py_DECREF(&GuardedWindowType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
