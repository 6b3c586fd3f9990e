"""What a federation round costs on real Flower processes, beside what it cannot avoid.

For the ~1B set (``benchmarks/common.py::ensure_1b_set``) and N clients (default 3), on loopback
with TLS and SuperNode authentication:

- the round's wall time, bytes sent per client (its delta package) and received (the model),
  peak RSS of the coordinator's ServerApp, of the SuperLink and of the hospitals' ClientApps;
- in the same run, a bare Flower app moving the same bytes in the same parts (no packing,
  verification, spool, merge or install) and the merge engine alone on the round's verified
  deltas. Target: round <= 1.5 x (bare transfer + engine); coordinator peak RSS < 3 GB.

``--clients 2,3,4`` repeats the round for each N (peak RSS against N). The fine-tunes of the set
are reused round-robin when N exceeds them (cost does not depend on the values).

``--simulated 3,6,12`` runs one round per N under Flower's simulation engine (``fedmerge
simulate``, Ray actors for the ClientApps) and reports the peak RSS of the coordinator's process
(the ServerApp, Flower's in-memory link state and the Ray driver) beside the N packages it took in.

    .venv/bin/python benchmarks/round_cost.py --clients 3 --delta-dtype bfloat16
    .venv/bin/python benchmarks/round_cost.py --clients none --simulated 3,6,12 --set small --delta-dtype bfloat16
    .venv/bin/python benchmarks/round_cost.py --clients 3 --set toy --bare-only-mb 600   # Flower's transfer alone
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BenchModelSpec, ensure_1b_set, ensure_bench_set  # noqa: E402

# A ~0.16B set of the same shape family, for runs where the ~1B one does not fit the time.
SMALL_SPEC = BenchModelSpec(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4)


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


def _layout(work: Path, n: int, base: Path, finetunes: list[Path], part_bytes: int, delta_dtype: str):
    """N institutions' identities and configs over the set's fine-tunes, reused round-robin."""
    from fedmerge.federation.toy import ToyFederation, build_toy_federation, institution_names

    names = institution_names(n)
    models = ToyFederation(work, base, {nm: finetunes[i % len(finetunes)] for i, nm in enumerate(names)}, None, {}, None, None, None)
    tf = build_toy_federation(
        work / "fed", n, models_from=models, part_bytes=part_bytes, round_timeout_s=3600.0,
        federation_overrides={"delta_dtype": delta_dtype, "wait_for_clients_s": 600.0},
    )  # fmt: skip
    return names, tf


def one_round(work: Path, n: int, base: Path, finetunes: list[Path], part_bytes: int, delta_dtype: str, bare: bool = True, bare_only_bytes: int | None = None) -> dict:
    import yaml

    from fedmerge import flower_internals
    from fedmerge.federation import flower
    from fedmerge.federation.coordinator_daemon import CoordinatorDaemon
    from fedmerge.federation.credentials import make_node_key, make_tls
    from fedmerge.federation.supervision import free_port
    from fedmerge.merging.engine import MergeSpec, merge
    from fedmerge.merging.taskvector import DeltaCheckpoint

    names, tf = _layout(work, n, base, finetunes, part_bytes, delta_dtype)
    tls = make_tls(work / "tls", ["127.0.0.1"])
    (work / "nodekeys").mkdir()
    keys = {nm: make_node_key(work / "nodekeys", nm) for nm in names}
    address = f"127.0.0.1:{free_port()}"
    fed = yaml.safe_load(tf.federation_config.read_text())
    fed["superlink"] = {
        "start": True, "address": address, "ca_cert": str(tls.ca_cert), "server_cert": str(tls.server_cert),
        "server_key": str(tls.server_key), "supernode_public_keys": {nm: str(keys[nm][1]) for nm in names},
    }  # fmt: skip
    tf.federation_config.write_text(yaml.safe_dump(fed))
    bare_app = Path(__file__).resolve().parent / "bare_flower_app"
    pins = [flower.app_hash(), flower.app_hash(bare_app)]
    class BareAppSuperLink(flower.SuperLink):  # the baseline app runs at the coordinator too
        def serverapp_pins(self) -> list[str]:
            return [*super().serverapp_pins(), flower.app_hash(bare_app)]

    coord = CoordinatorDaemon(tf.federation_config, superlink_class=BareAppSuperLink)
    fed_cfg = coord.cfg
    coord.start()
    nodes = []
    result: dict = {"clients": n}
    try:
        for nm in names:
            cfg = tf.client_configs[nm]
            nodes.append(flower.SuperNode(work / "nodes" / nm, address, str(tls.ca_cert), str(keys[nm][0]), str(cfg), free_port(), pins).start())
        if bare_only_bytes is None:
            labels = {"coordinator_serverapp": "guard --serve serverapp", "superlink": "fedmerge.federation.superlink_main", "client_apps": "guard --serve clientapp"}
            with PeakRss(labels) as rss:
                coord.submit()
                records = coord.wait(timeout=7200, poll_s=2.0)
            rec = records[0]
            assert rec.status == "completed", rec
            pkg_bytes = {k: c.bytes for k, c in rec.contributions.items()}
            result.update(
                round_seconds=round(rec.finished_at - rec.started_at, 1),
                merge_seconds_in_round=round(rec.merge.seconds, 1),
                bytes_sent_per_client=pkg_bytes,
                model_bytes_received_per_client=rec.publication.model_bytes,
                peak_rss_gb=rss.gb(),
            )
        else:  # only the bare transfer, of this many bytes each way per node
            pkg_bytes, rec = {nm: bare_only_bytes for nm in names}, None
        if not bare:
            return result
        # Bare Flower: the same bytes, parts and window, nothing else.
        plan = work / "bare-plan.json"
        out = work / "bare-result.json"
        plan.write_text(json.dumps({"nodes": n, "up_bytes": max(pkg_bytes.values()), "down_bytes": rec.publication.model_bytes if rec is not None else bare_only_bytes, "part_bytes": part_bytes, "window": fed_cfg.parts_in_flight,
                                    "total_window": fed_cfg.parts_in_flight_total, "out": str(out)}))
        with PeakRss({"bare_serverapp": "guard --serve serverapp"}) as bare_rss:
            t0 = time.perf_counter()
            flower_internals.start_run(coord.superlink.control, bare_app, {"plan": str(plan)})
            while not out.exists():
                time.sleep(1.0)
            bare_wall = time.perf_counter() - t0
        bare = json.loads(out.read_text())
        result["bare_transfer_seconds"] = round(bare["seconds"], 1)
        result["bare_run_wall_seconds"] = round(bare_wall, 1)
        result["bare_serverapp_peak_rss_gb"] = bare_rss.gb()["bare_serverapp"]
        if bare_only_bytes is not None:
            return result
    finally:
        for node in nodes:
            node.stop()
        coord.stop()
    # The engine alone on the same verified deltas.
    deltas = [DeltaCheckpoint(Path(c.delta_dir)) for _, c in sorted(rec.contributions.items())]
    t0 = time.perf_counter()
    merge(base, deltas, work / "engine-only", MergeSpec(**fed["strategy"]), progress=False)
    result["engine_seconds"] = round(time.perf_counter() - t0, 1)
    floor = result["bare_transfer_seconds"] + result["engine_seconds"]
    result["round_over_bare_plus_engine"] = round(result["round_seconds"] / floor, 2)
    return result


def simulated_round(work: Path, n: int, base: Path, finetunes: list[Path], part_bytes: int, delta_dtype: str) -> dict:
    """One round under Flower's simulation engine in a child process, its RSS sampled from /proc."""
    import subprocess

    import yaml

    names, tf = _layout(work, n, base, finetunes, part_bytes, delta_dtype)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="3", help="comma-separated N values for rounds on real Flower processes (default 3; 'none' for none)")
    ap.add_argument("--simulated", default=None, help="comma-separated N values for rounds under Flower's simulation engine")
    ap.add_argument("--part-mb", type=int, default=256, help="part size in MiB")
    ap.add_argument("--delta-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--set", default="1b", choices=["1b", "small", "toy"], help="the ~1B set, a ~0.16B one of the same shape family, or tiny toy models (checks the script; overhead-bound)")
    ap.add_argument("--bare-for", default=None, help="N values that also get the bare-transfer and engine baselines (default: all)")
    ap.add_argument("--bare-only-mb", type=int, default=None, help="skip the fedmerge round: only the bare transfer of this many MiB each way per node")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.set == "toy":
        from fedmerge.toymodels import build_tiny_mistral, perturb_checkpoint

        toy = Path(tempfile.mkdtemp(prefix="round-cost-toy-"))
        base = build_tiny_mistral(toy / "base")
        finetunes = [perturb_checkpoint(base, toy / f"ft{i}", seed=i + 1, scale=0.05) for i in range(2)]
    else:
        base, finetunes = ensure_1b_set() if args.set == "1b" else ensure_bench_set(SMALL_SPEC)
    results = []
    bare_for = None if args.bare_for is None else {int(x) for x in args.bare_for.split(",")}
    real_ns = [] if args.clients == "none" else [int(x) for x in args.clients.split(",")]
    sim_ns = [int(x) for x in (args.simulated or "").split(",") if x]
    models = (Path(base), [Path(f) for f in finetunes])
    for kind, n in [("sim", n) for n in sim_ns] + [("real", n) for n in real_ns]:
        work = Path(args.work or tempfile.mkdtemp(prefix="round-cost-")) / (f"sim-n{n}" if kind == "sim" else f"n{n}")
        try:
            if kind == "sim":
                r = simulated_round(work, n, *models, args.part_mb * 1024**2, args.delta_dtype)
            else:
                bare_only = None if args.bare_only_mb is None else args.bare_only_mb * 1024**2
                r = one_round(work, n, *models, args.part_mb * 1024**2, args.delta_dtype, bare=bare_for is None or n in bare_for, bare_only_bytes=bare_only)
            r["delta_dtype"], r["part_mb"], r["set"] = args.delta_dtype, args.part_mb, args.set
            results.append(r)
            print(json.dumps(r, indent=2), flush=True)
        finally:
            if args.work is None:
                shutil.rmtree(work.parent, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
