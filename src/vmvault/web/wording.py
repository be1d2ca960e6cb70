"""The portal's words: a service error's fix said in portal terms, labels for enum values, the recovery sheet.

The service's errors carry a fix worded for the CLI (`--target-dir`, `vmvault job wait ID`): the
CLI prints it as it is, the API returns it as recommendedAction. The portal has no flags and no
shell, so portal_fix() rewords it: a CLI command becomes the portal page that does the same, a flag
becomes the form field that sets it. Whatever is left that still names the CLI is replaced by a
plain "change the form and try again" rather than shown (tests/test_portal_words.py scans for it).
"""

from __future__ import annotations

import re
from typing import Any

# CLI commands (the start of the command line) -> what the portal user does instead
_COMMANDS: tuple[tuple[str, str], ...] = (
    (r"vmvault job (wait|show|cancel|list)\b(?: [^\s,;()]+)*", "open the job on the Backup jobs page"),
    (r"vmvault vault (show|list|verify)\b(?: [^\s,;()]+)*", "open the vault on the Vaults page"),
    (r"vmvault vault import\b(?: [^\s,;()]+)*", "import the vault on the server (see docs/operations.md)"),
    (r"vmvault recoverypoint list\b(?: [^\s,;()]+)*", "see the recovery points on the VM's Backup page"),
    (r"vmvault protection enable\b(?: [^\s,;()]+)*", "use Enable backup on the VM's page"),
    (r"vmvault protection resume\b(?: [^\s,;()]+)*", "use Resume backup on the VM's page"),
    (r"vmvault protection (disable|update)\b(?: [^\s,;()]+)*", "use the VM's Backup page"),
    (r"vmvault backup now\b(?: [^\s,;()]+)*", "use Backup now on the VM's page"),
    (r"vmvault restore disks\b(?: [^\s,;()]+)*", "use Restore VM, mode Restore disks"),
    (r"vmvault files (list|mount|browse)\b(?: [^\s,;()]+)*", "use File recovery on the VM's page"),
    (r"vmvault (vm|policy|token|notify)\b(?: [^\s,;()]+)*", "use the portal page of that object"),
    (r"vmvault\b(?: [^\s,;()]+)*", "use the matching page of the portal"),
)

# CLI flags (with the verb before them) -> the portal field or control that sets the same thing
_FLAGS: tuple[tuple[str, str], ...] = (
    (r"(pass |add )?--force( to overwrite)?", "tick Overwrite existing files"),
    (r"(set VMVAULT_PASSPHRASE or )?pass --passphrase-file FILE", "type the passphrase in the form"),
    (r"(use |with )--redundancy LRS", r"\1redundancy LRS"),
    (r"pass a directory to --target-dir", "give a directory in Target directory"),
    (r"--target-dir", "Target directory"),
    (r"give --retain-until", "pick a Retain backup till date"),
    (r"--retain-until( \d{4}-\d\d-\d\d)?", "Retain backup till"),
    (r"use --format raw or --format qcow2|--format raw or qcow2", "choose raw or qcow2 in Format"),
    (r"give its format with --format", "choose its Disk format"),
    (r"--format (raw|qcow2)", r"Disk format \1"),
    (r"--expires", "Expires"),
    (r"--name", "name"),
    (r"--webhook", "Webhook URL"),
    (r"--email", "E-mail"),
    (r"--smtp", "SMTP server"),
    (r"--rp ID or --session ID", "the recovery point's row"),
    (r"--rp ID", "a recovery point"),
    (r"give each --disk once", "give each disk image path once"),
    (r"check the path of --disk", "check the disk image path"),
    (r"--disk", "disk image path"),
    (r"give its passphrase with VMVAULT_PASSPHRASE or --passphrase-file", "type the vault's passphrase"),
    (r"rerun with VMVAULT_DEBUG=1 to see the traceback, and report it", "see the server's log, and report it"),
    (r"give --policy NAME and/or --exclude-disk DISK \(or --all-disks\)", "choose a policy"),
    (r"--policy( NAME)?", "the policy choice"),
)
_LEFTOVER = re.compile(r"(?<![\w-])--[a-z][a-z-]*|\bvmvault [a-z]|VMVAULT_")
GENERIC_FIX = "correct the form on the previous page and try again"


