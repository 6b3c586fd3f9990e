"""The federation's wire protocol: message kinds, record layouts, and how a folder is cut into parts.

Both the coordinator (``fedmerge.server``) and the hospital (``fedmerge.client``) import this
module and nothing of each other. It knows Flower records but no merging, no security: what
travels is a folder of plain files (a signed delta package one way, a signed model folder the
other way), described by a ``PartPlan`` and moved in bounded parts, one part per message, so
no process on either side ever holds more than a part in memory.

A round, as messages (all ``query.<action>``; each message starts a fresh ClientApp process,
so every handler does one small thing and keeps what it computed on disk):

- ``open_round``   coordinator -> client: round id, reference fingerprint, part size, delta dtype.
                   reply: the institution the client says it is (a hint only: the coordinator
                   knows which institution each node is bound to), the PartPlan of its package
                   and, when asked, the package's first part (one message fewer per round).
- ``fetch_part``   coordinator -> client: round id, part index. reply: that part's bytes + SHA-256.
- ``install_part`` coordinator -> client: round id, the model's PartPlan, part index, bytes; the
                   last part has ``commit``: the client checks every file's digest, verifies the
                   coordinator's signed publication (pinned coordinator, this round, newer than
                   what it has) and installs atomically. The commit also tells the hospital what
                   the round made of it (``outcome``: contributed, late, rejected...).
- ``install_commit`` commit alone (a model folder with no bytes to send).

With ``selection: federated`` two more, between collection and publication, to every
contributing hospital (see ``fedmerge.server.selection``):

- ``candidate_part``   coordinator -> client: round id, candidate id (``c1``...), the PartPlan of
                   the candidate's signed delta package (its delta from the round's reference,
                   signed by the coordinator), part index, bytes. reply: round, candidate, part.
- ``score_candidates`` coordinator -> client: round id, reference fingerprint, delta dtype, the
                   candidate ids. The client verifies each package (the pinned coordinator's
                   signature, this round, this candidate, this reference), rebuilds the candidate
                   and scores it on its own validation split. reply: the round and one accuracy
                   per candidate and task (``acc/<candidate>/<task>``), nothing else.

A hospital that cannot do what it is asked answers with ``refused`` (the error's type) and
``reason``, scrubbed of its local paths (``scrub_paths``), instead of raising: nothing about its
file system leaves the hospital.

Every plan a receiver gets is checked against its ``PlanLimits`` (file names it expects, total
size, part size and count) before a byte of it is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmerge.errors import FedmergeError

PROTOCOL_VERSION = 1

OPEN_ROUND = "query.open_round"
FETCH_PART = "query.fetch_part"
INSTALL_PART = "query.install_part"
INSTALL_COMMIT = "query.install_commit"
CANDIDATE_PART = "query.candidate_part"
SCORE_CANDIDATES = "query.score_candidates"
MESSAGE_KINDS = (OPEN_ROUND, FETCH_PART, INSTALL_PART, INSTALL_COMMIT, CANDIDATE_PART, SCORE_CANDIDATES)

META = "fedmerge"  # ConfigRecord holding the small fields of every message
PAYLOAD = "payload"  # ArrayRecord holding one part's bytes as a uint8 array
PAYLOAD_KEY = "bytes"

DEFAULT_PART_BYTES = 64 * 1024 * 1024
_READ_BLOCK = 4 * 1024 * 1024


# Keys of a reply's meta record for a refusal (see ``refusal_meta``).
REFUSED = "refused"
REASON = "reason"


class ProtocolError(FedmergeError):
    """A message or a part does not match what the protocol expects."""


class PlanRefused(ProtocolError):
    """A part plan asks for more than the receiver allows (file names, size, part size or count)."""


@dataclass(frozen=True)
class PlanLimits:
    """What a receiver accepts in a plan, checked before anything of it is written.

    ``names``: the file paths a folder of this kind may hold (full match); ``max_total_bytes``:
    the sum of the declared file sizes; ``part_bytes``: the part size the receiver asked for
    (a plan cut in larger parts would make it hold more in memory); the part count may not
    exceed what that part size needs, so a sender cannot turn a folder into a flood of tiny
    messages.
    """

    names: re.Pattern[str]
    max_total_bytes: int
    part_bytes: int
    max_files: int = 4096

    def check(self, plan: "PartPlan", who: str = "sender") -> None:
        if len(plan.files) > self.max_files:
            raise PlanRefused(f"part plan of {who}: {len(plan.files)} files, at most {self.max_files} allowed")
        for f in plan.files:
            if not self.names.fullmatch(f.path):
                raise PlanRefused(f"part plan of {who}: file name {f.path!r} is not one this folder may hold")
        if plan.total_bytes > self.max_total_bytes:
            raise PlanRefused(f"part plan of {who}: declares {plan.total_bytes} bytes, more than the {self.max_total_bytes} allowed")
        if plan.part_bytes > self.part_bytes:
            raise PlanRefused(f"part plan of {who}: parts of {plan.part_bytes} bytes, larger than the {self.part_bytes} asked for")
        needed = math.ceil(plan.total_bytes / plan.part_bytes) if plan.part_bytes else 0
        if len(plan.parts) > max(needed, 1):
            raise PlanRefused(f"part plan of {who}: {len(plan.parts)} parts where {needed} of {plan.part_bytes} bytes hold every file")


@dataclass(frozen=True)
class Segment:
    file: str  # path relative to the folder, with '/' separators
    offset: int
    length: int


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass
class PartPlan:
    """How a folder's files are laid end to end and cut into parts of at most ``part_bytes``."""

    files: list[FileEntry]
    parts: list[list[Segment]]
    part_bytes: int
    version: int = PROTOCOL_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def part_size(self, index: int) -> int:
        return sum(s.length for s in self.parts[index])

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": self.version,
                "part_bytes": self.part_bytes,
                "files": [asdict(f) for f in self.files],
                "parts": [[[s.file, s.offset, s.length] for s in p] for p in self.parts],
                "extra": self.extra,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> "PartPlan":
        try:
            data = json.loads(text)
            if data["version"] != PROTOCOL_VERSION:
                raise ProtocolError(f"part plan version {data['version']} is not {PROTOCOL_VERSION}; upgrade both sides")
            files = [FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in data["files"]]
            parts = [[Segment(str(a), int(b), int(c)) for a, b, c in p] for p in data["parts"]]
            plan = cls(files=files, parts=parts, part_bytes=int(data["part_bytes"]), extra=dict(data.get("extra", {})))
        except ProtocolError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolError(f"malformed part plan ({exc})") from exc
        plan.validate()
        return plan

    def validate(self) -> None:
        """Refuse plans that would write outside the folder or do not tile the files exactly."""
        sizes = {}
        for f in self.files:
            _check_relative(f.path)
            if f.size < 0 or f.path in sizes:
                raise ProtocolError(f"part plan: bad or repeated file entry {f.path!r}")
            sizes[f.path] = f.size
        covered = {p: 0 for p in sizes}
        for i, part in enumerate(self.parts):
            if sum(s.length for s in part) > self.part_bytes:
                raise ProtocolError(f"part plan: part {i} is larger than the part size {self.part_bytes}")
            for s in part:
                if s.file not in sizes or s.offset != covered[s.file] or s.length <= 0:
                    raise ProtocolError(f"part plan: part {i} segment {s} does not continue file {s.file!r}")
                covered[s.file] += s.length
        for p, n in covered.items():
            if n != sizes[p]:
                raise ProtocolError(f"part plan: file {p!r} is {sizes[p]} bytes but parts cover {n}")


