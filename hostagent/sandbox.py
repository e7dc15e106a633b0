"""Kernel-enforced passivity: the host agent's seccomp filter (claims C1, C6, C15).

Theory of operation.  The policy is data, ``seccomp_policy.toml`` beside this
module, reviewed like code: every entry names a syscall, the action the kernel
takes, optional argument conditions, and a human reason.  :func:`load_policy`
parses it strictly into a frozen :class:`Policy`; :func:`install` compiles that
policy with libseccomp (through ``pyseccomp``) and loads it into the kernel for
every thread of the calling process; :func:`describe` renders it as a Markdown
table for the docs.  Nothing else decides what is enforced, and
``tests/hostagent/test_sandbox.py`` calls each denied syscall of the data in a
sandboxed child to check that the kernel answers as the data says.

Why a deny-list on top of a default of ALLOW.  The agent is CPython, whose
syscall set depends on the interpreter version, the modules imported and the
code paths taken; and it starts QEMU, which inherits the filter across fork and
execve and can never drop it.  An allow-list would have to cover the union of
both (TCG, the block layer, VFIO hot-plug, io_uring probing, ...) for every
version, and a missing entry would kill a running guest.  So this filter
removes what neither ever needs, and QEMU narrows itself further with its own
``-sandbox on,...`` filter: the kernel stacks filters and applies the most
restrictive answer, so QEMU ends up under both.

What the filter guarantees, precisely:

- No socket of any family but AF_UNIX can be created by the agent or by any
  process it starts (C1).  connect(2) cannot be filtered by address, because
  its argument is a pointer that seccomp cannot read; removing every
  non-Unix socket removes the means instead.  Comparisons are on the full
  64-bit argument and the rule is ``domain != AF_UNIX``, so a value with stray
  upper bits is refused, never let through.
- io_uring is refused: its operations (including socket and connect) run in
  the kernel without passing through syscalls, so seccomp cannot see them.
- clone with a namespace flag is refused like unshare, and clone3, whose
  flags live in a struct seccomp cannot read, answers ENOSYS so that glibc
  falls back to clone (QEMU's own sandbox does the same).
- A syscall of a foreign ABI (i386 ``int 0x80``, x32 numbers) kills the
  process: those are numbered differently and would slip past every rule.
- The filter is synchronised to all threads of the process (TSYNC), and
  no_new_privs is set, which the kernel requires for an unprivileged filter
  and which also keeps QEMU from gaining privileges through a setuid helper.
- Denials are logged by the kernel audit subsystem when the policy asks for it
  (a ``type=1326`` SECCOMP record with pid and syscall number): an attempt to
  reach out is a sign of compromise and must be visible (C1, C16).

Invariants:

- the policy that is loaded is exactly the parsed data: syscall names are
  resolved by libseccomp for the native architecture, rules are added with
  ``seccomp_rule_add_exact`` (libseccomp may not rewrite them silently), and
  any unknown key, name, action, errno or constant is a :class:`PolicyError`;
- :func:`install` succeeds at most once per process.  A filter can never be
  removed or replaced, only stacked, so a second call is a programming error
  (and a no-op would silently ignore a different policy): it raises
  :class:`SandboxError`.  A failed call (bad policy, load refused) installs
  nothing and may be retried.

Call :func:`install` after start-up and before the first command is accepted.
Threads that already run are covered by TSYNC; the call fails (and installs
nothing) if one of them already carries a different filter.
"""

from __future__ import annotations

import enum
import errno as errno_module
import logging
import re
import threading
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyseccomp

__all__ = [
    "DEFAULT_POLICY_PATH",
    "Action",
    "ArgCondition",
    "Op",
    "Policy",
    "PolicyError",
    "Rule",
    "SandboxError",
    "Verdict",
    "build_filter",
    "describe",
    "install",
    "installed",
    "load_policy",
    "parse_policy",
]

_log = logging.getLogger(__name__)

DEFAULT_POLICY_PATH = Path(__file__).with_name("seccomp_policy.toml")
POLICY_VERSION = 1

