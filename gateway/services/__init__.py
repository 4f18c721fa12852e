"""Request -> generation -> response logic, one module per endpoint family (no HTTP framework concerns)."""
