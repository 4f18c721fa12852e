"""Thin HTTP routers: parse, call a service, wrap the result; no generation logic here."""
