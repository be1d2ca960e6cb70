"""Usage and pricing: the fee table against literal fees, and one real item's size and storage."""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path

import pytest

from helpers import Cli, copy_image, mutate_image
from helpers import protect_host_key_only as protect  # not about passphrases: skip their check (scrypt)
from vmvault.domain.usage import Prices, instance_fee, storage_fee

GB = 1_000_000_000

# size in bytes -> (tier, monthly fee in USD), written by hand from Azure's table.
FEES = [
    (0, "<=50GB", Decimal("5")),
    (50 * GB, "<=50GB", Decimal("5")),
    (50 * GB + 1, "50-500GB", Decimal("10")),
    (500 * GB, "50-500GB", Decimal("10")),
    (500 * GB + 1, ">500GB", Decimal("20")),
    (1000 * GB, ">500GB", Decimal("20")),
    (1000 * GB + 1, ">500GB", Decimal("30")),
    (2000 * GB, ">500GB", Decimal("40")),
]


@pytest.mark.parametrize(("size", "tier", "fee"), FEES, ids=[str(f[0]) for f in FEES])
def test_instance_fee_table(size: int, tier: str, fee: Decimal) -> None:
    got = instance_fee(size)
    assert (got.tier, got.fee) == (tier, fee)


def test_storage_fee_per_redundancy_and_overrides() -> None:
    assert storage_fee(GB, "LRS") == Decimal("0.024")
    assert storage_fee(GB, "GRS") == Decimal("0.048")
    assert storage_fee(2_500_000_000, "GRS") == Decimal("0.12")
    assert storage_fee(0, "LRS") == Decimal("0")
    cheap = Prices().with_overrides({"storage_lrs": "0.01", "instance_small": 4, "instance_per_500gb": "7.5"})
    assert storage_fee(3 * GB, "LRS", cheap) == Decimal("0.03")
    assert instance_fee(10 * GB, cheap).fee == Decimal("4")
    assert instance_fee(1200 * GB, cheap).fee == Decimal("22.5")
    with pytest.raises(ValueError, match="unknown price"):
        Prices().with_overrides({"storage_zrs": 1})
    with pytest.raises(ValueError, match=">= 0"):
        Prices().with_overrides({"storage_lrs": -1})


def nonzero_chunk_bytes(path: Path, chunk: int) -> int:
    """Bytes of the chunks of the disk that hold anything but zeros (computed here, not by vmvault).

    QEMU (through which vmvault reads images) sizes a raw disk in whole 512-byte sectors: the disk
    is the file padded with zeros to the next sector, so a partial last chunk counts up to there.
    """
    size = -(-os.path.getsize(path) // 512) * 512
    total = 0
    zero = bytes(chunk)
    with open(path, "rb") as f:
        for offset in range(0, size, chunk):
            length = min(chunk, size - offset)
            if f.read(length).ljust(length, b"\0") != zero[:length]:
                total += length
    return total


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def test_vault_usage_reports_the_last_points_nonzero_bytes(cli: Cli, tmp_path: Path, small_image: Path) -> None:
    disk = copy_image(small_image, tmp_path / "disk.raw")
    prot = protect(cli, disk, tmp_path / "vault")
    usage = cli.ok("vault", "usage", prot.vault).json()
    (line,) = usage["items"]
    assert line["billed"] is False and line["monthlyFee"] == 0.0, "no fee before the first backup"

    assert cli.backup_now(prot.vm).ok
    # Change the disk: zero 3 MiB that held data, and write new random data elsewhere.
    with open(disk, "r+b") as f:
        f.seek(20 << 20)
        f.write(bytes(3 << 20))
    mutate_image(disk, seed=11, fraction=0.05)
    assert cli.backup_now(prot.vm).ok

    chunk = int(cli.ok("vault", "show", prot.vault).json()["properties"]["chunkSize"])
    expected = nonzero_chunk_bytes(disk, chunk)
    assert 0 < expected < os.path.getsize(disk)
    usage = cli.ok("vault", "usage", prot.vault).json()
    (line,) = usage["items"]
    assert line["name"] == prot.vm
    assert line["protectedInstanceBytes"] == expected
    assert (line["tier"], line["monthlyFee"], line["billed"]) == ("<=50GB", 5.0, True)
    stored = tree_bytes(prot.storage)
    assert usage["storage"]["bytes"] == stored
    assert usage["storage"]["pricePerGBMonth"] == 0.024
    assert usage["totals"]["instanceFees"] == 5.0
    assert usage["totals"]["monthly"] == round(5 + stored / GB * 0.024, 2)

    # Prices: a file in the home, then flags over it.
    (cli.home / "prices.json").write_text('{"instance_small": 4, "storage_lrs": 1}')
    usage = cli.ok("vault", "usage", prot.vault, "--price-lrs", "2").json()
    assert usage["items"][0]["monthlyFee"] == 4.0
    assert usage["storage"]["pricePerGBMonth"] == 2.0
    r = cli.fails("vault", "usage", prot.vault, "--price-lrs", "-1")
    assert r.returncode == 64, r
    table = cli.ok("vault", "usage", prot.vault, json_output=False)
    assert "monthlyTotal" in table.stdout and prot.vm in table.stdout

    # Soft deleted: no instance fee for its 14 days (Azure's rule); undeleted, it is billed again.
    cli.ok("protection", "disable", prot.vm, "--delete-data")
    usage = cli.ok("vault", "usage", prot.vault).json()
    (line,) = usage["items"]
    assert (line["protectionState"], line["billed"], line["monthlyFee"]) == ("SoftDeleted", False, 0.0), line
    assert "soft deleted" in line["tier"]
    assert (usage["totals"]["protectedInstances"], usage["totals"]["instanceFees"]) == (0, 0.0)
    cli.ok("protection", "undelete", prot.vm)
    (line,) = cli.ok("vault", "usage", prot.vault).json()["items"]
    assert (line["billed"], line["monthlyFee"]) == (True, 4.0), line
