"""Children that die with their parent, stop signals, ports checked before use, leftovers refused
(small real processes: `sleep`, a Python parent, a listening socket; no Flower)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from fedmerge.federation.errors import DaemonConfigError, LeftoverProcess, PortInUse
from fedmerge.federation.flower import LogFollower, SuperLink
from fedmerge.federation.supervision import (
    Address,
    port_holder,
    process_alive,
    process_start_time,
    require_free_port,
)


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not process_alive(pid)


PARENT = """
import subprocess, sys, time
from fedmerge.federation.supervision import start_child
child = start_child(["sleep", "300"], None, subprocess.DEVNULL, die_signal={sig})
print(child.pid, flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("die_signal", [signal.SIGTERM, signal.SIGKILL])
def test_a_child_dies_when_its_parent_is_killed_outright(die_signal):
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(sig=int(die_signal))], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert process_alive(child)
        assert os.getsid(child) == child  # a session of its own: a stop reaches what it forks
        parent.kill()  # SIGKILL: the parent runs no clean-up at all
        parent.wait(10)
        assert _wait_dead(child, 10)
    finally:
        parent.kill()


STOPPABLE = """
import os, signal, sys, time
from fedmerge.federation.supervision import StopRequested, stop_on_signals
with stop_on_signals():
    try:
        print("ready", flush=True)
        time.sleep(60)
    except StopRequested as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal while cleaning up is ignored
        time.sleep(0.2)
        print(stop, stop.exit_code, flush=True)
        sys.exit(stop.exit_code)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_becomes_stop_requested_once(sig):
    proc = subprocess.Popen([sys.executable, "-c", STOPPABLE], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    name = signal.Signals(sig).name
    assert out.strip() == f"{name} {128 + sig}"
    assert proc.returncode == 128 + sig


def test_a_taken_port_names_the_field_and_the_process():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        assert port_holder(port)[0] == os.getpid()
        with pytest.raises(PortInUse, match=rf"runtime_port: port {port} on 127.0.0.1 is already in use, held by pid {os.getpid()} "):
            require_free_port(Address("127.0.0.1", port), "runtime_port")
    require_free_port(Address("127.0.0.1", port), "runtime_port")  # free again once closed


@pytest.mark.parametrize("text", ["9092", "host:", "host:0", "host:70000", "host:port"])
def test_a_bad_address_is_a_config_error(text):
    with pytest.raises(DaemonConfigError, match="superlink.address"):
        Address.parse(text, "superlink.address")


def test_addresses_parse():
    assert Address.parse("0.0.0.0:9092", "a") == Address("0.0.0.0", 9092)
    assert Address.parse("[::]:9092", "a") == Address("::", 9092)
    assert str(Address("::1", 5)) == "[::1]:5" and Address("0.0.0.0", 1).connect_host == "127.0.0.1"


def test_log_follower_returns_only_complete_new_lines(tmp_path):
    log = tmp_path / "x.log"
    log.write_bytes(b"old\n")
    follower = LogFollower(log, offset=4)
    assert follower.new_lines() == []
    with open(log, "ab") as f:
        f.write(b"one\ntw")
    assert follower.new_lines() == ["one"]
    with open(log, "ab") as f:
        f.write(b"o\n")
    assert follower.new_lines() == ["two"]


def _superlink(tmp_path) -> SuperLink:
    return SuperLink(tmp_path / "sl", "127.0.0.2:1", tmp_path / "ca.pem", tmp_path / "s.pem", tmp_path / "s.key", tmp_path / "db")


def _status(sl: SuperLink, pid: int, parent: int) -> None:
    sl.home.mkdir(parents=True, exist_ok=True)
    sl.status_file.write_text(json.dumps({
        "pid": pid, "start_time": process_start_time(pid), "parent": parent, "parent_start_time": process_start_time(parent),
        "fleet": "127.0.0.2:1", "loopback": "127.0.0.1:2",
    }))  # fmt: skip


def test_a_superlink_owned_by_a_running_process_is_refused_at_once(tmp_path):
    sl = _superlink(tmp_path)
    leftover = subprocess.Popen(["sleep", "60"])
    try:
        _status(sl, leftover.pid, os.getpid())
        t0 = time.monotonic()
        with pytest.raises(LeftoverProcess, match=rf"a SuperLink \(pid {leftover.pid}, .*owned by a running coordinator \(pid {os.getpid()}\)"):
            sl._refuse_leftover(grace_s=30)
        assert time.monotonic() - t0 < 5  # no grace for one that someone still owns
    finally:
        leftover.kill()
        leftover.wait()


def test_an_orphaned_superlink_that_does_not_stop_is_refused_after_the_grace(tmp_path):
    sl = _superlink(tmp_path)
    leftover = subprocess.Popen(["sleep", "60"])
    try:
        gone_parent = subprocess.Popen(["true"])
        gone_parent.wait()
        _status(sl, leftover.pid, gone_parent.pid)
        with pytest.raises(LeftoverProcess, match=rf"left by an earlier coordinator \(pid {leftover.pid}.*did not stop within 1 s.*kill {leftover.pid}"):
            sl._refuse_leftover(grace_s=1)
    finally:
        leftover.kill()
        leftover.wait()


def test_a_dead_superlink_in_the_status_file_is_no_obstacle(tmp_path):
    sl = _superlink(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    _status(sl, dead.pid, os.getpid())
    sl._refuse_leftover(grace_s=30)  # returns at once


@pytest.mark.slow
def test_a_client_whose_supernode_cannot_start_for_good_says_why_and_exits(make_federation, tmp_path):
    """An unusable node key is not retried: the daemon exits 1 with Flower's reason and the log's path."""
    import yaml

    from fedmerge.federation.credentials import make_tls
    from fedmerge.federation.supervision import free_port

    tf = make_federation(1)
    tls = make_tls(tmp_path / "tls", ["127.0.0.2"])
    bad_key = tmp_path / "bad.node"
    bad_key.write_text("not a key\n")
    path = tf.client_configs["hospital-a"]
    cfg = yaml.safe_load(path.read_text())
    cfg.update(superlink_address=f"127.0.0.2:{free_port('127.0.0.2')}", root_cert=str(tls.ca_cert), supernode_key=str(bad_key), runtime_port=free_port())
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "fedmerge", "client", "--config", str(path)], capture_output=True, text=True, timeout=300)
    log = tf.root / "clients" / "hospital-a" / "supernode" / "supernode.log"
    assert proc.returncode == 1
    assert (
        "fedmerge client: error: hospital-a: the SuperNode stopped: the SuperNode auth key is invalid "
        "(Flower exit 302: Unable to parse the private key file." in proc.stderr
    ), proc.stderr[-2000:]
    assert f"log {log}" in proc.stderr
    assert proc.stderr.count("SuperNode started towards") == 1  # not retried


ORPHAN = """
import os, time
from fedmerge.federation.supervision import exit_when_orphaned
exit_when_orphaned(os.getppid(), interval=0.1)
print(os.getpid(), flush=True)
time.sleep(300)
"""

LAUNCHING_PARENT = """
import os, subprocess, sys, time
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(child.pid, flush=True)
time.sleep(300)
"""


def _children_gone_with_their_parent(cmd: list[str], env=None) -> tuple[int, bool]:
    parent = subprocess.Popen([sys.executable, "-c", LAUNCHING_PARENT, *cmd], stdout=subprocess.PIPE, text=True, env=env)
    try:
        child = int(parent.stdout.readline())
        time.sleep(1.0)
        alive_before = process_alive(child)
        parent.kill()
        parent.wait(10)
        return child, alive_before and _wait_dead(child, 10)
    finally:
        parent.kill()


def test_a_process_watching_its_parent_ends_when_the_parent_is_killed():
    child, gone = _children_gone_with_their_parent([sys.executable, "-c", ORPHAN])
    assert gone, f"pid {child} outlived its parent"


def test_a_process_whose_parent_is_already_gone_ends_at_once():
    done = subprocess.run([sys.executable, "-c", "from fedmerge.federation.supervision import exit_when_orphaned; "
                           "exit_when_orphaned(1); print('still here')"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "still here" not in done.stdout


def test_an_app_started_by_the_guard_script_without_its_launch_server_dies_with_the_flower_process(tmp_path):
    """Flower's launcher runs ``flwr-serverapp``; its launch server is gone (the daemon is being
    killed: the socket file is still there, nobody listens), so the script starts the app in a
    fresh interpreter. That app must end with the process that started it, not retry a dead
    SuperLink forever."""
    from fedmerge.federation.guard import LAUNCH_SOCKET_ENV, write_guard_bin

    bin_dir = write_guard_bin(tmp_path / "bin", ("serverapp",))
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(tmp_path / "launch.sock"))
    dead.close()  # the file stays; connecting is refused
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        unreachable = s.getsockname()[1]
    env = {**os.environ, LAUNCH_SOCKET_ENV: str(tmp_path / "launch.sock")}
    cmd = [str(bin_dir / "flwr-serverapp"), "--runtime-api-address", f"127.0.0.1:{unreachable}", "--token", "x"]
    child, gone = _children_gone_with_their_parent(cmd, env)
    assert gone, f"the app (pid {child}) outlived the Flower process that launched it"
