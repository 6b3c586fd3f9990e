"""A round's model pushed as an encoded delta against the round's reference (``publish_compression``).

Every hospital holds the round's reference (the base, or the model it installed last round), so
the coordinator can push ``encode(merged - reference)`` instead of the whole model. It publishes
what the hospitals will rebuild, not the merge itself: the merged folder is encoded, rebuilt as
``reference + decode(delta)`` with ``fedmerge.checkpoints.rebuild`` (byte for byte what each
hospital rebuilds), and that rebuild is the round's model: the one evaluated, fingerprinted,
signed and recorded. The pushed folder holds the model's small files (config, tokenizer, merge
metadata, the signed publication) and the encoded delta under ``delta/``; a hospital rebuilds the
weights and checks the whole folder against the signed publication before installing it.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from pathlib import Path

from fedmerge.checkpoints.codecs import parse_compression
from fedmerge.checkpoints.rebuild import copy_sidecars, encode_and_rebuild
from fedmerge.protocol import PUBLISHED_DELTA_DIR

log = logging.getLogger(__name__)



def delta_dir_of(model_dir: Path) -> Path:
    """Where the encoded delta of a round's model is kept, beside it."""
    return model_dir.with_name(model_dir.name + ".delta")


def merged_dir_of(model_dir: Path) -> Path:
    """Where the merge is written before it is encoded and rebuilt."""
    return model_dir.with_name(model_dir.name + ".merged")


def clear(model_dir: Path) -> None:
    """Remove what an interrupted merge or rebuild of this round left (it is redone, deterministically)."""
    for p in (model_dir, delta_dir_of(model_dir), merged_dir_of(model_dir), push_dir_of(model_dir)):
        if p.exists():
            shutil.rmtree(p)


def rebuild_as_published(merged: Path, reference: Path, model_dir: Path, spec: str) -> float:
    """Encode ``merged - reference``, rebuild ``model_dir`` from it, drop the merge; returns the seconds."""
    t0 = time.perf_counter()
    encode_and_rebuild(merged, reference, delta_dir_of(model_dir), model_dir, parse_compression(spec), secrets.randbelow(1 << 53), sidecars_from=merged)
    shutil.rmtree(merged)
    seconds = time.perf_counter() - t0
    log.info("published model encoded as %s against %s and rebuilt in %.1f s", spec, reference, seconds)
    return seconds


def push_dir_of(model_dir: Path) -> Path:
    return model_dir.with_name(model_dir.name + ".push")


def push_folder(model_dir: Path) -> Path:
    """The folder pushed for a compressed publication: the model's small files (publication included)
    and the encoded delta under ``delta/``, hard-linked where the file system allows."""
    out = push_dir_of(model_dir)
    if out.exists():
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / PUBLISHED_DELTA_DIR).mkdir(parents=True)
    copy_sidecars(model_dir, tmp)
    for p in sorted(delta_dir_of(model_dir).iterdir()):
        try:
            os.link(p, tmp / PUBLISHED_DELTA_DIR / p.name)
        except OSError:
            shutil.copy2(p, tmp / PUBLISHED_DELTA_DIR / p.name)
    tmp.rename(out)
    return out
