"""agent.toml is read strictly: every mistake is an error naming the key, nothing is guessed."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostagent.config import ConfigError, load, parse

MINIMAL = """
[agent]
socket = "/run/p/agent.sock"
state_dir = "/var/lib/p/state"
runtime_dir = "/run/p/instances"
volume_dir = "/var/lib/p/volumes"
channel_secret_file = "/etc/p/channel.key"
controller_uid = 1000

[host]
memory_budget_mib = 2048

[images]
store = "/var/lib/p/images"
signing_public_key = "/etc/p/image.pub"
"""


def test_minimal_configuration_gets_documented_defaults() -> None:
    config = parse(MINIMAL)
    assert config.socket == Path("/run/p/agent.sock")
    assert (config.backend, config.qemu_accel, config.seccomp) == ("qemu", "auto", True)
    assert (config.handshake_timeout_s, config.idle_timeout_s, config.frame_timeout_s) == (5.0, 300.0, 5.0)
    assert config.reserved_cpus == () and config.sriov_pfs == ()
    assert config.sysfs_root == Path("/sys")


def test_the_module_docstring_example_is_a_valid_configuration() -> None:
    import hostagent.config as module

    assert module.__doc__ is not None
    example = module.__doc__.split("::", 1)[1]
    lines = [line[4:] for line in example.splitlines() if line.startswith("    ") or not line.strip()]
    config = parse("\n".join(lines))
    assert config.memory_budget_mib == 4096 and config.qemu_accel == "tcg"


@pytest.mark.parametrize(("edit", "message"), [
    (("[host]", "[hosts]"), "unknown sections: hosts"),
    (("controller_uid = 1000", "controller_uid = 1000\nuser = 'root'"), r"\[agent\] unknown keys: user"),
    (("controller_uid = 1000", "controller_uid = -1"), r"controller_uid must be an integer"),
    (("controller_uid = 1000", "controller_uid = true"), r"controller_uid must be an integer"),
    (('socket = "/run/p/agent.sock"', 'socket = "run/agent.sock"'), "socket must be an absolute path"),
    (('socket = "/run/p/agent.sock"\n', ""), r"\[agent\] socket is required"),
    (("memory_budget_mib = 2048", "memory_budget_mib = 2048\nreserved_cpus = [0, 'one']"), "reserved_cpus"),
    (("memory_budget_mib = 2048", "memory_budget_mib = 2048.5"), "memory_budget_mib"),
    (("controller_uid = 1000", "controller_uid = 1000\nbackend = 'docker'"), "backend must be one of qemu, sim"),
    (("[images]", "[qemu]\nbinary = 'qemu; rm -rf /'\n[images]"), "binary must be a plain name"),
    (("[images]", "[limits]\nidle_timeout_s = 0\n[images]"), "idle_timeout_s must be a number"),
    (("[images]", "[sandbox]\nseccomp = 'yes'\n[images]"), "seccomp must be true or false"),
    (("[images]", "host = 3\n[images]"), "memory_budget_mib|unknown keys"),
    (("[agent]", "agent = 1\n[agentx]"), "unknown sections|must be a table"),
])
def test_mistakes_are_refused_with_the_key_named(edit: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(MINIMAL.replace(*edit, 1))


def test_invalid_toml_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse("[agent\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(binary)
    good = tmp_path / "agent.toml"
    good.write_text(MINIMAL)
    assert load(good).controller_uid == 1000


def test_paths_too_long_for_unix_sockets_are_refused() -> None:
    long_dir = "/var/" + "x" * 60
    with pytest.raises(ConfigError, match="runtime_dir is longer than"):
        parse(MINIMAL.replace('runtime_dir = "/run/p/instances"', f'runtime_dir = "{long_dir}"'))
    with pytest.raises(ConfigError, match="socket is longer than 107 bytes"):
        parse(MINIMAL.replace('socket = "/run/p/agent.sock"', f'socket = "/{"s" * 110}"'))
