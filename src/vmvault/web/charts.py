"""The vault's storage-over-time chart: an inline SVG drawn on the server from recovery points.

The series is the protected data of the vault after each backup: for every point in time order,
each VM counts with the stored size (non-zero bytes, disks[].storedBytes) of its newest point so
far. It reads only what the catalog already holds (no new tables), soft-deleted points included
(their data is kept until purged).
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from vmvault.catalog import repos
from vmvault.catalog.clock import from_iso
from vmvault.service.context import Context
from vmvault.web.fmt import size, when

WIDTH, HEIGHT, PAD_LEFT, PAD_BOTTOM, PAD_TOP, PAD_RIGHT = 640, 220, 70, 30, 12, 16


@dataclass(frozen=True)
class Sample:
    time: str
    total: int


def storage_series(ctx: Context, vault_name: str) -> list[Sample]:
    with ctx.catalog.read() as s:
        vault = repos.get_vault(s, vault_name)
        points = sorted(repos.recovery_points_in_vault(s, vault.id), key=lambda p: p.time)
        rows = [(p.time, p.vm_id, sum(int(d.get("storedBytes") or 0) for d in p.disks)) for p in points]
    latest: dict[str, int] = {}
    out = []
    for time, vm_id, stored in rows:
        latest[vm_id] = stored
        out.append(Sample(time, sum(latest.values())))
    return out


def storage_svg(samples: list[Sample]) -> str:
    """A step chart of the samples (empty string when there is nothing to draw)."""
    if not samples:
        return ""
    times = [from_iso(s.time).timestamp() for s in samples]
    t0, t1 = times[0], max(times[-1], times[0] + 1)
    top = max(max(s.total for s in samples), 1)
    inner_w, inner_h = WIDTH - PAD_LEFT - PAD_RIGHT, HEIGHT - PAD_TOP - PAD_BOTTOM

    def x(t: float) -> float:
        return PAD_LEFT + (t - t0) / (t1 - t0) * inner_w if len(samples) > 1 else PAD_LEFT + inner_w / 2

    def y(v: int) -> float:
        return PAD_TOP + inner_h - v / top * inner_h

    path = []
    for i, (t, sample) in enumerate(zip(times, samples, strict=True)):
        if i:
            path.append(f"{x(t):.1f},{y(samples[i - 1].total):.1f}")
        path.append(f"{x(t):.1f},{y(sample.total):.1f}")
    dots = "".join(
        f'<circle cx="{x(t):.1f}" cy="{y(s.total):.1f}" r="3"><title>{escape(when(s.time))}: {escape(size(s.total))}'
        f"</title></circle>"
        for t, s in zip(times, samples, strict=True)
    )
    base = PAD_TOP + inner_h
    return (
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="Protected data over time">'
        f'<line class="axis" x1="{PAD_LEFT}" y1="{base}" x2="{WIDTH - PAD_RIGHT}" y2="{base}"/>'
        f'<line class="axis" x1="{PAD_LEFT}" y1="{PAD_TOP}" x2="{PAD_LEFT}" y2="{base}"/>'
        f'<text x="{PAD_LEFT - 6}" y="{PAD_TOP + 10}" text-anchor="end">{escape(size(top))}</text>'
        f'<text x="{PAD_LEFT - 6}" y="{base}" text-anchor="end">0</text>'
        f'<text x="{PAD_LEFT}" y="{HEIGHT - 8}">{escape(when(samples[0].time))}</text>'
        f'<text x="{WIDTH - PAD_RIGHT}" y="{HEIGHT - 8}" text-anchor="end">{escape(when(samples[-1].time))}</text>'
        f'<polyline points="{" ".join(path)}"/>{dots}</svg>'
    )


def bars_svg(bars: list[tuple[str, float | None]], title: str) -> str:
    """Horizontal bars of rates 0..1 (an item with no backup yet: an empty bar, 'no backups')."""
    if not bars:
        return ""
    row, label_w, bar_w = 22, 220, WIDTH - 220 - 60
    height = row * len(bars) + 8
    parts = [f'<svg class="chart bars" viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{escape(title)}">']
    for i, (name, rate) in enumerate(bars):
        y = 4 + i * row
        shown = "no backups" if rate is None else f"{rate * 100:.0f}%"
        width = 0.0 if rate is None else max(0.0, min(1.0, rate)) * bar_w
        tone = "ok" if rate is not None and rate >= 0.99 else "bad" if rate is not None and rate < 0.9 else "warn"
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{escape(name[:34])}</text>'
            f'<rect class="{tone}" x="{label_w}" y="{y + 3}" width="{width:.1f}" height="{row - 8}"/>'
            f'<text x="{label_w + width + 6:.1f}" y="{y + 14}">{escape(shown)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def sparkline_svg(samples: list[Sample], width: int = 120, height: int = 28) -> str:
    """A vault's stored size after each backup, as a tiny line for a table cell ('' with under two samples)."""
    if len(samples) < 2:
        return ""
    times = [from_iso(s.time).timestamp() for s in samples]
    t0, span = times[0], max(times[-1] - times[0], 1.0)
    top = max(max(s.total for s in samples), 1)
    points = " ".join(
        f"{2 + (t - t0) / span * (width - 4):.1f},{height - 2 - s.total / top * (height - 4):.1f}"
        for t, s in zip(times, samples, strict=True)
    )
    label = f"from {size(samples[0].total)} to {size(samples[-1].total)}"
    return (
        f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(label)}"><title>{escape(label)}</title><polyline points="{points}"/></svg>'
    )
