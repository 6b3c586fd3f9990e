"""Layers point one way: the package that launches Flower processes sits above the apps it launches.

Every import statement of a module counts, function-local ones included (read from the source,
nothing is imported).
"""

from __future__ import annotations

import ast
from pathlib import Path

import fedmerge

ROOT = Path(fedmerge.__file__).parent
LAUNCHERS = {
    "fedmerge.federation.flower",
    "fedmerge.federation.flower_internals",
    "fedmerge.federation.guard",
    "fedmerge.federation.superlink_main",
    "fedmerge.federation.supervision",
    "fedmerge.federation.coordinator_daemon",
    "fedmerge.federation.client_daemon",
    "fedmerge.federation.deployment_commands",
    "fedmerge.federation.credentials",
    "fedmerge.federation.errors",
}


def imports_of(path: Path) -> set[str]:
    """Every module name an import statement in ``path`` names (``from a import b`` gives a and a.b)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def package_imports(package: str) -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT.parent)): imports_of(p) for p in sorted((ROOT / package).rglob("*.py"))}


def test_imports_of_reads_every_import_statement(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import a.b\nfrom c import d\ndef f():\n    from e.f import g\n    import h\nfrom . import local\n")
    assert imports_of(src) == {"a.b", "c", "c.d", "e.f", "e.f.g", "h"}


def test_client_and_server_import_no_launcher_and_not_each_other():
    for package, other in (("client", "fedmerge.server"), ("server", "fedmerge.client")):
        for module, names in package_imports(package).items():
            assert not names & LAUNCHERS, f"{module} imports {sorted(names & LAUNCHERS)}"
            assert not any(n == other or n.startswith(other + ".") for n in names), f"{module} imports {other}"


def test_the_launchers_exist_where_the_graph_says():
    for name in LAUNCHERS:
        assert (ROOT.parent / (name.replace(".", "/") + ".py")).is_file(), name
