"""Child processes that cannot outlive the daemon that started them, and ports checked before use.

``fedmerge client`` and ``fedmerge coordinator`` own every Flower process they start. Each child
runs in a session of its own (so a stop reaches the processes it forks too) and asks the kernel
for a signal when its parent dies (``PR_SET_PDEATHSIG``): a daemon killed with SIGKILL, which
runs no clean-up of its own, still takes its children down. Grandchildren that Flower starts
itself watch their parent by pid (Flower's ``--parent-pid``) or, for the SuperLink, by a pipe
whose end of file means the coordinator is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fedmerge.federation.errors import DaemonConfigError, PortInUse

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux); False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def exit_when_orphaned(parent: int, interval: float = 0.5) -> None:
    """End this process once ``parent`` is no longer its parent (it died, or had died already).

    A watcher thread, not ``PR_SET_PDEATHSIG``: the parent here is a Flower process that may start
    its children from a worker thread, and the kernel's signal follows the thread, not the process.
    """
    import threading
    import time

    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="fedmerge-parent-watch", daemon=True).start()


def _child_setup(parent: int, sig: int):
    def setup() -> None:  # runs in the child between fork and exec
        os.setsid()
        die_with_parent(sig)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), sig)

    return setup


def start_child(cmd: list[str], env: dict[str, str], log_file: IO[bytes], *, die_signal: int = signal.SIGTERM, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own, output to ``log_file``, ``die_signal`` sent to it when this process dies."""
    return subprocess.Popen(
        cmd, env=env, stdin=stdin, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=_child_setup(os.getpid(), die_signal),
    )  # fmt: skip


def stop_child(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM a child we started and its session's process group, SIGKILL after ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_child(proc)
        return
    # The leader is gone; what it forked in its group goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def kill_child(proc: subprocess.Popen | None) -> None:
    """SIGKILL a child we started and its process group (a crash, or a stop that did not finish)."""
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


# -- signals --------------------------------------------------------------------------------------------


class StopRequested(BaseException):
    """SIGTERM, SIGINT or SIGHUP arrived: the daemon stops its children and exits.

    A ``BaseException`` like ``KeyboardInterrupt``, so that no ``except Exception`` on the way
    swallows it.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn the first stop signal into ``StopRequested``; later ones are ignored while the daemon cleans up."""
    raised = False

    def handler(signum, frame) -> None:
        nonlocal raised
        if raised:
            return
        raised = True
        raise StopRequested(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# -- ports ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, what: str) -> "Address":
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise DaemonConfigError(f"{what}: {text!r} is not HOST:PORT")
        return cls(host.strip("[]") or "0.0.0.0", int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def connect_host(self) -> str:
        """Where a local client reaches a listener bound to this address."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def port_holder(port: int) -> tuple[int, str] | None:
    """The pid and command line of a process (of this user) listening on ``port``, if one can be seen."""
    inodes = {f"socket:[{i}]" for i in _listening_inodes(port)}
    if not inodes:
        return None
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            for fd in (pid_dir / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    cmdline = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    return int(pid_dir.name), cmdline
        except OSError:
            continue
    return None


def port_is_free(addr: Address) -> bool:
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr.host, addr.port))
        except OSError:
            return False
    return True


def require_free_port(addr: Address, what: str) -> None:
    """``PortInUse`` naming ``what`` (a config field) and the process holding the port, if ``addr`` cannot be bound."""
    if port_is_free(addr):
        return
    holder = port_holder(addr.port)
    who = f"held by pid {holder[0]} ({holder[1][:200]})" if holder else "held by another process (not visible to this user)"
    raise PortInUse(f"{what}: port {addr.port} on {addr.host} is already in use, {who}; stop that process or choose another port")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot): with the pid, it names one process for good."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
