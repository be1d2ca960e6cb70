"""The error tree: every error carries a stable code, a message naming the object, and a fix.

One mapping from error class to CLI exit code (and later HTTP status) lives here, so every face
of vmvault reports the same thing the same way.
"""

from __future__ import annotations


class VmvaultError(Exception):
    """Base of every error vmvault reports to a user."""

    code = "internal_error"
    exit_code = 70
    http_status = 500

    def __init__(self, message: str, *, hint: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "recommendedAction": self.hint}


class InvalidInput(VmvaultError):
    code = "invalid_input"
    exit_code = 64
    http_status = 422


class NotFound(VmvaultError):
    code = "not_found"
    exit_code = 66
    http_status = 404


class AlreadyExists(VmvaultError):
    code = "already_exists"
    exit_code = 73
    http_status = 409


class Busy(VmvaultError):
    """The object is in use (locked image, running VM, running job)."""

    code = "busy"
    exit_code = 75
    http_status = 423


class VmRunning(Busy):
    code = "vm_running"


class AuthenticationError(VmvaultError):
    """Wrong passphrase or missing key."""

    code = "wrong_passphrase"
    exit_code = 77
    http_status = 401


class StorageCredentialsError(AuthenticationError):
    """The vault's storage has no credentials here, or refused them (not the vault's passphrase)."""

    code = "storage_credentials"
    http_status = 502  # the store refused this server, not the API caller's token


class StorageError(VmvaultError):
    code = "storage_error"
    exit_code = 74
    http_status = 503


class ObjectNotFound(StorageError):
    code = "object_not_found"


class IntegrityError(VmvaultError):
    """Data failed authentication or is missing: names the object and who uses it."""

    code = "integrity_error"
    exit_code = 65
    http_status = 500


class HostileContent(IntegrityError):
    """An authenticated vault file holding a name or path user input could not have given.

    Not accidental damage (that fails authentication): whoever holds the vault's keys wrote it.
    `vault import` refuses such a vault whole (service/vaults.py); the code stays integrity_error."""


class PointFailedVerification(VmvaultError):
    """A recovery point whose last verify failed: refused (409) rather than restored half-broken."""

    code = "point_failed_verification"
    exit_code = 65
    http_status = 409


class HypervisorError(VmvaultError):
    code = "hypervisor_error"
    exit_code = 69
    http_status = 502


class Cancelled(VmvaultError):
    code = "cancelled"
    exit_code = 130
    http_status = 409


class InternalError(VmvaultError):
    code = "internal_error"


class Unauthorized(VmvaultError):
    """No, a malformed, unknown, expired or revoked API token."""

    code = "unauthorized"
    exit_code = 77
    http_status = 401


class Forbidden(VmvaultError):
    """The token's role or vault scope does not allow the operation."""

    code = "forbidden"
    exit_code = 77
    http_status = 403


class PathNotAllowed(Forbidden):
    """A path from an API or portal caller outside the server's allowed roots (service/paths.py),
    or a restore that would overwrite a registered VM's disk."""

    code = "path_not_allowed"
