from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from app.http import StrictJSONRoute

router = APIRouter(tags=["health"], route_class=StrictJSONRoute)


class HealthResponse(BaseModel):
    status: str
    message: str


@router.get("/")
async def health() -> HealthResponse:
    """Tell the UI the backend is up (it polls this every few seconds)."""
    return HealthResponse(status="healthy", message="LocalAI backend is running")
