"""The delta codecs on hand-built tensors: error bounds, scales, seeded masks, composition, layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmerge.checkpoints.codecs import CODECS, canonical_spec, parse_compression
from fedmerge.checkpoints.codecs.hashing import hash32
from fedmerge.checkpoints.codecs.sparse import block_shape
from fedmerge.checkpoints.errors import UnknownCompression


def roundtrip(spec: str, x: torch.Tensor, seed: int = 5, dtype: str = "F32") -> torch.Tensor:
    codec = parse_compression(spec).for_tensor("w", tuple(x.shape), seed, dtype)
    return codec.decode(codec.encode(x, 0), 0)


# -- registry and spelling ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, canonical",
    [("none", "none"), (" NONE ", "none"), ("int8", "int8"), ("INT4", "int4"), ("int4:64", "int4"), ("int4:128", "int4:128"),
     ("sparse:0.250", "sparse:0.25"), ("sparse:.5 + int8", "sparse:0.5+int8"), ("sparse:0.25+int4", "sparse:0.25+int4")],
)  # fmt: skip
def test_specs_have_one_canonical_spelling(spec, canonical):
    assert canonical_spec(spec) == canonical


@pytest.mark.parametrize(
    "spec, says",
    [("zip", "unknown codec 'zip'"), ("int4+sparse:0.25", "int4 stores the values, so it must come last"),
     ("int8+int4", "must come last"), ("sparse", "share of values to keep"), ("sparse:0", "(0, 1]"), ("sparse:1.5", "(0, 1]"),
     ("sparse:abc", "(0, 1]"), ("int4:7", "even integer"), ("int8:3", "no argument"), ("", "empty")],
)  # fmt: skip
def test_bad_specs_are_refused_listing_the_valid_ones(spec, says):
    with pytest.raises(UnknownCompression) as err:
        parse_compression(spec)
    assert says in str(err.value)
    if spec:
        for valid in ("'none'", "int8", "int4[:GROUP]", "sparse:DENSITY", "sparse:0.25+int4"):
            assert valid in str(err.value)


def test_the_registry_is_one_table_of_named_codecs():
    assert set(CODECS) == {"int8", "int4", "sparse"}
    for name, codec in CODECS.items():
        assert codec.name == name and codec.summary and callable(codec.encode) and callable(codec.decode) and callable(codec.width)
    assert [c.stores for c in CODECS.values()] == [True, True, False]


# -- int8 -----------------------------------------------------------------------------------------
def test_int8_scales_each_row_by_its_largest_value():
    x = torch.tensor([[1.27, -0.635, 0.0, 0.005], [0.0, 0.0, 0.0, 0.0], [-2.54, 1.0, 0.01, 0.03]])
    codec = parse_compression("int8").for_tensor("w", (3, 4), 0, "F32")
    enc = codec.encode(x, 0)
    assert enc.shape == (3, 4 + 4)
    scales = enc[:, 4:].contiguous().view(torch.float32).flatten()
    assert torch.allclose(scales, torch.tensor([0.01, 0.0, 0.02]))
    q = enc[:, :4].contiguous().view(torch.int8)
    # 1.27 / 0.01 = 127, -0.635 / 0.01 = -63.5 -> -64 (half to even), 0.005 / 0.01 = 0.5 -> 0
    assert q[0].tolist() == [127, -64, 0, 0]
    assert q[1].tolist() == [0, 0, 0, 0]
    assert q[2].tolist() == [-127, 50, 0, 2]
    dec = codec.decode(enc, 0)
    assert dec[0, 0].item() == pytest.approx(1.27) and dec[2, 0].item() == pytest.approx(-2.54)


def test_int8_error_is_at_most_half_a_step_of_its_row():
    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * torch.logspace(-4, 1, 64).unsqueeze(1)
    dec = roundtrip("int8", x)
    step = x.abs().amax(dim=1, keepdim=True) / 127
    assert ((dec - x).abs() <= step / 2 * (1 + 1e-5)).all()


# -- int4 -----------------------------------------------------------------------------------------
def test_int4_keeps_a_bf16_scale_per_group_of_64():
    row = torch.zeros(1, 130)
    row[0, :64] = torch.linspace(-7.0, 7.0, 64)  # group 0: max 7 -> scale 1
    row[0, 64:128] = 0.7 * torch.linspace(1.0, -1.0, 64)  # group 1: max 0.7 -> scale bf16(0.1)
    row[0, 128:] = torch.tensor([0.35, -0.07])  # group 2 (2 values): max 0.35 -> scale 0.05
    codec = parse_compression("int4").for_tensor("w", (1, 130), 0, "F32")
    enc = codec.encode(row, 0)
    assert enc.shape == (1, 65 + 3 * 2)  # 65 bytes of nibbles, three bf16 scales
    scales = enc[0, 65:].clone().view(torch.bfloat16).float()
    expected = torch.tensor([1.0, 0.1, 0.05]).to(torch.bfloat16).float()
    assert torch.equal(scales, expected)
    # nibbles hold q + 8, low nibble first: -7 and the next value of group 0
    assert enc[0, 0].item() & 15 == 1 and enc[0, 64].item() & 15 == round(0.35 / expected[2].item()) + 8
    dec = codec.decode(enc, 0)
    for g, (a, b) in enumerate([(0, 64), (64, 128), (128, 130)]):
        assert ((dec[0, a:b] - row[0, a:b]).abs() <= scales[g] / 2 + 1e-7).all()
    assert dec[0, 0].item() == -7.0 and dec[0, 63].item() == 7.0


def test_int4_of_an_odd_row_and_a_zero_group():
    x = torch.zeros(2, 67)
    x[1, :3] = torch.tensor([1.0, -1.0, 0.5])
    dec = roundtrip("int4", x)
    assert torch.equal(dec[0], torch.zeros(67))
    s = torch.tensor(1.0 / 7).to(torch.bfloat16).item()  # 0.142578125: max / 7, rounded to bf16
    assert dec[1, :3].tolist() == [7 * s, -7 * s, 4 * s] and dec[1, 3:].abs().max() == 0


def _int4_by_the_book(x: torch.Tensor, group: int = 64) -> bytes:
    """The int4 row format of the codec's documentation, one value at a time in plain Python."""
    out = bytearray()
    for row in x.tolist():
        n = len(row)
        scales = []
        for g in range(0, n, group):
            m = max(abs(v) for v in row[g : g + group])
            scales.append(torch.tensor(m / 7.0, dtype=torch.float32).to(torch.bfloat16))
        qs = []
        for i, v in enumerate(row):
            s = scales[i // group].float()
            inv = (1.0 / s).item() if s.item() > 0 else 0.0
            q = torch.tensor(v, dtype=torch.float32) * torch.tensor(inv, dtype=torch.float32)  # float32 like the codec
            qs.append(int(min(7.0, max(-7.0, torch.round(q).item()))) + 8)
        if n % 2:
            qs.append(8)
        out += bytes(qs[i] | (qs[i + 1] << 4) for i in range(0, len(qs), 2))
        out += b"".join(s.reshape(1).view(torch.uint8).numpy().tobytes() for s in scales)
    return bytes(out)


@pytest.mark.parametrize("shape, group", [((3, 64), 64), ((4, 130), 64), ((2, 67), 64), ((5, 9), 4), ((1, 1), 64), ((3, 200), 128)])
def test_int4_bytes_equal_the_format_computed_value_by_value(shape, group):
    g = torch.Generator().manual_seed(shape[1])
    x = torch.randn(*shape, generator=g) * 0.01
    x[0, : min(3, shape[1])] = torch.tensor([0.5, -0.5, 1e-3])[: min(3, shape[1])]  # halves: round to even
    if shape[0] > 2:
        x[2] = 0.0  # an all-zero row: zero scales, every nibble 8
    spec = "int4" if group == 64 else f"int4:{group}"
    codec = parse_compression(spec).for_tensor("w", shape, 0, "F32")
    assert codec.encode(x, 0).numpy().tobytes() == _int4_by_the_book(x, group)


def test_int4_is_about_a_quarter_of_bf16_and_keeps_direction():
    x = torch.randn(512, 2048, generator=torch.Generator().manual_seed(1)) * 0.002
    c = parse_compression("int4")
    assert c.nbytes((512, 2048), "F32") / (512 * 2048 * 2) == pytest.approx(0.265625)
    dec = roundtrip("int4", x)
    assert torch.nn.functional.cosine_similarity(dec.flatten(), x.flatten(), dim=0) > 0.99


# -- sparse ---------------------------------------------------------------------------------------
def test_sparse_keeps_exactly_its_share_of_every_block_rescaled():
    x = torch.rand(8, 200) + 1.0  # no zeros: a kept value is never zero
    dec = roundtrip("sparse:0.25", x)
    kept = dec != 0
    b, k, nb = block_shape(parse_compression("sparse:0.25").stages[0].params, 200)
    assert (b, k, nb) == (64, 16, 4)
    for r in range(8):
        for j in range(3):  # full blocks: exactly 16 of 64 kept
            assert int(kept[r, j * 64 : (j + 1) * 64].sum()) == 16
        assert int(kept[r, 192:].sum()) <= 16  # the last block is padded with zeros past 200
    assert torch.allclose(dec[kept], 4.0 * x[kept])


def test_sparse_is_unbiased_over_seeds():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    seeds = 400
    runs = torch.stack([roundtrip("sparse:0.25", x, seed=s) for s in range(seeds)])
    kept_share = (runs != 0).float().mean(dim=0)
    # each element is kept with probability 1/4: binomial(400, 1/4) stays within 5 sd of 100
    assert ((kept_share - 0.25).abs() <= 5 * math.sqrt(0.25 * 0.75 / seeds)).all()
    mean = runs.mean(dim=0)
    sd = x.abs() * math.sqrt(3.0 / seeds)  # each draw is 4x with p 1/4, else 0: variance 3x^2
    assert ((mean - x).abs() <= 5 * sd + 1e-6).all()


def test_sparse_mask_is_regenerated_from_the_seed_alone():
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(3))
    a, b, c = roundtrip("sparse:0.5", x, seed=11), roundtrip("sparse:0.5", x, seed=11), roundtrip("sparse:0.5", x, seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a != 0, c != 0)
    # what is stored is the kept values only: the positions come from the seed
    codec = parse_compression("sparse:0.5").for_tensor("w", (16, 128), 11, "F32")
    assert codec.row_bytes == 64 * 4
    enc = codec.encode(x, 0).view(torch.float32)
    assert torch.equal(enc.sort(dim=1).values, x[a != 0].view(16, 64).sort(dim=1).values)


