"""The hospital's typed refusals: what its ClientApp answers instead of doing what was asked.

Each is sent back to the coordinator as a refusal (type name and message, local paths
scrubbed) and lands in the round record.
"""

from __future__ import annotations

from fedmerge.errors import FedmergeError


class ClientError(FedmergeError):
    """The hospital cannot do what the coordinator asked."""


class UnknownReference(ClientError):
    """No local model has the fingerprint the coordinator names as the round's reference."""


class TrainHookFailed(ClientError):
    """The configured train_hook did not produce a checkpoint."""


class RoundNotOpened(ClientError):
    """A part of a round this hospital never opened (or no longer holds) was asked for."""


class NothingReceived(ClientError):
    """A commit arrived for a model none of whose parts were received."""




class NoValidationData(ClientError):
    """Asked to score candidates, but the hospital's config names no validation eval config."""


class CandidateRefused(ClientError):
    """A candidate is not one this hospital scores: another signer, round, slot or reference, too
    many candidates, or a round not newer than the installed one."""


class ScorerFailed(ClientError):
    """The validation scorer could not be loaded, or returned something other than accuracies."""
