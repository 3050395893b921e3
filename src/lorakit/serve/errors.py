"""Errors the server reports to a client, each with its HTTP status and OpenAI's error fields."""

from __future__ import annotations

from typing import Any


class ServeError(Exception):
    """A request that cannot be served as asked; the message says which part to change."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(ServeError, ValueError):
    status = 400
    type = "invalid_request_error"


class AdapterError(BadRequest):
    """An adapter that cannot be loaded onto this base model (missing files, wrong shapes, DoRA)."""

    code = "invalid_adapter"


class NotFound(ServeError, LookupError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class Unauthorized(ServeError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"
