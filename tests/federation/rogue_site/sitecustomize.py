"""Turns a hospital's own processes rogue: loaded at interpreter start in every Python process of a
``fedmerge client`` daemon whose environment names a behaviour (see ``rogue_hospital``).

A malicious hospital runs whatever code it likes on its own machine; this is how the tests give
one such code without touching fedmerge.
"""

import os

if os.environ.get("FEDMERGE_TEST_ROGUE"):
    import rogue_hospital

    rogue_hospital.install(os.environ["FEDMERGE_TEST_ROGUE"])
