"""What the real-process federation tests share: a loopback deployment laid out on disk, daemons
started as their commands, the process table read from /proc, and an outsider's ``flwr`` CLI.

The "public" interface of every deployment here is 127.0.0.2 (a second loopback address), so a
listener bound to 127.0.0.1 is visibly not reachable there.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fedmerge.federation import flower
from fedmerge.federation.credentials import make_node_key, make_tls
from fedmerge.federation.supervision import free_port
from fedmerge.federation.toy import ToyFederation, build_toy_federation

PUBLIC_HOST = "127.0.0.2"
FEDMERGE = [sys.executable, "-m", "fedmerge"]
ROGUE_SITE = Path(__file__).resolve().parent / "rogue_site"


# -- the process table ----------------------------------------------------------------------------------


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _state(pid: int) -> str:
    stat = _read(f"/proc/{pid}/stat").decode(errors="replace")
    return stat.rsplit(")", 1)[1].split()[0] if ")" in stat else ""


def processes_mentioning(marker: str | Path) -> dict[int, str]:
    """Live processes (not zombies, not this one) whose command line or environment holds ``marker``.

    Every process a daemon starts inherits an environment naming its state folder (FLWR_HOME,
    the launch socket), so a deployment's folder finds all of them, Flower's grandchildren too,
    whatever session or parent they ended up in.
    """
    needle = str(marker).encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        cmdline = _read(f"/proc/{pid}/cmdline")
        if needle in cmdline or needle in _read(f"/proc/{pid}/environ"):
            if _state(pid) not in ("", "Z", "X"):
                found[pid] = cmdline.replace(b"\0", b" ").decode(errors="replace")[:300]
    return found


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` in the process tree."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read(f"/proc/{entry}/stat").decode(errors="replace")
            if ")" in stat:
                fields = stat.rsplit(")", 1)[1].split()
                if fields[0] not in ("Z", "X"):
                    children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def process_tree(pid: int) -> dict[int, tuple[str, str]]:
    """``pid``'s live descendants: pid -> (start time, command line); the start time tells a reused pid apart."""
    out = {}
    for child in descendants(pid):
        stat = _read(f"/proc/{child}/stat").decode(errors="replace")
        if ")" in stat:
            out[child] = (stat.rsplit(")", 1)[1].split()[19], _read(f"/proc/{child}/cmdline").replace(b"\0", b" ").decode(errors="replace")[:200])
    return out


def survivors(tree: dict[int, tuple[str, str]], timeout: float) -> dict[int, str]:
    """Those of ``tree`` (from ``process_tree``) still running after up to ``timeout`` s."""
    deadline = time.monotonic() + timeout

    def alive() -> dict[int, str]:
        left = {}
        for pid, (started, cmd) in tree.items():
            stat = _read(f"/proc/{pid}/stat").decode(errors="replace")
            if ")" in stat and stat.rsplit(")", 1)[1].split()[19] == started and _state(pid) not in ("", "Z", "X"):
                left[pid] = cmd
        return left

    left = alive()
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = alive()
    return left


