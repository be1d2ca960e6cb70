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
