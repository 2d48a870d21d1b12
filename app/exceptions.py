"""Domain errors. Services raise these; one handler in ``app.main`` maps them to HTTP.

Every error carries a message written for the person using the UI: it says what was wrong
and, where it helps, what to do about it.
"""

from __future__ import annotations


class AppError(Exception):
    """Root of every error the API reports on purpose."""

    status_code = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.keeps_changes = False
        """True when the request's changes so far are to be committed although the request
        fails: the failure is itself recorded (a failed generation removes its empty history
        entry). Only services set it; the request's transaction honours it."""


class BadRequestError(AppError):
    """The request cannot be served as asked (400)."""

    status_code = 400


class UnauthorizedError(AppError):
    """A remote service needs an access token that was not given, or refused it (401)."""

    status_code = 401


class ForbiddenError(AppError):
    """A remote service refused access with the token given (403)."""

    status_code = 403


class NotFoundError(AppError):
    """The named thing does not exist (404)."""

    status_code = 404


class ConflictError(AppError):
    """The request clashes with the current state (409)."""

    status_code = 409


class TooManyRequestsError(AppError):
    """A limit on waiting work is reached: try again once some of it is done (429)."""

    status_code = 429


class BadGatewayError(AppError):
    """A remote service failed or could not be reached (502)."""

    status_code = 502


class InsufficientStorageError(AppError):
    """The disk is full: nothing of the change was kept (507)."""

    status_code = 507


class NoModelLoadedError(BadRequestError):
    def __init__(self) -> None:
        super().__init__("No model is currently loaded. Load a model first.")
