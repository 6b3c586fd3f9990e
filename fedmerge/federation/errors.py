"""What launching and supervising the Flower processes refuses, each error naming the file, port or process.

The errors of the Flower adapter itself (``UnsupportedFlower``, ``ControlApiError``) are in ``fedmerge.flower_internals``.
"""

from __future__ import annotations

from fedmerge.errors import FedmergeError


class FlowerLaunchError(FedmergeError):
    """A Flower process did not start or stopped on its own; the message names its log."""


class PortInUse(FedmergeError):
    """A port a daemon must listen on is taken; the message names the config field and, where it can, the process."""


class LeftoverProcess(FedmergeError):
    """A SuperLink this coordinator did not start still runs on its state; the coordinator never attaches to it."""


class UnpinnedApp(FedmergeError):
    """A Flower app bundle whose SHA-256 is not pinned; it is refused before Flower installs or imports it."""


class DaemonConfigError(FedmergeError):
    """A daemon (``fedmerge client`` or ``fedmerge coordinator``) cannot start as configured."""


class SuperNodeGaveUp(FedmergeError):
    """The hospital's SuperNode stopped for a reason retrying cannot fix (bad key, TLS, address...)."""


class RoundsFailed(FedmergeError):
    """The coordinator's rounds did not all complete (a round failed, the run ended, or time ran out)."""


class WritableByOthers(DaemonConfigError):
    """A file that decides whom a daemon trusts can be changed by another user of the host."""
