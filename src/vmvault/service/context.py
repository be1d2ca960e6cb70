"""The service context: settings plus an open catalog, shared by every use case."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from vmvault.catalog.db import Catalog
from vmvault.settings import Settings

if TYPE_CHECKING:
    from vmvault.service.paths import PathPolicy


@dataclass
class Context:
    settings: Settings
    catalog: Catalog
    # The allowed roots of paths sent by API and portal callers (service/paths.py): the API and
    # the portal use a copy of the server's context with it set (remote()); None: the local CLI,
    # not restricted.
    paths: PathPolicy | None = None

    def remote(self, paths: PathPolicy) -> Context:
        """This context (same catalog) for API/portal callers: their paths are confined to the roots."""
        return replace(self, paths=paths)

    def close(self) -> None:
        self.catalog.close()

    def now(self) -> datetime:
        """The clock the scheduler reads: UTC now, plus the test-only offset (settings.clock_offset_s)."""
        from vmvault.catalog.clock import utc_now

        return utc_now() + timedelta(seconds=self.settings.clock_offset_s)


def open_context(settings: Settings) -> Context:
    """Open (and if needed migrate) the catalog, then fail jobs whose process died."""
    from vmvault.service.jobs import reap_dead_jobs

    if settings.catalog_url is not None:
        catalog = Catalog.open_url(settings.catalog_url)
    else:
        catalog = Catalog.open(settings.catalog_path)
    ctx = Context(settings=settings, catalog=catalog)
    try:
        reap_dead_jobs(ctx)
    except BaseException:
        catalog.close()
        raise
    return ctx


@contextmanager
def context(settings: Settings) -> Iterator[Context]:
    ctx = open_context(settings)
    try:
        yield ctx
    finally:
        ctx.close()
