"""What the coordinator and the hospital share beyond the wire protocol: config loading, the
Flower app descriptor, launching Flower processes, and the in-process federation for tests.

Imports ``fedmerge.server`` and ``fedmerge.client`` only where it launches them; neither of those
imports this package's launch code.
"""
