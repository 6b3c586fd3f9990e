"""A model sent as an encoded delta against a reference, and rebuilt the same way everywhere.

The coordinator may push a round's model as ``encode(model - reference)`` (compressed by a codec
of ``fedmerge.checkpoints.codecs``) instead of whole: every hospital holds the reference (the
base, or the model it installed last round). ``encode_model_delta`` writes that delta as an
encoded delta folder, with what the model is made of (its tensors' names, dtypes and shapes in
order, and its shard size). ``rebuild_model`` writes ``reference + decode(delta)``, cast back to
each tensor's dtype, through the planned writer with that layout: one float32 addition and one
cast per element, in a fixed order, so the coordinator's rebuild and every hospital's are the
same files, byte for byte. The coordinator publishes (evaluates, fingerprints, signs) its
rebuild, never the model before encoding, so what it signs is exactly what each hospital
installs. Both work a bounded number of rows at a time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedmerge.checkpoints.atomic import fsync_dir
from fedmerge.checkpoints.codecs.folder import encoding_metadata, folder_codecs, stored_info
from fedmerge.checkpoints.codecs.pipeline import Compression
from fedmerge.checkpoints.delta import subtract_reference
from fedmerge.checkpoints.dtypes import FLOAT_DTYPES, torch_dtype
from fedmerge.checkpoints.errors import CheckpointError, IncompatibleCheckpoint
from fedmerge.checkpoints.layout import INDEX_NAME, METADATA_NAME, TensorInfo
from fedmerge.checkpoints.pipeline import run_ordered
from fedmerge.checkpoints.reader import CheckpointReader
from fedmerge.checkpoints.writer import CheckpointWriter

MODEL_DELTA_KIND = "model-delta"
ROW_BLOCK_ELEMENTS = 1 << 21  # float32 elements held at once per tensor


def _row_blocks(info: TensorInfo):
    """Row ranges of about ``ROW_BLOCK_ELEMENTS`` (None: the tensor whole, for vectors and scalars)."""
    if len(info.shape) < 2 or info.shape[0] == 0:
        yield None
        return
    step = max(1, ROW_BLOCK_ELEMENTS // max(1, math.prod(info.shape[1:])))
    for a in range(0, info.shape[0], step):
        yield (a, min(info.shape[0], a + step))


@contextmanager
def _rebuilding_into(out_dir, sidecars_from=None):
    """The hidden folder a rebuilt model is committed into. When the body succeeds, the plain files
    of ``sidecars_from`` are copied beside the weights and the folder is renamed to ``out_dir``;
    on any failure it is removed, so ``out_dir`` appears only complete."""
    out = Path(out_dir)
    if out.exists():
        raise CheckpointError(f"{out}: already exists; rebuild into a new folder")
    tmp = out.with_name(f".{out.name}.rebuilding-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if sidecars_from is not None:
            copy_sidecars(sidecars_from, tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _DeltaPlan:
    """What ``model - reference`` is made of: each tensor's codec (None: exact float32), the stored
    layout of the delta folder and the ``fedmerge.json`` naming the model's own layout."""

    def __init__(self, model: CheckpointReader, ref: CheckpointReader, compression: Compression, seed: int, max_shard_bytes: int):
        self.codecs: dict[str, Any] = {}
        self.stored: list[TensorInfo] = []
        layout = []
        for name in model.names():
            info = model.info(name)
            if name not in ref or ref.info(name).shape != info.shape or info.dtype not in FLOAT_DTYPES:
                raise IncompatibleCheckpoint(f"{model.file_of(name)}: tensor {name!r} cannot be sent as a delta against {ref.path} (absent, reshaped or not floating point there)")
            layout.append([name, info.dtype, list(info.shape)])
            codec = compression.for_tensor(name, info.shape, seed, "F32") if compression.applies_to(info.shape) else None
            self.codecs[name] = codec
            self.stored.append(stored_info(codec) if codec is not None else TensorInfo(name, info.shape, "F32"))
        self.meta: dict[str, Any] = {"kind": MODEL_DELTA_KIND, "model": layout, "max_shard_bytes": max_shard_bytes}
        self.meta.update(encoding_metadata(compression.spec, seed, {n: (c.shape, "F32") for n, c in self.codecs.items() if c is not None}))


