"""What a hospital does for each message, as plain functions over its config and its disk.

The Flower ClientApp (``fedmerge.client.app``) and the in-process federation both call these.
Each call is short-lived (Flower starts a fresh process per message), so everything worth
keeping is on disk under ``state_dir``::

    rounds/round-NNNN/package/    this round's signed delta package (built once, then served part by part)
    rounds/round-NNNN/plan.json   its part plan
    rounds/round-NNNN/outcome.json what the coordinator said of this hospital's part in the round
    incoming/round-NNNN/          a model being received
    models/round-NNNN/            installed models; ``models/current`` links to the newest
    fingerprints.json             fingerprints of the base and installed models (computed once,
                                  or taken from the coordinator's signed publication)

A model is installed only when its publication is signed by the pinned coordinator
(``coordinator_public_file``), names the round it was pushed for, and that round is newer than
the installed one; the trust store it is checked against must itself be signed by that key.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from fedmerge import protocol
from fedmerge.checkpoints.atomic import fsync_tree, write_json_atomic
from fedmerge.client.config import ClientConfig
from fedmerge.client.errors import (
    ClientError,
    CompressionRefused,
    NothingReceived,
    RoundNotOpened,
    TrainHookFailed,
    UnknownReference,
)
from fedmerge.security.errors import StalePublication

log = logging.getLogger(__name__)

__all__ = ["HospitalNode", "ClientError"]

# A published model folder is flat (the publication lists plain file names); a compressed one
# also holds its encoded delta, one level down.
_MODEL_FILE_NAMES = re.compile(rf"(?:{protocol.PUBLISHED_DELTA_DIR}/)?[A-Za-z0-9_][A-Za-z0-9._-]{{0,254}}")
_MAX_MODEL_PART_BYTES = 1 << 30
_ROUND_DIR = re.compile(r"round-(\d{4,})")


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
        raise UnknownReference(
            f"{self.cfg.institution}: no local model has fingerprint {fingerprint} "
            f"(looked at the base {self.cfg.base_model} and {len(candidates) - 1} installed round(s))"
        )

    # -- contributing -------------------------------------------------------------------------------
    def open_round(self, r: int, reference_fingerprint: str, part_bytes: int, delta_dtype: str = "float32", *, compression: str = "none") -> dict[str, Any]:
        """Build (once) this round's signed package against the named reference; describe its parts."""
        compression = self.accepted_compression(compression)
        rdir = self.round_dir(r)
        plan_file = rdir / "plan.json"
        if plan_file.exists():
            cached = json.loads(plan_file.read_text())
            asked = (reference_fingerprint, part_bytes, delta_dtype, compression)
            if (cached["reference_fingerprint"], cached["part_bytes"], cached.get("delta_dtype", "float32"), cached.get("compression", "none")) == asked:
                return {"institution": self.cfg.institution, "plan": cached["plan"]}
            shutil.rmtree(rdir)
        reference = self.find_reference(reference_fingerprint)
        source = self._contribution_source(r, reference)
        rdir.mkdir(parents=True, exist_ok=True)
        from fedmerge.security.keys import load_identity, read_passphrase_file
        from fedmerge.security.pack import pack_delta

        identity = load_identity(self.cfg.identity_key, read_passphrase_file(self.cfg.identity_passphrase_file))
        seal_to = self.pinned_coordinator() if self.cfg.seal else None
        tmp = Path(tempfile.mkdtemp(prefix=".package-", dir=rdir))
        try:
            if self.cfg.adapter:
                if reference.resolve() != Path(self.cfg.base_model).resolve():
                    raise ClientError(f"{self.cfg.adapter}: a LoRA adapter contributes against the base model; set reference: base at the coordinator")
                from fedmerge.merging.taskvector import open_delta_source

                # A delta source is already relative to its base: no reference to subtract.
                model: Any = open_delta_source(source, self.cfg.base_model, kind="lora")
                against: Path | None = None
            else:
                model, against = source, reference
            pkg = Path(pack_delta(model, against, tmp / "package", identity, r, reference_fingerprint, seal_to=seal_to, dtype=delta_dtype, compress=compression))
            final = rdir / "package"
            shutil.rmtree(final, ignore_errors=True)
            os.replace(pkg, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        plan = protocol.plan_folder(final, part_bytes)
        write_json_atomic(plan_file, {"reference_fingerprint": reference_fingerprint, "part_bytes": part_bytes, "delta_dtype": delta_dtype, "compression": compression, "plan": plan.to_json()})
        log.info("%s: round %d package ready (%d bytes, %d part(s))", self.cfg.institution, r, plan.total_bytes, len(plan.parts))
        return {"institution": self.cfg.institution, "plan": plan.to_json()}

    def accepted_compression(self, spec: str) -> str:
        """The canonical spelling of the compression the coordinator asks for, if this hospital
        knows it and its config allows it; ``CompressionRefused`` otherwise."""
        from fedmerge.checkpoints.codecs import canonical_spec
        from fedmerge.checkpoints.errors import UnknownCompression

        try:
            canonical = canonical_spec(spec)
        except UnknownCompression as exc:
            raise CompressionRefused(f"{self.cfg.institution}: the coordinator asks for {exc}") from None
        allowed = self.cfg.compression
        if allowed is not None and canonical not in allowed:
            raise CompressionRefused(f"{self.cfg.institution}: the coordinator asks for compression {canonical}; this hospital packs only with {', '.join(allowed)} (client config `compression`)")
        return canonical

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
                raise TrainHookFailed(f"train_hook {self.cfg.train_hook[0]!r} failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
        return str(out)

    def fetch_part(self, r: int, index: int) -> tuple[dict[str, Any], bytes]:
        plan_file = self.round_dir(r) / "plan.json"
        if not plan_file.exists():
            raise RoundNotOpened(f"{self.cfg.institution}: round {r} was never opened here")
        plan = protocol.PartPlan.from_json(json.loads(plan_file.read_text())["plan"])
        if not plan.parts:
            return {"round": r, "part": index, "sha256": protocol.part_digest(b"")}, b""
        data = protocol.read_part(self.round_dir(r) / "package", plan, index)
        return {"round": r, "part": index, "sha256": protocol.part_digest(data)}, data

    # -- installing ---------------------------------------------------------------------------------
    def pinned_coordinator(self):
        from fedmerge.security.keys import PublicIdentity

        return PublicIdentity.load(self.cfg.coordinator_public_file)

    def trust(self):
        """The consortium's trust store, refused unless signed by the pinned coordinator."""
        from fedmerge.security.trust import TrustStore

        return TrustStore.load(self.cfg.trust_store, self.pinned_coordinator(), allow_unsigned=self.cfg.allow_unsigned_trust)

    def installed_round(self) -> int:
        """The round of the model ``current`` points at (0: none installed)."""
        if not self.current.is_symlink():
            return 0
        m = _ROUND_DIR.fullmatch(os.readlink(self.current))
        return int(m.group(1)) if m else 0

    def model_limits(self) -> protocol.PlanLimits:
        limit = self.cfg.max_model_bytes
        if limit is None:
            base = Path(self.cfg.base_model)
            limit = 2 * sum(p.stat().st_size for p in base.iterdir() if p.is_file()) + (64 << 20)
        return protocol.PlanLimits(names=_MODEL_FILE_NAMES, max_total_bytes=limit, part_bytes=_MAX_MODEL_PART_BYTES)

    def _is_installed(self, r: int, plan_json: str) -> bool:
        final = self.models / f"round-{r:04d}"
        return final.is_dir() and _installed_plan(final) == plan_json

    def _check_fresh(self, r: int, plan_json: str) -> None:
        have = self.installed_round()
        if r < have or (r == have and not self._is_installed(r, plan_json)):
            raise StalePublication(f"{self.cfg.institution}: a model for round {r} was pushed, but round {have} is installed; only newer rounds are accepted")

    def install_part(self, r: int, plan_json: str, index: int, data: bytes) -> dict[str, Any]:
        plan = protocol.PartPlan.from_json(plan_json)
        self._check_fresh(r, plan_json)
        if self._is_installed(r, plan_json):  # pushed again after a coordinator restart: nothing to write
            return {"round": r, "part": index}
        self.model_limits().check(plan, who="the coordinator")
        staging = self.state / "incoming" / f"round-{r:04d}"
        marker = staging.parent / f"round-{r:04d}.plan"
        if not marker.exists() or marker.read_text() != plan_json:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True, exist_ok=True)
            marker.write_text(plan_json)
        protocol.write_part(staging, plan, index, data, fsync=False)
        return {"round": r, "part": index}

    def install_commit(self, r: int, plan_json: str, outcome: str | None = None) -> dict[str, Any]:
        """Check every file and the signed publication (pinned coordinator, this round, newer), then switch ``current``."""
        plan = protocol.PartPlan.from_json(plan_json)
        self._check_fresh(r, plan_json)
        final = self.models / f"round-{r:04d}"
        staging = self.state / "incoming" / f"round-{r:04d}"
        if self._is_installed(r, plan_json) and not staging.exists():
            self._note_outcome(r, outcome)  # a commit repeated after a coordinator restart
            return {"round": r, "installed": final.name}
        if not staging.exists():
            raise NothingReceived(f"{self.cfg.institution}: nothing received for round {r}")
        self.model_limits().check(plan, who="the coordinator")
        protocol.check_complete(staging, plan)
        against = plan.extra.get(protocol.REBUILD_AGAINST)
        if against is not None:
            # The received parts are an encoded delta, read once and dropped: only the rebuilt
            # folder must be durable (its weights are fsynced as they are written).
            self._rebuild(staging, str(against), r)
        fsync_tree(staging)  # make the model durable before anything points at it
        publication = self._verify_publication(staging, r)
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
        if publication.fingerprint:
            self._remember(final, publication.fingerprint)
        self._switch_current(final)
        self._prune()
        self._note_outcome(r, outcome)
        log.info("%s: installed round %d at %s (fingerprint %s)", self.cfg.institution, r, final, publication.fingerprint)
        return {"round": r, "installed": final.name}

    def _rebuild(self, staging: Path, reference_fingerprint: str, r: int) -> None:
        """Turn a compressed publication's folder into the model: the named local reference plus the
        decoded delta (``fedmerge.checkpoints.rebuild``), in place of ``staging``. Nothing of it is
        trusted until the whole folder matches the signed publication."""
        from fedmerge.checkpoints.rebuild import rebuild_model

        reference = self.find_reference(reference_fingerprint)
        rebuilt = staging.with_name(staging.name + ".rebuilt")
        shutil.rmtree(rebuilt, ignore_errors=True)
        rebuild_model(reference, staging / protocol.PUBLISHED_DELTA_DIR, rebuilt, sidecars_from=staging)
        shutil.rmtree(staging)
        os.replace(rebuilt, staging)
        log.info("%s: round %d's model rebuilt on %s from its encoded delta", self.cfg.institution, r, reference)

    def _verify_publication(self, folder: Path, r: int):
        """The coordinator's signed publication of ``folder``: pinned signer, round ``r``, newer than installed."""
        from fedmerge.security.model_sign import verify_model

        # The signed document, not the plan, decides: the pinned coordinator, this round, newer than installed.
        return verify_model(folder, self.trust(), coordinator=self.pinned_coordinator(), expected_round=r, newer_than=self.installed_round())

    def _note_outcome(self, r: int, outcome: str | None) -> None:
        """What the coordinator said of this hospital in round ``r`` (contributed, late, rejected...)."""
        if not outcome:
            return
        write_json_atomic(self.round_dir(r) / "outcome.json", {"round": r, "outcome": outcome})
        if outcome != "contributed":
            log.warning("%s: round %d's model installed, but this hospital did not contribute to it (%s)", self.cfg.institution, r, outcome)

    def outcome(self, r: int) -> str | None:
        p = self.round_dir(r) / "outcome.json"
        return json.loads(p.read_text())["outcome"] if p.exists() else None

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

