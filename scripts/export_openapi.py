"""Write openapi/openapi.json from create_app without starting anything (the lifespan does not run)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUT = REPO_ROOT / "openapi" / "openapi.json"


def render() -> str:
    sys.path.insert(0, str(REPO_ROOT))
    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    # Fixed settings so the schema does not depend on the environment of whoever runs the export.
    app = create_app(GatewaySettings(_env_file=None, initial_peers=["/ip4/127.0.0.1/tcp/0"]))
    return json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
