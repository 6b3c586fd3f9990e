"""Security: identities, the trust store, signed manifests and sealed delta packages.

Never imports Flower, ``fedmerge.eval`` or the network.
"""
