"""The host agent's seccomp sandbox (claims C1, C6, C15): the data is what is enforced.

Every filter here is installed in a child Python process; the pytest process
itself is never sandboxed (a seccomp filter cannot be removed).  The children
print one JSON object on stdout and the tests assert on it.

The central check is data-driven: for every rule of ``hostagent/seccomp_policy.toml``
a sandboxed child calls the syscall through ``syscall(2)`` with harmless
arguments that satisfy the rule's conditions and expects the rule's errno,
while an unsandboxed child makes the same call to show the kernel alone would
answer differently (otherwise the check could not fail).  Adding a rule adds a
check; a rule without a probe below fails the suite.

Real components started: Python children, and QEMU (``-accel tcg``, ``-S``,
QMP on stdio) for the test marked ``qemu``.
"""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent import sandbox
from hostagent.sandbox import Action, ArgCondition, Op, PolicyError, Rule

REPO = Path(__file__).resolve().parents[2]
POLICY = sandbox.load_policy()
CHILD_TIMEOUT = 30

# --------------------------------------------------------------------------------------------------
# Harmless probes.  The unsandboxed baseline child really executes these, as root on CI, so every
# argument tuple must fail early in the kernel (or do nothing observable outside the throwaway
# child).  The comment says what the kernel answers without the filter.
# --------------------------------------------------------------------------------------------------

NULL = 0
BAD = (1 << 64) - 1  # a kernel address: every copy from or to user memory fails with EFAULT
NOFD = BAD  # -1 as the kernel reads an int descriptor: EBADF
BUF = "BUF"  # replaced by the address of a zeroed 64-byte buffer in the child
CLONE_THREAD = 0x00010000  # without CLONE_SIGHAND: EINVAL before anything is created
# Namespace flags, from include/uapi/linux/sched.h (written out independently of hostagent.sandbox).
NS_VALUES = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}

Probe = tuple[int | str, ...]

# clone(flags, stack, parent_tid, child_tid, tls): each namespace flag with CLONE_THREAD but without
# CLONE_SIGHAND, which copy_process refuses (EINVAL) before creating anything; the last one has no
# namespace flag and must pass the filter untouched.
CLONE_PROBES: list[Probe] = [(flag | CLONE_THREAD, NULL, NULL, NULL, 0) for flag in NS_VALUES.values()]
CLONE_PROBES.append((CLONE_THREAD, NULL, NULL, NULL, 0))