# Named constants a policy may use as argument values and masks.  These are
# Linux ABI values (include/uapi/linux/socket.h, sched.h, personality(2)) that
# never change; they are spelled out here rather than imported so that this
# module pulls in no networking code.
_CONSTANTS: Mapping[str, int] = {
    "AF_UNIX": 1,
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
    # personality(0xffffffff) only reads the current persona (personality(2)).
    "PERSONALITY_QUERY": 0xFFFFFFFF,
}

_U64_MAX = (1 << 64) - 1
_MAX_ARGS = 6  # a syscall has at most six arguments, seccomp_data.args[6]
_SYSCALL_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_ERRNO_NAMES = frozenset(errno_module.errorcode.values())


class SandboxError(Exception):
    """The sandbox could not be installed; the process is not (further) filtered."""


class PolicyError(SandboxError):
    """The policy data is malformed; the message names the file, the entry and the key."""


class Action(enum.Enum):
    """What the kernel does when a rule matches (a closed set)."""

    ALLOW = "allow"
    ERRNO = "errno"
    KILL_PROCESS = "kill_process"


class Op(enum.Enum):
    """Argument comparisons, as libseccomp defines them (seccomp_rule_add(3))."""

    NE = "ne"
    EQ = "eq"
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    MASKED_EQ = "masked_eq"


_OP_SYMBOL: Mapping[Op, str] = {
    Op.NE: "!=",
    Op.EQ: "==",
    Op.LT: "<",
    Op.LE: "<=",
    Op.GT: ">",
    Op.GE: ">=",
}

_OP_CODE: Mapping[Op, int] = {
    Op.NE: pyseccomp.NE,
    Op.EQ: pyseccomp.EQ,
    Op.LT: pyseccomp.LT,
    Op.LE: pyseccomp.LE,
    Op.GT: pyseccomp.GT,
    Op.GE: pyseccomp.GE,
    Op.MASKED_EQ: pyseccomp.MASKED_EQ,
}


@dataclass(frozen=True)
class Verdict:
    """An action with its errno (set exactly when the action is ERRNO) and the reason for it."""

    action: Action
    errno: int | None
    reason: str

    @property
    def label(self) -> str:
        if self.action is Action.ERRNO:
            assert self.errno is not None
            return f"ERRNO({errno_module.errorcode[self.errno]})"
        return self.action.name

    def seccomp_action(self) -> int:
        if self.action is Action.ALLOW:
            return int(pyseccomp.ALLOW)
        if self.action is Action.KILL_PROCESS:
            return int(pyseccomp.KILL_PROCESS)
        assert self.errno is not None
        return int(pyseccomp.ERRNO(self.errno))


@dataclass(frozen=True)
class ArgCondition:
    """``(args[index] & mask) == value`` for MASKED_EQ, else ``args[index] <op> value``, on 64 bits."""

    index: int
    op: Op
    value: int
    mask: int | None
    value_name: str  # as written in the policy, for the rendered table
    mask_name: str | None

    def render(self) -> str:
        if self.op is Op.MASKED_EQ:
            return f"arg{self.index} & {self.mask_name} == {self.value_name}"
        return f"arg{self.index} {_OP_SYMBOL[self.op]} {self.value_name}"


@dataclass(frozen=True)
class Rule:
    """One entry of the policy: when ``syscall`` is called and all ``args`` hold, apply ``verdict``."""

    syscall: str
    number: int  # resolved by libseccomp for the native architecture
    args: tuple[ArgCondition, ...]
    verdict: Verdict


@dataclass(frozen=True)
class Policy:
    source: str
    default: Verdict
    bad_arch: Verdict
    log_denials: bool
    log_reason: str
    rules: tuple[Rule, ...]


# --------------------------------------------------------------------------------------------------
# Strict parsing
# --------------------------------------------------------------------------------------------------


