"""The root of every error fedmerge raises on purpose.

Each part defines its own typed errors below this one, so callers (the CLI, the coordinator)
can tell a user mistake from a bug: a ``FedmergeError`` is printed as one clear line, anything
else is a traceback worth reporting.
"""


class FedmergeError(Exception):
    """An error whose message is written for the person running fedmerge."""
