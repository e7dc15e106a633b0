"""passivisor-controller: the gRPC controller (the "Nitro Controller" of DESIGN.md).

Start-up: read controller.toml, the channel secret, the TLS material and the
policy; open (and verify) the audit log, the idempotency store and the host
keys (created on first start, private files 0600); then listen on one TLS
port that requires client certificates.  There is no insecure port and no
reflection service.  The controller connects to the agent on the first call
and whenever the link must be re-established; it never connects anywhere
else (claim C1).  SIGTERM and SIGINT stop it gracefully.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import signal
import sys
import threading
from pathlib import Path

from hostagent.channel import ChannelError, load_secret
from hostagent.config import ConfigError

from . import identity
from . import policy as pol
from .app import AgentConnection
from .audit import CONTROLLER_PRINCIPAL, AuditError, AuditLog, CheckpointSigner, Decision, Outcome
from .config import ControllerConfig
from .config import load as load_config
from .encrypted_attach import EncryptedAttach
from .grpc_service import HostControllerHandler, HostKeys, Server, build_server
from .idempotency import IdempotencyStore, StoreError
from .ratelimit import BucketSpec, RateLimiter
from .telemetry import Telemetry
from .volumes import EncryptedVolumes, VolumeServerError, disable_core_dumps

log = logging.getLogger("passivisor.controller")
READY_MARK = "passivisor-controller: ready on "


class StartupError(Exception):
    """The controller cannot start; the message says what to fix."""


def build(config: ControllerConfig) -> tuple[Server, int, list[object]]:
    config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        # Every input is read before any state is opened, so a start refused for a bad input changes nothing.
        secret = load_secret(config.channel_secret_file)
        policy = pol.load(config.policy) if config.policy is not None else pol.load_default()
        ca, cert, key = config.ca.read_bytes(), config.certificate.read_bytes(), config.key.read_bytes()
        host = identity.load_or_create(config.state_dir / "host.x25519")
        signer = CheckpointSigner.for_host(host)  # the host identity's Ed25519 key signs the audit checkpoints
        (config.state_dir / "audit").mkdir(mode=0o700, exist_ok=True)
        audit = AuditLog(config.state_dir / "audit", signer)
        tokens = IdempotencyStore(config.state_dir)
        # Adopts the encryption servers a previous controller process left serving running guests.
        volumes = EncryptedVolumes(config.encrypted_volume_dir, config.state_dir, nbdkit=config.nbdkit,
                                   qemu_img=config.qemu_img)
    except (ChannelError, identity.KeyFileError, AuditError, StoreError, pol.PolicyError, VolumeServerError,
            OSError) as exc:
        raise StartupError(str(exc)) from None

    def alarm(detail: str) -> None:
        log.error("agent link anomaly: %s", detail)
        audit.append(CONTROLLER_PRINCIPAL, "AgentLinkAnomaly", {}, Decision.DENIED, Outcome.UNAVAILABLE)

    agent = AgentConnection(config.agent_socket, secret, on_anomaly=alarm)
    handler = HostControllerHandler(
        agent=agent, policy=policy,
        limiter=RateLimiter(principal=BucketSpec(config.principal_rate_per_s, config.principal_burst),
                            instance=BucketSpec(config.instance_rate_per_s, config.instance_burst)),
        tokens=tokens, audit=audit,
        keys=HostKeys(host.public_bytes, hashlib.sha256(host.public_bytes).digest(), signer.public_bytes()),
        telemetry=Telemetry(), encrypted=EncryptedAttach(host, volumes), default_timeout_s=config.call_timeout_s)
    server, port = build_server(handler, listen=config.listen, ca_pem=ca, cert_pem=cert, key_pem=key)
    return server, port, [agent, audit, tokens, volumes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="passivisor-controller", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="path to controller.toml")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"passivisor-controller: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # This process holds volume data keys (claim C8): no core file may ever contain one, and no other
    # process of the same user may read its memory.  The encryption processes it starts inherit the limit.
    disable_core_dumps()
    try:
        server, port, resources = build(config)
    except StartupError as exc:
        print(f"passivisor-controller: cannot start: {exc}", file=sys.stderr)
        return 1
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    server.start()
    host = config.listen.rpartition(":")[0]
    print(f"{READY_MARK}{host}:{port}", file=sys.stderr, flush=True)
    stopping.wait()
    server.stop(5).wait()
    for resource in resources:
        resource.close()  # type: ignore[attr-defined]
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