class _Ctx:
    """Where in the policy we are, for error messages: 'file: rule[3] (ptrace): ...'."""

    def __init__(self, source: str, where: str) -> None:
        self.source = source
        self.where = where

    def error(self, message: str) -> PolicyError:
        return PolicyError(f"{self.source}: {self.where}: {message}")

    def table(self, value: object, allowed: frozenset[str], required: frozenset[str]) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.error(f"expected a table, got {type(value).__name__}")
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise self.error(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
        missing = sorted(required - set(value))
        if missing:
            raise self.error(f"missing key(s) {', '.join(missing)}")
        return value

    def string(self, table: Mapping[str, Any], key: str) -> str:
        value = table[key]
        if not isinstance(value, str):
            raise self.error(f"{key!r} must be a string, got {type(value).__name__}")
        return value

    def reason(self, table: Mapping[str, Any]) -> str:
        text = " ".join(self.string(table, "reason").split())
        if not text:
            raise self.error("'reason' must not be empty: every entry says why it exists")
        return text


def _parse_verdict(ctx: _Ctx, table: Mapping[str, Any]) -> Verdict:
    name = ctx.string(table, "action")
    try:
        action = Action(name)
    except ValueError:
        raise ctx.error(f"unknown action {name!r}; expected one of {[a.value for a in Action]}") from None
    reason = ctx.reason(table)
    if action is not Action.ERRNO:
        if "errno" in table:
            raise ctx.error(f"'errno' is only meaningful with action 'errno', not {name!r}")
        return Verdict(action, None, reason)
    if "errno" not in table:
        raise ctx.error("action 'errno' needs an 'errno' name, e.g. errno = \"EPERM\"")
    errno_name = ctx.string(table, "errno")
    if errno_name not in _ERRNO_NAMES:
        raise ctx.error(f"unknown errno {errno_name!r}")
    return Verdict(action, int(getattr(errno_module, errno_name)), reason)


def _parse_value(ctx: _Ctx, key: str, raw: object) -> tuple[int, str]:
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ctx.error(f"{key!r} must be an integer or a constant name, got {type(raw).__name__}")
    if isinstance(raw, str):
        if raw not in _CONSTANTS:
            raise ctx.error(f"unknown constant {raw!r} for {key!r}; known: {', '.join(sorted(_CONSTANTS))}")
        return _CONSTANTS[raw], raw
    if not 0 <= raw <= _U64_MAX:
        raise ctx.error(f"{key!r} = {raw} is outside 0..2**64-1 (write negative values as unsigned)")
    return raw, hex(raw)


_ARG_KEYS = frozenset({"arg", "op", "value", "mask"})


def _parse_condition(ctx: _Ctx, raw: object) -> ArgCondition:
    table = ctx.table(raw, _ARG_KEYS, frozenset({"arg", "op", "value"}))
    index = table["arg"]
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < _MAX_ARGS:
        raise ctx.error(f"'arg' must be an argument index 0..{_MAX_ARGS - 1}, got {index!r}")
    op_name = ctx.string(table, "op")
    try:
        op = Op(op_name)
    except ValueError:
        raise ctx.error(f"unknown op {op_name!r}; expected one of {[o.value for o in Op]}") from None
    value, value_name = _parse_value(ctx, "value", table["value"])
    mask: int | None = None
    mask_name: str | None = None
    if op is Op.MASKED_EQ:
        if "mask" not in table:
            raise ctx.error("op 'masked_eq' needs a 'mask'")
        mask, mask_name = _parse_value(ctx, "mask", table["mask"])
        if value & ~mask:
            raise ctx.error(f"value {value_name} has bits outside mask {mask_name}: the rule could never match")
    elif "mask" in table:
        raise ctx.error(f"'mask' is only meaningful with op 'masked_eq', not {op_name!r}")
    return ArgCondition(index, op, value, mask, value_name, mask_name)


def _resolve_syscall(ctx: _Ctx, name: str) -> int:
    if not _SYSCALL_NAME.fullmatch(name):
        raise ctx.error(f"{name!r} is not a syscall name")
    number = int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))
    # libseccomp answers __NR_SCMP_ERROR (-1) for a name it does not know, and
    # a negative pseudo-number for a syscall that exists only on other
    # architectures (socketcall on x86_64); a rule for either would enforce
    # nothing here, so both are errors.
    if number == -1:
        raise ctx.error(f"unknown syscall {name!r} (libseccomp does not know it)")
    if number < 0:
        raise ctx.error(f"syscall {name!r} does not exist on this architecture")
    return number


_RULE_KEYS = frozenset({"syscall", "args", "action", "errno", "reason"})


