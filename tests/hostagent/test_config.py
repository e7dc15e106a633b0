"""agent.toml is read strictly: every mistake is an error naming the key, nothing is guessed."""

from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import stat
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from hostagent import main
from hostagent.backends.qemu import QemuBackend, RunAs
from hostagent.config import AgentConfig, ConfigError, load, parse

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


# --- [qemu] user: parsed here, resolved at start-up (hostagent.main, claim C15) ---------------------


def with_qemu(lines: str) -> str:
    return MINIMAL.replace("[images]", f"[qemu]\n{lines}\n[images]", 1)


def test_the_qemu_user_is_an_optional_plain_user_name() -> None:
    assert parse(MINIMAL).qemu_user is None
    assert parse(with_qemu('user = "passivisor-qemu"')).qemu_user == "passivisor-qemu"
    for bad in ('"Root"', '"1qemu"', '"-qemu"', '"qemu user"', '"qemu:0"', '""', "0", '"' + "q" * 33 + '"'):
        with pytest.raises(ConfigError, match=r"\[qemu\] user must be a user name"):
            parse(with_qemu(f"user = {bad}"))


def _startup_config(tmp_path: Path, user: str | None) -> AgentConfig:
    config = parse(with_qemu(f'user = "{user}"' if user else ""))
    return replace(config, runtime_dir=tmp_path)


def test_without_a_qemu_user_the_agent_warns_that_c15_is_weakened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="passivisor.agent"):
        assert main._qemu_user(_startup_config(tmp_path, None)) is None
    assert "[qemu] user is not set" in caplog.text and "C15" in caplog.text


@pytest.mark.parametrize(("user", "message"), [
    ("no-such-user-passivisor", "does not exist; create it with `useradd --system"),
    (pwd.getpwuid(0).pw_name, "must not run as root"),
])
def test_a_qemu_user_that_cannot_be_used_stops_the_start(tmp_path: Path, user: str, message: str) -> None:
    with pytest.raises(main.StartupError, match=re.escape(message)):
        main._backend(_startup_config(tmp_path, user))


def test_a_qemu_user_needs_a_root_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(main.StartupError, match="needs an agent running as root"):
        main._qemu_user(_startup_config(tmp_path, "nobody"))


@pytest.mark.skipif(os.geteuid() != 0, reason="the agent gives the runtime directory to QEMU's group as root")
def test_the_qemu_user_is_resolved_and_given_the_runtime_root(tmp_path: Path) -> None:
    entry = pwd.getpwnam("nobody")
    root = Path(tempfile.mkdtemp(prefix="pvc-"))  # below /tmp (1777), so that "nobody" can reach it
    try:
        backend = main._backend(_startup_config(root, "nobody"))
        assert isinstance(backend, QemuBackend) and backend.run_as is not None
        assert (backend.run_as.uid, backend.run_as.gid) == (entry.pw_uid, entry.pw_gid)
        info = root.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o710, entry.pw_gid)
    finally:
        shutil.rmtree(root)


def test_a_qemu_user_that_cannot_open_dev_kvm_is_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kvm = tmp_path / "kvm"
    kvm.write_bytes(b"")
    who = RunAs(61_001, 61_001, name="q")
    for mode, warned in ((0o600, True), (0o660, True), (0o666, False)):
        kvm.chmod(mode)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="passivisor.agent"):
            main._check_kvm_access(who, "auto", kvm)
        assert ("cannot open" in caplog.text and "fall back to TCG" in caplog.text) is warned, mode
    with caplog.at_level(logging.WARNING, logger="passivisor.agent"):
        main._check_kvm_access(who, "kvm", tmp_path / "absent")  # no KVM on the host: nothing to say
    assert "absent" not in caplog.text