def test_tensors_of_one_package_get_their_own_masks():
    x = torch.ones(4, 64)
    c = parse_compression("sparse:0.25")
    one, two = (c.for_tensor(n, (4, 64), 9, "F32") for n in ("a.weight", "b.weight"))
    assert not torch.equal(one.decode(one.encode(x, 0), 0) != 0, two.decode(two.encode(x, 0), 0) != 0)


# -- composition and row ranges -------------------------------------------------------------------
def test_sparse_then_int4_quantizes_the_kept_values():
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(4)) * 0.01
    alone, both = roundtrip("sparse:0.25", x, seed=8), roundtrip("sparse:0.25+int4", x, seed=8)
    assert not ((both != 0) & (alone == 0)).any()  # the same mask (stage seeds are positional); int4 may round a kept value to 0
    kept_values = alone[alone != 0].view(32, 64) / 4  # 64 kept values per row: one int4 group each
    step = kept_values.abs().amax(dim=1, keepdim=True) / 7
    assert ((both[alone != 0].view(32, 64) / 4 - kept_values).abs() <= step / 2 * 1.01).all()
    c = parse_compression("sparse:0.25+int4")
    assert c.nbytes((32, 256), "F32") == 32 * (32 + 2)  # 64 values: 32 nibble bytes + 1 scale
    assert c.nbytes((32, 256), "F32") / (32 * 256 * 2) <= 1 / 8