PROBES: dict[str, list[Probe]] = {
    # sockets are created and closed at once (AF_PACKET needs root: EPERM otherwise)
    "socket": [
        (socket.AF_INET, socket.SOCK_DGRAM, 0),
        (socket.AF_INET6, socket.SOCK_DGRAM, 0),
        (socket.AF_NETLINK, socket.SOCK_RAW, 0),
        (socket.AF_PACKET, socket.SOCK_DGRAM, 0),
        (socket.AF_VSOCK, socket.SOCK_STREAM, 0),
        (socket.AF_UNIX, socket.SOCK_STREAM, 0),
    ],
    "socketpair": [  # AF_INET: EOPNOTSUPP
        (socket.AF_INET, socket.SOCK_STREAM, 0, BUF),
        (socket.AF_UNIX, socket.SOCK_STREAM, 0, BUF),
    ],
    "ptrace": [(0x7FFFFFFF, 0, NULL, NULL)],  # unknown request, pid 0: ESRCH
    "process_vm_readv": [(0, NULL, 0, NULL, 0, 1)],  # flags != 0: EINVAL
    "process_vm_writev": [(0, NULL, 0, NULL, 0, 1)],  # flags != 0: EINVAL
    "pidfd_getfd": [(NOFD, NOFD, 1)],  # flags != 0: EINVAL
    "kexec_load": [(0, 0xFFFFFFFF, NULL, 0x8000)],  # unknown flag: EINVAL (ENOSYS without kexec)
    "kexec_file_load": [(NOFD, NOFD, 0, NULL, 0x8000)],  # unknown flag: EINVAL
    "init_module": [(NULL, 0, NULL)],  # empty image: ENOEXEC (ENOSYS without module support)
    "finit_module": [(NOFD, NULL, 0xFFFFFFFF)],  # unknown flags: EINVAL
    "delete_module": [(NULL, 0)],  # name at NULL: EFAULT
    "bpf": [(0x7FFFFFFF, NULL, 0)],  # unknown command: EINVAL
    "perf_event_open": [(NULL, 0, NOFD, NOFD, 0x80000000)],  # unknown flag: EINVAL
    "userfaultfd": [(0x1 | 0x2,)],  # UFFD_USER_MODE_ONLY (always allowed) + unknown flag: EINVAL
    "reboot": [(0, 0, 0, NULL)],  # wrong magic: EINVAL
    "swapon": [(BAD, 0xFFFFFFFF)],  # unknown flags: EINVAL, checked before privilege
    "swapoff": [(BAD,)],  # EFAULT
    "acct": [(BAD,)],  # EFAULT (acct(NULL) would switch accounting off: not used)
    "syslog": [(99, NULL, 0)],  # unknown action: EINVAL
    "iopl": [(4,)],  # level > 3: EINVAL (ENOSYS without I/O-port support)
    "ioperm": [(0x10000, 1, 0)],  # range past the 65536 ports: EINVAL
    "settimeofday": [(BAD, BAD)],  # EFAULT
    "clock_settime": [(0x7FFFFFFF, BAD)],  # unknown clock: EINVAL
    "adjtimex": [(BAD,)],  # EFAULT
    "clock_adjtime": [(0x7FFFFFFF, BAD)],  # EFAULT (or EINVAL: unknown clock)
    "keyctl": [(0x7FFFFFFF, 0, 0, 0, 0)],  # unknown command: EOPNOTSUPP
    "add_key": [(NULL, NULL, NULL, 0, 0)],  # type at NULL: EFAULT
    "request_key": [(NULL, NULL, NULL, 0)],  # type at NULL: EFAULT
    "personality": [
        (0,),  # PER_LINUX, the persona already in force: returns it, changes nothing
        (0xFFFFFFFF,),  # the read-only query the policy keeps allowed
    ],
    "mount": [(NULL, NULL, NULL, 0, NULL)],  # target at NULL: EFAULT
    "umount2": [(NULL, 0xFFFFFFFF)],  # unknown flags: EINVAL
    "pivot_root": [(NULL, NULL)],  # EFAULT
    "chroot": [(NULL,)],  # EFAULT
    "fsopen": [(NULL, 0xFFFFFFFF)],  # unknown flags: EINVAL
    "fsconfig": [(NOFD, 0x7FFFFFFF, NULL, NULL, 0)],  # no context: EINVAL/EBADF
    "fsmount": [(NOFD, 0xFFFFFFFF, 0)],  # unknown flags: EINVAL
    "fspick": [(NOFD, NULL, 0xFFFFFFFF)],  # unknown flags: EINVAL
    "move_mount": [(NOFD, NULL, NOFD, NULL, 0xFFFFFFFF)],  # unknown flags: EINVAL
    "open_tree": [(NOFD, NULL, 0xFFFFFFFF)],  # unknown flags: EINVAL
    "mount_setattr": [(NOFD, NULL, 0xFFFFFFFF, NULL, 0)],  # unknown flags: EINVAL
    "open_by_handle_at": [(NOFD, NULL, 0)],  # EBADF/EFAULT
    "name_to_handle_at": [(NOFD, NULL, NULL, NULL, 0xFFFFFFFF)],  # unknown flags: EINVAL
    "unshare": [(0x1,)],  # not an unshare flag: EINVAL
    "setns": [(NOFD, 0)],  # EBADF
    "clone": CLONE_PROBES,
    "clone3": [(NULL, 0)],  # size 0: EINVAL
    "io_uring_setup": [(0, NULL)],  # params at NULL: EFAULT
    "io_uring_enter": [(NOFD, 0, 0, 0, NULL, 0)],  # EBADF
    "io_uring_register": [(NOFD, 0, NULL, 0)],  # EINVAL/EBADF
}

# --------------------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------------------

