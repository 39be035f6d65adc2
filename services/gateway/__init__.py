"""The OpenAI-compatible gateway: ``create_app(backend, registry, settings)`` (see docs/api.md)."""

from services.gateway.app import GatewaySettings, create_app
from services.gateway.backend import Backend, LocalBackend, ModelInfo, SamplingParams

__all__ = ["Backend", "GatewaySettings", "LocalBackend", "ModelInfo", "SamplingParams", "create_app"]
