"""Lay out a complete small federation on disk: tiny models, identities, trust store, configs.

Used by ``fedmerge simulate`` (when its config asks for toy institutions), by the tests and by
the deployment walk-through. Everything is seeded, so two layouts with the same arguments hold
the same weights. The trust store is signed by the coordinator and every hospital pins the
coordinator's public identity, as in a real consortium. ``seal`` decides both whether hospitals
seal their packages and whether the coordinator requires it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmerge.errors import FedmergeError


class ToyLayoutExists(FedmergeError):
    """The folder already holds a toy federation (or something else) and overwriting was not asked for."""


@dataclass
class ToyFederation:
    root: Path
    base: Path
    finetunes: dict[str, Path]
    federation_config: Path
    client_configs: dict[str, Path]
    trust_store: Path
    coordinator_key: Path
    coordinator_public: Path
    extra: dict[str, Any] = field(default_factory=dict)


def institution_names(n: int) -> list[str]:
    return [f"hospital-{chr(ord('a') + i)}" if i < 26 else f"hospital-{i}" for i in range(n)]


def build_toy_federation(
    root: str | Path,
    n_clients: int = 3,
    *,
    rounds: int = 1,
    strategy: dict[str, Any] | None = None,
    min_clients: int | None = None,
    part_bytes: int = 64 * 1024,
    seal: bool = False,
    round_timeout_s: float = 60.0,
    seed: int = 0,
    spec=None,
    models_from: "ToyFederation | None" = None,
    federation_overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> ToyFederation:
    import yaml

    from fedmerge.security.keys import generate_identity
    from fedmerge.security.trust import TrustStore
    from fedmerge.toymodels import TinyMistralSpec, build_tiny_mistral, perturb_checkpoint

    root = Path(root)
    _clear(root, overwrite)
    root.mkdir(parents=True, exist_ok=True)
    names = institution_names(n_clients)
    if models_from is not None:
        base, finetunes = models_from.base, dict(models_from.finetunes)
    else:
        base = build_tiny_mistral(root / "models" / "base", spec or TinyMistralSpec(), seed=seed)
        finetunes = {
            name: perturb_checkpoint(base, root / "models" / name, seed=seed + 101 + i, scale=0.05)
            for i, name in enumerate(names)
        }
    keys = root / "keys"
    coord = generate_identity("coordinator", keys)
    trust = TrustStore(path=keys / "trust.json", consortium="toy")
    trust.add(coord.public, role="coordinator")
    for name in names:
        trust.add(generate_identity(name, keys).public, role="institution")
    trust.sign(coord)  # every party checks the store against the coordinator's pinned key
    trust.save()
    fed = {
        "name": "toy",
        "state_dir": str(root / "coordinator"),
        "base_model": str(base),
        "coordinator_key": str(keys / "coordinator.key"),
        "trust_store": str(keys / "trust.json"),
        "rounds": rounds,
        "min_clients": min_clients or n_clients,
        "part_bytes": part_bytes,
        "round_timeout_s": round_timeout_s,
        "wait_for_clients_s": 60.0,
        "require_sealed": seal,
        "strategy": strategy or {"method": "task_arithmetic", "parameters": {}},
    }
    fed.update(federation_overrides or {})
    fed_path = root / "federation.yaml"
    fed_path.write_text(yaml.safe_dump(fed, sort_keys=False))
    clients = {}
    for name in names:
        c = {
            "institution": name,
            "identity_key": str(keys / f"{name}.key"),
            "trust_store": str(keys / "trust.json"),
            "base_model": str(base),
            "finetuned": str(finetunes[name]),
            "state_dir": str(root / "clients" / name),
            "coordinator_public_file": str(keys / "coordinator.pub.json"),
            "seal": seal,
        }
        p = root / "clients" / f"{name}.yaml"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(yaml.safe_dump(c, sort_keys=False))
        clients[name] = p
    return ToyFederation(root, Path(base), {k: Path(v) for k, v in finetunes.items()}, fed_path, clients, keys / "trust.json", keys / "coordinator.key", keys / "coordinator.pub.json")


# What build_toy_federation writes under its root; only a folder holding nothing else is cleared.
_LAYOUT = {"models", "keys", "coordinator", "clients", "federation.yaml"}


def _clear(root: Path, overwrite: bool) -> None:
    if not root.exists() or not any(root.iterdir()):
        return
    present = {p.name for p in root.iterdir()}
    if not overwrite:
        raise ToyLayoutExists(f"{root} is not empty; pass --overwrite to replace the toy federation there")
    unknown = sorted(present - _LAYOUT)
    if unknown:
        raise ToyLayoutExists(f"{root} holds {unknown[0]!r}, which a toy federation does not write; not clearing it, choose an empty work_dir")
    for name in present:
        p = root / name
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