@pytest.mark.parametrize("spec", ["int8", "int4", "int4:16", "sparse:0.3", "sparse:0.25+int4", "sparse:0.5+int8", "sparse:0.5+sparse:0.5"])
@pytest.mark.parametrize("shape", [(37, 5, 9), (3, 100), (1, 4), (70, 1)])
def test_any_row_range_encodes_and_decodes_on_its_own(spec, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(6))
    codec = parse_compression(spec).for_tensor("t", shape, 21, "BF16")
    whole = codec.encode(x, 0)
    assert tuple(whole.shape) == (shape[0], codec.row_bytes) and whole.numel() == parse_compression(spec).nbytes(shape, "BF16")
    decoded = codec.decode(whole, 0)
    assert decoded.shape == x.shape
    a, b = shape[0] // 3, max(shape[0] // 3 + 1, 2 * shape[0] // 3)
    assert torch.equal(codec.encode(x[a:b], a), whole[a:b])
    assert torch.equal(codec.decode(whole[a:b], a), decoded[a:b])


def test_vectors_and_scalars_are_never_encoded():
    c = parse_compression("int4")
    assert not c.applies_to((2048,)) and not c.applies_to(()) and not c.applies_to((0, 5)) and c.applies_to((2, 3))
    assert c.nbytes((2048,), "BF16") == 4096


