"""The optional API key of the HTTP API.

With a key set, every route except the web page (`/`) and `/healthz` needs the header `Authorization: Bearer <key>`
(the OpenAI clients send their `api_key` that way); anything else gets 401 with an OpenAI-style error body.
The page asks its user for the key the first time a call answers 401.

Where the key comes from, by how the application is started:
- `python jobs/serve.py`, `serving.deploy.deploy(...)` (and the pipeline job): the environment variable GPT2_API_KEY of
  that process, read when the application is built; or the `api_key` field of the settings.
- `serve run serving/config.yaml`: Serve builds the application in a Ray task, so GPT2_API_KEY must be in the
  environment of the Ray cluster's processes (the shell that ran `ray start`, or the shell running `serve run` when it
  starts Ray itself). An `api_key:` in the config's args works too, but a config file is a poor place for a secret.

The key travels to the deployments inside the settings as a pydantic SecretStr, so it never shows in a repr, a log
line or a response.
"""

from __future__ import annotations

import hmac
import os

from pydantic import SecretStr

from serving.protocol import APIError

API_KEY_ENV = "GPT2_API_KEY"
OPEN_PATHS = frozenset({"/", "/healthz"})  # the page and the health check; every other route needs the key


class Unauthorized(APIError):
    """401 in the shape OpenAI answers a missing or wrong key."""

    def __init__(self, message: str) -> None:
        super().__init__(401, message, code="invalid_api_key")


def api_key_from_env(configured: SecretStr | None) -> SecretStr | None:
    """The configured key, else GPT2_API_KEY from the environment (an empty value counts as unset)."""
    if configured is not None and configured.get_secret_value():
        return configured
    value = os.environ.get(API_KEY_ENV, "")
    return SecretStr(value) if value else None


def check_authorization(header: str | None, key: SecretStr) -> None:
    """Raises Unauthorized unless `header` is `Bearer <key>`. Compared in constant time, so the time an answer takes
    tells nothing about how much of a guessed key was right."""
    scheme, _, token = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("this server needs an API key: send the header 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(token.strip().encode(), key.get_secret_value().encode()):
        raise Unauthorized("incorrect API key provided")