def _parse_rule(source: str, position: int, raw: object) -> Rule:
    ctx = _Ctx(source, f"rule[{position}]")
    if isinstance(raw, dict) and isinstance(raw.get("syscall"), str):
        ctx.where = f"rule[{position}] ({raw['syscall']})"
    table = ctx.table(raw, _RULE_KEYS, frozenset({"syscall", "action", "reason"}))
    name = ctx.string(table, "syscall")
    number = _resolve_syscall(ctx, name)
    raw_args = table.get("args", [])
    if not isinstance(raw_args, list) or ("args" in table and not raw_args):
        raise ctx.error("'args' must be a non-empty array of tables (omit it for an unconditional rule)")
    conditions = tuple(_parse_condition(ctx, item) for item in raw_args)
    indexes = [c.index for c in conditions]
    if len(set(indexes)) != len(indexes):
        raise ctx.error("two conditions on the same argument; state one condition per argument")
    verdict = _parse_verdict(ctx, table)
    return Rule(name, number, conditions, verdict)


_TOP_KEYS = frozenset({"version", "default", "bad_arch", "audit", "rule"})
_VERDICT_KEYS = frozenset({"action", "errno", "reason"})
_AUDIT_KEYS = frozenset({"log_denials", "reason"})


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse policy TOML strictly; raise :class:`PolicyError` naming the faulty entry and key."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: not valid TOML: {exc}") from exc
    top = _Ctx(source, "top level").table(document, _TOP_KEYS, _TOP_KEYS)
    if isinstance(top["version"], bool) or top["version"] != POLICY_VERSION:
        raise PolicyError(f"{source}: version {top['version']!r} is not supported (expected {POLICY_VERSION})")

    default_ctx = _Ctx(source, "[default]")
    default = _parse_verdict(default_ctx, default_ctx.table(top["default"], _VERDICT_KEYS, _VERDICT_KEYS - {"errno"}))
    bad_arch_ctx = _Ctx(source, "[bad_arch]")
    bad_arch = _parse_verdict(
        bad_arch_ctx, bad_arch_ctx.table(top["bad_arch"], _VERDICT_KEYS, _VERDICT_KEYS - {"errno"})
    )
    if bad_arch.action is Action.ALLOW:
        raise bad_arch_ctx.error("action 'allow' would let foreign-ABI syscalls bypass every rule")
    audit_ctx = _Ctx(source, "[audit]")
    audit = audit_ctx.table(top["audit"], _AUDIT_KEYS, _AUDIT_KEYS)
    if not isinstance(audit["log_denials"], bool):
        raise audit_ctx.error("'log_denials' must be true or false")
    log_reason = audit_ctx.reason(audit)

    raw_rules = top["rule"]
    if not isinstance(raw_rules, list) or not raw_rules:
        raise PolicyError(f"{source}: 'rule' must be a non-empty array of [[rule]] tables")
    rules = tuple(_parse_rule(source, i, raw) for i, raw in enumerate(raw_rules))

    seen: dict[tuple[str, tuple[ArgCondition, ...]], int] = {}
    unconditional: dict[str, int] = {}
    for i, rule in enumerate(rules):
        where = _Ctx(source, f"rule[{i}] ({rule.syscall})")
        key = (rule.syscall, rule.args)
        if key in seen:
            raise where.error(f"duplicates rule[{seen[key]}]")
        seen[key] = i
        if rule.verdict.action is default.action:
            # libseccomp refuses such a rule (EACCES), and it would say nothing.
            raise where.error(f"action {rule.verdict.action.value!r} is already the default action")
        if not rule.args:
            unconditional[rule.syscall] = i
    for i, rule in enumerate(rules):
        if rule.args and rule.syscall in unconditional:
            raise _Ctx(source, f"rule[{i}] ({rule.syscall})").error(
                f"can never apply: rule[{unconditional[rule.syscall]}] already matches every call"
            )
    return Policy(source, default, bad_arch, bool(audit["log_denials"]), log_reason, rules)


def load_policy(policy_path: Path | str = DEFAULT_POLICY_PATH) -> Policy:
    """Read and strictly parse the policy file."""
    path = Path(policy_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}: cannot read policy: {exc}") from exc
    return parse_policy(text, str(path))


# --------------------------------------------------------------------------------------------------
# Compilation and installation
# --------------------------------------------------------------------------------------------------