_SYSCALL_PRELUDE = """
import ctypes, json, os, sys
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_BUF = ctypes.create_string_buffer(64)

def raw_syscall(nr, *args):
    values = []
    for a in args:
        if a == "BUF":
            a = ctypes.addressof(_BUF)
        values.append(ctypes.c_long(a - (1 << 64) if a >= (1 << 63) else a))
    ctypes.set_errno(0)
    ret = _libc.syscall(ctypes.c_long(nr), *values)
    return ret, (ctypes.get_errno() if ret == -1 else 0)
"""

PROBE_CHILD = (
    _SYSCALL_PRELUDE
    + """
probes = json.load(sys.stdin)
if sys.argv[1] == "sandboxed":
    from hostagent import sandbox
    sandbox.install()
results = []
for nr, args in probes:
    before = set(os.listdir("/proc/self/fd"))
    results.append(raw_syscall(nr, *args))
    for fd in set(os.listdir("/proc/self/fd")) - before:
        try:
            os.close(int(fd))
        except OSError:
            pass
print(json.dumps(results))
"""
)

SCENARIO_CHILD = """
import errno, json, os, socket, sys, threading
from hostagent import sandbox

def status(pid="self"):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Seccomp", "Seccomp_filters", "NoNewPrivs"):
                out[key] = value.strip()
    return out

def try_socket(family, kind):
    try:
        socket.socket(family, kind).close()
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "ok"

report = {"before": status()}
try:
    sandbox.install(sys.argv[1])
except sandbox.PolicyError as exc:
    report["bad_policy"] = str(exc)
report["after_bad_policy"] = status()
report["installed_after_bad_policy"] = sandbox.installed()

go, done = threading.Event(), threading.Event()
def early_thread():
    go.wait()
    report["thread_socket_inet"] = try_socket(socket.AF_INET, socket.SOCK_STREAM)
    done.set()
worker = threading.Thread(target=early_thread)
worker.start()  # started before install: TSYNC must cover it

sandbox.install()
report["installed"] = sandbox.installed()
report["status"] = status()
report["tasks"] = {tid: status(f"self/task/{tid}") for tid in os.listdir("/proc/self/task")}
go.set(); done.wait(10); worker.join(10)

try:
    sandbox.install()
except sandbox.SandboxError as exc:
    report["second_install"] = [type(exc).__name__, str(exc)]
report["after_second_install"] = status()

report["socket"] = {
    "AF_INET": try_socket(socket.AF_INET, socket.SOCK_STREAM),
    "AF_INET6": try_socket(socket.AF_INET6, socket.SOCK_DGRAM),
    "AF_NETLINK": try_socket(socket.AF_NETLINK, socket.SOCK_RAW),
    "AF_PACKET": try_socket(socket.AF_PACKET, socket.SOCK_DGRAM),
    "AF_UNIX": try_socket(socket.AF_UNIX, socket.SOCK_STREAM),
}
try:
    socket.socketpair(socket.AF_INET)
    report["socketpair_inet"] = "ok"
except OSError as exc:
    report["socketpair_inet"] = errno.errorcode[exc.errno]

a, b = socket.socketpair(socket.AF_UNIX)
a.sendall(b"ping")
report["socketpair_unix"] = b.recv(4).decode()
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(os.path.join(sys.argv[2], "agent.sock"))
listener.listen(1)
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
client.connect(os.path.join(sys.argv[2], "agent.sock"))
conn, _ = listener.accept()
client.sendall(b"pong")
report["unix_listener"] = conn.recv(4).decode()
print(json.dumps(report))
"""

I386_CHILD = """
import ctypes, mmap, os, sys
# mov eax, 20 (__NR_getpid in the i386 table); int 0x80; ret
code = bytes([0xB8, 0x14, 0x00, 0x00, 0x00, 0xCD, 0x80, 0xC3])
page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(code)
func = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
if sys.argv[1] == "sandboxed":
    from hostagent import sandbox
    sandbox.install()
print("armed", flush=True)
print(func() == os.getpid(), flush=True)
"""

X32_CHILD = (
    _SYSCALL_PRELUDE
    + """
from hostagent import sandbox
sandbox.install()
print("armed", flush=True)
# socket(AF_INET, SOCK_DGRAM, 0) numbered in the x32 ABI (__X32_SYSCALL_BIT | 41)
print(json.dumps(raw_syscall(0x40000000 | 41, 2, 2, 0)), flush=True)
"""
)