def encode_model_delta(model_dir, reference_dir, out_dir, compression: Compression, seed: int, *, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """``model - reference`` of every tensor, matrices encoded by ``compression`` (vectors exact, float32).

    ``IncompatibleCheckpoint`` when the model has a tensor the reference lacks, of another shape,
    or not floating point: such a model is sent whole.
    """
    model, ref = CheckpointReader(model_dir), CheckpointReader(reference_dir)
    plan = _DeltaPlan(model, ref, compression, seed, max_shard_bytes)
    with CheckpointWriter(out_dir, overwrite=True) as w:
        w.plan(plan.stored)
        for name in model.names():
            codec = plan.codecs[name]
            for rows in _row_blocks(model.info(name)):
                d = subtract_reference(model.get(name, rows=rows), ref.get(name, rows=rows))
                if codec is None:
                    w.add(name, d)
                else:
                    w.add_part(name, codec.encode(d, rows[0]), final=rows[1] == codec.rows)
        return w.commit(metadata=plan.meta)


def encode_and_rebuild(model_dir, reference_dir, delta_dir, out_dir, compression: Compression, seed: int, *, sidecars_from=None,
                       max_shard_bytes: int = 2 * 1024**3) -> tuple[Path, Path]:  # fmt: skip
    """``encode_model_delta`` and ``rebuild_model`` of its result in one pass over the model (each
    block of rows is encoded, decoded and added to the reference while it is at hand): the same
    two folders, byte for byte, for a third of the reading."""
    import torch

    model, ref = CheckpointReader(model_dir), CheckpointReader(reference_dir)
    plan = _DeltaPlan(model, ref, compression, seed, max_shard_bytes)

    def encode(block):  # on a thread of its own, while the previous blocks are written
        name, rows = block
        base, codec, dtype = ref.get(name, rows=rows), plan.codecs[name], torch_dtype(model.info(name).dtype)
        d = subtract_reference(model.get(name, rows=rows), base)
        if codec is None:
            return d, torch.add(d, base.to(torch.float32)).to(dtype)
        enc = codec.encode(d, rows[0])
        return enc, codec.decode(enc, rows[0]).add_(base.to(torch.float32)).to(dtype)

    with (_rebuilding_into(out_dir, sidecars_from) as tmp, CheckpointWriter(delta_dir, overwrite=True) as dw,
          CheckpointWriter(tmp, max_shard_bytes=max_shard_bytes) as mw):
        dw.plan(plan.stored)
        mw.plan([model.info(n) for n in model.names()])

        def write(block, encoded) -> None:
            (name, rows), (stored, part), codec = block, encoded, plan.codecs[block[0]]
            if codec is None:
                dw.add(name, stored)
                mw.add(name, part)
            else:
                dw.add_part(name, stored, final=rows[1] == codec.rows)
                mw.add_part(name, part, final=rows[1] == codec.rows)

        run_ordered(_blocks(model.names(), model.info), encode, write, workers=1, depth=4)
        dw.commit(metadata=plan.meta)
        mw.commit()
    return Path(delta_dir), Path(out_dir)


def _blocks(names, info_of):
    """(name, rows) of every row block of every tensor, in order."""
    for name in names:
        for rows in _row_blocks(info_of(name)):
            yield name, rows


def read_model_delta(delta_dir) -> tuple[CheckpointReader, dict[str, Any]]:
    """The reader and ``fedmerge.json`` of a folder ``encode_model_delta`` wrote (refused otherwise)."""
    reader = CheckpointReader(delta_dir)
    path = Path(delta_dir) / METADATA_NAME
    try:
        meta = json.loads(path.read_text())
        if meta.get("kind") != MODEL_DELTA_KIND:
            raise ValueError(f"kind is {meta.get('kind')!r}, not {MODEL_DELTA_KIND!r}")
        layout = [(str(n), str(d), tuple(int(x) for x in s)) for n, d, s in meta["model"]]
        int(meta["max_shard_bytes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not the record of a model sent as a delta ({exc})") from None
    meta["model"] = layout
    return reader, meta


def rebuild_model(reference_dir, delta_dir, out_dir, sidecars_from=None) -> Path:
    """``reference + decode(delta)`` in each tensor's own dtype, written as the coordinator wrote it;
    every plain file of ``sidecars_from`` but the weights is copied beside it. The folder appears
    only when complete."""
    import torch

    ref = CheckpointReader(reference_dir)
    delta, meta = read_model_delta(delta_dir)
    codecs = folder_codecs(meta, delta)
    layout = meta["model"]
    for name, dtype, shape in layout:
        if dtype not in FLOAT_DTYPES or name not in ref or ref.info(name).shape != shape or name not in delta:
            raise IncompatibleCheckpoint(f"{delta_dir}: tensor {name!r} ({dtype} {list(shape)}) does not fit the reference {ref.path} or the delta")
        want = codecs[name].shape if name in codecs else delta.info(name).shape
        if want != shape or (name not in codecs and delta.info(name).dtype != "F32"):
            raise IncompatibleCheckpoint(f"{delta_dir}: the delta of tensor {name!r} does not have the model's shape {list(shape)}")
    infos = {n: TensorInfo(n, s, d) for n, d, s in layout}

    def rebuild(block):  # on a thread of its own, while the previous blocks are written
        (name, rows), codec = block, codecs.get(block[0])
        stored = delta.get(name, rows=rows)
        d = codec.decode(stored, rows[0]) if codec is not None else stored
        return d.add_(ref.get(name, rows=rows).to(torch.float32)).to(torch_dtype(infos[name].dtype))

    with _rebuilding_into(out_dir, sidecars_from) as tmp, CheckpointWriter(tmp, max_shard_bytes=int(meta["max_shard_bytes"])) as w:
        w.plan(list(infos.values()))

        def write(block, part) -> None:
            name, rows = block
            if rows is None:
                w.add(name, part)
            else:
                w.add_part(name, part, final=rows[1] == infos[name].shape[0])

        run_ordered(_blocks(infos, infos.__getitem__), rebuild, write, workers=1, depth=4)
        w.commit()
    return Path(out_dir)


def copy_sidecars(src_dir, out_dir) -> list[str]:
    """Every plain top-level file of ``src_dir`` but its weights (``*.safetensors`` and their index)."""
    copied = []
    for p in sorted(Path(src_dir).iterdir()):
        if p.is_file() and not p.is_symlink() and p.suffix != ".safetensors" and p.name != INDEX_NAME:
            shutil.copy2(p, Path(out_dir) / p.name)
            copied.append(p.name)
    fsync_dir(out_dir)
    return copied