def _seccomp_arg(condition: ArgCondition) -> Any:
    if condition.op is Op.MASKED_EQ:
        # libseccomp's SCMP_CMP_MASKED_EQ takes the mask first, then the value.
        return pyseccomp.Arg(condition.index, _OP_CODE[condition.op], condition.mask, condition.value)
    return pyseccomp.Arg(condition.index, _OP_CODE[condition.op], condition.value)


def build_filter(policy: Policy) -> Any:
    """Compile ``policy`` into a ``pyseccomp.SyscallFilter`` (not loaded).

    Useful on its own for review: ``build_filter(p).export_pfc(sys.stdout)``
    prints the pseudo-code libseccomp generates.
    """
    try:
        flt = pyseccomp.SyscallFilter(policy.default.seccomp_action())
        flt.set_attr(pyseccomp.Attr.ACT_BADARCH, policy.bad_arch.seccomp_action())
        flt.set_attr(pyseccomp.Attr.CTL_NNP, 1)
        flt.set_attr(pyseccomp.Attr.CTL_TSYNC, 1)
        if policy.log_denials:
            flt.set_attr(pyseccomp.Attr.CTL_LOG, 1)
        for rule in policy.rules:
            args = [_seccomp_arg(c) for c in rule.args]
            # "exact": libseccomp must fail rather than silently adjust the rule.
            flt.add_rule_exactly(rule.verdict.seccomp_action(), rule.number, *args)
    except OSError as exc:
        raise SandboxError(f"{policy.source}: libseccomp rejected the policy: {exc}") from exc
    return flt


_install_lock = threading.Lock()
_installed = False


def installed() -> bool:
    """True once :func:`install` has loaded the filter in this Python process.

    The flag is inherited across fork, like the filter; a program started with
    execve (QEMU) is still filtered but has no such flag.
    """
    return _installed


def install(policy_path: Path | str = DEFAULT_POLICY_PATH) -> None:
    """Load the policy into the kernel for every thread of this process, irrevocably.

    Raises :class:`PolicyError` for bad data and :class:`SandboxError` if the
    kernel refuses the filter or if a filter was already installed by this
    function; in every failure case nothing has been installed by this call.
    """
    global _installed
    with _install_lock:
        if _installed:
            raise SandboxError("the seccomp filter is already installed; it cannot be replaced or reinstalled")
        policy = load_policy(policy_path)
        flt = build_filter(policy)
        try:
            flt.load()
        except OSError as exc:
            raise SandboxError(f"{policy.source}: the kernel refused the seccomp filter: {exc}") from exc
        _installed = True
    _log.info(
        "seccomp filter installed from %s: %d rules, default %s, foreign ABI %s",
        policy.source,
        len(policy.rules),
        policy.default.label,
        policy.bad_arch.label,
    )


# --------------------------------------------------------------------------------------------------
# Documentation
# --------------------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|")


def _render(policy: Policy) -> str:
    lines = [
        "# Seccomp policy of the host agent",
        "",
        f"Generated from `{Path(policy.source).name}` by `hostagent.sandbox.describe()`; do not edit by hand.",
        "",
        f"- **Default action: {policy.default.label}.** {_cell(policy.default.reason)}",
        f"- **Foreign-ABI syscalls: {policy.bad_arch.label}.** {_cell(policy.bad_arch.reason)}",
        f"- **Denials logged to kernel audit: {'yes' if policy.log_denials else 'no'}.** {_cell(policy.log_reason)}",
        "",
        "| # | syscall | nr | condition | action | reason |",
        "|---|---|---|---|---|---|",
    ]
    for i, rule in enumerate(policy.rules):
        condition = " and ".join(c.render() for c in rule.args) or "always"
        lines.append(
            f"| {i} | `{rule.syscall}` | {rule.number} | {_cell(condition)} | {rule.verdict.label} "
            f"| {_cell(rule.verdict.reason)} |"
        )
    return "\n".join(lines) + "\n"


def describe(policy_path: Path | str = DEFAULT_POLICY_PATH) -> str:
    """The policy as a Markdown document: the global choices, then one table row (with its reason) per rule."""
    return _render(load_policy(policy_path))
