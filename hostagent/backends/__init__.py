"""VMM backends behind :class:`hostagent.backend.VmBackend`.

- ``qemu`` (:class:`hostagent.backends.qemu.QemuBackend`): real QEMU processes driven over QMP.
- ``sim`` (:class:`hostagent.backends.sim.SimBackend`): for fast tests and hosts without QEMU.

Import each from its module.  Scrubbing (claim C12) is shared with the rest of
the agent in :mod:`hostagent.scrub`.
"""
