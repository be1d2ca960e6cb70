"""Shared pieces of the route modules: the request-body base model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from vmvault.api.auth import AuthorizedRoute

ROUTE_CLASS = AuthorizedRoute


class Body(BaseModel):
    """A JSON request body: camelCase keys, unknown keys refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")
