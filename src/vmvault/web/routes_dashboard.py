"""The overview at / and the reports at /reports (with their CSV download and SVG chart)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from markupsafe import Markup
from starlette.responses import PlainTextResponse, Response

from vmvault.api.auth import Permission, visible
from vmvault.service import dashboard, reports
from vmvault.web.charts import bars_svg, sparkline_svg, storage_series
from vmvault.web.core import PortalRoute, access, ctx_of, principal_of, render

router = APIRouter(route_class=PortalRoute, include_in_schema=False)
PERIODS = (7, 30, 90)


@router.get("/")
@access(Permission.READ)
def overview(request: Request) -> Response:
    view = dashboard.overview(ctx_of(request), principal_of(request).vault)  # a scoped token: its vault only
    ctx = ctx_of(request)
    trends = {v["name"]: Markup(sparkline_svg(storage_series(ctx, v["name"]))) for v in view["vaults"]}
    return render(request, "dashboard.html", view=view, trends=trends)


def _report(request: Request, days: int) -> dict[str, object]:
    principal = principal_of(request)
    report = reports.backup_report(ctx_of(request), days)
    if principal.vault is not None:
        report["rows"] = visible(principal, report["rows"], key="vault")
    return report


@router.get("/reports")
@access(Permission.READ)
def report_page(request: Request, days: int = 30) -> Response:
    report = _report(request, days)
    bars = [(f"{r['item']} ({r['vault']})", r["successRate"]) for r in report["rows"] if r["scope"] == "item"]  # type: ignore[attr-defined]
    chart = Markup(bars_svg(bars, "Backup success rate per item"))  # numbers and escaped text only
    return render(request, "reports.html", report=report, periods=PERIODS, days=days, chart=chart)


@router.get("/reports.csv")
@access(Permission.READ)
def report_csv(request: Request, days: int = 30) -> Response:
    text = reports.report_csv(_report(request, days))
    headers = {"Content-Disposition": f'attachment; filename="vmvault-report-{days}d.csv"'}
    return PlainTextResponse(text, media_type="text/csv", headers=headers)