def wait_until_gone(marker: str | Path, timeout: float) -> dict[int, str]:
    """Wait for every process mentioning ``marker`` to end; returns those still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    left = processes_mentioning(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = processes_mentioning(marker)
    return left


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now (connections in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def kill_leftovers(marker: str | Path) -> None:
    """Test clean-up only: SIGKILL what a failed test left (processes this test run started, found by its folder)."""
    for pid in processes_mentioning(marker):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# -- a deployment on disk ------------------------------------------------------------------------------


@dataclass
class Layout:
    """A consortium and its hospitals laid out under ``root``: TLS, node keys, federation and client configs."""

    root: Path
    toy: ToyFederation
    tls: object
    node_keys: dict[str, tuple[Path, Path]]
    public_port: int
    runtime_ports: dict[str, int] = field(default_factory=dict)

    @property
    def public_address(self) -> str:
        return f"{PUBLIC_HOST}:{self.public_port}"

    @property
    def names(self) -> list[str]:
        return sorted(self.toy.client_configs)

    @property
    def state(self) -> Path:
        return self.toy.root / "coordinator"

    def client_config(self, name: str) -> Path:
        return self.toy.client_configs[name]

    def installed(self, name: str) -> Path:
        return self.toy.root / "clients" / name / "models" / "current"

    def set_federation(self, **fields) -> Path:
        fed = yaml.safe_load(self.toy.federation_config.read_text())
        fed.update(fields)
        self.toy.federation_config.write_text(yaml.safe_dump(fed, sort_keys=False))
        return self.toy.federation_config


def make_layout(root: Path, toy_models, n: int = 3, *, extra_keys: tuple[str, ...] = (), seal: bool = False, **federation) -> Layout:
    """``n`` toy hospitals behind one coordinator; ``seal``: hospitals seal and the coordinator requires it."""
    # A generous round timeout: on a loaded machine a node's Flower messages can take seconds each.
    toy = build_toy_federation(root / "fed", n, models_from=toy_models, part_bytes=384 * 1024, round_timeout_s=300.0, seal=seal)
    tls = make_tls(root / "tls", [PUBLIC_HOST, "localhost"])
    (root / "nodekeys").mkdir(parents=True)
    names = sorted(toy.client_configs)
    keys = {name: make_node_key(root / "nodekeys", name) for name in [*names, *extra_keys]}
    layout = Layout(root, toy, tls, keys, free_port(PUBLIC_HOST))
    layout.set_federation(
        wait_for_clients_s=120.0,
        superlink={
            "address": layout.public_address,
            "ca_cert": str(tls.ca_cert),
            "server_cert": str(tls.server_cert),
            "server_key": str(tls.server_key),
            "supernode_public_keys": {name: str(keys[name][1]) for name in names},
        },
        **federation,
    )
    for name in names:
        layout.runtime_ports[name] = free_port()
        path = toy.client_configs[name]
        cfg = yaml.safe_load(path.read_text())
        cfg.update(superlink_address=layout.public_address, root_cert=str(tls.ca_cert), supernode_key=str(keys[name][0]), runtime_port=layout.runtime_ports[name])
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return layout


def add_institution(layout: Layout, name: str, *, finetune: str = "hospital-a", **client: object) -> Path:
    """Enrol one more institution (identity, signed trust store, bound node key) and write its client config.

    Its config starts as ``finetune``'s, with its own identity, state, node key and runtime port;
    ``client`` overrides fields (an ``institution`` or ``identity_key`` other than its own, say).
    """
    from fedmerge.security.keys import generate_identity, load_identity
    from fedmerge.security.trust import TrustStore

    toy = layout.toy
    keys = toy.root / "keys"
    store = TrustStore.open_for_editing(toy.trust_store)
    store.add(generate_identity(name, keys).public, role="institution")
    store.sign(load_identity(toy.coordinator_key))
    store.save()
    layout.node_keys[name] = make_node_key(layout.root / "nodekeys", name)
    fed = yaml.safe_load(toy.federation_config.read_text())
    fed["superlink"]["supernode_public_keys"][name] = str(layout.node_keys[name][1])
    toy.federation_config.write_text(yaml.safe_dump(fed, sort_keys=False))
    cfg = yaml.safe_load(toy.client_configs[finetune].read_text())
    layout.runtime_ports[name] = free_port()
    cfg.update(institution=name, identity_key=str(keys / f"{name}.key"), state_dir=str(toy.root / "clients" / name),
               supernode_key=str(layout.node_keys[name][0]), runtime_port=layout.runtime_ports[name])  # fmt: skip
    cfg.update(client)
    path = toy.root / "clients" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    toy.client_configs[name] = path
    return path


# -- daemons as their commands ---------------------------------------------------------------------------


class Daemon:
    """``fedmerge client`` or ``fedmerge coordinator`` as a process of its own, its output in a file."""

    def __init__(self, args: list[str], out: Path, env: dict[str, str] | None = None):
        self.out = out
        self.offset = out.stat().st_size if out.exists() else 0  # a daemon started again appends to the same file
        self._f = open(out, "ab")
        self.proc = subprocess.Popen([*FEDMERGE, *args], stdout=self._f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        """What this start of the daemon printed."""
        with open(self.out, "rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode} before {needle!r}:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {needle!r} within {timeout:.0f} s:\n{self.text()[-3000:]}")
            time.sleep(0.25)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._f.close()

    @staticmethod
    def stop_all(daemons: "list[Daemon]") -> None:
        """SIGTERM them all at once, then wait for each (they stop their Flower processes side by side)."""
        for d in daemons:
            if d.proc.poll() is None:
                d.proc.terminate()
        for d in daemons:
            d.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._f.close()


def start_client(layout: Layout, name: str, config: Path | None = None, rogue: str | None = None) -> Daemon:
    """``fedmerge client`` for ``name``; ``rogue`` (e.g. ``"1:escape,2:stall"``) makes its processes misbehave (``rogue_site``)."""
    env = None
    if rogue is not None:
        env = dict(os.environ, FEDMERGE_TEST_ROGUE=rogue)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROGUE_SITE), env.get("PYTHONPATH", "")) if p)
    return Daemon(["client", "--config", str(config or layout.client_config(name))], layout.root / f"client-{name}.out", env)


def start_coordinator(layout: Layout, *extra: str) -> Daemon:
    return Daemon(["coordinator", "--config", str(layout.toy.federation_config), *extra], layout.root / "coordinator.out")


# -- an outsider holding only ca.pem ---------------------------------------------------------------------


def outsider_flwr_home(root: Path, address: str, ca_cert: Path) -> Path:
    """A ``flwr`` configuration naming ``address`` with nothing but the consortium's CA certificate."""
    home = root / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "target"\n\n[superlink.target]\naddress = "{address}"\nroot-certificates = "{ca_cert}"\n')
    return home


