"""Requests and responses of the hub routes (CONTRACT §3.3, §3.4)."""

from __future__ import annotations


# --- recommendations -------------------------------------------------------------------


# --- search, details, downloads --------------------------------------------------------