def portal_fix(hint: str | None) -> str | None:
    """An error's fix as the portal says it: no CLI command, flag or environment variable."""
    if not hint:
        return hint
    text = hint
    for pattern, words in _FLAGS:
        text = re.sub(pattern, words, text)
    for pattern, words in _COMMANDS:
        text = re.sub(r"(?:(?:see|list) \w+ with: )?" + pattern, words, text)
    if not _LEFTOVER.search(text):
        return text
    kept = [part for part in re.split(r"; |, or | \(|\)", text) if part.strip() and not _LEFTOVER.search(part)]
    return "; ".join(kept) if kept else GENERIC_FIX


def portal_message(message: str) -> str:
    """An error's message without CLI words (a few messages name the flag that would have worked)."""
    return portal_fix(message) or message


# Enum values -> words (the JSON keeps the Azure term; pages show these)
_LABELS: dict[str, str] = {
    "IRPending": "Initial backup pending",
    "NotProtected": "Not protected",
    "ProtectionStopped": "Protection stopped",
    "SoftDeleted": "Soft deleted",
    "CompletedWithWarnings": "Completed with warnings",
    "InProgress": "In progress",
    "Warning (Initial backup pending)": "Initial backup pending",
    "ConfigureBackup": "Configure backup",
    "DisableBackup": "Stop backup",
    "DeleteBackupData": "Delete backup data",
    "UndeleteBackupData": "Undelete backup data",
    "ResumeBackup": "Resume backup",
    "UpdateProtection": "Change protection",
    "FileRecovery": "File recovery",
    "CrashConsistent": "Crash consistent",
    "FileSystemConsistent": "File-system consistent",
    "ApplicationConsistent": "Application consistent",
    "Healthy": "Healthy",
    "Passed": "Passed",
}


def label(value: Any) -> str:
    """A status, state or operation as words: 'IRPending' -> 'Initial backup pending'."""
    text = "" if value is None else str(value)
    if text in _LABELS:
        return _LABELS[text]
    if text.startswith("Warning (") and text.endswith(")"):
        return text[len("Warning (") : -1]
    if re.fullmatch(r"[A-Z][a-z]+(?:[A-Z][a-z]+)+", text):  # other CamelCase enum names: split into words
        words = re.findall(r"[A-Z][a-z]+", text)
        return " ".join([words[0], *(w.lower() for w in words[1:])])
    return text


def recovery_sheet(vault: dict[str, Any], printed: str, passphrase: str | None) -> str:
    """The text the admin prints and keeps away from the server: what recovers the vault after losing it."""
    secret = (
        f"Passphrase:       {passphrase}\n(keep this sheet locked away: it opens every backup in the vault)\n"
        if passphrase
        else "Passphrase:       (not written here: keep it in your password manager or write it by hand)\n"
    )
    return (
        "vmvault vault recovery sheet\n"
        "============================\n\n"
        f"Vault name:       {vault['name']}\n"
        f"Vault ID:         {vault['uuid']}\n"
        f"Storage:          {vault['storageDir']}\n"
        f"Redundancy:       {vault['redundancy']}\n"
        f"Created:          {vault['created']}\n"
        f"Sheet printed:    {printed}\n"
        f"{secret}\n"
        "If this server is lost: install vmvault on a new server, copy the vault's storage folder there,\n"
        "and import it with the passphrase:\n"
        f"    vmvault vault import STORAGE_FOLDER --name {vault['name']} --passphrase-file FILE\n"
        "Without the passphrase the backups cannot be decrypted by anyone, including you.\n"
    )
