"""The kill points: named places in the controller and the agent where a process can be made to SIGKILL itself.

A kill point is a production function (module and qualified name) and a side (``before`` it runs or
``after`` it returned).  ``faults/inject.py`` wraps that function in the process it starts, counts its
calls, and on the Nth call sends SIGKILL to its own process, so the crash happens at exactly that
instant and nowhere else.  No production file is changed; the wrapper is installed by the launcher
before ``controller.main`` or ``hostagent.main`` runs.

``only`` names a filter (``faults.inject.FILTERS``) that restricts which calls count, e.g. only the
agent-link sends of a command (not of a handshake), or only mutating agent requests.

Each point says, in ``state``, what is true at that instant: what is durable, what the other process
has done, and what the client has not yet seen.  That is what the invariants are checked against.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KillPoint:
    name: str
    role: str  # "controller" or "agent": the process that kills itself
    module: str
    qualname: str  # "Class.method" or "function" (patched as an attribute of ``module``)
    when: str  # "before" or "after"
    state: str
    only: str | None = None
    delay_s: float = 0.0  # how long the process lives on after the hit (other threads run meanwhile)


POINTS: tuple[KillPoint, ...] = (
    # --- the controller ---------------------------------------------------------------------------
    KillPoint("controller:token-begun", "controller", "controller.idempotency", "IdempotencyStore.begin", "after",
              "the client token is IN_PROGRESS (not fsynced); no audit intent; the agent has seen nothing"),
    KillPoint("controller:intent-durable", "controller", "controller.audit.log", "AuditLog.begin", "after",
              "the audit intent is durable; the agent has not been sent the command (for an encrypted "
              "attach: nbdkit not started yet)"),
    KillPoint("controller:command-sent", "controller", "controller.agentlink", "AgentLink._send", "after",
              "the command frame is in the agent's socket: the agent runs it, but nobody reads the answer; "
              "between the audit intent written and the agent's answer", only="command_frame"),
    KillPoint("controller:agent-answered", "controller", "controller.app", "AgentConnection.request", "after",
              "the agent answered a mutating command and journaled it; the audit outcome, the token and the "
              "client's answer are missing", only="mutating"),
    KillPoint("controller:outcome-durable", "controller", "controller.audit.log", "AuditLog.finish", "after",
              "the audit outcome is durable; the client token is still IN_PROGRESS; no answer sent"),
    KillPoint("controller:token-complete", "controller", "controller.idempotency", "IdempotencyStore.complete",
              "after", "everything is durable (agent journal, audit, token); the client never got the answer"),
    KillPoint("controller:nbdkit-started", "controller", "controller.volumes", "EncryptedVolumes._start", "after",
              "nbdkit runs with the key, not recorded in the state file, its client end still in the controller"),
    KillPoint("controller:nbdkit-recorded", "controller", "controller.volumes", "EncryptedVolumes._record", "after",
              "nbdkit is recorded in volume-attachments.json; the agent has not received the socket"),
    KillPoint("controller:nbdkit-releasing", "controller", "controller.volumes", "EncryptedVolumes.release",
              "before", "the agent has detached (or stopped) the volume; its nbdkit still runs and is recorded"),
    KillPoint("controller:nbdkit-released", "controller", "controller.volumes", "EncryptedVolumes.release", "after",
              "nbdkit ended and the record is gone; the audit outcome and the token are missing"),
    KillPoint("controller:volume-state-saved", "controller", "controller.volumes", "EncryptedVolumes._save", "after",
              "volume-attachments.json was just replaced (after a record was added or dropped)"),
    KillPoint("controller:read-record-unwritten", "controller", "controller.audit.log", "AuditLog._write_batch",
              "before", "the audit record of a DescribeInstance is about to be written (the process lives 0.3 s more, "
              "long enough to send an answer if one were sent before its record is durable)",
              only="describe_batch", delay_s=0.3),
    # --- the agent --------------------------------------------------------------------------------
    KillPoint("agent:command-received", "agent", "hostagent.service", "AgentService.handle", "before",
              "the agent decoded a command and has done nothing with it"),
    KillPoint("agent:image-prepared", "agent", "hostagent.images", "ImageStore.prepare", "after",
              "a start verified and copied the image into a new runtime directory; nothing journaled"),
    KillPoint("agent:journal-saving", "agent", "hostagent.journal", "Journal.save", "before",
              "the state in memory changed (and so, maybe, did the VMM or sysfs); the journal has the old state"),
    KillPoint("agent:journal-saved", "agent", "hostagent.journal", "Journal.save", "after",
              "the new state is durable in state.json; the answer is not sent"),
    KillPoint("agent:vm-launched", "agent", "hostagent.backends.sim", "SimBackend.launch", "after",
              "the VM process runs; the journal says STARTING with no VM record"),
    KillPoint("agent:vm-stopped", "agent", "hostagent.backends.sim", "SimBackend.stop", "after",
              "the VM process is gone; the journal says STOPPING"),
    KillPoint("agent:volume-plugged", "agent", "hostagent.backends.sim", "SimBackend.attach_volume", "after",
              "the VMM has the disk; the journal does not"),
    KillPoint("agent:volume-unplugged", "agent", "hostagent.backends.sim", "SimBackend.detach_volume", "after",
              "the VMM no longer has the disk; the journal still lists it"),
    KillPoint("agent:vf-bound", "agent", "hostagent.inventory.sriov", "SysfsVfBinder.bind_vfio", "after",
              "the VF is bound to vfio-pci in sysfs; the VMM does not have it; the journal does not list it"),
    KillPoint("agent:vf-plugged", "agent", "hostagent.backends.sim", "SimBackend.attach_vf", "after",
              "the VMM has the VF device; the journal does not list it"),
    KillPoint("agent:vf-unplugged", "agent", "hostagent.backends.sim", "SimBackend.detach_vf", "after",
              "the VMM no longer has the VF; it is still bound to vfio-pci; the journal still lists it"),
    KillPoint("agent:vf-unbound", "agent", "hostagent.inventory.sriov", "SysfsVfBinder.unbind_vfio", "after",
              "the VF is back on its host driver (or unbound); the journal still lists it"),
    KillPoint("agent:sysfs-written", "agent", "inventory.fakesysfs", "FakeKernel.write", "after",
              "one sysfs write of a bind or unbind took effect, the next ones did not"),
    KillPoint("agent:scrubbing", "agent", "hostagent.service", "scrub_tree", "before",
              "an instance is being finished or started: its runtime directory is about to be scrubbed"),
    KillPoint("agent:answered", "agent", "hostagent.service", "AgentService.handle", "after",
              "the command is done and journaled; the answer was not sent"),
)

BY_NAME = {point.name: point for point in POINTS}
assert len(BY_NAME) == len(POINTS), "kill point names are unique"
