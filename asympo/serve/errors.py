"""OpenAI-style API errors: a status and a JSON body `{"error": {"message", "type", "code"}}`."""

from __future__ import annotations

import json

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error"}


class ApiError(Exception):
    """A request the server refuses; the message goes back to the client, so it never echoes secrets."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    def body(self) -> dict:
        kind = TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "code": self.code}}

    def encoded(self) -> bytes:
        return json.dumps(self.body()).encode()
