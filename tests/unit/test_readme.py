"""The README's configuration reference names every server and gateway setting, so it cannot silently rot."""

from pathlib import Path

from gateway.settings import GatewaySettings
from server.settings import ServerSettings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_server_setting_is_documented():
    missing = [name for name in ServerSettings.model_fields if f"--{name.replace('_', '-')}" not in README]
    assert not missing, f"README lacks server flags: {missing}"


def test_every_gateway_setting_is_documented():
    missing = [
        name
        for name in GatewaySettings.model_fields
        if f"--{name.replace('_', '-')}" not in README and f"PETALS_GATEWAY_{name.upper()}" not in README
    ]
    assert not missing, f"README lacks gateway settings: {missing}"


def test_readme_set_up_commands_exist_in_the_makefile():
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    assert "make serve" in README and "make test" in README
    assert "\nserve:" in makefile and "\ntest:" in makefile
