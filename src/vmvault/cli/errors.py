"""Exit codes: one per error class (vmvault.errors), looked up by the error's code."""

from __future__ import annotations

from vmvault.errors import InternalError, VmvaultError


def _subclasses(cls: type[VmvaultError]) -> list[type[VmvaultError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_subclasses(sub))
    return found


def exit_code_for(code: str | None) -> int:
    """The exit code of the error class with this code (70 when unknown)."""
    for cls in _subclasses(VmvaultError):
        if cls.code == code and cls is not VmvaultError:
            return cls.exit_code
    return InternalError.exit_code
