"""Running the project's nginx template in a test: render it, wrap it, find nginx.

Everything nginx writes (pid, logs, temporary files) stays under one prefix
folder; nginx runs in the foreground as the current user.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pwd
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = [
    "NGINX_TEMPLATE",
    "find_nginx",
    "nginx_command",
    "placeholders",
    "render_template",
    "write_nginx_config",
    "write_self_signed",
]

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
NGINX_TEMPLATE = DEPLOY / "nginx" / "callbot.conf.template"
_PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


def find_nginx() -> str:
    """The nginx binary; skip the test without one, unless CI requires servers."""
    found = shutil.which("nginx")
    if found is None and Path("/usr/sbin/nginx").exists():
        found = "/usr/sbin/nginx"
    if found is None:
        if os.environ.get("CALLBOT_TEST_REQUIRE_SERVERS") == "1":
            pytest.fail("nginx is required (CALLBOT_TEST_REQUIRE_SERVERS=1) but not installed")
        pytest.skip("nginx is not installed")
    return found


def placeholders(template: str) -> set[str]:
    """The ``${NAME}`` placeholders of a template."""
    return set(_PLACEHOLDER.findall(template))


def render_template(template: str, values: Mapping[str, str]) -> str:
    """Fill ``${NAME}`` placeholders (only those; nginx's ``$name`` stay), like envsubst."""

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"no value for ${{{name}}}")
        return values[name]

    return _PLACEHOLDER.sub(substitute, template)


def write_self_signed(directory: Path, host: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for ``host`` and 127.0.0.1: (certificate, key) PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "tls.crt"
    key_path = directory / "tls.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def write_nginx_config(
    prefix: Path, values: Mapping[str, str], adapt: Callable[[str], str] | None = None
) -> Path:
    """Render the template into ``prefix`` with a main config around it; return the latter.

    ``adapt`` changes the rendered site, as an operator edits it (an upstream block added)."""
    site = prefix / "callbot.conf"
    rendered = render_template(NGINX_TEMPLATE.read_text(encoding="utf-8"), values)
    site.write_text(rendered if adapt is None else adapt(rendered))
    temp = prefix / "temp"
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (temp / name).mkdir(parents=True, exist_ok=True)
    # As root, nginx would hand its workers to "nobody", who cannot use this folder.
    user = f"user {pwd.getpwuid(0).pw_name};" if os.geteuid() == 0 else ""
    main = prefix / "nginx.conf"
    main.write_text(
        f"""{user}
worker_processes 1;
events {{
    worker_connections 64;
}}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include {site};
}}
"""
    )
    return main


def nginx_command(binary: str, prefix: Path, config: Path, *extra: str) -> list[str]:
    """nginx in the foreground, with its pid and error log under ``prefix``."""
    error_log = prefix / "error.log"
    return [
        binary,
        *extra,
        "-p",
        f"{prefix}/",
        "-c",
        str(config),
        "-e",
        str(error_log),
        "-g",
        f"daemon off; pid {prefix}/nginx.pid; error_log {error_log} info;",
    ]
