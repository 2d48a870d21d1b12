"""Input types shared by every feature's schemas: values that reach SQLite or the file system.

SQLite stores signed 64-bit integers, so a larger id cannot name a row (and would make the
driver raise): such ids are refused as validation errors. Names that reach paths, SQL and
logs may not carry control characters (a NUL byte ends a C string: the file system and the
Hub client would see another name than the one we checked).
"""

from __future__ import annotations

import pathlib
from typing import Annotated

from fastapi import Path
from pydantic import AfterValidator, BeforeValidator, Field

MAX_DATABASE_ID = 2**63 - 1


def _not_a_boolean(value: object) -> object:
    # Pydantic's lax mode reads true/false as 1/0; a slider value or a size sent as a
    # boolean is a client bug, to be told, not a weight of 1.
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


Number = Annotated[float, BeforeValidator(_not_a_boolean)]
"""A float in a request body: any JSON number, never a boolean."""

Integer = Annotated[int, BeforeValidator(_not_a_boolean)]
"""An int in a request body: never a boolean."""

DatabaseId = Annotated[Integer, Field(ge=0, le=MAX_DATABASE_ID)]
"""A row id in a request body."""

DatabaseIdPath = Annotated[int, Path(ge=0, le=MAX_DATABASE_ID)]
"""A row id in a URL path (``/loras/{lora_id}``)."""


def control_character_in(text: str) -> str | None:
    """The first control character (C0, DEL or C1) in ``text``, or None."""
    return next((c for c in text if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0), None)


def user_path(text: str) -> pathlib.Path:
    """The path a user typed (a LoRA or a model to add), ``~`` expanded; ValueError with a
    sentence for the user when no file can have it."""
    found = control_character_in(text)
    if found is not None:
        raise ValueError(
            f"The path is invalid: it contains a control character (U+{ord(found):04X})."
        )
    try:
        return pathlib.Path(text).expanduser()
    except RuntimeError:  # ~name of a user that does not exist, or no home folder
        user = text.split("/", 1)[0]
        raise ValueError(f"The path is invalid: there is no home folder for {user}.") from None


def _no_control_characters(text: str) -> str:
    found = control_character_in(text)
    if found is not None:
        raise ValueError(f"must not contain control characters (found U+{ord(found):04X})")
    return text


ModelId = Annotated[
    str, Field(min_length=1, max_length=512), AfterValidator(_no_control_characters)
]
"""A model id: a Hugging Face repo id (``owner/name``) or a name this backend gave a model."""


def _hub_repo_id(value: str) -> str:
    if "--" in value or ".." in value:
        raise ValueError("a Hugging Face repository id contains no '--' and no '..'")
    return value


HubRepoId = Annotated[
    str,
    AfterValidator(_hub_repo_id),
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$",
        description="A Hugging Face repository id: owner/name (letters, digits, - _ .).",
        examples=["stable-diffusion-v1-5/stable-diffusion-v1-5"],
    ),
]
"""A Hugging Face model repository id, as the Hub allows them: never a path (each part starts
with a letter or digit, no ``..``), and no ``--``, so that ``owner--name``, the folder a
download goes to, names one repository only."""
