"""The consortium side: the round loop (membership, collection, merge or candidate selection, gate,
publication), its typed records, the spool and resume, and ``fedmerge status``.

Shares only ``fedmerge.protocol`` (and the lower layers: merging, security, eval, checkpoints)
with ``fedmerge.client``; never imports the client or ``fedmerge.federation``.
"""
