"""Running the federation: Flower processes launched and supervised, and simulated federations.

The coordinator's SuperLink and a hospital's SuperNode (``flower``, ``superlink_main``), the
app-pinning launcher (``guard``), the daemons behind ``fedmerge coordinator`` and ``fedmerge
client`` (``coordinator_daemon``, ``client_daemon``), and simulations on one machine. Every use
of Flower beyond its public API is in ``fedmerge.flower_internals``, which the round loop of
``fedmerge.server`` uses too.

This package imports the apps of ``fedmerge.server`` and ``fedmerge.client``; neither of those
imports it.
"""
