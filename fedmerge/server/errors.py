"""The coordinator's typed refusals and failures.

A ``ContributionRefused`` is never raised out of the round loop: it is what the loop records
(its type name and message) when it turns a hospital's contribution down, so the round record
and ``fedmerge status`` say exactly why. The others stop the loop or a command.
"""

from __future__ import annotations

from fedmerge.errors import FedmergeError


class ServerError(FedmergeError):
    """Something on the coordinator's side is not as it must be."""


class UnpinnedFederationConfig(ServerError):
    """The ServerApp was asked to run a federation config other than the coordinator's own, or it changed."""


class RoundFailed(ServerError):
    """A round could not complete (no quorum, not enough hospitals); its record says why."""


class RecordFormatError(ServerError):
    """A round record on disk is not in the format this fedmerge writes."""


class NodeDirectoryError(ServerError):
    """The coordinator cannot tell which institution a SuperNode is bound to."""


class ContributionRefused(ServerError):
    """A contribution turned down; recorded in the round with the institution the node is bound to."""


class UnboundNode(ContributionRefused):
    """The node that sent it is bound to no institution (its key is in no binding)."""


class ClaimMismatch(ContributionRefused):
    """The node says it is another institution than the one its key is bound to."""


class SignerNotBound(ContributionRefused):
    """The package is signed by another institution than the one bound to the node that sent it."""


class DuplicateContribution(ContributionRefused):
    """The institution already has an accepted contribution in this round."""
