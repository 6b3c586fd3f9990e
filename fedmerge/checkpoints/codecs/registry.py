"""The one table of delta codecs, and how a compression spec is read.

A spec is ``none`` (exact: no codec) or codec stages joined by ``+``: any *selecting* stages
(they keep some values of each row), then at most one *storing* stage (it turns the values into
bytes; without one the values are stored as they are, in the package's delta dtype). Each row
of ``CODECS`` is one codec: its name, how it is spelled, its parser, encoder, decoder and bytes
estimate (``width``: values or bytes per row of n inputs). A spec that names no registered
codec, or gives one a bad argument, is an ``UnknownCompression`` listing the valid specs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from fedmerge.checkpoints.codecs import quantize, sparse
from fedmerge.checkpoints.errors import UnknownCompression

NONE = "none"


@dataclass(frozen=True)
class StageContext:
    """Where the rows a stage encodes or decodes sit: their first row, the stage's seed for this
    tensor, and the package's delta dtype (what ``raw`` stores)."""

    first_row: int
    seed: int
    value_dtype: str


@dataclass(frozen=True)
class Codec:
    name: str
    usage: str  # how a spec spells it
    summary: str
    stores: bool  # True: writes bytes (comes last); False: selects values for the next stage
    parse: Callable[[str | None], Any]  # the text after ':' (None without one) -> parameters
    spell: Callable[[Any], str]  # parameters -> canonical spelling
    encode: Callable[[Any, Any, StageContext], Any]  # (params, float32 rows, ctx) -> values or uint8 rows
    decode: Callable[[Any, Any, int, StageContext], Any]  # (params, encoded rows, n inputs, ctx) -> float32 rows
    width: Callable[[Any, int, str], int]  # bytes estimate: (params, n inputs, value dtype) -> values or bytes per row
    gain: Callable[[Any, int], float]  # the most decoding multiplies a stored number by
    float_fields: Callable[[Any, int, str], list[tuple[int, int, str]]] | None = None  # storing: floats in an encoded row


def _no_arg(name: str, make: Callable[[], Any]) -> Callable[[str | None], Any]:
    def parse(arg: str | None) -> Any:
        if arg is not None:
            raise UnknownCompression(f"{name} takes no argument (got {name}:{arg})")
        return make()

    return parse


CODECS: dict[str, Codec] = {
    c.name: c
    for c in (
        Codec("int8", "int8", "8-bit integers, one float32 scale per row (max |x| / 127)", True,
              quantize.int8_parse, lambda p: "int8", quantize.int8_encode, quantize.int8_decode, quantize.int8_width,
              lambda p, n: 127.0, quantize.int8_fields),
        Codec("int4", "int4[:GROUP]", "4-bit integers, one bf16 scale per group of 64 values of a row (max |x| / 7)", True,
              quantize.int4_parse, quantize.int4_spell, quantize.int4_encode, quantize.int4_decode, quantize.int4_width,
              lambda p, n: 7.0, quantize.int4_fields),
        Codec("sparse", "sparse:DENSITY", "keep a seeded random DENSITY of each row's values, rescaled by 1/DENSITY", False,
              sparse.sparse_parse, sparse.sparse_spell, sparse.sparse_encode, sparse.sparse_decode, sparse.sparse_width,
              sparse.sparse_gain),
    )
}  # fmt: skip

# What a spec ends with when it names no storing codec: the values, in the package's delta dtype.
RAW = Codec("raw", "", "the values as they are", True, _no_arg("raw", quantize.RawParams), lambda p: "",
            quantize.raw_encode, quantize.raw_decode, quantize.raw_width, lambda p, n: 1.0, quantize.raw_fields)  # fmt: skip


@dataclass(frozen=True)
class Stage:
    codec: Codec
    params: Any

    @property
    def spec(self) -> str:
        return self.codec.spell(self.params)


def valid_specs() -> str:
    """The valid spellings, for error messages and ``--help``."""
    selecting = [c.usage for c in CODECS.values() if not c.stores]
    storing = [c.usage for c in CODECS.values() if c.stores]
    return (
        f"'{NONE}' (exact), one of {', '.join(storing + selecting)}, or selecting stages then one storing stage "
        f"joined by '+' (e.g. sparse:0.25+int4)"
    )


def describe_codecs() -> list[tuple[str, str]]:
    return [(NONE, "no compression: the delta travels exactly")] + [(c.usage, c.summary) for c in CODECS.values()]


def parse_stages(spec: str) -> tuple[Stage, ...]:
    """The stages of a spec (empty for ``none``); ``UnknownCompression`` naming the fault and the valid specs."""
    if not isinstance(spec, str) or not spec.strip():
        raise UnknownCompression(f"compression {spec!r} is empty; valid: {valid_specs()}")
    text = spec.strip().lower()
    if text == NONE:
        return ()
    stages: list[Stage] = []
    for part in text.split("+"):
        name, _, arg = part.strip().partition(":")
        codec = CODECS.get(name.strip())
        if codec is None:
            raise UnknownCompression(f"compression {spec!r}: unknown codec {name.strip()!r}; valid: {valid_specs()}")
        if stages and stages[-1].codec.stores:
            raise UnknownCompression(f"compression {spec!r}: {stages[-1].spec} stores the values, so it must come last; valid: {valid_specs()}")
        try:
            params = codec.parse(arg.strip() if arg.strip() else None)
        except UnknownCompression as exc:
            raise UnknownCompression(f"compression {spec!r}: {exc}; valid: {valid_specs()}") from None
        stages.append(Stage(codec, params))
    return tuple(stages)
