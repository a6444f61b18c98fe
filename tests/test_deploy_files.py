"""Static checks of deploy/: the Dockerfile, the YAML manifests, the systemd unit, nginx.

No Docker engine or cluster is needed: the files are parsed and their
important settings checked against the bot's own defaults. ``nginx -t`` and
``systemd-analyze verify`` run when those programs are installed.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from callbot import Settings

from .nginx_support import (
    NGINX_TEMPLATE,
    find_nginx,
    nginx_command,
    placeholders,
    write_nginx_config,
    write_self_signed,
)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DEFAULTS = Settings()

DOCKERFILE_INSTRUCTIONS = {
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
}


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends in a continuation line"
    return instructions


def test_dockerfile_runs_callbot_as_a_non_root_user_with_a_healthcheck() -> None:
    instructions = dockerfile_instructions((DEPLOY / "Dockerfile").read_text())
    unknown = {keyword for keyword, _ in instructions} - DOCKERFILE_INSTRUCTIONS
    assert not unknown, f"unknown instructions {unknown}"

    stages = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert stages, "no FROM"
    # The wheel is built with the license file pyproject.toml names.
    copied = [a for keyword, a in instructions[: stages[-1]] if keyword == "COPY"]
    assert "LICENSE" in " ".join(copied).split()
    final = instructions[stages[-1] :]
    base = final[0][1].split()[0]
    assert re.fullmatch(r"python:3\.\d+-slim", base), base

    users = [arguments.split(":")[0] for keyword, arguments in final if keyword == "USER"]
    assert users, "the image runs as root: no USER"
    assert users[-1] not in ("root", "0")

    [healthcheck] = [arguments for keyword, arguments in final if keyword == "HEALTHCHECK"]
    assert "/healthz" in healthcheck
    entrypoint = [arguments for keyword, arguments in final if keyword == "ENTRYPOINT"]
    assert entrypoint == ['["callbot", "run"]']
    exposed = [arguments for keyword, arguments in final if keyword == "EXPOSE"]
    assert exposed == [str(DEFAULTS.port)]
    env = " ".join(arguments for keyword, arguments in final if keyword == "ENV")
    assert "CALLBOT_HOST=0.0.0.0" in env


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert all(isinstance(d, dict) for d in documents)
    return documents


def test_compose_runs_the_bot_with_redis_and_time_to_drain() -> None:
    [compose] = load_yaml_documents(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"redis", "bot", "nginx"}
    bot = services["bot"]
    assert bot["build"]["dockerfile"] == "deploy/Dockerfile"
    assert bot["environment"]["CALLBOT_STORE"].startswith("redis://redis:")
    assert bot["depends_on"]["redis"]["condition"] == "service_healthy"
    # What the bot accepted survives a restart of Redis: persisted, on a volume of its own.
    redis = services["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "always"
    [data] = [v for v in redis["volumes"] if v.endswith(":/data")]
    assert data.split(":")[0] in compose["volumes"]
    shutdown = float(bot["environment"]["CALLBOT_SHUTDOWN_TIMEOUT"])
    assert seconds(bot["stop_grace_period"]) > shutdown
    # nginx is the trusted proxy: its network is the one the bot trusts.
    [subnet] = [c["subnet"] for c in compose["networks"]["internal"]["ipam"]["config"]]
    assert bot["environment"]["CALLBOT_TRUSTED_PROXIES"] == subnet
    nginx = services["nginx"]
    template = "./nginx/callbot.conf.template"
    assert any(v.startswith(template + ":/etc/nginx/templates/") for v in nginx["volumes"])
    assert set(nginx["environment"]) >= placeholders(NGINX_TEMPLATE.read_text())
    # The bot by its service name, asked of Docker's embedded DNS while nginx runs.
    assert nginx["environment"]["CALLBOT_UPSTREAM"] == f"bot:{DEFAULTS.port}"
    assert nginx["environment"]["NGINX_RESOLVER"] == "127.0.0.11"


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return float(match.group(1))


def test_kubernetes_manifest_has_probes_prestop_and_grace() -> None:
    documents = load_yaml_documents(DEPLOY / "kubernetes" / "callbot.yaml")
    by_kind = {d["kind"]: d for d in documents}
    assert sorted(by_kind) == ["Deployment", "Ingress", "Service"]
    assert by_kind["Deployment"]["apiVersion"] == "apps/v1"
    assert by_kind["Ingress"]["apiVersion"] == "networking.k8s.io/v1"

    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pre_stop = container["lifecycle"]["preStop"]
    assert pre_stop["exec"]["command"][0] == "sleep"
    pre_stop_seconds = float(pre_stop["exec"]["command"][1])
    shutdown = float(env["CALLBOT_SHUTDOWN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop_seconds + shutdown
    assert pod["securityContext"]["runAsNonRoot"] is True

    [port] = container["ports"]
    assert port["containerPort"] == int(env["CALLBOT_PORT"])
    service = by_kind["Service"]["spec"]
    assert service["selector"] == by_kind["Deployment"]["spec"]["selector"]["matchLabels"]
    assert service["ports"][0]["targetPort"] == port["name"]

    ingress = by_kind["Ingress"]
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-body-size"] == "4m"
    [rule] = ingress["spec"]["rules"]
    [path] = rule["http"]["paths"]
    assert path["path"] == DEFAULTS.callback_path
    assert path["backend"]["service"]["name"] == by_kind["Service"]["metadata"]["name"]
    assert rule["host"] in env["CALLBOT_PUBLIC_URL"]


def read_unit(path: Path) -> configparser.ConfigParser:
    # systemd allows repeated keys (Environment=); later ones add to earlier ones.
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment, method-assign]
    unit.read_string(path.read_text())
    return unit


def test_systemd_unit_sections_and_stop_timeout() -> None:
    path = DEPLOY / "systemd" / "callbot.service"
    unit = read_unit(path)
    assert unit.sections() == ["Unit", "Service", "Install"]
    service = unit["Service"]
    assert " run " in service["ExecStart"]
    assert service["ExecStart"].split()[0].endswith("callbot")
    assert service["User"] not in ("root", "0")
    assert service["KillSignal"] == "SIGTERM"
    environment = re.findall(r"^Environment=(\w+)=(\S+)$", path.read_text(), re.MULTILINE)
    shutdown = float(dict(environment)["CALLBOT_SHUTDOWN_TIMEOUT"])
    assert float(service["TimeoutStopSec"]) > shutdown
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = (DEPLOY / "systemd" / "callbot.service").read_text()
    # The installed program does not exist here; any executable stands in for it.
    copy = tmp_path / "callbot.service"
    copy.write_text(re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", text, flags=re.MULTILINE))
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_nginx_template_limits_match_the_bot() -> None:
    text = NGINX_TEMPLATE.read_text()
    assert placeholders(text) == {
        "CALLBOT_UPSTREAM",
        "NGINX_RESOLVER",
        "NGINX_LISTEN",
        "SERVER_NAME",
        "TLS_CERTIFICATE",
        "TLS_CERTIFICATE_KEY",
    }
    [size] = re.findall(r"^\s*client_max_body_size\s+(\d+)m;", text, re.MULTILINE)
    assert int(size) * 1024 * 1024 == DEFAULTS.max_body_bytes
    for header, value in (
        ("X-Forwarded-For", "$proxy_add_x_forwarded_for"),
        ("X-Forwarded-Proto", "$scheme"),
        ("X-Forwarded-Host", "$host"),
    ):
        assert re.search(rf"proxy_set_header\s+{header}\s+{re.escape(value)};", text), header


def test_nginx_template_asks_for_the_bots_name_again_within_seconds() -> None:
    """An upstream block resolves a name once, at start, and keeps a re-created bot's old
    address: the template passes through a variable, resolved per request, keeping answers
    a few seconds (tests/test_nginx.py shortens them to one to run quickly)."""
    text = NGINX_TEMPLATE.read_text()
    assert not re.search(r"^\s*upstream\s", text, re.MULTILINE)
    assert re.findall(r"^\s*proxy_pass\s+(\S+);", text, re.MULTILINE) == ["$callbot_upstream"]
    [resolver] = re.findall(r"^\s*resolver\s+\$\{NGINX_RESOLVER\}\s+([^;]*);", text, re.MULTILINE)
    [valid] = re.findall(r"\bvalid=(\d+)s\b", resolver)
    assert 1 <= int(valid) <= 10, resolver
    # IPv4, the network the bot trusts nginx on in compose.
    assert "ipv6=off" in resolver.split()
    # A DNS server that does not answer fails the callback fast, like a bot that does not.
    [timeout] = re.findall(r"^\s*resolver_timeout\s+(\d+)s;", text, re.MULTILINE)
    [connect] = re.findall(r"^\s*proxy_connect_timeout\s+(\d+)s;", text, re.MULTILINE)
    assert int(timeout) <= int(connect)


@pytest.mark.nginx
def test_nginx_accepts_the_rendered_template(tmp_path: Path) -> None:
    binary = find_nginx()
    certificate, key = write_self_signed(tmp_path)
    config = write_nginx_config(
        tmp_path,
        {
            "CALLBOT_UPSTREAM": "bot:8080",
            "NGINX_RESOLVER": "127.0.0.11",
            "NGINX_LISTEN": "127.0.0.1:8443",
            "SERVER_NAME": "bot.example.test",
            "TLS_CERTIFICATE": str(certificate),
            "TLS_CERTIFICATE_KEY": str(key),
        },
    )
    result = subprocess.run(
        nginx_command(binary, tmp_path, config, "-t"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test is successful" in result.stderr