def _check_relative(path: str) -> None:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in path:
        raise ProtocolError(f"part plan: file path {path!r} is not a plain relative path")


# An absolute POSIX path (two or more components) or a home-relative one, as exception messages
# print them; whatever follows up to a quote, space or bracket.
_LOCAL_PATH = re.compile(r"(?:~|(?<![\w.])/(?=[^\s/'\"]))[^\s'\"<>()\[\],;]*")


def scrub_paths(text: str, limit: int = 600) -> str:
    """``text`` without the local file-system paths it names (each becomes ``<local path>``).

    What a hospital tells the coordinator about its failures goes into the consortium's round
    records; where its models, keys and state live stays at the hospital.
    """
    def replace(m: re.Match[str]) -> str:
        path = m.group(0)
        kept = path[len(path.rstrip(".:")) :]  # a sentence's punctuation after the path stays
        return "<local path>" + kept

    return _LOCAL_PATH.sub(replace, str(text))[:limit]


def refusal_meta(exc: BaseException) -> dict[str, str]:
    """A reply's meta saying the request was refused, and why, with local paths scrubbed."""
    return {REFUSED: type(exc).__name__, REASON: scrub_paths(str(exc))}


def read_refusal(meta: dict[str, Any]) -> str | None:
    """``'<ErrorType>: reason'`` when the reply is a refusal, else None (scrubbed again here)."""
    if REFUSED not in meta:
        return None
    return scrub_paths(f"{meta.get(REFUSED)}: {meta.get(REASON, '')}")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_READ_BLOCK):
            h.update(block)
    return h.hexdigest()


