#!/usr/bin/env python3
"""hello_worker.py: a herd worker in plain Python 3 (standard library only).

Answers every HTTP/1.1 request with 200 and "Handled by worker <pid>", like
the Rust hello-worker. The herd part is the first half of this file: adopt
the channel from HERD_CHANNEL_FD, say READY, then receive one connection fd
per HANDOFF message and ACK it (protocol: docs/protocol.md). In the OS modes
(--mode shared|reuseport) it also accepts from the inherited LISTEN_FDS
sockets itself and reports each connection with ACCEPTED.

Given herd's counter page (HERD_PAGE_FD) it sends none of those messages:
it counts in the page and takes queued hand-offs, several to a message
(docs/protocol.md, "Counting without messages").

    herd run --listen 127.0.0.1:3000 --workers 4 -- python3 workers/python/hello_worker.py
"""
import array
import ctypes
import mmap
import os
import selectors
import signal
import socket
import struct
import threading

VERSION, HANDOFF, DRAIN, ACK, READY, CLOSED, ACCEPTED = 1, 0x01, 0x02, 0x81, 0x82, 0x83, 0x85
REPORTS_CLOSED = 0x0001  # READY flag: this worker sends CLOSED for every connection
PAGE, QUEUED = 0x0002, 0x0004  # READY flags: counts in the page; takes queued hand-offs
THREADS = 0x0008  # READY flag: counts receipts per hand-off thread (the id's top byte)
MAX_HANDOFF_THREADS = 7  # page counters 72 + 8*t for t < 7
HANDOFF_LEN, MAX_BATCH = 52, 32  # a message to a QUEUED worker holds up to 32 HANDOFFs


class Page:
    """herd's counter page (HERD_PAGE_FD): one add per connection instead of a
    message. Offsets: 64 closed, 72 + 8*t received from hand-off thread t,
    128 + 8*i accepted on listener i."""

    def __init__(self, fd):
        self.map = mmap.mmap(fd, 4096)  # shared, read-write
        if self.map[:8] != b"herdpag1":
            raise ValueError("HERD_PAGE_FD is not a herd counter page")
        self.lock = threading.Lock()  # serve threads close, the main thread takes

    def add(self, offset, n=1):
        with self.lock:
            cell = ctypes.c_uint64.from_buffer(self.map, offset)
            cell.value += n  # one aligned 8-byte store: herd never reads it torn


def counter_page():
    try:
        return Page(int(os.environ["HERD_PAGE_FD"]))
    except (KeyError, ValueError, OSError):
        return None  # no page: report by message


