"""The hospital side: the Flower ClientApp's handlers (contribute a signed package, score candidate
merges on its own validation split, install a published model) over the hospital's own disk.

Shares only ``fedmerge.protocol`` (and the lower layers: merging, security, eval, checkpoints) with
``fedmerge.server``; never imports the server or ``fedmerge.federation`` (which holds the daemon that runs it).
"""
