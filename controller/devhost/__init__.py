"""Development-host tooling: things a developer machine or CI needs, never the production path.

`controller.devhost.guest` builds the tiny guest (Debian cloud kernel + busybox initramfs) that the
end-to-end tests boot under QEMU.
"""
