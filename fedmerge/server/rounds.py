"""The coordinator's round loop: sample, collect and verify parts, merge on quorum, sign, push back.

Works on any Flower ``Grid``: the real one the SuperLink hands the ServerApp, or the in-process
one the tests and ``fedmerge simulate`` use. All state lives on disk (spool + ledger), so the
loop can be killed anywhere and started again: it resumes at the first round not completed and
never asks again for a contribution it already accepted.
"""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

from fedmerge import protocol
from fedmerge.errors import FedmergeError
from fedmerge.federation import deps
from fedmerge.server.config import FederationConfig
from fedmerge.server.exchange import NodeFailed, run_exchange
from fedmerge.server.ledger import RoundLedger
from fedmerge.server.spool import RoundSpool

log = logging.getLogger(__name__)


class RoundFailed(FedmergeError):
    """A round could not complete (no quorum, no clients); its record says why."""


class RoundRunner:
    def __init__(self, grid, config: FederationConfig, *, crash_after_accepts: int | None = None, crash_hard: bool = False):
        self.grid = grid
        self.cfg = config
        self.ledger = RoundLedger(config.state_dir)
        self.identity = deps.load_identity(config.coordinator_key, _read_optional(config.coordinator_key_passphrase_file))
        self.trust = deps.load_trust(config.trust_store, self.identity.public, allow_unsigned=config.allow_unsigned_trust)
        self._fingerprints: dict[str, str] = {}
        # Test hook: stop the process abruptly after this many contributions were accepted.
        self._crash_after_accepts = crash_after_accepts
        self._crash_hard = crash_hard

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        start = self.ledger.last_completed() + 1
        if start > 1:
            log.info("resuming after round %d (completed rounds are on disk)", start - 1)
        for r in range(start, self.cfg.rounds + 1):
            self.run_round(r)
        return self.ledger.records()

    def reference_for(self, round_id: int) -> tuple[Path, str]:
        if self.cfg.reference == "global" and round_id > 1:
            ref = self.ledger.model_dir(round_id - 1)
        else:
            ref = Path(self.cfg.base_model)
        return ref, self.fingerprint(ref)

    def fingerprint(self, model_dir: Path) -> str:
        key = str(Path(model_dir).resolve())
        if key not in self._fingerprints:
            from fedmerge.checkpoints import CheckpointReader, model_fingerprint

            with CheckpointReader(model_dir) as reader:
                self._fingerprints[key] = model_fingerprint(reader)
        return self._fingerprints[key]

    def wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + self.cfg.wait_for_clients_s
        want = max(self.cfg.min_clients, self.cfg.clients_per_round or 0)
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= want or time.monotonic() > deadline:
                return nodes
            time.sleep(0.5)

    def run_round(self, r: int) -> dict[str, Any]:
        cfg = self.cfg
        record = self.ledger.load(r)
        if record is None:
            ref_dir, ref_fp = self.reference_for(r)
            record = self.ledger.new(
                r,
                strategy=cfg.strategy.spec_fields(),
                reference={"path": str(ref_dir), "fingerprint": ref_fp, "kind": cfg.reference},
                started_at=time.time(),
            )
            self.ledger.save(record)
        if record["status"] == "completed":
            return record
        if record["status"] == "failed":  # a restart retries a round that missed its quorum
            record["status"] = "open"
            record["events"].append({"t": time.time(), "event": "retry", "after": record.pop("failure", "")})
            record["dropped"], record["rejections"] = [], []
        if record["status"] != "merged":
            self._collect(r, record)
            self._merge(r, record)
        self._push(r, record)
        record["status"] = "completed"
        record["finished_at"] = time.time()
        self.ledger.save(record)
        log.info("round %d completed: %d contributor(s), %d rejected, %d dropped", r, len(record["contributors"]), len(record["rejections"]), len(record["dropped"]))
        return record

    # -- collection --------------------------------------------------------------------------------
    def _collect(self, r: int, record: dict[str, Any]) -> None:
        cfg = self.cfg
        spool = RoundSpool(cfg.state_dir, r)
        ref_fp = record["reference"]["fingerprint"]
        nodes = self.wait_for_nodes()
        k = cfg.clients_per_round or len(nodes)
        sampled = sorted(random.Random(cfg.sample_seed * 1_000_003 + r).sample(nodes, min(k, len(nodes))))
        record["sampled"] = sampled
        record["events"].append({"t": time.time(), "event": "sampled", "nodes": sampled})
        self.ledger.save(record)
        log.info("round %d: %d node(s) connected, sampled %s", r, len(nodes), sampled)
        accepted_before = set(spool.accepted_institutions())
        deadline = time.monotonic() + cfg.round_timeout_s
        group = str(r)
        ttl = cfg.round_timeout_s + 60

        # 1. open: every sampled node builds (or finds cached) its package and describes it.
        plans: dict[int, tuple[str, protocol.PartPlan]] = {}

        def on_open(node_id: int, _tag, reply) -> None:
            meta = protocol.read_meta(reply.content)
            plan = protocol.PartPlan.from_json(meta["plan"])
            inst = str(meta["institution"])
            plans[node_id] = (inst, plan)
            if "part" in meta and protocol.PAYLOAD in reply.content.array_records and inst not in accepted_before:
                data = protocol.read_payload(reply.content)
                if int(meta["part"]) != 0 or meta.get("sha256") != protocol.part_digest(data):
                    raise NodeFailed("the first part arrived damaged")
                # Spooled at once: memory holds one part, not one per client.
                if 0 not in spool.start(node_id, plan, inst):
                    self._spool_part(spool, node_id, inst, plan, 0, data, record)

        open_meta = {
            "round": r,
            "reference_fingerprint": ref_fp,
            "part_bytes": cfg.part_bytes,
            "accepted": sorted(accepted_before),
            # A first part riding on each open reply saves a message per client, but all N of them
            # wait at the SuperLink at once: only worth it while N is within the global cap.
            "with_first_part": len(sampled) <= cfg.parts_in_flight_total,
            "delta_dtype": cfg.delta_dtype,
        }
        failures = run_exchange(
            self.grid,
            {n: [(protocol.OPEN_ROUND, open_meta, None, "open")] for n in sampled},
            on_open,
            group_id=group,
            deadline=deadline,
            window=1,
            make_content=protocol.make_content,
            ttl=ttl,
        )
        for node, reason in failures.items():
            record["dropped"].append({"node": node, "stage": "open", "reason": reason})

        # 2. fetch the parts not yet on disk, spooling each as it arrives.
        requests: dict[int, list] = {}
        for node, (inst, plan) in plans.items():
            if inst in accepted_before:
                record["events"].append({"t": time.time(), "event": "already accepted", "node": node, "institution": inst})
                continue
            have = spool.start(node, plan, inst)
            todo = [i for i in range(len(plan.parts)) if i not in have]
            requests[node] = [(protocol.FETCH_PART, {"round": r, "part": i}, None, i) for i in todo]
            if not todo:
                self._finish_package(r, spool, node, inst, plan, record, ref_fp)

        def on_part(node_id: int, index: int, reply) -> None:
            inst, plan = plans[node_id]
            meta = protocol.read_meta(reply.content)
            data = protocol.read_payload(reply.content)
            if int(meta.get("part", -1)) != index or meta.get("sha256") != protocol.part_digest(data):
                raise NodeFailed(f"part {index} arrived damaged or out of place")
            self._spool_part(spool, node_id, inst, plan, index, data, record)
            if _all_received(spool, node_id, plan):
                self._finish_package(r, spool, node_id, inst, plan, record, ref_fp)

        def parts_deadline() -> float:
            # With quorum verified, stragglers get a grace period rather than the whole timeout.
            if cfg.straggler_grace_s is not None and len(spool.accepted_institutions()) >= cfg.min_clients:
                if "quorum_at" not in grace:
                    grace["quorum_at"] = time.monotonic()
                return min(deadline, grace["quorum_at"] + cfg.straggler_grace_s)
            return deadline

        grace: dict[str, float] = {}
        failures = run_exchange(
            self.grid,
            {n: reqs for n, reqs in requests.items() if reqs},
            on_part,
            group_id=group,
            deadline=parts_deadline,
            window=cfg.parts_in_flight,
            total_window=cfg.parts_in_flight_total,
            make_content=protocol.make_content,
            ttl=ttl,
        )
        for node, reason in failures.items():
            record["dropped"].append({"node": node, "institution": plans[node][0], "stage": "parts", "reason": reason})
        record["contributors"] = spool.accepted_institutions()
        self.ledger.save(record)

    @staticmethod
    def _spool_part(spool: RoundSpool, node_id: int, inst: str, plan, index: int, data: bytes, record) -> None:
        spool.receive_part(node_id, plan, index, data)
        record.setdefault("bytes_received", {}).setdefault(inst, 0)
        record["bytes_received"][inst] += len(data)

    def _finish_package(self, r, spool: RoundSpool, node_id: int, inst: str, plan, record, ref_fp) -> None:
        """All parts are on disk: verify the package, then accept (durably) or reject with the reason."""
        pkg = spool.package_dir(node_id)
        try:
            protocol.check_complete(pkg, plan)
            shutil.rmtree(spool.unpack_dir(node_id), ignore_errors=True)
            spool.unpack_dir(node_id).parent.mkdir(parents=True, exist_ok=True)
            verified = deps.verify_package(pkg, self.trust, expected_round=r, expected_reference=ref_fp, opener=self.identity, unpack_to=spool.unpack_dir(node_id), require_sealed=self.cfg.seal)
            if verified.sender != inst:
                raise _Rejected(f"the node says it is {inst!r} but the package is signed by {verified.sender!r}")
            if verified.sender in spool.accepted_institutions():
                raise _Rejected(f"{verified.sender} already contributed to round {r}")
            spool.accept(node_id, verified.sender)
        except (FedmergeError, _Rejected) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("round %d: rejected the package from node %s (%s): %s", r, node_id, inst, reason)
            record["rejections"].append({"node": node_id, "institution": inst, "reason": reason})
            spool.discard(node_id)
            self.ledger.save(record)
            return
        record["contributors"] = spool.accepted_institutions()
        record.setdefault("inputs", {})[inst] = {
            "package_sha256": hashlib.sha256(plan.to_json().encode()).hexdigest(),
            "bytes": plan.total_bytes,
            "node": node_id,
            "delta_dir": str(spool.accepted_dir(inst)),
        }
        self.ledger.save(record)
        log.info("round %d: accepted the contribution of %s (node %s)", r, inst, node_id)
        if self._crash_after_accepts is not None and len(record["contributors"]) >= self._crash_after_accepts:
            if self._crash_hard:  # as if the machine lost power: no cleanup, no flush of anything
                import os
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
            raise SimulatedCrash(f"stopping after {len(record['contributors'])} accepted contribution(s)")

    # -- merge --------------------------------------------------------------------------------------
    def _merge(self, r: int, record: dict[str, Any]) -> None:
        cfg = self.cfg
        spool = RoundSpool(cfg.state_dir, r)
        contributors = spool.accepted_institutions()
        record["contributors"] = contributors
        if len(contributors) < cfg.min_clients:
            record["status"] = "failed"
            record["failure"] = f"quorum not met: {len(contributors)} verified contribution(s), min_clients is {cfg.min_clients}"
            self.ledger.save(record)
            raise RoundFailed(f"round {r}: {record['failure']}")
        ref_dir = Path(record["reference"]["path"])
        out = self.ledger.model_dir(r)
        if out.exists():  # a merge that finished before a crash but was not recorded: redo it, it is deterministic
            shutil.rmtree(out)
        t0 = time.perf_counter()
        deps.merge(
            ref_dir,
            [spool.accepted_dir(i) for i in contributors],
            out,
            cfg.strategy.spec_fields(),
            metadata={"round": r, "contributors": contributors, "federation": cfg.name},
        )
        record["merge_seconds"] = time.perf_counter() - t0
        deps.sign_model(out, self.identity, round_id=r, fingerprint=self.fingerprint(out))
        record["output"] = {"path": str(out), "fingerprint": self.fingerprint(out)}
        record["metrics"] = self._evaluate(r, out)
        record["status"] = "merged"
        self.ledger.save(record)
        log.info("round %d: merged %d contribution(s) with %s in %.1f s", r, len(contributors), cfg.strategy.method, record["merge_seconds"])

    def _evaluate(self, r: int, model_dir: Path) -> dict[str, Any]:
        """Score the round's model with the configured evaluator (optional); never loses the round."""
        if self.cfg.evaluator is None:
            return {}
        try:
            from fedmerge.eval.config import EvalConfig
            from fedmerge.eval.evaluator import Evaluator

            ev = Evaluator(EvalConfig.from_yaml(self.cfg.evaluator.config_path))
            result = ev.evaluate(
                str(model_dir), round=r, label=f"round-{r}", role="merge",
                strategy=self.cfg.strategy.method, params=self.cfg.strategy.parameters,
            )  # fmt: skip
            return {"scores": result.accuracies(), "fingerprint": result.fingerprint, "seconds": result.seconds}
        except Exception as exc:  # the evaluator must not lose a merged round
            log.error("round %d: evaluator failed: %s", r, exc)
            return {"error": f"{type(exc).__name__}: {exc}"}

    # -- push back ----------------------------------------------------------------------------------
    def _push(self, r: int, record: dict[str, Any]) -> None:
        cfg = self.cfg
        model_dir = Path(record["output"]["path"])
        plan = protocol.plan_folder(model_dir, cfg.part_bytes, extra={"round": r, "fingerprint": record["output"]["fingerprint"]})
        plan_json = plan.to_json()
        nodes = sorted(self.grid.get_node_ids())
        installed: dict[int, str] = {}

        def payload_requests():
            reqs = []
            last = len(plan.parts) - 1
            for i in range(len(plan.parts)):
                meta = {"round": r, "plan": plan_json, "part": i, "commit": i == last}
                reqs.append((protocol.INSTALL_PART, meta, _Lazy(model_dir, plan, i), ("commit" if i == last else "part", i)))
            if not plan.parts:
                reqs.append((protocol.INSTALL_COMMIT, {"round": r, "plan": plan_json}, None, ("commit", None)))
            return reqs

        def on_reply(node_id: int, tag, reply) -> None:
            if tag[0] == "commit":
                meta = protocol.read_meta(reply.content)
                installed[node_id] = str(meta.get("installed", ""))

        def make(meta, payload):
            return protocol.make_content(meta, payload.read() if isinstance(payload, _Lazy) else payload)

        contributor_nodes = {int(v["node"]) for v in record.get("inputs", {}).values()} & set(nodes)
        hard_deadline = time.monotonic() + cfg.round_timeout_s
        grace: dict[str, float] = {}

        def push_deadline() -> float:
            # Nodes that did not contribute (dropped, maybe dead) get a grace period once every
            # contributor has installed, not the whole round timeout.
            if cfg.straggler_grace_s is not None and contributor_nodes <= set(installed):
                grace.setdefault("at", time.monotonic())
                return min(hard_deadline, grace["at"] + cfg.straggler_grace_s)
            return hard_deadline

        failures = run_exchange(
            self.grid,
            {n: payload_requests() for n in nodes},
            on_reply,
            group_id=f"{r}-install",
            deadline=push_deadline,
            window=cfg.parts_in_flight,
            total_window=cfg.parts_in_flight_total,
            make_content=make,
            ttl=cfg.round_timeout_s + 60,
        )
        record["installed_by"] = sorted(installed)
        record["install_failures"] = [{"node": n, "reason": why} for n, why in failures.items()]
        record["model_bytes"] = plan.total_bytes


class _Lazy:
    """A part read from disk only when its message is built, so queued parts cost no memory."""

    def __init__(self, folder: Path, plan, index: int):
        self.folder, self.plan, self.index = folder, plan, index

    def read(self) -> bytes:
        return protocol.read_part(self.folder, self.plan, self.index)


class _Rejected(Exception):
    pass


class SimulatedCrash(BaseException):
    """Raised only by the crash test hook; a BaseException so nothing on the way swallows it."""


def _all_received(spool: RoundSpool, node_id: int, plan) -> bool:
    import json

    data = json.loads((spool.incoming / f"node-{node_id}.json").read_text())
    return len(data["received"]) == len(plan.parts)


def _read_optional(path: str | None) -> str | None:
    return Path(path).read_text().strip() if path else None
