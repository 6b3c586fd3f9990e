"""Property-based: random and mutated manifests and package files never crash or pass.

Whatever bytes arrive, the parser and the verifier answer with one of the project's typed
errors (a ``SecurityError``) or, for the untouched package, accept it: never another exception,
and never an altered package.
"""

from __future__ import annotations

import json
import shutil

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedmerge.security.errors import ManifestInvalid, SecurityError
from fedmerge.security.manifest import MANIFEST_NAME, SIGNATURE_NAME, canonical_bytes, parse_manifest
from fedmerge.security.verify import verify_package

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)


@SETTINGS
@given(st.binary(max_size=400))
def test_random_bytes_are_refused_as_invalid_manifests(raw):
    try:
        parse_manifest(raw)
    except ManifestInvalid:
        return
    raise AssertionError("random bytes were accepted as a manifest")


@SETTINGS
@given(json_values)
def test_random_json_documents_are_refused(doc):
    try:
        raw = json.dumps(doc).encode()
    except (ValueError, OverflowError):
        return
    try:
        parse_manifest(raw)
    except ManifestInvalid:
        return
    raise AssertionError("a random JSON document was accepted as a manifest")


def _paths(doc, prefix=()):
    """Every (path) to a value inside a JSON document."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def _set(doc, path, value):
    if not path:
        return value
    target = doc
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    return doc


@SETTINGS
@given(data=st.data())
def test_mutated_manifests_parse_to_exactly_what_they_say_or_are_refused(packages, data):
    """Structure-level fuzzing: replace or delete one value anywhere in a valid manifest."""
    raw = (packages["sealed"] / MANIFEST_NAME).read_bytes()
    doc = json.loads(raw)
    paths = list(_paths(doc))
    path = data.draw(st.sampled_from(paths[1:]))
    if data.draw(st.booleans()) and isinstance(path[-1], str):
        target = doc
        for p in path[:-1]:
            target = target[p]
        del target[path[-1]]
    else:
        _set(doc, path, data.draw(json_values))
    try:
        mutated = canonical_bytes(doc) if data.draw(st.booleans()) else json.dumps(doc).encode()
    except ValueError:  # an infinite float has no canonical form; send its JSON spelling instead
        mutated = json.dumps(doc).encode()
    try:
        m = parse_manifest(mutated)
    except ManifestInvalid:
        return
    # Accepted only when it is a well-formed manifest that serialises back to the same bytes.
    assert m.to_bytes() == mutated


@SETTINGS
@given(data=st.data())
def test_mutated_package_files_are_never_accepted(packages, trust, ids, tmp_path_factory, data):
    kind = data.draw(st.sampled_from(["plain", "sealed"]))
    src = packages[kind]
    pkg = tmp_path_factory.mktemp("mut") / "pkg"
    shutil.copytree(src, pkg)
    files = sorted(p.name for p in pkg.iterdir())
    name = data.draw(st.sampled_from(files))
    blob = bytearray((pkg / name).read_bytes())
    how = data.draw(st.sampled_from(["flip", "truncate", "insert", "replace_span"]))
    if how == "flip":
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif how == "insert":
        pos = data.draw(st.integers(0, len(blob)))
        blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=32))
    else:
        pos = data.draw(st.integers(0, len(blob) - 1))
        new = data.draw(st.binary(min_size=1, max_size=64))
        assume(bytes(blob[pos : pos + len(new)]) != new)
        blob[pos : pos + len(new)] = new
    assume(bytes(blob) != (src / name).read_bytes())
    (pkg / name).write_bytes(bytes(blob))
    try:
        verify_package(pkg, trust, expected_round=3, opener=ids["coord"], require_sealed=kind == "sealed")
    except SecurityError:
        return
    finally:
        shutil.rmtree(pkg.parent, ignore_errors=True)
    raise AssertionError(f"{how} of {name} went unnoticed")


def test_the_untouched_package_is_accepted(packages, trust, ids):
    # The control for the property above: the same call accepts the pristine packages.
    for kind in ("plain", "sealed"):
        assert verify_package(packages[kind], trust, expected_round=3, opener=ids["coord"], require_sealed=kind == "sealed").data_checked
    assert {p.name for p in packages["plain"].iterdir()} >= {MANIFEST_NAME, SIGNATURE_NAME}


@SETTINGS
@given(data=st.data())
def test_mutated_published_models_are_never_installed(models, trust, ids, tmp_path_factory, data):
    from fedmerge.security.model_sign import sign_model, verify_model

    root = tmp_path_factory.mktemp("pub")
    folder = root / "model"
    shutil.copytree(models[1], folder)
    sign_model(folder, ids["coord"], round_id=1, fingerprint="sha256:test")
    verify_model(folder, trust)  # the control: accepted untouched
    name = data.draw(st.sampled_from(sorted(p.name for p in folder.iterdir())))
    blob = bytearray((folder / name).read_bytes())
    original = bytes(blob)
    if data.draw(st.booleans()) and blob:
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] ^= data.draw(st.integers(1, 255))
    else:
        pos = data.draw(st.integers(0, len(blob)))
        blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    assume(bytes(blob) != original)
    (folder / name).write_bytes(bytes(blob))
    try:
        verify_model(folder, trust)
    except SecurityError:
        return
    finally:
        shutil.rmtree(root, ignore_errors=True)
    raise AssertionError(f"a change to {name} went unnoticed")
