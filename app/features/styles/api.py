from __future__ import annotations

from typing import Any

from fastapi import APIRouter

router = APIRouter(prefix="/styles", tags=["styles"])


@router.get("")
async def list_styles() -> list[dict[str, Any]]:
    """List prompt-style sections; none are installed yet, so the list is empty."""
    return []