def inherited_listeners():
    """Listening sockets herd passed in the OS-scheduled modes (shared, reuseport),
    by systemd's convention: fds 3.. when LISTEN_PID is our pid."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    return [socket.socket(fileno=3 + i) for i in range(int(os.environ["LISTEN_FDS"]))]


def watch(channel):
    """A selector on the channel (data None) and on each inherited listener
    (data: its index), non-blocking: every worker may wake up for one connection."""
    events = selectors.DefaultSelector()
    events.register(channel, selectors.EVENT_READ, None)
    for index, listener in enumerate(inherited_listeners()):
        listener.setblocking(False)
        events.register(listener, selectors.EVENT_READ, index)
    return events


def accept_inherited(key):
    """(socket, peer_ip, peer_port) from the ready inherited listener, or None:
    another worker took it, or the client left."""
    try:
        conn, (peer_ip, peer_port, *_) = key.fileobj.accept()
    except (BlockingIOError, ConnectionAbortedError):
        return None
    return conn, peer_ip, peer_port


def connections():
    """Yields (socket, peer_ip, peer_port, closed) for each connection, handed over
    by herd or (OS modes) accepted here from an inherited socket and reported to
    herd; call closed() once the socket is closed (herd counts open connections)."""
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=int(os.environ["HERD_CHANNEL_FD"]))
    page = counter_page()
    if page:
        yield from counted_connections(channel, page)
        return
    channel.send(struct.pack("<BBH", VERSION, READY, REPORTS_CLOSED))
    report = lambda kind, listener, conn_id: channel.send(struct.pack("<BBHQ", VERSION, kind, listener, conn_id))
    events = watch(channel)
    accepted = 0
    while True:
        for key, _ in events.select():
            if key.data is not None:  # an inherited listener (OS modes)
                taken = accept_inherited(key)
                if not taken:
                    continue
                conn, peer_ip, peer_port = taken
                accepted += 1
                report(ACCEPTED, key.data, accepted)
                conn.setblocking(True)
                yield conn, peer_ip, peer_port, lambda conn_id=accepted: report(CLOSED, 0, conn_id)
                continue
            message, fds, _flags, _addr = socket.recv_fds(channel, 64, 1)
            for fd in fds:
                os.set_inheritable(fd, False)  # keep it from programs this worker may start
            if not message:  # herd is gone
                return
            if message[0] != VERSION:
                raise SystemExit(f"herd speaks protocol {message[0]}, this worker {VERSION}")
            if message[1] == DRAIN:  # herd asks us to finish and exit
                return
            _, kind, _listener, conn_id = struct.unpack_from("<BBHQ", message)
            if kind != HANDOFF or len(fds) != 1:
                raise SystemExit(f"unexpected message from herd: {message!r}")
            report(ACK, 0, conn_id)  # herd may close its copy now
            peer_ip, port = peer_of(message)
            conn = socket.socket(fileno=fds[0])
            conn.setblocking(True)  # the fd arrives non-blocking
            yield conn, peer_ip, port, lambda conn_id=conn_id: report(CLOSED, 0, conn_id)


def peer_of(record):
    """The client's (ip, port) from a HANDOFF record's peer address block."""
    family, _, port = struct.unpack_from("<BBH", record, 12)
    raw_ip = record[16:20] if family == 4 else record[16:32]
    return socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, raw_ip), port


def counted_connections(channel, page):
    """connections() with the counter page: no ACK, ACCEPTED or CLOSED message;
    a message from herd may hold several HANDOFFs, one fd each, in order."""
    channel.send(struct.pack("<BBH", VERSION, READY, REPORTS_CLOSED | PAGE | QUEUED | THREADS))
    closed = lambda: page.add(64)
    events = watch(channel)
    while True:
        for key, _ in events.select():
            if key.data is not None:  # an inherited listener (OS modes)
                taken = accept_inherited(key)
                if not taken:
                    continue
                conn, peer_ip, peer_port = taken
                page.add(128 + 8 * min(key.data, 495))
                conn.setblocking(True)
                yield conn, peer_ip, peer_port, closed
                continue
            message, ancillary, _flags, _addr = channel.recvmsg(
                HANDOFF_LEN * MAX_BATCH, socket.CMSG_SPACE(4 * MAX_BATCH), socket.MSG_CMSG_CLOEXEC)
            fds = array.array("i")
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            if not message:  # herd is gone
                return
            if message[0] != VERSION:
                raise SystemExit(f"herd speaks protocol {message[0]}, this worker {VERSION}")
            if message[1] == DRAIN:
                return
            records = [message[i:i + HANDOFF_LEN] for i in range(0, len(message), HANDOFF_LEN)]
            for record in records:  # taken off the channel: ours now, counted per sending thread
                thread = record[11] if len(record) == HANDOFF_LEN else 0  # the id's top byte
                page.add(72 + 8 * (thread if thread < MAX_HANDOFF_THREADS else 0))
            if len(fds) != len(records) or any(r[1] != HANDOFF or len(r) != HANDOFF_LEN for r in records):
                raise SystemExit(f"unexpected message from herd: {message!r}")
            for record, fd in zip(records, fds):
                peer_ip, port = peer_of(record)
                conn = socket.socket(fileno=fd)
                conn.setblocking(True)
                yield conn, peer_ip, port, closed


BODY = f"Handled by worker {os.getpid()}".encode()
HEAD = (f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(BODY)}\r\n"
        f"X-Herd-Worker: {os.environ.get('HERD_WORKER_ID', '?')}\r\n").encode()


def serve_and_report(conn, closed):
    try:
        serve(conn)
    finally:
        try:
            closed()
        except OSError:
            pass  # herd is gone


def serve(conn):
    """Minimal HTTP/1.1: keep-alive by default, honours Connection: close and HTTP/1.0."""
    with conn:
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            body_len = int(headers.get("content-length", "0"))
            while len(buffer) < body_len:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            buffer = buffer[body_len:]
            connection = headers.get("connection", "").lower()
            keep_alive = connection == "keep-alive" or (lines[0].endswith("HTTP/1.1") and connection != "close")
            conn.sendall(HEAD + (b"\r\n" if keep_alive else b"Connection: close\r\n\r\n") + BODY)
            if not keep_alive:
                return


class Stop(Exception):
    """Raised by the SIGTERM handler to leave the accept loop."""


def stop(*_):
    raise Stop


def main():
    # herd sends SIGTERM (or DRAIN) to stop us: take no more connections, give
    # the ones in progress a few seconds, then exit (idle keep-alives are dropped).
    signal.signal(signal.SIGTERM, stop)
    threads = []
    try:
        for conn, _peer_ip, _peer_port, closed in connections():
            threads = [t for t in threads if t.is_alive()]
            threads.append(threading.Thread(target=serve_and_report, args=(conn, closed), daemon=True))
            threads[-1].start()
    except Stop:
        pass
    for thread in threads:
        thread.join(timeout=2)


if __name__ == "__main__":
    main()