AUDIT_CHILD = """
import socket, sys, time
from hostagent import sandbox
sandbox.install()
print("armed", flush=True)
for _ in range(100):
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except OSError:
        pass
    time.sleep(0.1)
"""

QEMU_CHILD = """
import json, subprocess, sys
from hostagent import sandbox
sandbox.install()
cmd = [
    sys.argv[1], "-machine", "q35,accel=tcg", "-nodefaults", "-no-user-config", "-display", "none", "-S",
    "-qmp", "stdio",
    "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
]
qemu = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

def reply():
    while True:
        line = qemu.stdout.readline()
        if not line:
            return {"eof": True}
        message = json.loads(line)
        if "return" in message or "error" in message or "QMP" in message:
            return message

def send(command):
    qemu.stdin.write(json.dumps({"execute": command}) + "\\n")
    qemu.stdin.flush()
    return reply()

report = {"greeting": reply(), "qmp_capabilities": send("qmp_capabilities")}
with open(f"/proc/{qemu.pid}/status") as f:
    report["qemu_status"] = {
        k: v.strip() for k, _, v in (line.partition(":") for line in f) if k in ("Seccomp", "Seccomp_filters")
    }
report["quit"] = send("quit")
out, err = qemu.communicate(timeout=20)
report["returncode"] = qemu.returncode
report["stderr"] = err
print(json.dumps(report))
"""


def run_child(code: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=CHILD_TIMEOUT,
        check=False,
    )


def child_json(code: str, *args: str, stdin: str | None = None) -> Any:
    proc = run_child(code, *args, stdin=stdin)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout)


# --------------------------------------------------------------------------------------------------
# The data is what is enforced
# --------------------------------------------------------------------------------------------------


def condition_holds(condition: ArgCondition, args: Probe) -> bool:
    """Reference semantics of one condition (seccomp_rule_add(3)), independent of libseccomp."""
    raw = args[condition.index] if condition.index < len(args) else 0
    assert isinstance(raw, int), "conditions on buffer arguments are not probed"
    value = raw & ((1 << 64) - 1)
    if condition.op is Op.MASKED_EQ:
        assert condition.mask is not None
        return value & condition.mask == condition.value
    compare = {
        Op.NE: value != condition.value,
        Op.EQ: value == condition.value,
        Op.LT: value < condition.value,
        Op.LE: value <= condition.value,
        Op.GT: value > condition.value,
        Op.GE: value >= condition.value,
    }
    return compare[condition.op]


def rule_matches(rule: Rule, args: Probe) -> bool:
    return all(condition_holds(c, args) for c in rule.args)


ALL_PROBES: list[tuple[str, Probe]] = [(name, args) for name, probes in PROBES.items() for args in probes]
UNMATCHED_PROBES = [
    (name, args)
    for name, args in ALL_PROBES
    if not any(rule.syscall == name and rule_matches(rule, args) for rule in POLICY.rules)
]


def syscall_number(name: str) -> int:
    return next(rule.number for rule in POLICY.rules if rule.syscall == name)


@pytest.fixture(scope="module")
def probe_results() -> dict[str, dict[tuple[str, Probe], tuple[int, int]]]:
    """Run every probe once without and once under the filter, each in its own child."""
    request = json.dumps([(syscall_number(name), list(args)) for name, args in ALL_PROBES])
    results = {}
    for mode in ("baseline", "sandboxed"):
        answers = child_json(PROBE_CHILD, mode, stdin=request)
        results[mode] = {probe: (ret, err) for probe, (ret, err) in zip(ALL_PROBES, answers, strict=True)}
    return results


def _rule_id(rule: Rule) -> str:
    return rule.syscall + "".join(f"[{c.render()}]" for c in rule.args)


