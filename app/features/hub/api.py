"""Routes: ``/models/recommendations``, ``/models/search``, ``/models/details``, ``/downloads``."""

from __future__ import annotations

from fastapi import APIRouter

from app.http import StrictJSONRoute

router = APIRouter(tags=["hub"], route_class=StrictJSONRoute)

# --- recommendations -------------------------------------------------------------------


# --- search, details, downloads --------------------------------------------------------
