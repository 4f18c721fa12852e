"""``python -m gateway`` is ``petals-gateway``."""

from gateway.cli import main

main()