@pytest.mark.parametrize("rule", POLICY.rules, ids=[_rule_id(r) for r in POLICY.rules])
def test_every_rule_of_the_data_is_enforced_by_the_kernel(
    rule: Rule, probe_results: dict[str, dict[tuple[str, Probe], tuple[int, int]]]
) -> None:
    matching = [(rule.syscall, args) for args in PROBES.get(rule.syscall, []) if rule_matches(rule, args)]
    assert matching, f"add a harmless probe for {_rule_id(rule)} to PROBES (one that satisfies its conditions)"
    assert rule.verdict.action is Action.ERRNO, "a killing rule needs its own test, not a shared probe child"
    expected = (-1, rule.verdict.errno)
    inconclusive = []
    for probe in matching:
        assert probe_results["sandboxed"][probe] == expected, (
            f"{probe}: kernel answered {probe_results['sandboxed'][probe]}, the policy says {rule.verdict.label}"
        )
        if probe_results["baseline"][probe] == expected:
            inconclusive.append(probe)
    if inconclusive:
        pytest.skip(f"without the filter the kernel already answers {rule.verdict.label} here: {inconclusive}")


@pytest.mark.parametrize("probe", UNMATCHED_PROBES, ids=[f"{n}{list(a)}" for n, a in UNMATCHED_PROBES])
def test_calls_outside_the_rules_conditions_are_untouched(
    probe: tuple[str, Probe], probe_results: dict[str, dict[tuple[str, Probe], tuple[int, int]]]
) -> None:
    baseline, sandboxed = probe_results["baseline"][probe], probe_results["sandboxed"][probe]
    if baseline[0] >= 0:  # success; the value may be a descriptor number
        assert sandboxed[0] >= 0, f"{probe}: allowed call refused under the filter: {sandboxed}"
    else:
        assert sandboxed == baseline


def test_every_probe_belongs_to_a_policy_syscall() -> None:
    assert set(PROBES) <= {rule.syscall for rule in POLICY.rules}


# --------------------------------------------------------------------------------------------------
# The running sandbox, end to end
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("sandbox")
    bad_policy = workdir / "bad.toml"
    bad_policy.write_text(sandbox.DEFAULT_POLICY_PATH.read_text().replace('"ptrace"', '"ptraec"', 1))
    result: dict[str, Any] = child_json(SCENARIO_CHILD, str(bad_policy), str(workdir))
    return result


def test_filter_is_active_in_mode_2_with_no_new_privs(scenario: dict[str, Any]) -> None:
    assert scenario["before"]["Seccomp"] == "0"
    assert scenario["installed"] is True
    assert scenario["status"] == {"NoNewPrivs": "1", "Seccomp": "2", "Seccomp_filters": "1"}


def test_filter_covers_threads_started_before_install(scenario: dict[str, Any]) -> None:
    assert len(scenario["tasks"]) >= 2
    for tid, status in scenario["tasks"].items():
        assert status["Seccomp"] == "2", tid
    assert scenario["thread_socket_inet"] == "EAFNOSUPPORT"


@pytest.mark.parametrize("family", ["AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET"])
def test_network_sockets_are_refused(scenario: dict[str, Any], family: str) -> None:
    assert scenario["socket"][family] == "EAFNOSUPPORT"


def test_socketpair_of_a_network_family_is_refused(scenario: dict[str, Any]) -> None:
    assert scenario["socketpair_inet"] == "EAFNOSUPPORT"


def test_unix_sockets_and_socketpairs_still_work(scenario: dict[str, Any]) -> None:
    assert scenario["socket"]["AF_UNIX"] == "ok"
    assert scenario["socketpair_unix"] == "ping"
    assert scenario["unix_listener"] == "pong"


def test_second_install_is_an_error_and_stacks_nothing(scenario: dict[str, Any]) -> None:
    kind, message = scenario["second_install"]
    assert kind == "SandboxError"
    assert "already installed" in message
    assert scenario["after_second_install"]["Seccomp_filters"] == "1"


def test_a_rejected_policy_installs_nothing(scenario: dict[str, Any]) -> None:
    assert "unknown syscall 'ptraec'" in scenario["bad_policy"]
    assert scenario["after_bad_policy"]["Seccomp"] == "0"
    assert scenario["installed_after_bad_policy"] is False


def test_i386_syscalls_kill_the_process() -> None:
    baseline = run_child(I386_CHILD, "baseline")
    if baseline.returncode != 0 or "True" not in baseline.stdout:
        pytest.skip(f"this kernel cannot run i386 syscalls at all (IA32 emulation off): {baseline.returncode}")
    sandboxed = run_child(I386_CHILD, "sandboxed")
    assert sandboxed.stdout.split() == ["armed"], sandboxed.stderr
    assert sandboxed.returncode == -signal.SIGSYS