def plan_folder(folder: str | os.PathLike[str], part_bytes: int = DEFAULT_PART_BYTES, extra: dict[str, Any] | None = None) -> PartPlan:
    """Describe every regular file under ``folder`` (sorted) and cut them into parts."""
    if part_bytes <= 0:
        raise ProtocolError("part_bytes must be positive")
    root = Path(folder)
    entries = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            rel = p.relative_to(root).as_posix()
            entries.append(FileEntry(rel, p.stat().st_size, file_sha256(p)))
    parts: list[list[Segment]] = []
    current: list[Segment] = []
    room = part_bytes
    for f in entries:
        offset = 0
        while offset < f.size:
            take = min(room, f.size - offset)
            current.append(Segment(f.path, offset, take))
            offset += take
            room -= take
            if room == 0:
                parts.append(current)
                current, room = [], part_bytes
    if current:
        parts.append(current)
    # Empty files need no bytes; they are created when the plan is committed.
    return PartPlan(files=entries, parts=parts, part_bytes=part_bytes, extra=dict(extra or {}))


def read_part(folder: str | os.PathLike[str], plan: PartPlan, index: int) -> bytes:
    if not 0 <= index < len(plan.parts):
        raise ProtocolError(f"part {index} does not exist (the plan has {len(plan.parts)})")
    out = bytearray()
    root = Path(folder)
    for s in plan.parts[index]:
        with open(root / s.file, "rb") as fh:
            fh.seek(s.offset)
            data = fh.read(s.length)
        if len(data) != s.length:
            raise ProtocolError(f"{root / s.file}: shorter than its plan says (part {index})")
        out += data
    return bytes(out)


def part_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_part(folder: str | os.PathLike[str], plan: PartPlan, index: int, data: bytes, fsync: bool = True) -> None:
    """Write one part's bytes at their offsets (idempotent: a part written twice is the same)."""
    if not 0 <= index < len(plan.parts):
        raise ProtocolError(f"part {index} does not exist (the plan has {len(plan.parts)})")
    expected = plan.part_size(index)
    if len(data) != expected:
        raise ProtocolError(f"part {index} carries {len(data)} bytes, the plan says {expected}")
    root = Path(folder)
    pos = 0
    for s in plan.parts[index]:
        target = root / s.file
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, data[pos : pos + s.length], s.offset)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        pos += s.length


def check_complete(folder: str | os.PathLike[str], plan: PartPlan) -> None:
    """Every file of the plan is present with its size and SHA-256; raise naming the first that is not."""
    root = Path(folder)
    for f in plan.files:
        p = root / f.path
        if f.size == 0 and not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()
        if not p.exists():
            raise ProtocolError(f"{p}: missing after transfer")
        if p.stat().st_size != f.size:
            raise ProtocolError(f"{p}: {p.stat().st_size} bytes after transfer, expected {f.size}")
        if file_sha256(p) != f.sha256:
            raise ProtocolError(f"{p}: SHA-256 differs from the part plan after transfer")


# -- record layouts ---------------------------------------------------------------------------


SALT_BYTES = 16


def make_content(meta: dict[str, Any], payload: bytes | None = None):
    """A RecordDict with the message's small fields and, optionally, one part's bytes.

    The payload is prefixed with random bytes. Flower stores and moves objects by content hash,
    so two messages carrying identical bytes (two hospitals' all-zero deltas of a frozen layer,
    or the same model part pushed to every node) would share objects in flight; a transfer
    that completes for one message could then release what another still waits for. The salt
    makes every part its own object.
    """
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    records: dict[str, Any] = {META: ConfigRecord({k: v for k, v in meta.items() if v is not None})}
    if payload is not None:
        buf = np.empty(SALT_BYTES + len(payload), dtype=np.uint8)
        buf[:SALT_BYTES] = np.frombuffer(os.urandom(SALT_BYTES), dtype=np.uint8)
        buf[SALT_BYTES:] = np.frombuffer(payload, dtype=np.uint8)
        # ArrayRecord, not a ConfigRecord bytes value: Flower chunks arrays when it moves them.
        records[PAYLOAD] = ArrayRecord({PAYLOAD_KEY: Array(buf)})
    return RecordDict(records)


