"""Python client for Hearth's HTTP API: deploy, invoke, tokens, usage.

Every error answer from the server raises :class:`HearthError`, which
carries the HTTP status and the parsed ``application/problem+json`` body.
"""

from ._client import (
    AsyncInvocation,
    Client,
    HearthError,
    InvokeResult,
    StoredResponse,
    Tokens,
    UsageRecords,
)

__all__ = [
    "AsyncInvocation",
    "Client",
    "HearthError",
    "InvokeResult",
    "StoredResponse",
    "Tokens",
    "UsageRecords",
]