def test_x32_syscall_numbers_kill_the_process() -> None:
    proc = run_child(X32_CHILD)
    assert proc.stdout.split() == ["armed"], (proc.stdout, proc.stderr)
    assert proc.returncode == -signal.SIGSYS


def _kmsg_records(fd: int) -> Iterator[str]:
    while True:
        try:
            record = os.read(fd, 8192)
        except BlockingIOError:
            return
        except OSError as exc:  # EPIPE: records were overwritten while we read; keep going
            if exc.errno != errno.EPIPE:
                raise
            continue
        yield record.decode(errors="replace")


def test_denials_raise_a_kernel_audit_record() -> None:
    try:
        kmsg = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        pytest.skip(f"cannot read the kernel log here: {exc}")
    try:
        os.lseek(kmsg, 0, os.SEEK_END)
        child = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(AUDIT_CHILD)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "armed"
            # The child retries every 0.1 s: printk rate limiting may drop a few records.
            deadline = time.monotonic() + 8
            found: list[str] = []
            while not found and time.monotonic() < deadline:
                select.select([kmsg], [], [], 0.2)
                found = [
                    r
                    for r in _kmsg_records(kmsg)
                    if "type=1326" in r and f" pid={child.pid} " in r and " syscall=41 " in r
                ]
        finally:
            child.kill()
            child.wait()
    finally:
        os.close(kmsg)
    assert found, "no SECCOMP audit record for the refused socket(AF_INET)"
    assert "code=0x50000" in found[0]  # SECCOMP_RET_ERRNO


@pytest.mark.qemu
def test_qemu_started_by_the_sandboxed_agent_runs_under_both_filters() -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    report = child_json(QEMU_CHILD, qemu)
    assert "QMP" in report["greeting"], report
    assert report["qmp_capabilities"] == {"return": {}}, report
    # Ours, inherited across fork+exec, with QEMU's own -sandbox filter stacked on top.
    assert report["qemu_status"] == {"Seccomp": "2", "Seccomp_filters": "2"}
    assert report["quit"] == {"return": {}}, report
    assert report["returncode"] == 0, report["stderr"]


def test_the_test_process_itself_is_never_sandboxed() -> None:
    assert not sandbox.installed()


# --------------------------------------------------------------------------------------------------
# The shipped policy
# --------------------------------------------------------------------------------------------------

# Syscalls whose refusal DESIGN.md's claims rely on; removing one from the data fails here.
REQUIRED_DENIALS = {
    "ptrace", "process_vm_readv", "process_vm_writev", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "mount", "umount2", "pivot_root", "chroot", "swapon", "swapoff", "reboot",
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key", "acct", "settimeofday",
    "clock_settime", "adjtimex", "iopl", "ioperm", "open_by_handle_at", "name_to_handle_at", "personality",
    "unshare", "setns", "io_uring_setup", "io_uring_enter", "io_uring_register", "clone3",
}  # fmt: skip


def test_shipped_policy_floor() -> None:
    assert POLICY.default.action is Action.ALLOW
    assert POLICY.bad_arch.action is Action.KILL_PROCESS
    assert POLICY.log_denials is True
    assert REQUIRED_DENIALS <= {rule.syscall for rule in POLICY.rules}
    socket_rules = [rule for rule in POLICY.rules if rule.syscall in ("socket", "socketpair")]
    assert [(r.syscall, r.args, r.verdict.errno) for r in socket_rules] == [
        (name, (ArgCondition(0, Op.NE, socket.AF_UNIX, None, "AF_UNIX", None),), errno.EAFNOSUPPORT)
        for name in ("socket", "socketpair")
    ]
    clone_masks = {c.mask for rule in POLICY.rules if rule.syscall == "clone" for c in rule.args}
    assert clone_masks == set(NS_VALUES.values())


def test_constants_match_the_platform() -> None:
    assert sandbox._CONSTANTS["AF_UNIX"] == socket.AF_UNIX
    for name, value in NS_VALUES.items():
        assert sandbox._CONSTANTS[name] == value
        assert getattr(os, name, value) == value  # os.CLONE_* exists from Python 3.12


