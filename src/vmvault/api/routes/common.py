"""Shared pieces of the route modules: the request-body base model, list pages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from vmvault.api.auth import AuthorizedRoute
from vmvault.errors import InvalidInput

ROUTE_CLASS = AuthorizedRoute


class Body(BaseModel):
    """A JSON request body: camelCase keys, unknown keys refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


PAGE_SIZE = 200  # Azure's lists answer 200 objects a page as well


class Paging:
    """$top and $skipToken of a list route: answers {"value": [...], "nextLink": URL | null}, as Azure."""

    def __init__(
        self,
        request: Request,
        top: Annotated[int, Query(alias="$top", ge=1, le=PAGE_SIZE, description="Page size")] = PAGE_SIZE,
        skip_token: Annotated[
            str | None, Query(alias="$skipToken", max_length=20, description="From a nextLink: where the page starts")
        ] = None,
    ) -> None:
        self.request, self.top = request, top
        self.start = _offset(skip_token)

    def page(self, rows: Sequence[Any]) -> dict[str, Any]:
        """The page of a whole list."""
        end = self.start + self.top
        return self.window(rows[self.start : end], end < len(rows))

    def window(self, rows: Sequence[Any], more: bool) -> dict[str, Any]:
        """A page the catalog already cut (rows start..start+top): for lists too long to load whole."""
        next_link = None
        if more:
            next_link = str(self.request.url.include_query_params(**{"$skipToken": str(self.start + self.top)}))
        return {"value": list(rows), "nextLink": next_link}


def _offset(token: str | None) -> int:
    if token is None:
        return 0
    if not token.isdigit():
        raise InvalidInput(f"invalid $skipToken '{token}'", hint="use the nextLink of the previous page as it is")
    return int(token)


Pages = Annotated[Paging, Depends()]
