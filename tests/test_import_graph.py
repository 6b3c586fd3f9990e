"""The package's layers point one way: checked on the source, function-local imports included.

cli -> federation -> server / client -> merging, security, eval -> checkpoints -> errors. merging,
security and eval never import Flower, the federation or each other (security may use merging's
public task-vector API, which it needs to pack an adapter's delta); client and server share only
the protocol and the layers below; no cycle between sub-packages. Flower is used through its
public API, its internals only in fedmerge/flower_internals.py; lm-eval only in
fedmerge/eval/lmeval.py.
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


# -- library internals stay behind their adapter ---------------------------------------------------

# Flower's documented API: these modules, and only the names each lists in its ``__all__``.
# Everything else under ``flwr`` (supercore, superlink, supernode, proto, common.constant, ...)
# is reached only through fedmerge/flower_internals.py, which checks the installed version.
FLOWER_PUBLIC_MODULES = ("flwr.app", "flwr.serverapp", "flwr.clientapp", "flwr.common", "flwr.simulation")
FLOWER_ADAPTER = "fedmerge/flower_internals.py"
LMEVAL_ADAPTER = "fedmerge/eval/lmeval.py"


def _library_imports(tree: ast.AST):
    """(module, imported names or None for the module itself, line) of every import, at any depth,
    including ``importlib.import_module("...")`` and ``__import__("...")`` of a literal name."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.module, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("import_module", "__import__"):
                yield node.args[0].value, None, node.lineno


def _dict_writes(tree: ast.AST):
    """Lines that write into an object's ``__dict__`` (``x.__dict__[k] = v``, ``x.__dict__.update(...)``, ...)."""
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Attribute) and t.value.attr == "__dict__":
                yield node.lineno
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("update", "setdefault", "pop", "clear")
                and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "__dict__"):  # fmt: skip
            yield node.lineno


def _sources():
    for path in sorted(ROOT.rglob("*.py")):
        yield path.relative_to(ROOT.parent).as_posix(), ast.parse(path.read_text(), str(path))


def _private_flower_imports(module: str, names: list[str] | None) -> list[str]:
    """What of ``from module import names`` (``import module`` when None) is not Flower's public API."""
    import importlib

    if module != "flwr" and not module.startswith("flwr."):
        return []
    if module not in FLOWER_PUBLIC_MODULES:
        return [module]
    if names is None:
        return []
    public = set(importlib.import_module(module).__all__)
    return [f"{module}.{n}" for n in names if n not in public]


def test_flower_internals_are_touched_only_by_the_adapter():
    bad = []
    for rel, tree in _sources():
        if rel == FLOWER_ADAPTER:
            continue
        for module, names, line in _library_imports(tree):
            bad += [f"{rel}:{line} imports {what}" for what in _private_flower_imports(module, names)]
        bad += [f"{rel}:{line} writes into an object's __dict__" for line in _dict_writes(tree)]
    assert not bad, f"only {FLOWER_ADAPTER} may reach past Flower's public API: {bad}"


def test_the_flower_rule_catches_what_it_names():
    # The scan itself: a private module, a private name of a public module, a __dict__ write, an
    # import by name; the public API passes.
    src = '''
from flwr.app import Message, Context
from flwr.serverapp import Grid
from flwr.common.constant import ErrorCode
from flwr.app import NotPublic
import flwr.supercore.run
def f(msg):
    import importlib
    importlib.import_module("flwr.superlink.main")
    msg.metadata.__dict__["_message_id"] = "x"
    msg.__dict__.update(a=1)
'''
    tree = ast.parse(src)
    found = [w for m, n, _ in _library_imports(tree) for w in _private_flower_imports(m, n)]
    assert found == ["flwr.common.constant", "flwr.app.NotPublic", "flwr.supercore.run", "flwr.superlink.main"]
    assert list(_dict_writes(tree)) == [10, 11]


def test_lm_eval_is_imported_only_by_its_adapter():
    bad = [
        f"{rel}:{line} imports {module}" for rel, tree in _sources() if rel != LMEVAL_ADAPTER
        for module, _, line in _library_imports(tree) if module.split(".")[0] == "lm_eval"
    ]  # fmt: skip
    assert not bad, f"only {LMEVAL_ADAPTER} may import lm-eval: {bad}"