def read_meta(content) -> dict[str, Any]:
    if META not in content.config_records:
        raise ProtocolError("message carries no fedmerge record; is the other side running fedmerge?")
    return dict(content.config_records[META])


def read_payload(content) -> bytes:
    if PAYLOAD not in content.array_records:
        raise ProtocolError("message carries no payload")
    data = content.array_records[PAYLOAD][PAYLOAD_KEY].numpy()
    if data.shape[0] < SALT_BYTES:
        raise ProtocolError("message payload is shorter than its salt")
    return data[SALT_BYTES:].tobytes()


# -- candidate selection --------------------------------------------------------------------------

# A candidate's id: ``c`` and its number in the coordinator's config (c1 is the first).
CANDIDATE_ID = re.compile(r"c[1-9][0-9]{0,2}")
SCORE_PREFIX = "acc/"


def candidate_id(index: int) -> str:
    """The id of the ``index``-th candidate (0-based)."""
    return f"c{index + 1}"


def candidate_package_label(round_id: int, candidate: str) -> str:
    """The label a candidate's package carries inside its signed manifest.

    The hospital accepts a package as candidate ``candidate`` of round ``round_id`` only with
    exactly this label, so a candidate signed for one slot cannot be passed off as another.
    """
    return f"fedmerge candidate {candidate} of round {round_id}"


def check_candidate_id(value: Any) -> str:
    if not isinstance(value, str) or not CANDIDATE_ID.fullmatch(value):
        raise ProtocolError(f"{str(value)[:40]!r} is not a candidate id (c1, c2, ...)")
    return value


def is_accuracy(value: Any) -> bool:
    """A finite number in [0, 1] (not a bool): what a validation score must be."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0


def scores_meta(round_id: int, scores: dict[str, dict[str, float]]) -> dict[str, Any]:
    """A ``score_candidates`` reply: the round and one number per (candidate, task), nothing else."""
    meta: dict[str, Any] = {"round": round_id}
    for cid, tasks in scores.items():
        for task, value in tasks.items():
            meta[f"{SCORE_PREFIX}{check_candidate_id(cid)}/{task}"] = float(value)
    return meta


def read_scores(meta: dict[str, Any], round_id: int, candidates: list[str]) -> dict[str, dict[str, float]]:
    """The accuracies of a ``score_candidates`` reply, refused unless it holds exactly what was asked.

    Every asked candidate scored on the same tasks, each value a number in [0, 1]; no other
    field than ``round``.
    """
    if meta.get("round") != round_id:
        raise ProtocolError(f"scores for round {meta.get('round')!r}, asked for round {round_id}")
    out: dict[str, dict[str, float]] = {}
    for key, value in meta.items():
        if key == "round":
            continue
        if not key.startswith(SCORE_PREFIX) or key.count("/") < 2:
            raise ProtocolError(f"unexpected field {key[:60]!r} in a scores reply")
        cid, task = key[len(SCORE_PREFIX) :].split("/", 1)
        if cid not in candidates:
            raise ProtocolError(f"a score for {cid[:40]!r}, which was not asked for")
        if not task or len(task) > 200:
            raise ProtocolError(f"candidate {cid}: a score with no task name or a name over 200 characters")
        if not is_accuracy(value):
            raise ProtocolError(f"candidate {cid}, task {task[:60]!r}: {str(value)[:40]!r} is not an accuracy in [0, 1]")
        out.setdefault(cid, {})[task] = float(value)
    missing = [c for c in candidates if c not in out]
    if missing:
        raise ProtocolError(f"no scores for candidate(s) {', '.join(missing)}")
    tasks = {c: sorted(t) for c, t in out.items()}
    first = tasks[candidates[0]]
    for c in candidates[1:]:
        if tasks[c] != first:
            raise ProtocolError(f"candidate {c} was scored on other tasks than {candidates[0]} ({', '.join(tasks[c])} vs {', '.join(first)})")
    return {c: out[c] for c in candidates}


class FolderPart:
    """One part of a folder, read from disk only when its message is built (queued parts cost no memory)."""

    def __init__(self, folder: str | os.PathLike[str], plan: PartPlan, index: int):
        self.folder, self.plan, self.index = Path(folder), plan, index

    def read(self) -> bytes:
        return read_part(self.folder, self.plan, self.index)


def make_lazy_content(meta: dict[str, Any], payload: "bytes | FolderPart | None"):
    """``make_content``, reading a ``FolderPart`` payload at the last moment."""
    return make_content(meta, payload.read() if isinstance(payload, FolderPart) else payload)
