"""Building a round's candidate merges, and the signed delta package each travels in.

Every candidate is a merge of the round's verified contributions with one strategy from
``selection:``, by the same engine and from the same inputs as the configured strategy's merge,
into ``<state_dir>/rounds/round-NNNN/candidates/<id>/model``. In federated mode each one is also
turned into a delta from the round's reference, signed by the coordinator, in
``candidates/<id>/package`` (``candidate_package``): what hospitals download and score.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fedmerge import protocol


def candidates_dir(state_dir: str | os.PathLike[str], round_id: int) -> Path:
    return Path(state_dir) / "rounds" / f"round-{round_id:04d}" / "candidates"


def build_candidate(reference_dir: str | os.PathLike[str], delta_dirs: dict[str, Path], out: Path, strategy: dict, metadata: dict) -> None:
    """Merge the contributions (institution -> verified delta folder) into ``out`` with ``strategy``."""
    from fedmerge.merging.engine import MergeSpec, merge
    from fedmerge.merging.taskvector import DeltaCheckpoint

    if out.exists():  # left by a build a restart interrupted: merges are deterministic, build again
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    inputs = [DeltaCheckpoint(path, label=inst) for inst, path in sorted(delta_dirs.items())]
    merge(str(reference_dir), inputs, out, MergeSpec(**strategy), progress=False, metadata=metadata)


def candidate_package(
    model_dir: Path,
    reference_dir: str | os.PathLike[str],
    out: Path,
    identity,
    *,
    round_id: int,
    candidate: str,
    reference_fingerprint: str,
    dtype: str,
    compression: str = "none",
) -> Path:
    """The one place a candidate's delta folder is made: ``model - reference`` at ``dtype``, signed,
    its matrices encoded with ``compression`` (a codec spec; ``none``: exact).

    The package is the ordinary delta package (``fedmerge.security.pack``), signed by the
    coordinator, unsealed (every hospital gets the same bytes), whose signed label binds it to
    this round and candidate (``protocol.candidate_package_label``). Hospitals verify and unpack
    whatever encoding the signed manifest declares, and rebuild the candidate from it.
    """
    from fedmerge.security.pack import pack_delta

    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    label = protocol.candidate_package_label(round_id, candidate)
    return Path(pack_delta(str(model_dir), str(reference_dir), out, identity, round_id, reference_fingerprint, seal_to=None, dtype=dtype, label=label,
                          compress=compression))  # fmt: skip


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
