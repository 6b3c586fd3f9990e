"""Security: identities, the trust store, signed manifests and sealed delta packages.

- ``keys``: Ed25519 + X25519 identities, private files 0600, optional passphrase.
- ``trust``: the consortium's trust store (members, roles, revocations), optionally signed.
- ``manifest``: the canonical, versioned package manifest and its strict parser.
- ``seal``: X25519 + HKDF-SHA256 + AES-256-GCM per chunk, bound to sender, round, tensor, chunk.
- ``package``: ``pack_delta`` / ``verify_package`` / ``VerifiedPackage.unpack``, streaming.
- ``replay``: ``ReplayGuard``, accepted rounds and nonces per sender, on disk.
- ``model_sign``: ``sign_model`` / ``verify_model`` for what the coordinator publishes.
- ``errors``: the typed refusals. ``commands``: the CLI. See ``docs/security.md``.

Never imports Flower, ``fedmerge.eval`` or the network.
"""
