"""The reader enforces the whole safetensors format: every malformed header is a typed error naming
the file (and the tensor), never a traceback, and never a file that ``safetensors`` would refuse."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from fedmerge.checkpoints import CheckpointError, CheckpointReader, MalformedSafetensors, read_safetensors_header


def _file(tmp_path, header: dict | bytes, data: bytes, name="model.safetensors"):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_reader_accepts_what_safetensors_writes(tmp_path):
    save_file({"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16), "empty": torch.zeros(0)}, tmp_path / "model.safetensors")
    entries, _ = read_safetensors_header(tmp_path / "model.safetensors")
    assert set(entries) == {"a", "b", "empty"}


CASES = {
    "two tensors share bytes": ({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 0, 8)}, 8, "overlaps the tensor before it"),
    "a gap between tensors": ({"a": _entry("F32", [1], 0, 4), "b": _entry("F32", [1], 8, 12)}, 12, r"leaves bytes \[4, 8\) unaccounted"),
    "trailing bytes": ({"a": _entry("F32", [1], 0, 4)}, 12, "trailing bytes"),
    "length differs from shape": ({"a": _entry("F32", [3], 0, 8)}, 8, "declares bytes"),
    "unknown dtype": ({"a": _entry("Q4", [1], 0, 1)}, 1, "unsupported dtype 'Q4'"),
    "dtype not a string": ({"a": _entry(["F32"], [1], 0, 4)}, 4, "unsupported dtype"),
    "negative dimension": ({"a": _entry("F32", [-1], 0, 0)}, 0, "non-negative integers"),
    "boolean dimension": ({"a": _entry("F32", [True], 0, 4)}, 4, "non-negative integers"),
    "float offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}, 4, r"is not \[begin, end\]"),
    "three offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, 4, r"is not \[begin, end\]"),
    "missing key": ({"a": {"dtype": "F32", "shape": [1]}}, 4, "must have dtype, shape and data_offsets"),
    "entry not an object": ({"a": [1, 2]}, 0, "must have dtype, shape and data_offsets"),
    "metadata not strings": ({"__metadata__": {"k": 1}, "a": _entry("F32", [1], 0, 4)}, 4, "__metadata__ must map strings"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_header_is_a_typed_error_naming_the_file(tmp_path, case):
    header, size, message = CASES[case]
    path = _file(tmp_path, header, bytes(size))
    with pytest.raises(MalformedSafetensors, match=message) as info:
        CheckpointReader(tmp_path)
    assert str(path) in str(info.value)
    with pytest.raises(Exception):  # the reference implementation refuses each of them too
        with safe_open(str(path), "pt") as fh:
            for k in fh.keys():
                fh.get_tensor(k)


def test_deeply_nested_json_and_duplicate_keys(tmp_path):
    _file(tmp_path, b"[" * 100_000 + b"]" * 100_000, b"")
    with pytest.raises(MalformedSafetensors, match="nested too deeply"):
        CheckpointReader(tmp_path)
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    _file(tmp_path, raw, bytes(4))
    with pytest.raises(MalformedSafetensors, match="key 'a' appears twice"):
        CheckpointReader(tmp_path)


def test_header_that_is_not_an_object(tmp_path):
    _file(tmp_path, b"[1, 2]", b"")
    with pytest.raises(MalformedSafetensors, match="not a JSON object"):
        CheckpointReader(tmp_path)


def test_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):
        CheckpointReader(tmp_path)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_header_bytes_give_a_typed_error_or_a_valid_reader(tmp_path_factory, raw):
    folder = tmp_path_factory.mktemp("fuzz")
    _file(folder, raw, bytes(16))
    try:
        CheckpointReader(folder)
    except CheckpointError:
        pass
