"""`vmvault vault usage` (registered on the command tree by cli/app.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from vmvault.cli import output
from vmvault.cli.app import vault_app
from vmvault.cli.state import STATE, service_context

USAGE_COLUMNS = ("name", "protectionState", "protectedInstanceGB", "tier", "monthlyFee", "lastRecoveryPoint")


def _price(flag: str, what: str) -> object:
    return typer.Option(flag, help=f"Override the price of {what}.", show_default=False)


@vault_app.command("usage")
def vault_usage(
    name: Annotated[str, typer.Argument(help="Vault name.")],
    price_small: Annotated[float | None, _price("--price-small", "an instance <= 50 GB (per month)")] = None,
    price_medium: Annotated[float | None, _price("--price-medium", "an instance of 50-500 GB (per month)")] = None,
    price_per_500gb: Annotated[
        float | None, _price("--price-per-500gb", "each started 500 GB of a larger instance (per month)")
    ] = None,
    price_lrs: Annotated[float | None, _price("--price-lrs", "LRS storage (per GB-month)")] = None,
    price_grs: Annotated[float | None, _price("--price-grs", "GRS storage (per GB-month)")] = None,
) -> None:
    """Protected instances (size of their last backup's data, tier, monthly fee) and storage consumed."""
    from vmvault.cli import remote
    from vmvault.service import usage

    overrides = {
        "instance_small": price_small,
        "instance_medium": price_medium,
        "instance_per_500gb": price_per_500gb,
        "storage_lrs": price_lrs,
        "storage_grs": price_grs,
    }
    if remote.active():
        remote.refuse_option("--price-*", any(v is not None for v in overrides.values()))
        report = remote.get(f"/vaults/{remote.q(name)}/usage")
    else:
        with service_context() as ctx:
            report = usage.vault_usage(ctx, name, overrides)
    if STATE.structured:
        output.print_json(report)
        return
    output.print_list(report["items"], USAGE_COLUMNS)
    output.info("")
    storage, totals = report["storage"], report["totals"]
    output.print_object(
        {
            "vault": report["vault"],
            "redundancy": report["redundancy"],
            "storageBytes": storage["bytes"],
            "storagePricePerGBMonth": storage["pricePerGBMonth"],
            "storageFee": totals["storageFee"],
            "protectedInstances": totals["protectedInstances"],
            "instanceFees": totals["instanceFees"],
            "monthlyTotal": f"{totals['monthly']} {report['currency']}",
        }
    )
