"""Security: identities, the trust store, signed manifests and sealed delta packages.

- ``keys``: Ed25519 + X25519 identities, private files 0600, optional passphrase.
- ``trust``: the consortium's trust store (members, roles, revocations), signed by a coordinator
  and loaded only against a pinned coordinator key (``TrustStore.load``).
- ``manifest``: the canonical, versioned package manifest, its limits and its strict parser.
- ``seal``: X25519 + HKDF-SHA256 + AES-256-GCM per chunk, bound to sender, round, tensor, chunk.
- ``pack``: ``pack_delta``; ``verify``: ``verify_package`` / ``VerifiedPackage.unpack``;
  ``delta_folder``: the verified deltas as a safetensors folder. All three stream, in bounded memory.
- ``replay``: ``ReplayGuard``, accepted rounds and nonces per sender, on disk.
- ``model_sign``: ``sign_model`` / ``verify_model`` for what the coordinator publishes.
- ``files``, ``finite``, ``hashing``: small helpers of the above. ``errors``: the typed refusals.
  ``commands``: the CLI. See ``docs/security.md``.

Never imports Flower, ``fedmerge.eval`` or the network; of ``fedmerge.merging`` only the
``DeltaSource`` contract a package can be made from.
"""
