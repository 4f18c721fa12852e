"""openapi/openapi.json must match what create_app produces (run scripts/export_openapi.py to refresh)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_openapi_file_is_up_to_date():
    spec = importlib.util.spec_from_file_location("export_openapi", REPO_ROOT / "scripts" / "export_openapi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = module.render()
    current = (REPO_ROOT / "openapi" / "openapi.json").read_text()
    assert current == expected, "openapi/openapi.json is out of date: run `python scripts/export_openapi.py`"
