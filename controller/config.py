"""controller.toml: the controller's configuration, read strictly (the agent's rules, hostagent.config).

Example (every key shown; those with a default may be omitted)::

    [controller]
    listen = "127.0.0.1:7443"                   # host:port of the one TLS port; port 0 picks one
    state_dir = "/var/lib/passivisor/controller"  # audit log, idempotency store, host keys
    agent_socket = "/run/passivisor/agent.sock"
    channel_secret_file = "/etc/passivisor/channel.key"
    policy = "/etc/passivisor/policy.toml"      # optional; the shipped least-privilege policy otherwise
    log_level = "info"

    [tls]
    ca = "/etc/passivisor/pki/ca.pem"           # the control-plane CA: every client certificate chains to it
    certificate = "/etc/passivisor/pki/server.pem"
    key = "/etc/passivisor/pki/server.key"

    [limits]
    principal_rate_per_s = 50.0
    principal_burst = 100
    instance_rate_per_s = 2.0
    instance_burst = 10
    call_timeout_s = 60.0                       # when the caller sets no deadline

    [volumes]
    encrypted_dir = "/var/lib/passivisor/encrypted-volumes"  # LUKS volume files named by volume id
    nbdkit = "nbdkit"                           # serves a volume decrypted over NBD (controller side)
    qemu_img = "qemu-img"                       # checks a data key against a volume before serving it
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from hostagent.config import ConfigError, Section

_SECTIONS = ("controller", "tls", "limits", "volumes")


@dataclass(frozen=True)
class ControllerConfig:
    listen: str
    state_dir: Path
    agent_socket: Path
    channel_secret_file: Path
    policy: Path | None
    log_level: str
    ca: Path
    certificate: Path
    key: Path
    principal_rate_per_s: float
    principal_burst: int
    instance_rate_per_s: float
    instance_burst: int
    call_timeout_s: float
    encrypted_volume_dir: Path
    nbdkit: str
    qemu_img: str


def parse(text: str) -> ControllerConfig:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    unknown = sorted(set(document) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown sections: {', '.join(unknown)}")
    sections = {}
    for name in _SECTIONS:
        data = document.get(name, {})
        if not isinstance(data, dict):
            raise ConfigError(f"[{name}] must be a table")
        sections[name] = Section(data, name)
    c, tls, lim, vol = (sections[n] for n in _SECTIONS)
    listen = c.address("listen", "127.0.0.1:7443")
    policy = c.path("policy") if "policy" in c.data else None
    config = ControllerConfig(
        listen=listen,
        state_dir=c.path("state_dir"),
        agent_socket=c.path("agent_socket"),
        channel_secret_file=c.path("channel_secret_file"),
        policy=policy,
        log_level=c.choice("log_level", ("debug", "info", "warning", "error"), "info"),
        ca=tls.path("ca"),
        certificate=tls.path("certificate"),
        key=tls.path("key"),
        principal_rate_per_s=lim.number("principal_rate_per_s", 0.001, 1e6, 50.0),
        principal_burst=lim.integer("principal_burst", 1, 1_000_000, 100),
        instance_rate_per_s=lim.number("instance_rate_per_s", 0.001, 1e6, 2.0),
        instance_burst=lim.integer("instance_burst", 1, 1_000_000, 10),
        call_timeout_s=lim.number("call_timeout_s", 0.1, 3600, 60.0),
        encrypted_volume_dir=vol.path("encrypted_dir", "/var/lib/passivisor/encrypted-volumes"),
        nbdkit=vol.word("nbdkit", "nbdkit"),
        qemu_img=vol.word("qemu_img", "qemu-img"),
    )
    for section in sections.values():
        section.finish()
    return config


def load(path: Path) -> ControllerConfig:
    try:
        return parse(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8") from None
