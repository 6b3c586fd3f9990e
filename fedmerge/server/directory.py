"""Which institution each SuperNode is: the binding the round loop trusts, never the node's word.

The coordinator's config binds each institution to the public key of its SuperNode
(``superlink.supernode_public_keys``). Flower authenticates every node by that key and names it
by a node id; a ``NodeDirectory`` answers "which institution is node N bound to?". The round
loop counts a contribution only for that institution, and pushes models only to bound nodes.

``KeyBoundDirectory`` learns each node's registered key from the Grid the SuperLink hands the
ServerApp (``fedmerge.flower_internals.registered_node_keys``); ``MappingDirectory`` is a fixed
table (the in-process grid, tests).
"""

from __future__ import annotations

import os
from typing import Mapping, Protocol, runtime_checkable

from fedmerge.flower_internals import node_key_der, registered_node_keys
from fedmerge.server.errors import NodeDirectoryError


@runtime_checkable
class NodeDirectory(Protocol):
    def institution_of(self, node_id: int) -> str | None:
        """The institution the node is bound to, or None when it is bound to none."""

    def institutions(self) -> list[str]:
        """Every institution that has a bound node (connected or not)."""


class MappingDirectory:
    """node id -> institution, as given."""

    def __init__(self, bindings: Mapping[int, str]):
        self.bindings = {int(k): str(v) for k, v in bindings.items()}

    def institution_of(self, node_id: int) -> str | None:
        return self.bindings.get(int(node_id))

    def institutions(self) -> list[str]:
        return sorted(set(self.bindings.values()))


def load_node_key(path: str | os.PathLike[str], institution: str) -> bytes:
    """A node's OpenSSH public key file, in the form keys are compared (``node_key_der``)."""
    try:
        with open(path, "rb") as fh:
            return node_key_der(fh.read())
    except (OSError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise NodeDirectoryError(f"{path}: cannot read {institution}'s SuperNode public key ({exc})") from None


class KeyBoundDirectory:
    """Bindings by key: a node is the institution whose configured key the SuperLink registered for it."""

    def __init__(self, grid, keys: Mapping[str, bytes]):
        by_key: dict[bytes, str] = {}
        for institution, key in keys.items():
            if key in by_key:
                raise NodeDirectoryError(f"{institution} and {by_key[key]} are bound to the same SuperNode key")
            by_key[key] = institution
        self.grid = grid
        self._by_key = by_key
        self._known: dict[int, str | None] = {}

    @classmethod
    def from_files(cls, grid, key_files: Mapping[str, str | os.PathLike[str]]) -> "KeyBoundDirectory":
        return cls(grid, {inst: load_node_key(path, inst) for inst, path in key_files.items()})

    def institutions(self) -> list[str]:
        return sorted(self._by_key.values())

    def institution_of(self, node_id: int) -> str | None:
        node_id = int(node_id)
        if node_id not in self._known:
            for nid, key in registered_node_keys(self.grid).items():
                self._known[nid] = self._by_key.get(key) if key is not None else None
            self._known.setdefault(node_id, None)  # unknown to the SuperLink: bound to nothing
        return self._known[node_id]
