"""The hash-chained, checkpointed audit log of every call (claims C3, C5, C7, C16).

- ``chain``: the pure core: records, redaction, canonical encoding, hashing, verification.
- ``checkpoint``: the audit signing key (Ed25519) and when to sign the chain head.
- ``log``: the append-only file adapter (fsync, group commit, ``audit.head``).

No gRPC here; the service maps these types to ``AuditRecord`` messages.
"""

from .chain import (
    CONTROLLER_PRINCIPAL,
    NO_PRINCIPAL,
    AuditError,
    CallRecord,
    ChainBroken,
    ChainBuilder,
    CheckpointRecord,
    Decision,
    Kind,
    Outcome,
    Record,
    RecordError,
    Verifier,
    VerifyReport,
    audit_method,
    audit_principal,
    decode,
    redact,
    verify,
    verify_lines,
)
from .checkpoint import CheckpointPolicy, CheckpointSigner, SigningKeyError
from .log import AuditLog, AuditLogError, LogStats, OpenReport, quarantine, verify_directory

__all__ = [
    "CONTROLLER_PRINCIPAL",
    "NO_PRINCIPAL",
    "AuditError",
    "AuditLog",
    "AuditLogError",
    "CallRecord",
    "ChainBroken",
    "ChainBuilder",
    "CheckpointPolicy",
    "CheckpointRecord",
    "CheckpointSigner",
    "Decision",
    "Kind",
    "LogStats",
    "OpenReport",
    "Outcome",
    "Record",
    "RecordError",
    "SigningKeyError",
    "Verifier",
    "VerifyReport",
    "audit_method",
    "audit_principal",
    "decode",
    "quarantine",
    "redact",
    "verify",
    "verify_directory",
    "verify_lines",
]
