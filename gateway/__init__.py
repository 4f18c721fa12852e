"""OpenAI-compatible HTTP gateway: tokenizer, embeddings, final norm and LM head here; blocks in the swarm.

    cli / __main__   -- ``petals-gateway serve``: settings once, logging, uvicorn
    settings         -- GatewaySettings (``PETALS_GATEWAY_*``)
    app              -- create_app(settings, swarm_factory=..., model_loader=...) and its lifespan
    embedded         -- the local dev swarm (bootstrap + block servers as child processes)
    errors           -- the error tree and the one translation to OpenAI error bodies
    middleware       -- x-request-id and the last-resort 500
    api/             -- thin routers;  schemas/ -- OpenAI wire models;  services/ -- endpoint logic
    generation/      -- tokenization, the token loop, stop strings, logprobs (pure of HTTP)
    streaming        -- SSE framing

Depends on ``swarm`` only; never on ``server``.
"""

from gateway.settings import GatewaySettings

__all__ = ["GatewaySettings", "create_app"]


def __getattr__(name: str):  # create_app pulls in FastAPI and torch; import it only when asked for
    if name == "create_app":
        from gateway.app import create_app

        return create_app
    raise AttributeError(name)