def test_compiled_filter_names_every_rule() -> None:
    import tempfile

    with tempfile.TemporaryFile(mode="w+") as out:
        sandbox.build_filter(POLICY).export_pfc(out)
        out.seek(0)
        pfc = out.read()
    for rule in POLICY.rules:
        assert f'"{rule.syscall}" ({rule.number})' in pfc
    assert "action KILL_PROCESS;" in pfc


def test_describe_renders_one_row_per_rule_with_its_reason() -> None:
    text = sandbox.describe()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    assert len(rows) == len(POLICY.rules)
    for i, (row, rule) in enumerate(zip(rows, POLICY.rules, strict=True)):
        assert row.startswith(f"| {i} | `{rule.syscall}` | {rule.number} |")
        assert rule.verdict.reason.replace("|", "\\|") in row
        assert rule.verdict.label in row
    assert "| 0 | `socket` | 41 | arg0 != AF_UNIX | ERRNO(EAFNOSUPPORT) |" in text
    assert "Default action: ALLOW" in text


def test_describe_escapes_table_syntax(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(policy_text(rule_toml(reason="pipes | and \\\\ backslashes")))
    row = sandbox.describe(path).splitlines()[-1]
    assert row.endswith("| pipes \\| and \\\\ backslashes |")


# --------------------------------------------------------------------------------------------------
# Strict parsing
# --------------------------------------------------------------------------------------------------

HEADER = """
version = 1
[default]
action = "allow"
reason = "why allow"
[bad_arch]
action = "kill_process"
reason = "why kill"
[audit]
log_denials = false
reason = "why log"
"""


def rule_toml(syscall: str = "ptrace", extra: str = "", **fields: str) -> str:
    values = {"action": '"errno"', "errno": '"EPERM"', "reason": '"why deny"'}
    # A field value is TOML as written when it starts like an array, table, number, bool or string;
    # anything else is quoted; "-" drops the field.
    values.update({k: v if v[:1] in '[{01tf"' else f'"{v}"' for k, v in fields.items()})
    body = "".join(f"{k} = {v}\n" for k, v in values.items() if v != '"-"')
    return f'\n[[rule]]\nsyscall = "{syscall}"\n{body}{extra}\n'


def policy_text(*rules: str, header: str = HEADER) -> str:
    return header + "".join(rules)


def test_minimal_policy_parses() -> None:
    policy = sandbox.parse_policy(
        policy_text(rule_toml(), rule_toml("socket", args='[{arg = 0, op = "ne", value = "AF_UNIX"}]'))
    )
    assert [r.syscall for r in policy.rules] == ["ptrace", "socket"]
    assert policy.rules[1].args == (ArgCondition(0, Op.NE, 1, None, "AF_UNIX", None),)


def _masked(mask: str, value: str) -> str:
    return f'[{{arg = 0, op = "masked_eq", mask = {mask}, value = {value}}}]'


BAD_POLICIES: list[tuple[str, str, str]] = [
    ("toml", "version = ", "not valid TOML"),
    ("top-unknown-key", "extra = 1\n" + policy_text(rule_toml()), r"top level: unknown key\(s\) extra"),
    ("top-missing-audit", policy_text(rule_toml(), header=HEADER.split("[audit]")[0]), r"missing key\(s\) audit"),
    ("version", policy_text(rule_toml(), header=HEADER.replace("version = 1", "version = 2")), "version 2"),
    ("no-rules", "rule = []\n" + HEADER, "non-empty array"),
    ("log-not-bool", policy_text(rule_toml(), header=HEADER.replace("= false", '= "no"')), "log_denials"),
    (
        "default-unknown-action",
        policy_text(rule_toml(), header=HEADER.replace('"allow"', '"deny"')),
        r"\[default\].*'deny'",
    ),
    ("bad-arch-allow", policy_text(rule_toml(), header=HEADER.replace('"kill_process"', '"allow"')), "foreign-ABI"),
    ("rule-unknown-key", policy_text(rule_toml(reasn='"x"')), r"rule\[0\] \(ptrace\): unknown key\(s\) reasn"),
    ("rule-missing-reason", policy_text(rule_toml(reason="-")), r"rule\[0\] \(ptrace\): missing key\(s\) reason"),
    ("rule-empty-reason", policy_text(rule_toml(reason="  ")), "must not be empty"),
    ("rule-reason-not-string", policy_text(rule_toml(reason="1")), "'reason' must be a string"),
    ("rule-syscall-not-string", policy_text(rule_toml().replace('"ptrace"', "42")), "'syscall' must be a string"),
    ("unknown-syscall", policy_text(rule_toml("ptraec")), "unknown syscall 'ptraec'"),
    ("foreign-syscall", policy_text(rule_toml("socketcall")), "does not exist on this architecture"),
    ("not-a-name", policy_text(rule_toml("PTRACE")), "is not a syscall name"),
    ("unknown-action", policy_text(rule_toml(action="deny")), "unknown action 'deny'"),
    ("errno-missing", policy_text(rule_toml(errno="-")), "needs an 'errno'"),
    ("errno-unknown", policy_text(rule_toml(errno="EWHATEVER")), "unknown errno 'EWHATEVER'"),
    ("errno-on-kill", policy_text(rule_toml(action="kill_process")), "only meaningful with action 'errno'"),
    ("action-is-default", policy_text(rule_toml(action="allow", errno="-")), "already the default action"),
    ("args-empty", policy_text(rule_toml(args="[]")), "non-empty array of tables"),
    ("args-not-table", policy_text(rule_toml(args="[1]")), "expected a table"),
    ("arg-unknown-key", policy_text(rule_toml(args='[{arg = 0, op = "ne", value = 1, note = "x"}]')), "note"),
    ("arg-missing-op", policy_text(rule_toml(args="[{arg = 0, value = 1}]")), r"missing key\(s\) op"),
    ("arg-index", policy_text(rule_toml(args='[{arg = 6, op = "ne", value = 1}]')), "index 0..5"),
    ("arg-index-bool", policy_text(rule_toml(args='[{arg = true, op = "ne", value = 1}]')), "index 0..5"),
    ("op-unknown", policy_text(rule_toml(args='[{arg = 0, op = "contains", value = 1}]')), "unknown op 'contains'"),
    ("value-constant", policy_text(rule_toml(args='[{arg = 0, op = "ne", value = "AF_INETT"}]')), "'AF_INETT'"),
    ("value-negative", policy_text(rule_toml(args='[{arg = 0, op = "ne", value = -1}]')), "outside 0..2\\*\\*64-1"),
    ("value-too-big", policy_text(rule_toml(args='[{arg = 0, op = "ne", value = 0x1ffffffffffffffff}]')), "outside"),
    ("value-bool", policy_text(rule_toml(args='[{arg = 0, op = "ne", value = true}]')), "integer or a constant"),
    ("masked-no-mask", policy_text(rule_toml(args='[{arg = 0, op = "masked_eq", value = 1}]')), "needs a 'mask'"),
    ("mask-on-ne", policy_text(rule_toml(args='[{arg = 0, op = "ne", value = 1, mask = 1}]')), "only meaningful"),
    ("mask-never-matches", policy_text(rule_toml("clone", args=_masked("1", "3"))), "could never match"),
    (
        "same-arg-twice",
        policy_text(rule_toml(args='[{arg = 0, op = "ge", value = 1}, {arg = 0, op = "le", value = 9}]')),
        "same argument",
    ),
    ("duplicate", policy_text(rule_toml(), rule_toml(reason="other")), r"rule\[1\] \(ptrace\): duplicates rule\[0\]"),
    (
        "dead-conditional",
        policy_text(rule_toml("clone"), rule_toml("clone", args=_masked('"CLONE_NEWNS"', '"CLONE_NEWNS"'))),
        r"rule\[1\] \(clone\): can never apply: rule\[0\]",
    ),
]


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in BAD_POLICIES], ids=[c[0] for c in BAD_POLICIES])
def test_malformed_policy_is_rejected_with_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message) as info:
        sandbox.parse_policy(text, "test.toml")
    assert str(info.value).startswith("test.toml: ")


def test_missing_policy_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy"):
        sandbox.load_policy(tmp_path / "absent.toml")
