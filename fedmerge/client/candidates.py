"""Scoring the coordinator's candidate merges on this hospital's own validation split.

With ``selection: federated`` the coordinator sends each contributing hospital its candidates
(``candidate_part``) and asks for their scores (``score_candidates``). What the hospital does:

1. receives each candidate's package part by part into ``candidates/round-NNNN/<id>/`` after
   checking its plan (file names, size, part size; at most ``max_candidates`` per round, only
   for a round newer than the installed model);
2. verifies it before anything uses it: signed by the pinned coordinator with the label of this
   round and this candidate, relative to the round's reference (a local model found by its
   fingerprint, as for contributing), the delta dtype asked for, every tensor the reference's,
   every byte against the signed digests;
3. rebuilds the candidate (reference + delta) in a scratch folder, scores it with the scorer on
   its ``validation:`` eval config (default: fedmerge's evaluator), and deletes the scratch;
4. answers with one accuracy per candidate and task and nothing else.

A candidate is never installed: it is not a signed publication and never becomes ``current``.
Scores are kept in ``candidates/round-NNNN/scores.json`` (keyed by the plan the candidate came
with), so a question asked again (the coordinator restarted, a reply was lost) is answered
without scoring again; packages are deleted once scored, and older rounds' folders when a newer
round's candidates arrive.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from fedmerge import protocol
from fedmerge.checkpoints.atomic import write_json_atomic, write_text_atomic
from fedmerge.client.errors import CandidateRefused, NoValidationData, RoundNotOpened, ScorerFailed

log = logging.getLogger(__name__)

_MAX_PART_BYTES = 1 << 30
_DELTA_DTYPES = ("float32", "bfloat16", "float16")
_ROUND_DIR = re.compile(r"round-(\d{4,})")


class CandidateScorer(Protocol):
    """Scores one rebuilt candidate model folder on the hospital's validation tasks."""

    def __call__(self, model_dir: Path, *, round: int, candidate: str) -> Mapping[str, float]: ...


# factory(EvalConfig) -> CandidateScorer; built once per score_candidates message.
ScorerFactory = Callable[[Any], CandidateScorer]


class EvaluatorScorer:
    """fedmerge's evaluator on the validation eval config; its tasks are built once for all candidates."""

    def __init__(self, config):
        from fedmerge.eval.evaluator import Evaluator

        self.evaluator = Evaluator(config)

    def __call__(self, model_dir: Path, *, round: int, candidate: str) -> dict[str, float]:
        result = self.evaluator.evaluate(str(model_dir), round=round, label=f"round-{round}-{candidate}", role="merge")
        return result.accuracies("acc")


def scorer_factory(spec: str | None) -> ScorerFactory:
    """The factory named by ``validation_scorer`` (``module:factory``), or the evaluator's."""
    if spec is None:
        return EvaluatorScorer
    module, _, name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ScorerFailed(f"validation_scorer {spec!r} cannot be loaded ({type(exc).__name__}: {exc})") from None
    if not callable(factory):
        raise ScorerFailed(f"validation_scorer {spec!r} is not callable")
    return factory


