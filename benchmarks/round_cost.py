"""What a federation round costs on real Flower processes, beside what it cannot avoid.

For the ~1B set (``benchmarks/common.py::ensure_1b_set``) and N clients (default 3), on loopback
with TLS and SuperNode authentication:

- the round's wall time, bytes sent per client (its delta package) and received (the model),
  peak RSS of the coordinator's ServerApp, of the SuperLink and of the hospitals' ClientApps;
- in the same run, a bare Flower app moving the same bytes in the same parts (no packing,
  verification, spool, merge or install) and the merge engine alone on the round's verified
  deltas. Target: round <= 1.5 x (bare transport + engine); coordinator peak RSS < 3 GB.

``--compression SPEC`` sets the federation's ``compression`` (what hospitals send);
``--publish-compression SPEC`` what the coordinator pushes back (``none``: the whole model).

``--transports a,b,...`` first moves the same bytes with the bare app under each named
transport setting (``TRANSPORTS``: Flower's defaults, then each of fedmerge's changes alone, then
all of them), each on its own SuperLink and SuperNodes, and reports its seconds and MB/s: the
effect of each change, in one run. ``--bare-only-mb MB`` moves that many MiB each way per node
instead of a round's bytes and skips the round.

``--clients 2,3,4`` repeats the round for each N (peak RSS against N). The fine-tunes of the set
are reused round-robin when N exceeds them (cost does not depend on the values).

``--simulated 3,6,12`` runs one round per N under Flower's simulation engine (``fedmerge
simulate``, Ray actors for the ClientApps) and reports the peak RSS of the coordinator's process
(the ServerApp, Flower's in-memory link state and the Ray driver) beside the N packages it took in.

    .venv/bin/python benchmarks/round_cost.py --clients 3 --delta-dtype bfloat16 --compression int4 --publish-compression int4
    .venv/bin/python benchmarks/round_cost.py --clients 3 --set toy --bare-only-mb 192 --transports flower-defaults,memory,one-chunk,raw-payload,fedmerge
    .venv/bin/python benchmarks/round_cost.py --clients none --simulated 3,6,12 --set small --delta-dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BenchModelSpec, ensure_1b_set, ensure_bench_set  # noqa: E402

# A ~0.16B set of the same shape family, for runs where the ~1B one does not fit the time.
SMALL_SPEC = BenchModelSpec(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4)
BARE_APP = Path(__file__).resolve().parent / "bare_flower_app"
FLOWER_CHUNK = "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE"


@dataclass(frozen=True)
class Transport:
    """One way of running Flower's transport: link state, Flower's environment settings, payload form."""

    what: str
    link_state: str  # "memory" or "file" (superlink.link_state)
    env: dict[str, str] = field(default_factory=dict)  # over fedmerge's defaults, for every Flower process
    payload: str = "raw"  # "raw" (fedmerge's Array of bytes) or "numpy" (np.save'd, as before); bare app only
    poll_max_s: float | None = None  # the coordinator's longest wait between polls (None: the Exchange's default); bare app only


_FLOWER_DEFAULT_CHUNK = {FLOWER_CHUNK: str(5 * 1024 * 1024)}
_BEFORE = dict(link_state="file", env=_FLOWER_DEFAULT_CHUNK, payload="numpy", poll_max_s=0.05)
TRANSPORTS: dict[str, Transport] = {
    "flower-defaults": Transport("SQLite link state, 5 MiB array chunks, numpy payloads, polls every 50 ms (fedmerge before)", **_BEFORE),
    "memory": Transport("in-memory link state only", **{**_BEFORE, "link_state": "memory"}),
    "one-chunk": Transport("one array chunk per part only", **{**_BEFORE, "env": {}}),
    "raw-payload": Transport("payload bytes as they are (no np.save / np.load copies) only", **{**_BEFORE, "payload": "raw"}),
    "poll-backoff": Transport("polls spaced out to 0.4 s while nothing comes only", **{**_BEFORE, "poll_max_s": None}),
    "fedmerge": Transport("all of them (fedmerge's defaults)", "memory", {}, "raw", None),
}


class PeakRss:
    """Samples /proc for the peak RSS (VmHWM) of processes whose command line matches a label."""

    def __init__(self, labels: dict[str, str], interval: float = 0.5):
        self.labels, self.interval = labels, interval
        self.peak_kb = {k: 0 for k in labels}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for pid_dir in Path("/proc").glob("[0-9]*"):
                try:
                    cmd = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    label = next((k for k, pat in self.labels.items() if pat in cmd), None)
                    if label is None:
                        continue
                    for line in (pid_dir / "status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_kb[label] = max(self.peak_kb[label], int(line.split()[1]))
                except (OSError, ValueError):
                    continue
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRss":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    def gb(self) -> dict[str, float]:
        return {k: round(v / 1024**2, 3) for k, v in self.peak_kb.items()}


class CpuMeter:
    """CPU seconds (user + system) spent by each kind of process of a deployment while it runs.

    Processes are found by the deployment's folder in their command line or environment and
    sampled every ``interval`` seconds (an app process lives for one message; forked by a
    launcher, it carries the launcher's command line). Each process counts what it spent between
    the start (or its birth) and its last sample. On a shared machine, CPU seconds move far less
    with the load than wall seconds.
    """

    KINDS = {"superlink": "superlink_main", "serverapp launcher+apps": "guard --serve serverapp", "supernodes": "flower-supernode",
             "clientapp launchers+apps": "guard --serve clientapp", "superexec": "flower-superexec"}  # fmt: skip

    def __init__(self, work: Path, interval: float = 0.2):
        self.work, self.interval = str(work), interval
        self.tick = os.sysconf("SC_CLK_TCK")
        self.first: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _sample(self, initial: bool = False) -> None:
        for pid_dir in Path("/proc").glob("[0-9]*"):
            try:
                pid = int(pid_dir.name)
                if pid not in self.last:
                    cmd = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    kind = next((k for k, pat in self.KINDS.items() if pat in cmd), None)
                    if kind is None or (self.work not in cmd and self.work.encode() not in (pid_dir / "environ").read_bytes()):
                        continue
                else:
                    kind = self.last[pid][0]
                fields = (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()
                used = (int(fields[11]) + int(fields[12])) / self.tick  # utime, stime
                if pid not in self.last:
                    self.first[pid] = used if initial else 0.0
                self.last[pid] = (kind, used)
            except (OSError, ValueError, IndexError):
                continue

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "CpuMeter":
        self._sample(initial=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self._sample()
        totals = {k: 0.0 for k in self.KINDS}
        for pid, (kind, used) in self.last.items():
            totals[kind] += max(0.0, used - self.first[pid])
        self.seconds = {k: round(v, 1) for k, v in totals.items()}


@dataclass
class RoundSettings:
    part_bytes: int
    delta_dtype: str
    compression: str = "none"
    publish_compression: str = "none"
    parts_in_flight: int | None = None  # None: the federation config's default
    parts_in_flight_total: int | None = None


class Deployment:
    """A coordinator (SuperLink with TLS and node auth) and N SuperNodes on loopback, under one transport."""

    def __init__(self, work: Path, n: int, base: Path, finetunes: list[Path], settings: RoundSettings, transport: Transport):
        self.work, self.n, self.base, self.finetunes = work, n, base, finetunes
        self.settings, self.transport = settings, transport
        self.nodes: list = []
        self.coord = None
        self._saved_env: dict[str, str | None] = {}

    def _layout(self):
        """N institutions' identities and configs over the set's fine-tunes, reused round-robin."""
        from fedmerge.federation.toy import ToyFederation, build_toy_federation, institution_names

        names = institution_names(self.n)
        models = ToyFederation(self.work, self.base, {nm: self.finetunes[i % len(self.finetunes)] for i, nm in enumerate(names)}, None, {}, None, None, None)
        s = self.settings
        overrides = {"delta_dtype": s.delta_dtype, "wait_for_clients_s": 600.0, "compression": s.compression}
        if s.publish_compression != "none":
            overrides["publish_compression"] = s.publish_compression
        for key in ("parts_in_flight", "parts_in_flight_total"):
            if getattr(s, key) is not None:
                overrides[key] = getattr(s, key)
        tf = build_toy_federation(self.work / "fed", self.n, models_from=models, part_bytes=s.part_bytes, round_timeout_s=3600.0, federation_overrides=overrides)
        return names, tf

    def __enter__(self) -> "Deployment":
        import yaml

        from fedmerge.federation import flower
        from fedmerge.federation.coordinator_daemon import CoordinatorDaemon
        from fedmerge.federation.credentials import make_node_key, make_tls
        from fedmerge.federation.supervision import free_port

        for key, value in self.transport.env.items():  # every process started below inherits them
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        self.names, self.tf = self._layout()
        tls = make_tls(self.work / "tls", ["127.0.0.1"])
        (self.work / "nodekeys").mkdir()
        keys = {nm: make_node_key(self.work / "nodekeys", nm) for nm in self.names}
        address = f"127.0.0.1:{free_port()}"
        fed = yaml.safe_load(self.tf.federation_config.read_text())
        fed["superlink"] = {
            "address": address, "ca_cert": str(tls.ca_cert), "server_cert": str(tls.server_cert), "server_key": str(tls.server_key),
            "supernode_public_keys": {nm: str(keys[nm][1]) for nm in self.names}, "link_state": self.transport.link_state,
        }  # fmt: skip
        self.tf.federation_config.write_text(yaml.safe_dump(fed))
        self.strategy = fed["strategy"]
        pins = [flower.app_hash(), flower.app_hash(BARE_APP)]

        class BareAppSuperLink(flower.SuperLink):  # the baseline app runs at the coordinator too
            def serverapp_pins(self) -> list[str]:
                return [*super().serverapp_pins(), flower.app_hash(BARE_APP)]

        self.coord = CoordinatorDaemon(self.tf.federation_config, superlink_class=BareAppSuperLink)
        self.coord.start()
        for nm in self.names:
            cfg = self.tf.client_configs[nm]
            self.nodes.append(flower.SuperNode(self.work / "nodes" / nm, address, str(tls.ca_cert), str(keys[nm][0]), str(cfg), free_port(), pins).start())
        return self

    def __exit__(self, *exc) -> None:
        for node in self.nodes:
            node.stop()
        if self.coord is not None:
            self.coord.stop()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def round(self) -> dict:
        """One fedmerge round: its record's figures and the peak RSS of each kind of process."""
        labels = {"coordinator_serverapp": "guard --serve serverapp", "superlink": "fedmerge.federation.superlink_main", "client_apps": "guard --serve clientapp"}
        with PeakRss(labels) as rss, CpuMeter(self.work) as cpu:
            self.coord.submit()
            records = self.coord.wait(timeout=7200, poll_s=2.0)
        rec = records[0]
        assert rec.status.value == "completed", rec
        self.record = rec
        pub = rec.publication
        return {
            "round_seconds": round(rec.finished_at - rec.started_at, 1),
            "merge_seconds_in_round": round(rec.merge.seconds, 1),
            "bytes_sent_per_client": {k: c.bytes for k, c in rec.contributions.items()},
            "model_bytes_received_per_client": pub.model_bytes,
            "peak_rss_gb": rss.gb(),
            "round_cpu_seconds_by_process": cpu.seconds,
            "phase_seconds": phases(rec),
        }

    def bare(self, up_bytes: int, down_bytes: int) -> dict:
        """The bare app moving ``up_bytes`` from and ``down_bytes`` to every node, in the round's parts and windows."""
        from fedmerge import flower_internals

        cfg = self.coord.cfg
        plan, out = self.work / "bare-plan.json", self.work / "bare-result.json"
        out.unlink(missing_ok=True)
        plan.write_text(json.dumps({
            "nodes": self.n, "up_bytes": up_bytes, "down_bytes": down_bytes, "part_bytes": self.settings.part_bytes,
            "window": cfg.parts_in_flight, "total_window": cfg.parts_in_flight_total, "payload": self.transport.payload, "out": str(out),
            "poll_max_s": self.transport.poll_max_s,
        }))  # fmt: skip
        with PeakRss({"bare_serverapp": "guard --serve serverapp"}) as rss, CpuMeter(self.work) as cpu:
            t0 = time.perf_counter()
            flower_internals.start_run(self.coord.superlink.control, BARE_APP, {"plan": str(plan)})
            while not out.exists():
                self.coord.superlink.check_alive()
                time.sleep(1.0)
            wall = time.perf_counter() - t0
        res = json.loads(out.read_text())
        if res.get("failed"):
            raise RuntimeError(f"the bare transfer failed for nodes {res['failed']}")
        moved = self.n * (up_bytes + down_bytes)
        return {
            "bare_transfer_seconds": round(res["seconds"], 1), "bare_up_seconds": round(res["up_seconds"], 1), "bare_down_seconds": round(res["down_seconds"], 1),
            "bare_run_wall_seconds": round(wall, 1), "bare_mb_per_s": round(moved / 1e6 / res["seconds"], 1), "bare_serverapp_peak_rss_gb": rss.gb()["bare_serverapp"],
            "bare_cpu_seconds": round(sum(cpu.seconds.values()), 1), "bare_cpu_seconds_per_gb": round(sum(cpu.seconds.values()) / (moved / 1e9), 1),
            "bare_cpu_seconds_by_process": cpu.seconds,
        }  # fmt: skip

    def engine_alone(self) -> float:
        """The merge engine alone on the round's verified deltas (as the coordinator stores them)."""
        from fedmerge.merging.engine import MergeSpec, merge
        from fedmerge.merging.taskvector import DeltaCheckpoint

        deltas = [DeltaCheckpoint(Path(c.delta_dir)) for _, c in sorted(self.record.contributions.items())]
        t0 = time.perf_counter()
        merge(self.base, deltas, self.work / "engine-only", MergeSpec(**self.strategy), progress=False)
        return round(time.perf_counter() - t0, 1)


def phases(rec) -> dict[str, float]:
    """Where the round's wall time went, from its record's events: opened -> every package accepted
    (pack, upload, verify), -> merged (merge, and the encoding and rebuild of a compressed
    publication), -> signed, -> every hospital installed (push, rebuild, verify, install)."""
    at = {}
    for e in rec.events:
        at.setdefault(e.kind.value, []).append(e.at)
    marks = [("collect", "accepted"), ("merge", "merged"), ("sign", "signed"), ("push_and_install", "installed")]
    out, last = {}, rec.started_at
    for name, kind in marks:
        if kind in at:
            end = max(at[kind])
            out[name] = round(end - last, 1)
            last = end
    return out


def transport_effects(work: Path, n: int, models: tuple[Path, list[Path]], settings: RoundSettings, names: list[str], each_bytes: int) -> list[dict]:
    """The bare transfer of ``each_bytes`` up and down per node under each named transport."""
    rows = []
    for name in names:
        t = TRANSPORTS[name]
        with Deployment(work / f"transport-{name}", n, *models, settings, t) as dep:
            row = {"transport": name, "what": t.what, "clients": n, "mib_each_way_per_node": each_bytes // 2**20, **dep.bare(each_bytes, each_bytes)}
        rows.append(row)
        print(json.dumps(row, indent=2), flush=True)
    return rows


def one_round(work: Path, n: int, models: tuple[Path, list[Path]], settings: RoundSettings, transport: str, bare: bool = True) -> dict:
    with Deployment(work, n, *models, settings, TRANSPORTS[transport]) as dep:
        result: dict = {"clients": n, "transport": transport, **dep.round()}
        if bare:
            # Bare Flower: the same bytes, parts and windows, nothing else.
            result.update(dep.bare(max(result["bytes_sent_per_client"].values()), result["model_bytes_received_per_client"]))
    if bare:
        result["engine_seconds"] = dep.engine_alone()
        result["round_over_bare_plus_engine"] = round(result["round_seconds"] / (result["bare_transfer_seconds"] + result["engine_seconds"]), 2)
    return result


def simulated_round(work: Path, n: int, base: Path, finetunes: list[Path], settings: RoundSettings) -> dict:
    """One round under Flower's simulation engine in a child process, its RSS sampled from /proc."""
    import subprocess

    import yaml

    dep = Deployment(work, n, base, finetunes, settings, TRANSPORTS["fedmerge"])
    names, tf = dep._layout()
    sim = work / f"simulate-n{n}.yaml"
    sim.write_text(yaml.safe_dump({
        "engine": "flower", "flower": {"cpus": 2, "cpus_per_client": 1, "object_store_mb": 1024},
        "federation_config": str(tf.federation_config), "client_configs": [str(tf.client_configs[nm]) for nm in names],
    }))  # fmt: skip
    labels = {"coordinator": str(sim), "client_actors": "ray::", "ray_raylet": "raylet"}
    t0 = time.perf_counter()
    with PeakRss(labels) as rss:
        proc = subprocess.run([sys.executable, "-m", "fedmerge", "simulate", str(sim), "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"simulated round with {n} clients failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    rec = report["rounds"][0]["record"]
    pkg = sum(v["bytes"] for v in rec["contributions"].values())
    return {
        "clients": n,
        "engine": "flower-simulation",
        "command_wall_seconds": round(wall, 1),
        "round_seconds": round(rec["finished_at"] - rec["started_at"], 1),
        "merge_seconds_in_round": round(rec["merge"]["seconds"], 1),
        "packages_taken_in_gb": round(pkg / 1e9, 3),
        "peak_rss_gb": rss.gb(),
    }


def _models(kind: str) -> tuple[Path, list[Path]]:
    if kind == "toy":
        from fedmerge.toymodels import build_tiny_mistral, perturb_checkpoint

        toy = Path(tempfile.mkdtemp(prefix="round-cost-toy-"))
        base = build_tiny_mistral(toy / "base")
        return Path(base), [Path(perturb_checkpoint(base, toy / f"ft{i}", seed=i + 1, scale=0.05)) for i in range(2)]
    base, finetunes = ensure_1b_set() if kind == "1b" else ensure_bench_set(SMALL_SPEC)
    return Path(base), [Path(f) for f in finetunes]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="3", help="comma-separated N values for rounds on real Flower processes (default 3; 'none' for none)")
    ap.add_argument("--simulated", default=None, help="comma-separated N values for rounds under Flower's simulation engine")
    ap.add_argument("--part-mb", type=int, default=64, help="part size in MiB (default 64)")
    ap.add_argument("--parts-in-flight", type=int, default=None, help="part requests outstanding per client (default: the config's)")
    ap.add_argument("--parts-in-flight-total", type=int, default=None, help="part requests outstanding across clients (default: the config's)")
    ap.add_argument("--delta-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--compression", default="none", help="the federation's compression: what hospitals send (none, int4, sparse:0.25+int4...)")
    ap.add_argument("--publish-compression", default="none", help="what the coordinator pushes back: none (the whole model) or a codec spec")
    ap.add_argument("--transport", default="fedmerge", choices=sorted(TRANSPORTS), help="transport of the round (default: fedmerge's)")
    ap.add_argument("--transports", default=None, help=f"comma-separated transports whose bare transfer is compared first: {', '.join(TRANSPORTS)}")
    ap.add_argument("--set", default="1b", choices=["1b", "small", "toy"], help="the ~1B set, a ~0.16B one of the same shape family, or tiny toy models (checks the script; overhead-bound)")
    ap.add_argument("--bare-for", default=None, help="N values that also get the bare-transfer and engine baselines (default: all)")
    ap.add_argument("--bare-only-mb", type=int, default=None, help="skip the fedmerge round: only the bare transfers of this many MiB each way per node")
    ap.add_argument("--transport-mb", type=int, default=256, help="MiB each way per node of each --transports comparison (default 256)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models = _models(args.set)
    settings = RoundSettings(args.part_mb * 1024**2, args.delta_dtype, args.compression, args.publish_compression, args.parts_in_flight, args.parts_in_flight_total)
    results = []
    bare_for = None if args.bare_for is None else {int(x) for x in args.bare_for.split(",")}
    real_ns = [] if args.clients == "none" else [int(x) for x in args.clients.split(",")]
    sim_ns = [int(x) for x in (args.simulated or "").split(",") if x]
    root = Path(args.work or tempfile.mkdtemp(prefix="round-cost-"))
    try:
        for n in sim_ns:
            r = simulated_round(root / f"sim-n{n}", n, *models, settings)
            results.append({**r, "delta_dtype": args.delta_dtype, "set": args.set})
            print(json.dumps(results[-1], indent=2), flush=True)
        for n in real_ns:
            if args.transports or args.bare_only_mb is not None:
                names = args.transports.split(",") if args.transports else [args.transport]
                each = (args.bare_only_mb or args.transport_mb) * 1024**2
                results += transport_effects(root / f"n{n}", n, models, settings, names, each)
            if args.bare_only_mb is not None:
                continue
            r = one_round(root / f"n{n}" / "round", n, models, settings, args.transport, bare=bare_for is None or n in bare_for)
            r.update(delta_dtype=args.delta_dtype, compression=args.compression, publish_compression=args.publish_compression, part_mb=args.part_mb, set=args.set)
            results.append(r)
            print(json.dumps(r, indent=2), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(root, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
