"""agent.toml: the agent's configuration, read strictly.

Unknown sections or keys, wrong types and out-of-range values are errors that
name the key; nothing is guessed.  Paths must be absolute so that the agent's
behaviour never depends on its working directory.

Example (every key shown; those with a default may be omitted)::

    [agent]
    socket = "/run/passivisor/agent.sock"
    state_dir = "/var/lib/passivisor/agent"     # journal
    runtime_dir = "/run/passivisor/instances"   # per-instance scratch, scrubbed
    volume_dir = "/var/lib/passivisor/volumes"  # raw volume files named by volume id
    channel_secret_file = "/etc/passivisor/channel.key"
    controller_uid = 0
    backend = "qemu"                            # or "sim"
    log_level = "info"

    [limits]
    handshake_timeout_s = 5.0
    idle_timeout_s = 300.0
    frame_timeout_s = 5.0

    [host]
    sysfs_root = "/sys"
    reserved_cpus = [0]
    memory_budget_mib = 4096
    sriov_pfs = []                              # PF addresses; empty = every SR-IOV PF found

    [images]
    store = "/var/lib/passivisor/images"
    signing_public_key = "/etc/passivisor/image-signing.pub"

    [qemu]
    binary = "qemu-system-x86_64"
    accel = "tcg"                               # "kvm", "tcg" or "auto"
    user = "passivisor-qemu"                    # QEMU runs as this system user (C15); absent: as the agent

    [sandbox]
    seccomp = true
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """The configuration is invalid; the message names the key."""


@dataclass(frozen=True)
class AgentConfig:
    socket: Path
    state_dir: Path
    runtime_dir: Path
    volume_dir: Path
    channel_secret_file: Path
    controller_uid: int
    backend: str
    log_level: str
    handshake_timeout_s: float
    idle_timeout_s: float
    frame_timeout_s: float
    sysfs_root: Path
    reserved_cpus: tuple[int, ...]
    memory_budget_mib: int
    sriov_pfs: tuple[str, ...]
    image_store: Path
    image_signing_public_key: Path
    qemu_binary: str
    qemu_accel: str
    qemu_user: str | None  # resolved to uid and gids at start-up (hostagent.main), not here
    seccomp: bool


_MISSING = object()


class Section:
    def __init__(self, data: dict[str, Any], name: str) -> None:
        self.data = data
        self.name = name
        self.used: set[str] = set()

    def _get(self, key: str, default: Any) -> Any:
        self.used.add(key)
        value = self.data.get(key, default)
        if value is _MISSING:
            raise ConfigError(f"[{self.name}] {key} is required")
        return value

    def path(self, key: str, default: Any = _MISSING) -> Path:
        value = self._get(key, default)
        if not isinstance(value, str) or not value.startswith("/"):
            raise ConfigError(f"[{self.name}] {key} must be an absolute path")
        return Path(value)

    def integer(self, key: str, lo: int, hi: int, default: Any = _MISSING) -> int:
        value = self._get(key, default)
        if type(value) is not int or not lo <= value <= hi:
            raise ConfigError(f"[{self.name}] {key} must be an integer in [{lo}, {hi}]")
        return value

    def number(self, key: str, lo: float, hi: float, default: Any = _MISSING) -> float:
        value = self._get(key, default)
        if type(value) not in (int, float) or not lo <= value <= hi:
            raise ConfigError(f"[{self.name}] {key} must be a number in [{lo}, {hi}]")
        return float(value)

    def choice(self, key: str, choices: tuple[str, ...], default: Any = _MISSING) -> str:
        value = self._get(key, default)
        if value not in choices:
            raise ConfigError(f"[{self.name}] {key} must be one of {', '.join(choices)}")
        return str(value)

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        value = self._get(key, default)
        if type(value) is not bool:
            raise ConfigError(f"[{self.name}] {key} must be true or false")
        return value

    def address(self, key: str, default: Any = _MISSING) -> str:
        """HOST:PORT, the host a name or an IPv4 address, the port 0..65535."""
        value = self._get(key, default)
        host, _, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
        if (not host or not all(c.isalnum() or c in "-." for c in host) or not port.isdigit()
                or int(port) > 65535):
            raise ConfigError(f"[{self.name}] {key} must be HOST:PORT")
        return str(value)

    def word(self, key: str, default: Any = _MISSING) -> str:
        value = self._get(key, default)
        if not isinstance(value, str) or not value or not all(c.isalnum() or c in "-_./" for c in value):
            raise ConfigError(f"[{self.name}] {key} must be a plain name")
        return value

    def user_name(self, key: str) -> str | None:
        """An optional POSIX user name (as useradd accepts them by default); None when absent."""
        value = self._get(key, None)
        if value is not None and (not isinstance(value, str) or not _USER_NAME.fullmatch(value)):
            raise ConfigError(f"[{self.name}] {key} must be a user name")
        return value

    def int_list(self, key: str, lo: int, hi: int, default: Any = _MISSING) -> tuple[int, ...]:
        value = self._get(key, default)
        if not isinstance(value, list) or not all(type(v) is int and lo <= v <= hi for v in value):
            raise ConfigError(f"[{self.name}] {key} must be a list of integers in [{lo}, {hi}]")
        return tuple(value)

    def str_list(self, key: str, default: Any = _MISSING) -> tuple[str, ...]:
        value = self._get(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"[{self.name}] {key} must be a list of strings")
        return tuple(value)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"[{self.name}] unknown keys: {', '.join(unknown)}")


_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_MAX_SOCKET_PATH = 107
_MAX_RUNTIME_DIR = _MAX_SOCKET_PATH - len("/0123456789abcdef0123456789abcdef/console.sock")

_SECTIONS = ("agent", "limits", "host", "images", "qemu", "sandbox")


def parse(text: str) -> AgentConfig:
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
    a, lim, h, img, q, sb = (sections[n] for n in _SECTIONS)
    config = AgentConfig(
        socket=a.path("socket"),
        state_dir=a.path("state_dir"),
        runtime_dir=a.path("runtime_dir"),
        volume_dir=a.path("volume_dir"),
        channel_secret_file=a.path("channel_secret_file"),
        controller_uid=a.integer("controller_uid", 0, 2**32 - 2),
        backend=a.choice("backend", ("qemu", "sim"), "qemu"),
        log_level=a.choice("log_level", ("debug", "info", "warning", "error"), "info"),
        handshake_timeout_s=lim.number("handshake_timeout_s", 0.1, 60, 5.0),
        idle_timeout_s=lim.number("idle_timeout_s", 1, 86400, 300.0),
        frame_timeout_s=lim.number("frame_timeout_s", 0.1, 60, 5.0),
        sysfs_root=h.path("sysfs_root", "/sys"),
        reserved_cpus=h.int_list("reserved_cpus", 0, 4095, []),
        memory_budget_mib=h.integer("memory_budget_mib", 64, 1 << 30),
        sriov_pfs=h.str_list("sriov_pfs", []),
        image_store=img.path("store"),
        image_signing_public_key=img.path("signing_public_key"),
        qemu_binary=q.word("binary", "qemu-system-x86_64"),
        qemu_accel=q.choice("accel", ("kvm", "tcg", "auto"), "auto"),
        qemu_user=q.user_name("user"),
        seccomp=sb.boolean("seccomp", True),
    )
    for section in sections.values():
        section.finish()
    # Unix socket paths are limited to 107 bytes (sun_path); an instance's
    # sockets live at <runtime_dir>/<32 hex>/<name>.sock.
    if len(bytes(config.socket)) > _MAX_SOCKET_PATH:
        raise ConfigError(f"[agent] socket is longer than {_MAX_SOCKET_PATH} bytes")
    if len(bytes(config.runtime_dir)) > _MAX_RUNTIME_DIR:
        raise ConfigError(f"[agent] runtime_dir is longer than {_MAX_RUNTIME_DIR} bytes, too long for the "
                          "instances' Unix sockets below it")
    return config


def load(path: Path) -> AgentConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8") from None
    return parse(text)