class CandidateScoring:
    """One hospital's side of the selection phase, over its config and its disk."""

    def __init__(self, node):
        self.node = node
        self.cfg = node.cfg
        self.root = node.state / "candidates"

    def round_dir(self, r: int) -> Path:
        return self.root / f"round-{r:04d}"

    # -- receiving ------------------------------------------------------------------------------------
    def limits(self) -> protocol.PlanLimits:
        """A candidate package's files, at most ``max_candidate_bytes`` (default: twice the base's files)."""
        from fedmerge.security.manifest import DATA_FILE_RE, MANIFEST_NAME, MAX_MANIFEST_BYTES, SIGNATURE_NAME

        names = re.compile("|".join([re.escape(MANIFEST_NAME), re.escape(SIGNATURE_NAME), DATA_FILE_RE.pattern.strip("^$")]))
        limit = self.cfg.max_candidate_bytes
        if limit is None:
            base = Path(self.cfg.base_model)
            limit = 2 * sum(p.stat().st_size for p in base.iterdir() if p.is_file()) + MAX_MANIFEST_BYTES + (64 << 10)
        return protocol.PlanLimits(names=names, max_total_bytes=limit, part_bytes=_MAX_PART_BYTES)

    def receive_part(self, r: int, candidate: str, plan_json: str, index: int, data: bytes) -> dict[str, Any]:
        cid = self._candidate(candidate)
        self._check_round(r)
        plan = protocol.PartPlan.from_json(plan_json)
        self.limits().check(plan, who="the coordinator")
        self._prune(r)
        cdir = self.round_dir(r) / cid
        marker = cdir / "plan.json"
        if not marker.exists() or marker.read_text() != plan_json:
            if not cdir.exists():
                held = [p for p in self.round_dir(r).glob("c*") if p.is_dir()] if self.round_dir(r).exists() else []
                if len(held) >= self.cfg.max_candidates:
                    raise CandidateRefused(f"{self.cfg.institution}: round {r} already has {len(held)} candidates, max_candidates is {self.cfg.max_candidates}")
            shutil.rmtree(cdir, ignore_errors=True)
            (cdir / "package").mkdir(parents=True)
            write_text_atomic(marker, plan_json)
        protocol.write_part(cdir / "package", plan, index, data, fsync=False)
        return {"round": r, "candidate": cid, "part": index}

    # -- scoring --------------------------------------------------------------------------------------
    def score(self, r: int, reference_fingerprint: str, delta_dtype: str, candidates: list[Any]) -> dict[str, Any]:
        """Verify, rebuild and score each candidate; the reply: ``protocol.scores_meta``."""
        if self.cfg.validation is None:
            raise NoValidationData(f"{self.cfg.institution}: no validation eval config (validation: in the client config); not scoring candidates")
        cids = [self._candidate(c) for c in candidates]
        if not cids or len(set(cids)) != len(cids):
            raise CandidateRefused(f"{self.cfg.institution}: asked to score {cids!r}; expected distinct candidate ids")
        if len(cids) > self.cfg.max_candidates:
            raise CandidateRefused(f"{self.cfg.institution}: asked to score {len(cids)} candidates, max_candidates is {self.cfg.max_candidates}")
        if delta_dtype not in _DELTA_DTYPES:
            raise CandidateRefused(f"{self.cfg.institution}: delta dtype {delta_dtype!r} is not one of {', '.join(_DELTA_DTYPES)}")
        self._check_round(r)
        cache_path = self.round_dir(r) / "scores.json"
        cache: dict[str, Any] = json.loads(cache_path.read_text()) if cache_path.exists() else {}
        todo = [c for c in cids if cache.get(c, {}).get("plan") != self._plan_digest(r, c)]
        if todo:
            from fedmerge.eval.config import EvalConfig

            reference = self.node.find_reference(reference_fingerprint)
            scorer = scorer_factory(self.cfg.validation_scorer)(EvalConfig.from_yaml(self.cfg.validation))
            for cid in todo:
                scores = self._score_one(r, cid, reference, reference_fingerprint, delta_dtype, scorer)
                cache[cid] = {"plan": self._plan_digest(r, cid), "scores": scores}
                write_json_atomic(cache_path, cache)
                shutil.rmtree(self.round_dir(r) / cid / "package", ignore_errors=True)  # scored: the bytes are not needed again
                log.info("%s: round %d candidate %s scored on validation: %s", self.cfg.institution, r, cid,
                         ", ".join(f"{t} {v:.4f}" for t, v in sorted(scores.items())))  # fmt: skip
        return protocol.scores_meta(r, {c: cache[c]["scores"] for c in cids})

    def _score_one(self, r: int, cid: str, reference: Path, reference_fingerprint: str, dtype: str, scorer: CandidateScorer) -> dict[str, float]:
        from fedmerge.checkpoints import CheckpointReader
        from fedmerge.merging.engine import MergeSpec, merge
        from fedmerge.merging.taskvector import DeltaCheckpoint
        from fedmerge.security.verify import verify_package

        cdir = self.round_dir(r) / cid
        if not (cdir / "plan.json").exists():
            raise RoundNotOpened(f"{self.cfg.institution}: candidate {cid} of round {r} was never received")
        plan = protocol.PartPlan.from_json((cdir / "plan.json").read_text())
        pkg = cdir / "package"
        protocol.check_complete(pkg, plan)
        trust = self.node.trust()
        self._check_signer(pkg, trust, r, cid)
        work = Path(tempfile.mkdtemp(prefix=".work-", dir=self.round_dir(r)))
        try:
            with CheckpointReader(reference) as ref:
                verify_package(pkg, trust, expected_round=r, expected_reference=reference_fingerprint, require_sealed=False,
                               expected_tensors=ref, expected_dtype=dtype, unpack_to=work / "delta")  # fmt: skip
            # reference + 1.0 x delta: the candidate, up to the rounding of the delta's dtype
            merge(str(reference), [DeltaCheckpoint(work / "delta", label=cid)], work / "model",
                  MergeSpec(method="task_arithmetic", parameters={"lambda": 1.0}), progress=False)  # fmt: skip
            try:
                raw = scorer(work / "model", round=r, candidate=cid)
            except Exception as exc:
                raise ScorerFailed(f"{self.cfg.institution}: scoring candidate {cid} failed: {type(exc).__name__}: {exc}") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return self._accuracies(raw, cid)

    def _check_signer(self, pkg: Path, trust, r: int, cid: str) -> None:
        """Signed by the pinned coordinator as candidate ``cid`` of round ``r``, before anything else is read."""
        from fedmerge.security.verify import read_signed_manifest

        manifest, key = read_signed_manifest(pkg, trust)
        pinned = self.node.pinned_coordinator()
        if manifest.sender != pinned.name or key != pinned.signing_key:
            raise CandidateRefused(f"{self.cfg.institution}: candidate {cid} of round {r} is signed by {manifest.sender!r}, not by the pinned coordinator {pinned.name!r}")
        want = protocol.candidate_package_label(r, cid)
        if manifest.label != want:
            raise CandidateRefused(f"{self.cfg.institution}: the package sent as candidate {cid} of round {r} is signed as {manifest.label[:80]!r}")

    def _accuracies(self, raw: Any, cid: str) -> dict[str, float]:
        if not isinstance(raw, Mapping) or not raw:
            raise ScorerFailed(f"{self.cfg.institution}: the scorer returned no accuracy for candidate {cid} (do the validation tasks report acc?)")
        out = {}
        for task, value in raw.items():
            if not isinstance(task, str) or not protocol.is_accuracy(value):
                raise ScorerFailed(f"{self.cfg.institution}: the scorer returned {str(value)[:40]!r} for task {str(task)[:60]!r} of candidate {cid}; expected an accuracy in [0, 1]")
            out[task] = float(value)
        return out

    # -- helpers --------------------------------------------------------------------------------------
    def _candidate(self, value: Any) -> str:
        try:
            return protocol.check_candidate_id(value)
        except protocol.ProtocolError as exc:
            raise CandidateRefused(f"{self.cfg.institution}: {exc}") from None

    def _check_round(self, r: int) -> None:
        installed = self.node.installed_round()
        if r <= installed:
            raise CandidateRefused(f"{self.cfg.institution}: candidates for round {r}, but round {installed} is installed; only a newer round's candidates are scored")

    def _plan_digest(self, r: int, cid: str) -> str | None:
        marker = self.round_dir(r) / cid / "plan.json"
        return hashlib.sha256(marker.read_bytes()).hexdigest() if marker.exists() else None

    def _prune(self, r: int) -> None:
        if not self.root.exists():
            return
        for p in self.root.iterdir():
            m = _ROUND_DIR.fullmatch(p.name)
            if m and int(m.group(1)) < r:
                shutil.rmtree(p, ignore_errors=True)
