#!/bin/sh
# /init of the passivisor development guest (busybox ash, PID 1 from the initramfs).
#
# Theory of operation
#
# The guest exists so that tests can watch, from inside, what the host agent did to it. It has no
# network, no login and reads nothing from its console: everything it knows it prints as single
# lines on the serial port /dev/ttyS0 (the tty adds CR before LF). The host-side reader is
# controller.devhost.guest.parse_console_line; keep the two in step.
#
#   PASSIVISOR-GUEST-READY          once: modules loaded and the ACPI power button armed
#   PASSIVISOR-RNG <name>...        once: /sys/class/misc/hw_random/rng_available, or "none" (claim C13)
#   PASSIVISOR-DISKS [<name>...]    block devices in /sys/block except loop* and ram*, sorted by the
#                                   shell glob; printed when the set changes and at least every 5 s
#   PASSIVISOR-POWEROFF             the ACPI power button was pressed; power-off follows at once
#   PASSIVISOR-ERROR <text>         a step failed; the guest carries on without it
#
# Invariants
# - This shell never exits: PID 1 exiting panics the kernel (the host boots it with panic=-1 and
#   -no-reboot, so QEMU then exits, which the agent reports as a crash rather than a stop).
# - READY is printed only after the power-button device is open, so a host that saw READY can rely
#   on a graceful ACPI power-down (QMP system_powerdown) being acted on.
#
# Modules are stored as /lib/modules/NN-name.ko; the two-digit prefix is the load order that
# controller.devhost.guest.MODULE_LOAD_ORDER fixes (virtio first, then evdev and button).

/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/bin

# The kernel opened /dev/console for us; pin the protocol to the first serial port whatever
# console= says, so the host always knows where to read.
if [ -c /dev/ttyS0 ]; then
    exec </dev/null >/dev/ttyS0 2>&1
fi

for m in /lib/modules/*.ko; do
    [ -e "$m" ] || continue
    insmod "$m" || echo "PASSIVISOR-ERROR insmod ${m##*/}"
done

# ACPI power button: the kernel's button driver turns the ACPI event into KEY_POWER on an input
# device named "Power Button", and evdev exposes it as /dev/input/eventN. Any event on that device
# means the button was pressed (it reports nothing else). Each device is opened here, before READY,
# so no press can be lost; a background reader powers the guest off on the first event.
fd=3
for e in /sys/class/input/event*; do
    [ -r "$e/device/name" ] || continue
    read -r name <"$e/device/name"
    [ "$name" = "Power Button" ] || continue
    [ "$fd" -le 9 ] || break
    if eval "exec $fd<\"/dev/input/${e##*/}\""; then
        (
            # struct input_event is 24 bytes on x86_64; evdev refuses shorter reads.
            if eval "dd bs=24 count=1 of=/dev/null <&$fd" 2>/dev/null; then
                echo "PASSIVISOR-POWEROFF"
                sync
                poweroff -f
            fi
            echo "PASSIVISOR-ERROR power button reader ${e##*/} failed"
        ) &
        fd=$((fd + 1))
    fi
done
[ "$fd" -gt 3 ] || echo "PASSIVISOR-ERROR no ACPI power button"

echo "PASSIVISOR-GUEST-READY"

# virtio-rng registers with hw_random while its driver probes; allow it up to 2 s to show up.
rng=
i=0
while [ "$i" -lt 20 ]; do
    read -r rng </sys/class/misc/hw_random/rng_available 2>/dev/null
    [ -n "$rng" ] && break
    usleep 100000
    i=$((i + 1))
done
echo "PASSIVISOR-RNG ${rng:-none}"

last=unset
unchanged=0
while :; do
    disks=
    for b in /sys/block/*; do
        n=${b##*/}
        case "$n" in
            loop* | ram* | '*') ;;
            *) disks="$disks $n" ;;
        esac
    done
    if [ "$disks" != "$last" ] || [ "$unchanged" -ge 4 ]; then
        echo "PASSIVISOR-DISKS$disks"
        last=$disks
        unchanged=0
    else
        unchanged=$((unchanged + 1))
    fi
    sleep 1
done
