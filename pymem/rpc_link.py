"""Is an rpc-server still there? This process's connection to it, as the OS sees it.

Why: ggml's RPC backend aborts the whole process (``GGML_ABORT``) when a call finds its
server gone: a graph compute, a tensor read or write, even freeing a buffer. pymem looks
at the connection first, in microseconds, and raises :class:`~pymem.errors.DeviceError`
instead (``Tensor`` I/O, graph runners), or leaves a dead server's buffers unfreed with a
warning (``TensorStore.close``, runner ``close``). A server that dies between the look
and ggml's call still aborts: the check narrows the window, it cannot close it.

The lowest layer of the package, beside :mod:`pymem._native`: :mod:`pymem.backend` and
:mod:`pymem.ggml` both use it.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from typing import Any

from pymem._native import cstr, ffi, lib
from pymem.errors import DeviceError

_TCP_ESTABLISHED = "01"


def rpc_endpoint(dev: Any) -> tuple[str, int] | None:
    """``(host, port)`` of an rpc-server's device (its description is the endpoint)."""
    reg = lib.ggml_backend_dev_backend_reg(dev.handle)
    if reg == ffi.NULL or cstr(lib.ggml_backend_reg_name(reg)) != "RPC":
        return None
    host, sep, port = dev.description.rpartition(":")
    return (host, int(port)) if sep and port.isdigit() else None


def _proc_addrs(host: str, port: int) -> set[str]:
    """``/proc/net/tcp{,6}`` spellings of ``host:port`` (32-bit words in host byte order).

    E.g. 127.0.0.1:50052 -> {"0100007F:C384", "0000000000000000FFFF00000100007F:C384"}.
    """
    out: set[str] = set()
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError:
        return out
    for family, *_, sockaddr in infos:
        raw = socket.inet_pton(family, str(sockaddr[0]))
        if family == socket.AF_INET:
            raw6 = b"\0" * 10 + b"\xff\xff" + raw  # the IPv4-mapped IPv6 address
            out.add(f"{struct.unpack('=I', raw)[0]:08X}:{port:04X}")
        else:
            raw6 = raw
        words = struct.unpack("=4I", raw6)
        out.add("".join(f"{w:08X}" for w in words) + f":{port:04X}")
    return out


def _fd_link(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _peer_addrs(host: str, port: int) -> set[tuple[str, int]]:
    """``(ip, port)`` pairs a socket connected to ``host:port`` reports as its peer."""
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError:
        return set()
    out = {(str(sa[0]), port) for *_, sa in infos}
    out |= {(f"::ffff:{ip}", p) for ip, p in list(out) if "." in ip}  # IPv4-mapped
    return out


def _fd_ident(fd: int) -> str:
    """What a descriptor is (its socket, as the OS names it), to notice it was reused."""
    link = _fd_link(fd)
    if link:
        return link
    try:
        st = os.fstat(fd)
    except OSError:
        return ""
    return f"{st.st_dev}:{st.st_ino}" if stat.S_ISSOCK(st.st_mode) else ""


class ServerLink:
    """This process's TCP connection to one rpc-server, as the kernel sees it.

    Linux: found once through ``/proc/self/fd`` and ``/proc/net/tcp{,6}`` (about 2 ms
    with a hundred sockets on the host), then read with ``getsockopt(TCP_INFO)`` on a
    duplicate of its descriptor (microseconds). Elsewhere with ``/dev/fd`` (macOS, the
    BSDs): the open sockets whose peer is the server, then a non-blocking ``MSG_PEEK``
    read (end of stream or a reset: the server closed it; nothing to read: up; it takes
    no bytes). Either way the descriptor is looked up again once it is another socket.
    """

    def __init__(self, host: str, port: int, use_proc: bool | None = None) -> None:
        self.host, self.port = host, port
        self.use_proc = os.path.isdir("/proc/self/fd") if use_proc is None else use_proc
        self.addrs = _proc_addrs(host, port)
        self.peers = _peer_addrs(host, port)
        self.fd = -1
        self.link = ""

    def _find(self) -> bool | None:
        """Locate the socket (an established one first); None where it cannot be looked up."""
        return self._find_proc() if self.use_proc else self._find_peer()

    def _find_proc(self) -> bool | None:
        try:
            ours = {}
            for name in os.listdir("/proc/self/fd"):
                link = _fd_link(int(name))
                if link.startswith("socket:["):
                    ours[link[8:-1]] = (int(name), link)
            found = []
            for table in ("/proc/net/tcp", "/proc/net/tcp6"):
                with open(table, encoding="ascii") as f:
                    next(f)
                    for line in f:
                        # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
                        fields = line.split()
                        if fields[2] in self.addrs and fields[9] in ours:
                            found.append((fields[3] != _TCP_ESTABLISHED, fields[9]))
        except OSError:
            return None
        if not found:
            return False
        self.fd, self.link = ours[min(found)[1]]
        return True

    def _find_peer(self) -> bool | None:
        try:
            names = os.listdir("/dev/fd")
        except OSError:
            return None  # Windows: a socket is no C runtime descriptor
        found = []
        for name in names:
            fd = int(name)
            ident = _fd_ident(fd)
            if not ident:
                continue
            try:
                with socket.socket(fileno=os.dup(fd)) as sock:
                    peer = sock.getpeername()
            except OSError:
                continue  # not connected, not TCP, or closed meanwhile
            if (str(peer[0]), int(peer[1])) in self.peers:
                found.append((self._peek(fd) != "up", fd, ident))
        if not found:
            return False
        _, self.fd, self.link = min(found)
        return True

    @staticmethod
    def _peek(fd: int) -> str:
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:
                data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return "up"
        except OSError:
            return "down"  # reset
        return "up" if data else "down"

    def status(self) -> str:
        """The connection's state: "up"; "down" (the server closed or reset it); "none"
        (no connection, e.g. nothing allocated there yet); "unknown" (no way to look)."""
        if self.fd < 0 or _fd_ident(self.fd) != self.link:
            found = self._find()
            if not found:
                return "unknown" if found is None else "none"
        if not self.use_proc:
            return self._peek(self.fd)
        try:
            with socket.socket(fileno=os.dup(self.fd)) as sock:
                state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
        except (OSError, AttributeError):
            return "unknown"
        return "up" if state == int(_TCP_ESTABLISHED, 16) else "down"

    def check(self, device: str) -> None:
        """Raise :class:`DeviceError` when the server is gone.

        ``"down"``: it closed or reset this process's connection. ``"none"`` (no
        connection yet): it must accept one. ``"unknown"`` (Windows: sockets are no C
        runtime descriptors) passes.
        """
        status = self.status()
        if status in ("up", "unknown"):
            return
        gone = f"device {device!r}: the rpc-server at {self.host}:{self.port} is gone"
        if status == "down":
            raise DeviceError(f"{gone} (it closed this process's connection)")
        try:
            socket.create_connection((self.host, self.port), timeout=5).close()
        except OSError as exc:
            raise DeviceError(f"{gone} ({exc})") from exc

    def is_down(self) -> bool:
        """Whether the server closed this process's connection (a call now would abort)."""
        return self.status() == "down"


def server_link(dev: Any) -> ServerLink | None:
    """A :class:`ServerLink` for an rpc-server's device, None for any other device."""
    endpoint = rpc_endpoint(dev)
    return None if endpoint is None else ServerLink(*endpoint)
