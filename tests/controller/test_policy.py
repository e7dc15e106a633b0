"""Authorization policy (claim C3): the shipped matrix, deny by default, limits, strict parsing."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller import policy as p
from controller.policy import (
    HEALTH_CHECK,
    METHODS,
    Decision,
    DenyReason,
    Fact,
    Limit,
    Method,
    PermissionDenied,
    Policy,
    PolicyError,
    RequestFacts,
    is_principal,
    load,
    load_default,
    parse,
)

ROLES = ("instance-manager", "volume-attacher", "network-manager", "telemetry", "auditor")

# The shipped matrix, written out independently of default_policy.toml.  Every (role, method) pair not
# listed here must be denied, so a method added to Method later is denied to everyone by this test's
# construction until someone decides otherwise in both places.
EXPECTED = {
    "instance-manager": {"StartInstance", "StopInstance", "DescribeInstance", "ListInstances"},
    # GetHostIdentity (public keys only): the volume-attacher wraps data keys to the X25519 key; the auditor
    # verifies checkpoint signatures with the Ed25519 key (see the reasons in the policy).
    "volume-attacher": {"AttachVolume", "DetachVolume", "GetHostIdentity"},
    "network-manager": {"AssignVirtualFunction", "ReleaseVirtualFunction"},
    "telemetry": {"GetMetrics", "PollEvents"},
    "auditor": {"ReadAuditLog", "GetHostIdentity"},
}

IM = "spiffe://controlplane/instance-manager"
IID = uuid.UUID("6f1c2a4e-0b7d-4c1e-9a53-2f0d8e6b1c77")
OTHER_IID = uuid.UUID("0a2b3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d")


def principal(role: str) -> str:
    return f"spiffe://controlplane/{role}"


def entry(uri: str = IM, methods: str = '["StartInstance"]', extra: str = "") -> str:
    return f'version = 1\n[[principal]]\nuri = "{uri}"\nmethods = {methods}\nreason = "test"\n{extra}\n'


@pytest.fixture(scope="module")
def default() -> Policy:
    return load_default()


# ---------------------------------------------------------------------------------------------------------
# The shipped policy
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("method", list(Method), ids=lambda m: m.value)
def test_the_default_policy_is_exactly_the_documented_matrix(default: Policy, role: str, method: Method) -> None:
    decision = default.authorize_method(principal(role), method)
    if method.value in EXPECTED[role]:
        assert decision == p.ALLOW
    else:
        assert decision.reason is DenyReason.METHOD_NOT_ALLOWED
    # The path form (what the gRPC handler wrapper passes) decides the same.
    assert default.authorize_method(principal(role), method.path) == decision


def test_the_default_policy_names_exactly_the_five_roles(default: Policy) -> None:
    assert set(default.grants) == {principal(role) for role in ROLES}
    assert p.matrix(default, default.grants) == {
        principal(role): frozenset(Method(name) for name in names) for role, names in EXPECTED.items()}


def test_the_expected_matrix_only_names_real_methods() -> None:
    """Guards against a typo in EXPECTED that would make a 'denied' assertion vacuous."""
    assert set().union(*EXPECTED.values()) <= {m.value for m in Method}


def test_the_default_policy_has_no_limits_and_a_reason_per_role(default: Policy) -> None:
    for grant in default.grants.values():
        assert (grant.max_vcpus, grant.max_memory_mib, grant.instance_id_prefixes) == (None, None, None)
        assert len(grant.reason) > 40


def test_load_default_reads_the_shipped_file(default: Policy) -> None:
    assert load(Path(p.__file__).with_name(p.DEFAULT_POLICY_RESOURCE)) == default


def test_a_method_added_to_the_service_later_is_denied_to_every_role(default: Policy) -> None:
    for role in ROLES:
        for path in (f"/{p.SERVICE}/RebootInstance", f"/{p.SERVICE}/startinstance", "/other.Service/StartInstance",
                     "StartInstance", "", "/grpc.health.v1.Health/Watch"):
            decision = default.authorize_method(principal(role), path)
            assert decision.reason is DenyReason.METHOD_NOT_ALLOWED, (role, path)


def test_every_method_has_a_row_in_the_method_table() -> None:
    assert set(METHODS) == set(Method)
    mutating = {m.value for m, info in METHODS.items() if info.mutating}
    assert mutating == {"StartInstance", "StopInstance", "AttachVolume", "DetachVolume", "AssignVirtualFunction",
                        "ReleaseVirtualFunction"}


def test_method_paths_round_trip() -> None:
    for method in Method:
        assert method.path == f"/passivisor.v1.HostController/{method.value}"
        assert Method.from_path(method.path) is method
    assert Method.from_path("/passivisor.v1.HostController/Nope") is None


def test_limit_bounds_are_the_wire_bounds() -> None:
    from hostagent.wire import messages

    assert p.VCPUS_RANGE == (messages.MIN_VCPUS, messages.MAX_VCPUS)
    assert p.MEMORY_MIB_RANGE == (messages.MIN_MEMORY_MIB, messages.MAX_MEMORY_MIB)


# ---------------------------------------------------------------------------------------------------------
# Deny by default; the health check
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(Method), ids=lambda m: m.value)
def test_a_principal_missing_from_the_policy_is_denied_everything(default: Policy, method: Method) -> None:
    for who in ("spiffe://controlplane/intruder", "spiffe://other-domain/instance-manager",
                "spiffe://controlplane/instance-manager/x", "spiffe://controlplane/Instance-Manager"):
        decision = default.authorize(who, method, RequestFacts(IID, 1, 64))
        assert decision.reason is DenyReason.UNKNOWN_PRINCIPAL


def test_principals_match_exactly_without_normalisation(default: Policy) -> None:
    for near_miss in (IM + "/", IM.upper(), "SPIFFE://controlplane/instance-manager", IM + " ", " " + IM,
                      IM + "\n", "spiffe://controlplane//instance-manager", "spiffe://controlplane/./instance-manager"):
        assert default.authorize_method(near_miss, Method.START_INSTANCE).reason is DenyReason.UNKNOWN_PRINCIPAL


def test_an_empty_policy_denies_everything() -> None:
    empty = parse("version = 1\n")
    for method in Method:
        assert empty.authorize_method(IM, method).reason is DenyReason.UNKNOWN_PRINCIPAL


def test_the_health_check_is_granted_to_every_authenticated_principal(default: Policy) -> None:
    for who in [principal(role) for role in ROLES] + ["spiffe://controlplane/not-in-policy"]:
        assert default.authorize_method(who, HEALTH_CHECK).allowed
        assert default.authorize(who, HEALTH_CHECK, p.NO_FACTS).allowed
    assert parse("version = 1\n").authorize_method(IM, HEALTH_CHECK).allowed


def test_the_health_check_is_denied_to_a_malformed_principal(default: Policy) -> None:
    for who in ("", "instance-manager", "https://controlplane/x", "spiffe://controlplane"):
        assert default.authorize_method(who, HEALTH_CHECK).reason is DenyReason.UNKNOWN_PRINCIPAL


def test_the_health_check_cannot_be_listed_in_a_policy() -> None:
    for name in ("grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Check", "Check"):
        with pytest.raises(PolicyError) as info:
            parse(entry(methods=f'["{name}"]'))
        assert info.value.key.endswith(".methods")
        assert "health check" in info.value.problem


def test_require_raises_with_the_decision(default: Policy) -> None:
    default.require(IM, Method.DESCRIBE_INSTANCE, RequestFacts(IID))
    with pytest.raises(PermissionDenied) as info:
        default.require(IM, Method.READ_AUDIT_LOG, p.NO_FACTS)
    assert info.value.decision.reason is DenyReason.METHOD_NOT_ALLOWED


def test_a_decision_is_consistent_by_construction() -> None:
    with pytest.raises(ValueError):
        Decision(allowed=True, reason=DenyReason.UNKNOWN_PRINCIPAL)
    with pytest.raises(ValueError):
        Decision(allowed=False)
    with pytest.raises(ValueError):
        Decision(allowed=False, reason=DenyReason.LIMIT_EXCEEDED)
    with pytest.raises(ValueError):
        Decision(allowed=False, reason=DenyReason.METHOD_NOT_ALLOWED, limit=Limit.MAX_VCPUS)


@given(who=st.text(max_size=80), method=st.text(max_size=80))
def test_authorize_is_total_and_denies_what_it_does_not_know(who: str, method: str) -> None:
    default = load_default()
    for decision in (default.authorize_method(who, method), default.authorize(who, method, p.NO_FACTS)):
        assert isinstance(decision, Decision)
        if method != HEALTH_CHECK:
            assert not decision.allowed


# ---------------------------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------------------------

LIMITED = parse(entry(
    methods='["StartInstance", "StopInstance", "DescribeInstance", "ListInstances"]',
    extra='max_vcpus = 4\nmax_memory_mib = 1024\ninstance_id_prefixes = ["6f1c", "0a2b3c4d-5e"]'))


@pytest.mark.parametrize(("facts", "limit"), [
    (RequestFacts(IID, 4, 1024), None),
    (RequestFacts(OTHER_IID, 1, 64), None),
    (RequestFacts(IID, 5, 1024), Limit.MAX_VCPUS),
    (RequestFacts(IID, 4, 1025), Limit.MAX_MEMORY_MIB),
    (RequestFacts(uuid.UUID("6f1d2a4e-0b7d-4c1e-9a53-2f0d8e6b1c77"), 1, 64), Limit.INSTANCE_ID_PREFIXES),
    (RequestFacts(uuid.UUID("0a2b3c4d-5f6f-4a1b-8c2d-3e4f5a6b7c8d"), 1, 64), Limit.INSTANCE_ID_PREFIXES),
    # Limits fail closed: a request that does not carry the fact a limit needs is denied.
    (RequestFacts(IID, None, 64), Limit.MAX_VCPUS),
    (RequestFacts(IID, 1, None), Limit.MAX_MEMORY_MIB),
    (RequestFacts(None, 1, 64), Limit.INSTANCE_ID_PREFIXES),
])
def test_start_instance_limits(facts: RequestFacts, limit: Limit | None) -> None:
    decision = LIMITED.authorize(IM, Method.START_INSTANCE, facts)
    if limit is None:
        assert decision == p.ALLOW
    else:
        assert (decision.allowed, decision.reason, decision.limit) == (False, DenyReason.LIMIT_EXCEEDED, limit)


def test_limits_apply_only_to_the_facts_a_method_carries() -> None:
    # StopInstance carries an instance id but no vCPUs: the vCPU and memory limits do not apply to it.
    assert LIMITED.authorize(IM, Method.STOP_INSTANCE, RequestFacts(IID)).allowed
    assert LIMITED.authorize(IM, Method.STOP_INSTANCE, RequestFacts(IID, vcpus=99)).allowed
    out_of_scope = uuid.UUID("ffffffff-0b7d-4c1e-9a53-2f0d8e6b1c77")
    for method in (Method.STOP_INSTANCE, Method.DESCRIBE_INSTANCE):
        assert LIMITED.authorize(IM, method, RequestFacts(out_of_scope)).limit is Limit.INSTANCE_ID_PREFIXES
    assert LIMITED.authorize(IM, Method.LIST_INSTANCES, p.NO_FACTS).allowed


def test_authorize_method_does_not_check_limits_but_authorize_does() -> None:
    too_big = RequestFacts(IID, 100, 1024)
    assert LIMITED.authorize_method(IM, Method.START_INSTANCE).allowed
    assert not LIMITED.authorize(IM, Method.START_INSTANCE, too_big).allowed
    # authorize repeats the method check: it alone is sufficient.
    assert LIMITED.authorize(IM, Method.GET_METRICS, p.NO_FACTS).reason is DenyReason.METHOD_NOT_ALLOWED


def test_list_instances_is_filtered_by_the_prefixes() -> None:
    assert LIMITED.instance_in_scope(IM, IID)
    assert LIMITED.instance_in_scope(IM, OTHER_IID)
    assert not LIMITED.instance_in_scope(IM, uuid.UUID("ffffffff-0b7d-4c1e-9a53-2f0d8e6b1c77"))
    assert not LIMITED.instance_in_scope("spiffe://controlplane/unknown", IID)
    assert load_default().instance_in_scope(IM, uuid.uuid4())


@given(vcpus=st.integers(1, 128), memory=st.integers(64, 1 << 20), instance=st.uuids(),
       max_vcpus=st.integers(1, 128), max_memory=st.integers(64, 1 << 20),
       prefixes=st.lists(st.uuids().map(str).flatmap(lambda s: st.integers(1, 36).map(lambda n: s[:n])),
                         min_size=1, max_size=4, unique=True))
def test_limits_match_a_reference_model(vcpus: int, memory: int, instance: uuid.UUID, max_vcpus: int,
                                        max_memory: int, prefixes: list[str]) -> None:
    quoted = ", ".join(f'"{x}"' for x in prefixes)
    policy = parse(entry(extra=f"max_vcpus = {max_vcpus}\nmax_memory_mib = {max_memory}\n"
                               f"instance_id_prefixes = [{quoted}]"))
    decision = policy.authorize(IM, Method.START_INSTANCE, RequestFacts(instance, vcpus, memory))
    in_scope = any(str(instance).startswith(x) for x in prefixes)
    assert decision.allowed == (vcpus <= max_vcpus and memory <= max_memory and in_scope)


# ---------------------------------------------------------------------------------------------------------
# A random policy decides exactly what its entries say (reference model)
# ---------------------------------------------------------------------------------------------------------

segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789._-", min_size=1, max_size=8).filter(
    lambda s: s not in (".", ".."))
principals = st.builds(lambda d, ss: f"spiffe://{d}/" + "/".join(ss),
                       st.text(alphabet="abc0123456789.-_", min_size=1, max_size=8), st.lists(segment, min_size=1,
                                                                                              max_size=3))


@given(grants=st.dictionaries(principals, st.sets(st.sampled_from(list(Method)), min_size=1), max_size=5),
       probes=st.lists(st.tuples(principals, st.sampled_from(list(Method))), max_size=10))
def test_a_random_policy_grants_exactly_its_entries(grants: dict[str, set[Method]],
                                                    probes: list[tuple[str, Method]]) -> None:
    text = "version = 1\n" + "".join(
        f'[[principal]]\nuri = "{who}"\nmethods = [{", ".join(repr(m.value) for m in sorted(ms, key=str))}]\n'
        f'reason = "r"\n' for who, ms in grants.items())
    policy = parse(text)
    for who, method in [(w, m) for w in grants for m in Method] + probes:
        decision = policy.authorize_method(who, method)
        assert decision.allowed == (method in grants.get(who, set()))
        if who not in grants:
            assert decision.reason is DenyReason.UNKNOWN_PRINCIPAL


@given(principals)
def test_generated_spiffe_ids_are_principals(who: str) -> None:
    assert is_principal(who)


# ---------------------------------------------------------------------------------------------------------
# Strict parsing: every mistake is a PolicyError naming the key
# ---------------------------------------------------------------------------------------------------------

BAD = [
    ("not toml [", "<document>"),
    ('version = 1\nextra = 1\n', "extra"),
    ('version = 2\n', "version"),
    ('version = "1"\n', "version"),
    ('[[principal]]\nuri = "spiffe://a/b"\nmethods = ["GetMetrics"]\nreason = "r"\n', "version"),
    ('version = 1\nprincipal = "x"\n', "principal"),
    ('version = 1\n[principal]\nuri = "spiffe://a/b"\n', "principal"),
    (entry(extra="colour = 1"), "principal[0].colour"),
    (entry(extra="max_cpus = 4"), "principal[0].max_cpus"),
    ('version = 1\n[[principal]]\nmethods = ["GetMetrics"]\nreason = "r"\n', "principal[0].uri"),
    ('version = 1\n[[principal]]\nuri = "spiffe://a/b"\nreason = "r"\n', "principal[0].methods"),
    ('version = 1\n[[principal]]\nuri = "spiffe://a/b"\nmethods = ["GetMetrics"]\n', "principal[0].reason"),
    (entry(methods='["StartInstance", "RebootInstance"]'), ".methods"),
    (entry(methods='["startinstance"]'), ".methods"),
    (entry(methods='["/passivisor.v1.HostController/StartInstance"]'), ".methods"),
    (entry(methods='["StartInstance", "StartInstance"]'), ".methods"),
    (entry(methods="[]"), ".methods"),
    (entry(methods='"StartInstance"'), ".methods"),
    (entry(methods="[1]"), ".methods"),
    ('version = 1\n[[principal]]\nuri = "spiffe://a/b"\nmethods = ["GetMetrics"]\nreason = "  "\n', ".reason"),
    (entry(extra="max_vcpus = 0"), ".max_vcpus"),
    (entry(extra="max_vcpus = 129"), ".max_vcpus"),
    (entry(extra="max_vcpus = 4.0"), ".max_vcpus"),
    (entry(extra="max_vcpus = true"), ".max_vcpus"),
    (entry(extra="max_memory_mib = 63"), ".max_memory_mib"),
    (entry(extra='max_memory_mib = "1G"'), ".max_memory_mib"),
    (entry(extra="instance_id_prefixes = []"), ".instance_id_prefixes"),
    (entry(extra='instance_id_prefixes = ["6F1C"]'), ".instance_id_prefixes"),
    (entry(extra='instance_id_prefixes = ["6f1c2a4e0"]'), ".instance_id_prefixes"),  # hyphen missing
    (entry(extra='instance_id_prefixes = ["-"]'), ".instance_id_prefixes"),
    (entry(extra='instance_id_prefixes = [""]'), ".instance_id_prefixes"),
    (entry(extra='instance_id_prefixes = ["g"]'), ".instance_id_prefixes"),
    (entry(extra='instance_id_prefixes = ["6f1c2a4e-0b7d-4c1e-9a53-2f0d8e6b1c770"]'), ".instance_id_prefixes"),
    (entry(extra='instance_id_prefixes = ["6f", "6f"]'), ".instance_id_prefixes"),
    (entry(extra="instance_id_prefixes = 6"), ".instance_id_prefixes"),
    # A limit no granted method can trigger is a mistake, not a control.
    (entry(methods='["StopInstance"]', extra="max_vcpus = 4"), ".max_vcpus"),
    (entry(methods='["GetMetrics"]', extra="max_memory_mib = 128"), ".max_memory_mib"),
    (entry(methods='["GetMetrics", "ReadAuditLog"]', extra='instance_id_prefixes = ["6f"]'), ".instance_id_prefixes"),
]

MALFORMED_PRINCIPALS = [
    "", "instance-manager", "spiffe://controlplane", "spiffe://controlplane/", "spiffe://controlplane/a/",
    "spiffe:///a", "spiffe://Controlplane/a", "SPIFFE://controlplane/a", "https://controlplane/a",
    "spiffe://controlplane/a b", "spiffe://controlplane/a?x=1", "spiffe://controlplane/a#f",
    "spiffe://controlplane:443/a", "spiffe://user@controlplane/a", "spiffe://controlplane//a",
    "spiffe://controlplane/./a", "spiffe://controlplane/a/..", "spiffe://controlplane/%41",
    "spiffe://controlplane/é", "spiffe://" + "a" * 256 + "/x", "spiffe://a/" + "x" * 2048,
]


@pytest.mark.parametrize(("text", "key"), BAD)
def test_invalid_policies_are_refused_naming_the_key(text: str, key: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse(text)
    assert key in info.value.key
    assert str(info.value).startswith(info.value.key)


@pytest.mark.parametrize("uri", MALFORMED_PRINCIPALS)
def test_malformed_principals_are_refused(uri: str) -> None:
    assert not is_principal(uri)
    with pytest.raises(PolicyError) as info:
        parse(entry(uri=uri))
    assert info.value.key == "principal[0].uri"


def test_a_duplicate_principal_is_refused_naming_both_entries() -> None:
    text = entry() + f'[[principal]]\nuri = "{IM}"\nmethods = ["GetMetrics"]\nreason = "r"\n'
    with pytest.raises(PolicyError) as info:
        parse(text)
    assert info.value.key == "principal[1].uri"
    assert "principal[0]" in info.value.problem and IM in info.value.problem


def test_the_largest_valid_values_are_accepted() -> None:
    policy = parse(entry(extra='max_vcpus = 128\nmax_memory_mib = 1048576\n'
                               'instance_id_prefixes = ["6f1c2a4e-0b7d-4c1e-9a53-2f0d8e6b1c77", "6", "6f1c2a4e-"]'))
    grant = policy.grant(IM)
    assert grant is not None
    assert (grant.max_vcpus, grant.max_memory_mib) == (128, 1 << 20)
    assert policy.authorize(IM, Method.START_INSTANCE, RequestFacts(IID, 128, 1 << 20)).allowed


def test_too_many_principals_are_refused() -> None:
    text = "version = 1\n" + "".join(f'[[principal]]\nuri = "spiffe://a/{i}"\nmethods = ["GetMetrics"]\n'
                                     'reason = "r"\n' for i in range(p.MAX_PRINCIPALS + 1))
    with pytest.raises(PolicyError) as info:
        parse(text)
    assert info.value.key == "principal"


def test_load_refuses_unreadable_oversized_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load(tmp_path / "missing.toml")
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (p.MAX_POLICY_BYTES + 1))
    with pytest.raises(PolicyError, match="larger than"):
        load(big)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"version = 1\n# \xe9\n")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load(latin)


@given(st.text(max_size=300))
def test_parsing_is_total(text: str) -> None:
    try:
        parse(text)
    except PolicyError:
        pass


def test_facts_have_the_documented_names() -> None:
    assert {f.value for f in Fact} == {"instance_id", "vcpus", "memory_mib"}
    assert {limit.value for limit in Limit} == {"max_vcpus", "max_memory_mib", "instance_id_prefixes"}
