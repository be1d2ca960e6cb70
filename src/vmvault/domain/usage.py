"""What a vault costs per month, priced the way Azure bills VM backup.

Protected-instance fee, by the instance's size (the non-zero data of its disks at the last
backup, GB = 10^9 bytes):

    size <= 50 GB            $5
    50 GB < size <= 500 GB   $10
    size > 500 GB            $10 x ceil(size / 500 GB)     (1000 GB -> $20, 1000 GB + 1 B -> $30)

plus the storage consumed, per GB-month: $0.024 LRS, $0.048 GRS. Every price can be overridden.
Money is Decimal; nothing is rounded until it is shown.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from decimal import Decimal
from typing import Any

GB = 10**9
SMALL_LIMIT = 50 * GB
MEDIUM_LIMIT = 500 * GB
BLOCK = 500 * GB
TIER_SMALL = "<=50GB"
TIER_MEDIUM = "50-500GB"
TIER_LARGE = ">500GB"


@dataclass(frozen=True)
class Prices:
    """US list prices (USD) unless overridden."""

    instance_small: Decimal = Decimal("5")  # per month, instance <= 50 GB
    instance_medium: Decimal = Decimal("10")  # per month, 50 GB < instance <= 500 GB
    instance_per_500gb: Decimal = Decimal("10")  # per started 500 GB per month, instance > 500 GB
    storage_lrs: Decimal = Decimal("0.024")  # per GB-month
    storage_grs: Decimal = Decimal("0.048")  # per GB-month
    currency: str = "USD"

    def storage_rate(self, redundancy: str) -> Decimal:
        return self.storage_grs if redundancy.upper() == "GRS" else self.storage_lrs

    def with_overrides(self, overrides: dict[str, Any]) -> Prices:
        """These prices with some replaced (keys: the field names); bad values raise ValueError."""
        known = {f.name for f in fields(self)}
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in known:
                raise ValueError(f"unknown price '{key}' (known: {', '.join(sorted(known))})")
            if key == "currency":
                changes[key] = str(value)
                continue
            amount = Decimal(str(value))
            if not amount.is_finite() or amount < 0:
                raise ValueError(f"price '{key}' must be a number >= 0, not {value!r}")
            changes[key] = amount
        return replace(self, **changes)


@dataclass(frozen=True)
class InstanceFee:
    tier: str
    fee: Decimal


SOFT_DELETED_STATE = "SoftDeleted"
SOFT_DELETED_TIER = "not billed (soft deleted: free for its 14 days)"


def is_billed(protection_state: str, has_point: bool) -> bool:
    """Billed from the first backup on while data is kept, except soft deleted (Azure: free for 14 days)."""
    return has_point and protection_state != SOFT_DELETED_STATE


def instance_fee(size_bytes: int, prices: Prices | None = None) -> InstanceFee:
    """The monthly protected-instance fee for an instance of size_bytes."""
    p = prices or Prices()
    if size_bytes < 0:
        raise ValueError("size_bytes must be >= 0")
    if size_bytes <= SMALL_LIMIT:
        return InstanceFee(TIER_SMALL, p.instance_small)
    if size_bytes <= MEDIUM_LIMIT:
        return InstanceFee(TIER_MEDIUM, p.instance_medium)
    blocks = -(-size_bytes // BLOCK)  # ceil without floats
    return InstanceFee(TIER_LARGE, p.instance_per_500gb * blocks)


def storage_fee(stored_bytes: int, redundancy: str, prices: Prices | None = None) -> Decimal:
    """The monthly fee for stored_bytes of vault storage (exact; GB = 10^9 bytes)."""
    p = prices or Prices()
    return Decimal(stored_bytes) / Decimal(GB) * p.storage_rate(redundancy)


def money(amount: Decimal, places: int = 2) -> float:
    """An amount for display, rounded half-up to `places` decimals."""
    from decimal import ROUND_HALF_UP

    return float(amount.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))