# -- the verifier's check of encoded bytes --------------------------------------------------------
def test_stored_scales_must_be_finite_and_stay_finite_once_decoded():
    x = torch.randn(10, 128, generator=torch.Generator().manual_seed(7))
    codec = parse_compression("int4").for_tensor("w", (10, 128), 0, "F32")
    enc = codec.encode(x, 0).numpy().copy()
    raw = enc.tobytes()
    assert codec.finite(raw, 0) and codec.finite(raw[100:1000], 100)
    bad = enc.copy()
    bad[4, 64:66] = np.frombuffer(np.array([0x7FC0], dtype="<u2").tobytes(), dtype=np.uint8)  # a NaN scale in row 4
    assert not codec.finite(bad.tobytes(), 0)
    assert not codec.finite(bad.tobytes()[4 * 68 + 60 : 4 * 68 + 67], 4 * 68 + 60)  # a chunk that cuts into row 4
    assert codec.finite(bad.tobytes()[: 4 * 68], 0)  # the rows before it are fine
    huge = enc.copy()
    huge[2, 64:66] = np.frombuffer(np.array([0x7F70], dtype="<u2").tobytes(), dtype=np.uint8)  # ~3.2e38: finite, but 7x is not
    assert not codec.finite(huge.tobytes(), 0)


# -- the seeded hash is defined here, bit for bit ---------------------------------------------------
def _reference_hash32(counter: int, key: int) -> int:
    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x45D9F3B) & 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x45D9F3B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    x = mix((counter & 0xFFFFFFFF) ^ (key & 0xFFFFFFFF))
    return mix(x ^ (counter >> 32) ^ ((key >> 32) & 0xFFFFFFFF))


def test_mask_hash_matches_its_definition():
    counters = [0, 1, 2, 12345, (1 << 32) + 7, (1 << 40) + 99]
    key = 0x1234_5678_9ABC_DEF0 & 0x7FFF_FFFF_FFFF_FFFF
    got = hash32(torch.tensor(counters, dtype=torch.int64), key).tolist()
    assert got == [_reference_hash32(c, key) for c in counters]
