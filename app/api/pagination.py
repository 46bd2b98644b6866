"""Cursor pagination, newest first: the cursor is the id of the last item seen."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, and_, or_, select
from sqlalchemy.orm import Session

from .errors import ApiError


def page(session: Session, query: Select[Any], model: Any, *, tenant_id: str, limit: int,
         after: str | None) -> tuple[list[Any], str | None]:
    """One page of the tenant's `query` newest first, and the cursor of the next page (None on the last)."""
    query = query.where(model.tenant_id == tenant_id)
    if after is not None:
        # Another tenant's id is as unknown as a made-up one: no answer may tell them apart.
        anchor = session.execute(select(model.created_at, model.id)
                                 .where(model.id == after, model.tenant_id == tenant_id)).first()
        if anchor is None:
            raise ApiError(422, "invalid_cursor", f"cursor {after!r} names no item; pass a next_cursor "
                           "returned by a previous page", "after")
        query = query.where(or_(model.created_at < anchor.created_at,
                                and_(model.created_at == anchor.created_at, model.id < anchor.id)))
    rows = list(session.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, rows[-1].id if more and rows else None
