"""The consortium side: the Flower ServerApp, the round loop, the spool and resume."""
