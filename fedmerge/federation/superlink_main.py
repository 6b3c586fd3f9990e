"""``flower-superlink`` with a SQLite busy timeout long enough for the payloads it stores.

With a state database (``--database``), Flower 1.41 keeps the message store *and* every object
of every message (payload chunks of ~5 MiB) in the same SQLite file, and sets SQLite's busy
timeout to 5 s. Moving a model writes and deletes hundreds of MB of blobs there; a write that
waits longer than 5 s for the lock fails with "database is locked", which the SuperLink answers
as HTTP 500. Flower's clients do not retry a 500: a SuperNode's message loop or heartbeat thread
stops on it (the node then drops offline while its process still runs, so the replies it says
it sent never reach the coordinator), and the ServerApp's heartbeat thread stops, so the
SuperLink ends the run a minute later. Waiting for the lock instead of failing costs nothing:
the Flower clients time out and retry on their side anyway.
"""

from __future__ import annotations

import sys

BUSY_TIMEOUT_MS = 120_000


def patch_busy_timeout(ms: int = BUSY_TIMEOUT_MS) -> None:
    from flwr.supercore import sql_mixin

    sql_mixin.SQLITE_PRAGMAS = tuple((k, str(ms) if k == "busy_timeout" else v) for k, v in sql_mixin.SQLITE_PRAGMAS)


def main() -> None:
    patch_busy_timeout()
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    sys.exit(flower_superlink())


if __name__ == "__main__":
    main()
