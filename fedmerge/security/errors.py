"""Typed errors of ``fedmerge.security``.

Every refusal says who sent the package, which tensor (and chunk) is at fault, and what to do,
so an operator can tell a tampered package from a misconfigured federation at a glance. The
attributes (``sender``, ``tensor``, ``path``) let the coordinator log and count refusals without
parsing messages.
"""

from __future__ import annotations

from fedmerge.errors import FedmergeError


class SecurityError(FedmergeError):
    """Root of every refusal and failure of the security part."""

    def __init__(self, message: str, *, sender: str | None = None, tensor: str | None = None, path: object = None):
        super().__init__(message)
        self.sender = sender
        self.tensor = tensor
        self.path = path


# -- keys and trust ---------------------------------------------------------------------------
class KeyFileError(SecurityError):
    """A key or public identity file is missing, malformed, or has unsafe permissions."""


class PassphraseError(KeyFileError):
    """The private key is encrypted and no passphrase or a wrong one was given."""


class TrustStoreError(SecurityError):
    """The trust store file is malformed, or an operation on it is not allowed."""


class TrustStoreUnverified(TrustStoreError):
    """The trust store cannot be trusted as loaded: unsigned without the explicit flag, signed but
    no coordinator key was pinned to check it, or opened for editing and then used to verify."""


class DuplicateMember(TrustStoreError):
    """The trust store lists one member id twice; which entry counts would be a guess."""


class KeyReuse(TrustStoreError):
    """One key is enrolled under two ids, or a revoked (or rotated-out) key would be enrolled again."""


class UnknownSender(SecurityError):
    """The sender is not in the trust store."""


class RevokedSender(SecurityError):
    """The sender is in the trust store but its enrolment was revoked."""


class RoleNotAllowed(SecurityError):
    """The signer is enrolled but not with the role this operation needs (e.g. coordinator)."""


# -- packages -----------------------------------------------------------------------------------
class PackageError(SecurityError):
    """A delta package cannot be built, read or unpacked as asked."""


class ManifestInvalid(PackageError):
    """The manifest is not valid: bad JSON, wrong format version, a missing or ill-typed field."""


class SignatureInvalid(PackageError):
    """The Ed25519 signature does not match the manifest and the sender's enrolled key."""


class TrustStoreSignatureInvalid(TrustStoreError, SignatureInvalid):
    """The trust store's signature does not verify against the pinned coordinator key."""


class UnsealedPackage(PackageError):
    """Sealing is required and the package is not sealed."""


class NotAPlainFile(PackageError):
    """A package folder holds a symbolic link, a FIFO, a device or a folder: only plain files are read."""


class ReferenceMismatch(PackageError):
    """The package was computed against another reference model than the one expected."""


class ReplayError(PackageError):
    """The package was seen before, or belongs to a round that is over."""


class StaleRound(ReplayError):
    """The package's round is not the expected one, or not newer than the sender's last."""


class ReplayedNonce(ReplayError):
    """This sender's package nonce was already accepted once."""


class DataError(PackageError):
    """The tensor data do not match what the signed manifest promises."""


class DigestMismatch(DataError):
    """A tensor's SHA-256 differs from the signed manifest."""


class TensorMismatch(DataError):
    """A tensor's shape or dtype does not match the manifest (or the expected model)."""


class NonFiniteValues(DataError):
    """A tensor holds NaN or infinite values (or, compressed, scales that would decode to them)."""


class CompressionMismatch(DataError):
    """The package is compressed otherwise than the coordinator asked (or asked for none)."""


class TruncatedData(DataError):
    """A data file is shorter than the manifest says, or missing."""


class OversizedData(DataError):
    """A data file is longer than the manifest says, or an unlisted file is present."""


class SealError(PackageError):
    """A sealed package cannot be opened."""


class NotSealedForYou(SealError):
    """The package was sealed to another coordinator's key."""


class OpenerRequired(SealError):
    """The package is sealed; its data cannot be checked or unpacked without the coordinator key."""


class ChunkAuthenticationFailed(SealError):
    """AES-GCM refused a chunk: altered, swapped, reordered, truncated or from another package."""


# -- published models ---------------------------------------------------------------------------
class ModelVerificationFailed(SecurityError):
    """A model folder does not match the coordinator's signed publication manifest."""


class WrongPublisher(ModelVerificationFailed):
    """The publication is signed by an enrolled coordinator, but not by the pinned one."""


class StalePublication(ModelVerificationFailed):
    """The publication is for another round than expected, or not newer than the installed one."""