def flwr_cli(args: list[str], flwr_home: Path) -> tuple[int, str]:
    """Run one ``flwr`` command in this interpreter (a new one costs seconds); returns its exit code and output."""
    from flwr.cli.app import app
    from flwr.supercore.logger import console_handler

    saved_home = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(flwr_home)
    out = io.StringIO()
    real_stdout = sys.__stdout__
    streams = (sys.stdout, sys.stderr, console_handler.stream)
    sys.__stdout__ = out  # `--format json` writes to sys.__stdout__ directly
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                app(args, standalone_mode=False)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except Exception as exc:  # click/typer raise their own errors for a failed command
                out.write(f"{type(exc).__name__}: {exc}")
                code = 1
    finally:
        sys.__stdout__ = real_stdout
        sys.stdout, sys.stderr, console_handler.stream = streams
        if saved_home is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = saved_home
    return code, out.getvalue()


class ProbePinningSuperLink(flower.SuperLink):
    """A coordinator's SuperLink that also runs one more app bundle (a test's probe), as a careless coordinator might."""

    extra_pins: list[str] = []

    def serverapp_pins(self) -> list[str]:
        return [*super().serverapp_pins(), *self.extra_pins]


# -- an evaluator whose verdict is known in advance --------------------------------------------------


def write_gate_eval(folder: Path) -> Path:
    """An eval config (``evaluator.config_path``) on which any sane model scores 1 and a broken one 0.

    Each item's gold ending is one word, its rival nine: a model's log-likelihood of nine tokens
    is far below that of one, so every working model picks the gold ending (acc 1.0). A model
    whose logits are not finite (scaled-up weights) scores every ending NaN and lm-eval picks the
    first, never the gold (acc 0.0).
    """
    from fedmerge.eval.tasks import write_local_task

    words = ["fever", "cough", "rash", "pain", "ache", "nausea", "sore", "chill"]
    items = [
        {"id": f"q{i}", "question": f"patient {i} presents with", "choices": [" ".join(words[(i + k) % 8] for k in range(9)), words[i % 8]], "answer": 1}
        for i in range(16)
    ]
    write_local_task(folder / "tasks", "one_word", items, kind="hellaswag")
    path = folder / "eval.yaml"
    path.write_text(yaml.safe_dump({"tasks": ["one_word"], "task_dirs": [str(folder / "tasks")], "num_fewshot": 0, "device": "cpu",
                                    "batch_size": 4, "cpu_threads": 1, "store": str(folder / "results.db")}))  # fmt: skip
    return path


TRAIN_HOOKS = Path(__file__).resolve().parent / "train_hooks.py"


def train_hook(*args: str) -> list[str]:
    """A client config's ``train_hook`` running ``train_hooks.py`` with ``args``."""
    return [sys.executable, str(TRAIN_HOOKS), *args]
