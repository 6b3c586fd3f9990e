"""The package's layers point one way: checked on the source, function-local imports included.

cli -> federation -> server / client -> merging, security, eval -> checkpoints -> errors. merging,
security and eval never import Flower, the federation or each other (security may use merging's
public task-vector API, which it needs to pack an adapter's delta); client and server share only
the protocol and the layers below; no cycle between sub-packages.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fedmerge"


def _part(module: str) -> str | None:
    """The sub-package (or top-level module) a dotted fedmerge module belongs to."""
    bits = module.split(".")
    return bits[1] if bits[0] == "fedmerge" and len(bits) > 1 else ("fedmerge" if bits[0] == "fedmerge" else None)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, set[tuple[str, str]]]:
    """module -> {(imported module, where)} for every import statement, at any depth."""
    out: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        mod = _module_name(path)
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT.parent)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                out[mod].update((a.name, where) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                out[mod].add((target, where))
                out[mod].update((f"{target}.{a.name}", where) for a in node.names)
    return out


IMPORTS = _imports()


def _edges() -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for mod, targets in IMPORTS.items():
        src = _part(mod)
        for target, where in targets:
            dst = _part(target)
            if dst and src and dst != src and dst != "fedmerge":
                edges[(src, dst)].append(f"{where} imports {target}")
    return edges


EDGES = _edges()


def _violations(src: str, forbidden: set[str], allowed_modules: tuple[str, ...] = ()) -> list[str]:
    return [
        w for (s, d), wheres in EDGES.items() if s == src and d in forbidden for w in wheres
        if not any(w.endswith(f"imports {m}") or f"imports {m}." in w for m in allowed_modules)
    ]  # fmt: skip


def test_no_cycle_between_subpackages():
    graph: dict[str, set[str]] = defaultdict(set)
    for s, d in EDGES:
        graph[s].add(d)
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        seen[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if seen.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in seen and (cycle := visit(m)):
                return cycle
        stack.pop()
        seen[n] = 2
        return None

    for node in sorted(graph):
        if node not in seen and (cycle := visit(node)):
            detail = [w for a, b in zip(cycle, cycle[1:]) for w in EDGES[(a, b)][:2]]
            pytest.fail(f"import cycle {' -> '.join(cycle)}: {detail}")


FEDERATION_SIDE = {"federation", "server", "client", "cli", "demo"}


@pytest.mark.parametrize("part", ["checkpoints", "merging", "security", "eval"])
def test_lower_layers_never_import_the_federation_or_flower(part):
    bad = _violations(part, FEDERATION_SIDE)
    bad += [f"{w} imports {t}" for m, ts in IMPORTS.items() if _part(m) == part for t, w in ts if t.split(".")[0] == "flwr"]
    assert not bad, bad


def test_checkpoints_is_the_bottom():
    assert not _violations("checkpoints", {p for (_, p) in EDGES} - {"errors"}), "checkpoints may import only fedmerge.errors"


def test_merging_security_eval_do_not_import_each_other():
    bad = _violations("merging", {"security", "eval"}) + _violations("eval", {"merging", "security"})
    bad += _violations("security", {"eval"}) + _violations("security", {"merging"}, allowed_modules=("fedmerge.merging.taskvector",))
    assert not bad, bad


def test_client_and_server_share_only_the_protocol_and_lower_layers():
    bad = _violations("client", {"server", "federation", "demo", "cli"}) + _violations("server", {"client", "federation", "demo", "cli"})
    assert not bad, bad
