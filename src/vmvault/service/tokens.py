"""API tokens: minted once, stored only as the SHA-256 of their secret, with a role and a vault scope.

A token reads ``vmv_<id>_<secret>``: the id finds the row, the secret (32 random bytes) is checked
against the stored hash in constant time. Roles are Azure's built-in backup roles (see ROLES).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy.orm import Session

from vmvault.catalog import repos
from vmvault.catalog.clock import from_iso, now_iso, to_iso, utc_now
from vmvault.catalog.models import ApiTokenRow
from vmvault.errors import InvalidInput, NotFound
from vmvault.service.context import Context
from vmvault.service.validate import check_name
from vmvault.service.views import JsonDict

OWNER, CONTRIBUTOR, OPERATOR, READER = "Owner", "BackupContributor", "BackupOperator", "BackupReader"
AGENT = "BackupAgent"  # `vmvault agent run` on a hypervisor host: only the agent calls, only for its host
ROLES = (OWNER, CONTRIBUTOR, OPERATOR, READER, AGENT)
PREFIX = "vmv_"
FIRST_RUN_NAME = "first-run"
_TOKEN_RE = re.compile(r"^vmv_([0-9a-f]{16})_([A-Za-z0-9_-]{20,128})$")
LAST_USED_EVERY = timedelta(minutes=1)
MAX_EXPIRY_DAYS = 100 * 366  # a longer expiry is a typo, not a plan ("never" says never)
_RELATIVE_RE = re.compile(r"^(\d+)([hdw])$")


@dataclass(frozen=True)
class Principal:
    """Who calls: the token's id, role and vault scope (None: every vault); a BackupAgent's host."""

    token_id: str
    name: str
    role: str
    vault: str | None
    host: str | None = None


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_role(role: str) -> str:
    for known in ROLES:
        if role.lower() == known.lower():
            return known
    raise InvalidInput(f"unknown role '{role}'", hint=f"use one of: {', '.join(ROLES)}")


def parse_expires(text: str | None, now: datetime | None = None) -> str | None:
    """'30d', '12h', '2w', or a UTC date/time (YYYY-MM-DD[THH:MM]) in the future; None: never."""
    if text is None or text.strip().lower() in ("", "never"):
        return None
    now = now or utc_now()
    raw = text.strip()
    match = _RELATIVE_RE.fullmatch(raw)
    if match:
        count, unit = int(match.group(1)), match.group(2)
        if count < 1:
            raise InvalidInput(f"--expires '{text}' is not in the future", hint="e.g. --expires 30d")
        days = count * {"h": 1 / 24, "d": 1, "w": 7}[unit]
        if days > MAX_EXPIRY_DAYS:  # also keeps timedelta and datetime from overflowing (a 500)
            raise InvalidInput(f"--expires '{text}' is too far away", hint=f"at most {MAX_EXPIRY_DAYS} days, or never")
        return to_iso(now + timedelta(days=days))
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidInput(
            f"--expires '{text}' is neither a span nor a date", hint="e.g. --expires 30d, 12h or 2030-01-31"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return _checked_moment(text, moment, now)
    except OverflowError:  # year 1 or 9999 with an offset: out of datetime's range
        raise InvalidInput(f"--expires '{text}' is out of range", hint="e.g. --expires 30d or 2030-01-31") from None


def _checked_moment(text: str, moment: datetime, now: datetime) -> str:
    if moment <= now:
        raise InvalidInput(f"--expires '{text}' is not in the future", hint="give a later date, e.g. --expires 30d")
    if moment - now > timedelta(days=MAX_EXPIRY_DAYS):
        raise InvalidInput(f"--expires '{text}' is too far away", hint=f"at most {MAX_EXPIRY_DAYS} days, or never")
    return to_iso(moment)


def token_view(row: ApiTokenRow) -> JsonDict:
    return {
        "id": row.id,
        "name": row.name,
        "role": row.role,
        "vault": row.vault,
        "created": row.created,
        "expires": row.expires,
        "revoked": row.revoked,
        "lastUsed": row.last_used,
        "host": row.host,
    }


def check_host_binding(role: str, host: str | None) -> None:
    """A BackupAgent token names its host (it acts for that host only); no other role takes one."""
    if role == AGENT and not host:
        raise InvalidInput(
            "a BackupAgent token is bound to one host", hint="give the host: --role BackupAgent --host NAME"
        )
    if role != AGENT and host:
        raise InvalidInput(
            f"--host binds only BackupAgent tokens (not {role})", hint="leave --host out, or use --role BackupAgent"
        )
    if host:
        check_name("host", host)


def create_token(
    ctx: Context,
    role: str,
    *,
    vault: str | None = None,
    expires: str | None = None,
    name: str | None = None,
    host: str | None = None,
) -> tuple[JsonDict, str]:
    """Mint a token; returns (its view, the token itself — shown once, never stored)."""
    known = check_role(role)
    check_host_binding(known, host)
    until = parse_expires(expires)
    label = name or (f"{known}-{host}" if host else known)
    if len(label) > 128 or not label.strip():
        raise InvalidInput("a token name has 1-128 characters", hint="e.g. --name ci")
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    with ctx.catalog.write() as s:
        vault_uuid = None
        if vault is not None:
            check_name("vault", vault)
            vault_uuid = repos.get_vault(s, vault).uuid  # the scope is this vault, whatever its name later
        row = ApiTokenRow(
            id=token_id,
            name=label,
            token_hash=hash_secret(secret),
            role=known,
            vault=vault,
            vault_uuid=vault_uuid,
            created=now_iso(),
            expires=until,
            host=host,
        )
        repos.add_api_token(s, row)
        view = token_view(row)
    return view, f"{PREFIX}{token_id}_{secret}"


def list_tokens(ctx: Context, *, include_revoked: bool = False) -> list[JsonDict]:
    with ctx.catalog.read() as s:
        return [token_view(row) for row in repos.list_api_tokens(s, include_revoked=include_revoked)]


def revoke_token(ctx: Context, token_id: str) -> JsonDict:
    with ctx.catalog.write() as s:
        row = repos.find_api_token(s, token_id)
        if row is None:
            raise NotFound(f"token '{token_id}' not found", hint="list tokens with: vmvault token list")
        if row.revoked is None:
            repos.update_api_token(s, token_id, revoked=now_iso())
            s.refresh(row)
        return token_view(row)


def authenticate(ctx: Context, token: str) -> Principal | None:
    """The principal of a valid, unexpired, unrevoked token; None otherwise."""
    match = _TOKEN_RE.fullmatch(token.strip())
    if match is None:
        return None
    token_id, secret = match.group(1), match.group(2)
    with ctx.catalog.read() as s:
        row = repos.find_api_token(s, token_id)
        if row is None:
            hmac.compare_digest(hash_secret(secret), "0" * 64)  # same work whether or not the id exists
            return None
        if not hmac.compare_digest(hash_secret(secret), row.token_hash):
            return None
        if row.revoked is not None or (row.expires is not None and from_iso(row.expires) <= utc_now()):
            return None
        scope = _scope_of(s, row)
        if scope is False:
            return None
        principal = Principal(token_id=row.id, name=row.name, role=row.role, vault=scope, host=row.host)
        stale = row.last_used is None or from_iso(row.last_used) < utc_now() - LAST_USED_EVERY
    if stale:  # at most one write a minute per token
        with ctx.catalog.write() as s:
            repos.update_api_token(s, principal.token_id, last_used=now_iso())
    return principal


def _scope_of(s: Session, row: ApiTokenRow) -> str | Literal[False] | None:
    """The current name of the token's vault (None: unscoped); False when that vault is gone.

    A vault deleted and re-created under the same name has another UUID: its old tokens are refused.
    """
    if row.vault is None:
        return None
    vault = repos.find_vault_by_uuid(s, row.vault_uuid) if row.vault_uuid else None
    return vault.name if vault is not None else False


def ensure_first_run_token(ctx: Context) -> str | None:
    """On a home where no token was ever made: mint an Owner token and return it (else None)."""
    with ctx.catalog.read() as s:
        if repos.count_api_tokens(s) > 0:
            return None
    _view, token = create_token(ctx, OWNER, name=FIRST_RUN_NAME)
    return token
