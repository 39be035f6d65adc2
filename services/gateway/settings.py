"""The gateway's limits and defaults (``GatewaySettings``), kept on ``app.state.settings``."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class GatewaySettings:
    require_keys: bool = True  # False: no Authorization needed (embedded use on localhost only)
    max_prompt_chars: int = 16_000  # longer prompts get 413
    request_timeout_s: float = 120.0  # a completion (or a whole stream) taking longer gets 504
    default_max_tokens: int = 64  # when the request names no max_tokens
    max_tokens_limit: int = 2048  # larger max_tokens get 400
    default_temperature: float = 0.0  # when the request names none: greedy, not OpenAI's 1.0
    rate_window_s: float = 60.0  # the window of the per-key requests-per-minute limit

    @classmethod
    def from_env(cls) -> GatewaySettings:
        """MOERGE_REQUIRE_KEYS (default 0 = the embedded default), MOERGE_MAX_PROMPT_CHARS,
        MOERGE_REQUEST_TIMEOUT_S, MOERGE_DEFAULT_MAX_TOKENS, MOERGE_MAX_TOKENS_LIMIT."""
        d = cls()
        env = os.environ.get
        return cls(
            require_keys=env("MOERGE_REQUIRE_KEYS", "0").lower() in ("1", "true", "yes"),
            max_prompt_chars=int(env("MOERGE_MAX_PROMPT_CHARS", d.max_prompt_chars)),
            request_timeout_s=float(env("MOERGE_REQUEST_TIMEOUT_S", d.request_timeout_s)),
            default_max_tokens=int(env("MOERGE_DEFAULT_MAX_TOKENS", d.default_max_tokens)),
            max_tokens_limit=int(env("MOERGE_MAX_TOKENS_LIMIT", d.max_tokens_limit)),
        )
