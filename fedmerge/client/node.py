"""What a hospital does for each message, as plain functions over its config and its disk.

The Flower ClientApp (``fedmerge.client.app``) and the in-process federation both call these.
Each call is short-lived (Flower starts a fresh process per message), so everything worth
keeping is on disk under ``state_dir``::

    rounds/round-NNNN/package/    this round's signed delta package (built once, then served part by part)
    rounds/round-NNNN/plan.json   its part plan
    incoming/round-NNNN/          a model being received
    models/round-NNNN/            installed models; ``models/current`` links to the newest
    fingerprints.json             fingerprints of the base and installed models (computed once)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from fedmerge import protocol
from fedmerge.checkpoints.atomic import write_json_atomic
from fedmerge.client.config import ClientConfig
from fedmerge.errors import FedmergeError
from fedmerge.federation import deps

log = logging.getLogger(__name__)


class ClientError(FedmergeError):
    """The hospital cannot do what the coordinator asked (unknown reference, failed install...)."""


class HospitalNode:
    def __init__(self, config: ClientConfig):
        self.cfg = config
        self.state = config.state
        self.state.mkdir(parents=True, exist_ok=True)

    # -- paths --------------------------------------------------------------------------------------
    def round_dir(self, r: int) -> Path:
        return self.state / "rounds" / f"round-{r:04d}"

    @property
    def models(self) -> Path:
        return self.state / "models"

    @property
    def current(self) -> Path:
        return self.models / "current"

    # -- fingerprints -------------------------------------------------------------------------------
    def _fp_cache(self) -> dict[str, str]:
        p = self.state / "fingerprints.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def _remember(self, path: Path, fp: str) -> None:
        cache = self._fp_cache()
        cache[str(path.resolve())] = fp
        write_json_atomic(self.state / "fingerprints.json", cache)

    def fingerprint(self, model_dir: Path) -> str:
        key = str(Path(model_dir).resolve())
        cache = self._fp_cache()
        if key not in cache:
            from fedmerge.checkpoints import CheckpointReader, model_fingerprint

            with CheckpointReader(model_dir) as reader:
                fp = model_fingerprint(reader)
            self._remember(Path(model_dir), fp)
            return fp
        return cache[key]

    def find_reference(self, fingerprint: str) -> Path:
        """The local model whose weights the coordinator names: the base or an installed round."""
        candidates = [Path(self.cfg.base_model)]
        if self.models.exists():
            candidates += sorted((p for p in self.models.glob("round-*") if p.is_dir()), reverse=True)
        for c in candidates:
            if self.fingerprint(c) == fingerprint:
                return c
        raise ClientError(
            f"{self.cfg.institution}: no local model has fingerprint {fingerprint} "
            f"(looked at the base {self.cfg.base_model} and {len(candidates) - 1} installed round(s))"
        )

    # -- contributing -------------------------------------------------------------------------------
    def open_round(self, r: int, reference_fingerprint: str, part_bytes: int, delta_dtype: str = "float32") -> dict[str, Any]:
        """Build (once) this round's signed package against the named reference; describe its parts."""
        rdir = self.round_dir(r)
        plan_file = rdir / "plan.json"
        if plan_file.exists():
            cached = json.loads(plan_file.read_text())
            if (cached["reference_fingerprint"], cached["part_bytes"], cached.get("delta_dtype", "float32")) == (reference_fingerprint, part_bytes, delta_dtype):
                return {"institution": self.cfg.institution, "plan": cached["plan"]}
            shutil.rmtree(rdir)
        reference = self.find_reference(reference_fingerprint)
        source = self._contribution_source(r, reference)
        rdir.mkdir(parents=True, exist_ok=True)
        identity = deps.load_identity(self.cfg.identity_key, _read_optional(self.cfg.identity_passphrase_file))
        seal_to = deps.load_public(self.cfg.coordinator_public_file) if self.cfg.seal else None
        tmp = Path(tempfile.mkdtemp(prefix=".package-", dir=rdir))
        try:
            if self.cfg.adapter:
                if reference.resolve() != Path(self.cfg.base_model).resolve():
                    raise ClientError(f"{self.cfg.adapter}: a LoRA adapter contributes against the base model; set reference: base at the coordinator")
                from fedmerge.merging.taskvector import open_delta_source

                model: Any = open_delta_source(source, self.cfg.base_model, kind="lora")
            else:
                model = source
            pkg = deps.pack_delta(model, reference, tmp / "package", identity, r, reference_fingerprint, seal_to=seal_to, dtype=delta_dtype)
            final = rdir / "package"
            shutil.rmtree(final, ignore_errors=True)
            os.replace(pkg, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        plan = protocol.plan_folder(final, part_bytes)
        write_json_atomic(plan_file, {"reference_fingerprint": reference_fingerprint, "part_bytes": part_bytes, "delta_dtype": delta_dtype, "plan": plan.to_json()})
        log.info("%s: round %d package ready (%d bytes, %d part(s))", self.cfg.institution, r, plan.total_bytes, len(plan.parts))
        return {"institution": self.cfg.institution, "plan": plan.to_json()}

    def _contribution_source(self, r: int, reference: Path) -> str:
        if not self.cfg.train_hook:
            return self.cfg.source
        out = self.state / "trained" / f"round-{r:04d}"
        if not out.exists():
            env = dict(os.environ)
            env.update(
                FEDMERGE_ROUND=str(r),
                FEDMERGE_REFERENCE=str(reference),
                FEDMERGE_CURRENT_MODEL=str(self.current if self.current.exists() else self.cfg.base_model),
                FEDMERGE_FINETUNED=self.cfg.source,
                FEDMERGE_OUTPUT=str(out),
            )
            proc = subprocess.run(self.cfg.train_hook, env=env, capture_output=True, text=True)
            if proc.returncode != 0 or not out.exists():
                raise ClientError(f"train_hook {self.cfg.train_hook[0]!r} failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
        return str(out)

    def fetch_part(self, r: int, index: int) -> tuple[dict[str, Any], bytes]:
        plan_file = self.round_dir(r) / "plan.json"
        if not plan_file.exists():
            raise ClientError(f"{self.cfg.institution}: round {r} was never opened here")
        plan = protocol.PartPlan.from_json(json.loads(plan_file.read_text())["plan"])
        if not plan.parts:
            return {"round": r, "part": index, "sha256": protocol.part_digest(b"")}, b""
        data = protocol.read_part(self.round_dir(r) / "package", plan, index)
        return {"round": r, "part": index, "sha256": protocol.part_digest(data)}, data

    # -- installing ---------------------------------------------------------------------------------
    def install_part(self, r: int, plan_json: str, index: int, data: bytes) -> dict[str, Any]:
        plan = protocol.PartPlan.from_json(plan_json)
        staging = self.state / "incoming" / f"round-{r:04d}"
        marker = staging.parent / f"round-{r:04d}.plan"
        if not marker.exists() or marker.read_text() != plan_json:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True, exist_ok=True)
            marker.write_text(plan_json)
        protocol.write_part(staging, plan, index, data, fsync=False)
        return {"round": r, "part": index}

    def install_commit(self, r: int, plan_json: str) -> dict[str, Any]:
        """Check every file, verify the coordinator's signature, then switch ``current`` atomically."""
        plan = protocol.PartPlan.from_json(plan_json)
        staging = self.state / "incoming" / f"round-{r:04d}"
        final = self.models / f"round-{r:04d}"
        if final.exists() and not staging.exists() and _installed_plan(final) == plan_json:
            self._switch_current(final)  # a commit repeated after a coordinator restart
            return {"round": r, "installed": str(final)}
        if not staging.exists():
            raise ClientError(f"{self.cfg.institution}: nothing received for round {r}")
        protocol.check_complete(staging, plan)
        for f in plan.files:  # make the received bytes durable before anything points at them
            with open(staging / f.path, "rb") as fh:
                os.fsync(fh.fileno())
        pinned = deps.load_public(self.cfg.coordinator_public_file) if self.cfg.coordinator_public_file else None
        trust = deps.load_trust(self.cfg.trust_store, pinned, allow_unsigned=self.cfg.allow_unsigned_trust)
        deps.verify_model(staging, trust)
        self.models.mkdir(parents=True, exist_ok=True)
        (self.models / f".{final.name}.plan").write_text(plan_json)
        if final.exists():
            old = self.models / f".{final.name}.replaced"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
        (self.state / "incoming" / f"round-{r:04d}.plan").unlink(missing_ok=True)
        fp = plan.extra.get("fingerprint")
        if fp:
            self._remember(final, str(fp))
        self._switch_current(final)
        self._prune()
        log.info("%s: installed round %d at %s", self.cfg.institution, r, final)
        return {"round": r, "installed": str(final)}

    def _switch_current(self, target: Path) -> None:
        tmp = self.models / ".current.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(target.name, tmp)
        os.replace(tmp, self.current)
        fd = os.open(self.models, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _prune(self) -> None:
        rounds = sorted(p for p in self.models.glob("round-*") if p.is_dir())
        for old in rounds[: -self.cfg.keep_models]:
            shutil.rmtree(old, ignore_errors=True)

    def installed_rounds(self) -> list[int]:
        return sorted(int(p.name.split("-")[1]) for p in self.models.glob("round-*") if p.is_dir()) if self.models.exists() else []


def _installed_plan(folder: Path) -> str | None:
    p = folder.parent / f".{folder.name}.plan"
    return p.read_text() if p.exists() else None


def _read_optional(path: str | None) -> str | None:
    return Path(path).read_text().strip() if path else None
