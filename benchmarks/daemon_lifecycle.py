"""How long the federation's daemons take to be ready, and to leave nothing behind when stopped or killed.

On loopback (public interface 127.0.0.2), with tiny models, ``--repeat`` times:

- ``coordinator_ready_s``: ``fedmerge coordinator`` started to its ``ready:`` line (SuperLink up on
  loopback, node keys registered, Fleet listener open);
- ``coordinator_sigkill_gone_s``: SIGKILL of the coordinator daemon mid-round to the last of its
  Flower processes (SuperLink, SuperExec, ServerApp launcher, ServerApp) gone from /proc;
- ``client_sigterm_exit_s`` / ``client_sigterm_gone_s``: SIGTERM of a ``fedmerge client`` to its exit,
  and to the last of its processes (SuperNode, SuperExec, launcher, ClientApps) gone;
- ``client_sigkill_gone_s``: the same after SIGKILL (the daemon runs no clean-up at all).

    .venv/bin/python benchmarks/daemon_lifecycle.py --repeat 3

The baseline is the daemon's own exit: what follows it is what supervision costs.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "federation"))

from deployment_helpers import make_layout, processes_mentioning, start_client, start_coordinator  # noqa: E402


def _gone_after(marker: Path, t0: float, timeout: float = 60.0) -> float:
    while processes_mentioning(marker):
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"processes of {marker} still alive after {timeout:.0f} s: {processes_mentioning(marker)}")
        time.sleep(0.02)
    return round(time.monotonic() - t0, 2)


def one_cycle(work: Path, models) -> dict[str, float]:
    layout = make_layout(work, models, 2, rounds=1, part_bytes=64 * 1024)
    clients = {name: start_client(layout, name) for name in layout.names}
    out: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        coordinator = start_coordinator(layout)
        coordinator.wait_for("ready:", 300)
        out["coordinator_ready_s"] = round(time.monotonic() - t0, 2)
        accepted = layout.state / "rounds" / "round-0001" / "accepted"
        while not (accepted.is_dir() and any(accepted.iterdir())):
            time.sleep(0.05)
        t0 = time.monotonic()
        coordinator.signal(signal.SIGKILL)
        coordinator.wait(30)
        out["coordinator_sigkill_gone_s"] = _gone_after(layout.state, t0)

        a, b = layout.names
        t0 = time.monotonic()
        clients[a].signal(signal.SIGTERM)
        clients[a].wait(60)
        out["client_sigterm_exit_s"] = round(time.monotonic() - t0, 2)
        out["client_sigterm_gone_s"] = _gone_after(layout.toy.root / "clients" / a, t0)
        t0 = time.monotonic()
        clients[b].signal(signal.SIGKILL)
        clients[b].wait(30)
        out["client_sigkill_gone_s"] = _gone_after(layout.toy.root / "clients" / b, t0)
    finally:
        for daemon in clients.values():
            daemon.stop()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args()
    from fedmerge.federation.toy import build_toy_federation

    with tempfile.TemporaryDirectory(prefix="daemon-lifecycle-") as tmp:
        models = build_toy_federation(Path(tmp) / "models", 2)
        runs = [one_cycle(Path(tmp) / f"run-{i}", models) for i in range(args.repeat)]
    summary = {k: {"median": statistics.median(r[k] for r in runs), "max": max(r[k] for r in runs)} for k in runs[0]}
    result = {"runs": runs, "summary": summary}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
