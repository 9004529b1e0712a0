"""The pool service: a daemon that owns one System and serves client processes.

Modules, one concern each:

- :mod:`.protocol` - the wire format shared by both sides: message types and
  error codes as ``IntEnum``, frame headers, body layouts, the handshake;
- :mod:`.slot` - the shared-memory request/reply slot: its layout, the code
  both ends use, and the client's end;
- :mod:`.settings` - the service's configuration as validated plain data;
- :mod:`.provider` - what the daemon hands out: shm descriptors, storage
  descriptors for ``SCM_RIGHTS``, mappings of clients' registered objects;
- :mod:`.metrics` - request counters and latency percentiles;
- :mod:`.server` - the single-threaded event loop, one Context per connection;
- :mod:`.client` - ``connect(path)`` and the Client handle, over
  :mod:`.channel` (socket, framing, descriptors, timeouts, fork checks),
  :mod:`.objects` (Context, Session, Shm), :mod:`.params`
  (session parameters) and :mod:`.batch` (Batch, LocalBatch).
"""
