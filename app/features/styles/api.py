from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.http import StrictJSONRoute

router = APIRouter(prefix="/styles", tags=["styles"], route_class=StrictJSONRoute)


@router.get("")
async def list_styles() -> list[dict[str, Any]]:
    """List prompt-style sections; none are installed yet, so the list is empty."""
    return []
