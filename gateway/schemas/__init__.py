"""OpenAI wire models: requests accept (and ignore) unknown fields; responses follow OpenAI's shapes."""
