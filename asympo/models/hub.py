"""Fail fast when the Hugging Face hub cannot be reached, instead of retrying with backoff for a minute."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from huggingface_hub import constants

from asympo.errors import UserError


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(what: str) -> None:
    if not hub_reachable():
        raise UserError(
            f"{what} is not in the local Hugging Face cache and the hub cannot be reached (offline?); "
            "use a local path, or download it on a machine with network access"
        )
