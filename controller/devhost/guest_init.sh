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
#   PASSIVISOR-DISK-MARKER <dev> <token>
#                                   marker mode: virtio disk <dev> appeared holding a marker sector
#   PASSIVISOR-DISK-WROTE <dev> <token>
#                                   marker mode: <dev> appeared without one; the guest wrote a marker
#                                   with a new <token> and read the sector back identical
#   PASSIVISOR-DISK-BENCH <dev> write <bytes> <cs> read <bytes> <cs>
#                                   bench mode: sequential direct I/O on <dev>; <cs> is the elapsed
#                                   time of each pass in centiseconds (/proc/uptime)
#   PASSIVISOR-POWEROFF             the ACPI power button was pressed; power-off follows at once
#   PASSIVISOR-ERROR <text>         a step failed; the guest carries on without it. A disk's failure
#                                   reads "PASSIVISOR-ERROR disk <dev> <reason>"
#
# Disks
#
# The mode is the first line of /etc/passivisor-guest-mode in the initramfs: "marker" when the file
# is absent, or "bench" (controller.devhost.guest.build_guest writes it). An unknown mode is an
# ERROR and leaves every disk untouched.
#
# Each appearance of a virtio disk /sys/block/vdX is handled once, in a background job, so that a
# slow or hung disk (an NBD server that stalls) never delays the 0.1 s loop and DISKS keeps its
# cadence. An appearance is the name plus /sys/block/vdX/diskseq, which the kernel never gives two
# disks during one boot: a disk that is detached and attached again is handled again, even if both
# happened between two passes. A disk whose /dev node does not exist yet is retried on the next pass.
#
# Marker mode. Sector 0 of a marked disk starts with "PASSIVISOR-MARKER <token>\n", <token> being
# [A-Za-z0-9-]{8,64}; what follows the newline does not matter. A disk without one gets
# "PASSIVISOR-MARKER <uuid>\n" padded with zero bytes to 512, the uuid from
# /proc/sys/kernel/random/uuid (seeded by virtio-rng). All disk I/O uses O_DIRECT (busybox dd
# iflag=direct, oflag=direct), so a write reaches the device and a read comes from it, never from the
# guest's page cache; the write ends with a cache flush (conv=fsync). WROTE is printed only after
# the sector read back matches the one written. A read-only disk fails the write: an ERROR line.
#
# Bench mode. Zeros are written over the first N MiB of each new disk (N from
# /etc/passivisor-bench-mib, default 1024, reduced to the whole MiB the disk has), destroying what was
# there, with bs=1M and O_DIRECT; then the same range is read back with O_DIRECT. No cache flush
# ends the write pass: it times the data path to the volume (QEMU, and the controller's encryption
# process if there is one), not the host's disk. Each pass is timed by /proc/uptime around its dd,
# so the time includes starting dd. Disks that appear together are measured at the same time.
#
# Invariants
# - This shell never exits: PID 1 exiting panics the kernel (the host boots it with panic=-1 and
#   -no-reboot, so QEMU then exits, which the agent reports as a crash rather than a stop).
# - READY is printed only after the power-button device is open, so a host that saw READY can rely
#   on a graceful ACPI power-down (QMP system_powerdown) being acted on.
# - The loop below does arithmetic only on numbers it has checked: an arithmetic error ends the
#   shell. Disk I/O happens only in background jobs, whose failures end the job, never PID 1.
#
# Modules are stored as /lib/modules/NN-name.ko; the two-digit prefix is the load order that
# controller.devhost.guest.MODULE_LOAD_ORDER fixes (virtio first, then evdev and button).

# BEGIN disk functions. tests/devhost/test_guest_build.py runs this block with the host's busybox
# (the same Debian busybox-static) against regular files, so it must stay free of side effects.
#
# Each job opens its disk once, read-only, as descriptor 3 and does all its I/O through
# /proc/self/fd/3, which reopens that same device. dd of=/dev/vdX would create a regular file in
# /dev if the disk had just been unplugged (dd opens its output with O_CREAT); that file would then
# report success for a disk that is gone and keep the next disk of that name from getting its node.

# disk_open PATH: hold PATH open as descriptor 3 of this shell.
disk_open() {
    { command exec 3<"$1"; } 2>/dev/null
}

# disk_read_sector FILE: copy sector 0 of the disk held as descriptor 3 to FILE, read with
# O_DIRECT; fails unless 512 bytes came.
disk_read_sector() {
    dd if=/proc/self/fd/3 of="$1" bs=512 count=1 iflag=direct 2>/dev/null || return 1
    [ "$(wc -c <"$1")" -eq 512 ]
}

# disk_marker_token FILE: print the token of the marker sector in FILE, or nothing. The longest
# marker line is 18 + 64 + 1 = 83 bytes; every byte that cannot occur in one becomes "?" first, so
# that a NUL cannot end the line early for sed and a line without its newline cannot match.
disk_marker_token() {
    head -c 83 "$1" | tr -c 'A-Za-z0-9 \n-' '?' | head -n 1 |
        sed -n 's/^PASSIVISOR-MARKER \([A-Za-z0-9-]\{8,64\}\)$/\1/p'
}

# disk_marker NAME PATH: the marker protocol for one appearance of disk NAME at PATH.
disk_marker() {
    local dir token
    if ! disk_open "$2"; then
        echo "PASSIVISOR-ERROR disk $1 cannot open $2"
        return
    fi
    if ! dir=$(mktemp -d -t pvdisk.XXXXXX); then
        echo "PASSIVISOR-ERROR disk $1 no scratch directory"
        return
    fi
    if ! disk_read_sector "$dir/found"; then
        echo "PASSIVISOR-ERROR disk $1 cannot read sector 0"
    elif token=$(disk_marker_token "$dir/found") && [ -n "$token" ]; then
        echo "PASSIVISOR-DISK-MARKER $1 $token"
    elif ! read -r token </proc/sys/kernel/random/uuid || [ -z "$token" ]; then
        echo "PASSIVISOR-ERROR disk $1 no token from /proc/sys/kernel/random/uuid"
    elif ! { printf 'PASSIVISOR-MARKER %s\n' "$token" >"$dir/wrote" && truncate -s 512 "$dir/wrote"; }; then
        echo "PASSIVISOR-ERROR disk $1 cannot make the marker sector"
    elif ! dd if="$dir/wrote" of=/proc/self/fd/3 bs=512 count=1 oflag=direct conv=notrunc,fsync 2>/dev/null; then
        echo "PASSIVISOR-ERROR disk $1 cannot write sector 0"
    elif ! disk_read_sector "$dir/read"; then
        echo "PASSIVISOR-ERROR disk $1 cannot read sector 0 back"
    elif ! cmp -s "$dir/wrote" "$dir/read"; then
        echo "PASSIVISOR-ERROR disk $1 sector 0 read back differs from what was written"
    else
        echo "PASSIVISOR-DISK-WROTE $1 $token"
    fi
    rm -rf "$dir"
}

# uptime_cs: set $now_cs to the time since boot in centiseconds ("123.45" in /proc/uptime; the
# leading 1 keeps a fraction such as "08" from being read as octal).
uptime_cs() {
    local up
    read -r up _ </proc/uptime
    now_cs=$((${up%.*} * 100 + 1${up#*.} - 100))
}

# disk_bench NAME PATH SIZE_BYTES MIB: the bench for one appearance of disk NAME at PATH.
disk_bench() {
    local mib=$4 dir t0 write_cs= read_cs=
    [ "$mib" -le $(($3 / 1048576)) ] || mib=$(($3 / 1048576))
    if [ "$mib" -lt 1 ]; then
        echo "PASSIVISOR-ERROR disk $1 is smaller than 1 MiB"
        return
    fi
    if ! disk_open "$2"; then
        echo "PASSIVISOR-ERROR disk $1 cannot open $2"
        return
    fi
    if ! dir=$(mktemp -d -t pvdisk.XXXXXX); then
        echo "PASSIVISOR-ERROR disk $1 no scratch directory"
        return
    fi
    uptime_cs
    t0=$now_cs
    if dd if=/dev/zero of=/proc/self/fd/3 bs=1M count="$mib" oflag=direct conv=notrunc 2>"$dir/write"; then
        uptime_cs
        write_cs=$((now_cs - t0))
        t0=$now_cs
        if dd if=/proc/self/fd/3 of=/dev/null bs=1M count="$mib" iflag=direct,fullblock 2>"$dir/read"; then
            uptime_cs
            read_cs=$((now_cs - t0))
        fi
    fi
    # dd's own count is the proof that every MiB went through, not just that dd exited 0.
    if [ -z "$read_cs" ] || ! grep -qx "$mib+0 records out" "$dir/write" ||
        ! grep -qx "$mib+0 records in" "$dir/read"; then
        echo "PASSIVISOR-ERROR disk $1 bench failed:" $(cat "$dir/write" "$dir/read" 2>/dev/null)
    else
        echo "PASSIVISOR-DISK-BENCH $1 write $((mib * 1048576)) $write_cs read $((mib * 1048576)) $read_cs"
    fi
    rm -rf "$dir"
}

# END disk functions

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

mode=marker
[ -e /etc/passivisor-guest-mode ] && read -r mode </etc/passivisor-guest-mode
case "$mode" in
    marker | bench) ;;
    *) echo "PASSIVISOR-ERROR unknown guest mode; disks are left alone" ;;
esac
bench_mib=1024
if [ "$mode" = bench ] && [ -e /etc/passivisor-bench-mib ]; then
    read -r mib </etc/passivisor-bench-mib
    case "$mib" in
        '' | 0* | *[!0-9]* | ??????*) echo "PASSIVISOR-ERROR bad /etc/passivisor-bench-mib; using $bench_mib" ;;
        *) bench_mib=$mib ;;
    esac
fi

last=unset
unchanged=0
handled=
while :; do
    disks=
    now=
    for b in /sys/block/*; do
        n=${b##*/}
        case "$n" in
            loop* | ram* | '*') ;;
            *) disks="$disks $n" ;;
        esac
        case "$n" in
            vd*) ;;
            *) continue ;;
        esac
        seq=
        read -r seq 2>/dev/null <"$b/diskseq"
        id=$n@$seq
        case "$handled " in
            *" $id "*) now="$now $id" ;;
            *)
                [ -b "/dev/$n" ] || continue
                now="$now $id"
                case "$mode" in
                    marker) disk_marker "$n" "/dev/$n" & ;;
                    bench)
                        # Checked before use: an arithmetic error would end this shell, PID 1.
                        sectors=
                        read -r sectors 2>/dev/null <"$b/size"
                        case "$sectors" in
                            '' | *[!0-9]* | ????????????????*) echo "PASSIVISOR-ERROR disk $n has no size" ;;
                            *) disk_bench "$n" "/dev/$n" $((sectors * 512)) "$bench_mib" & ;;
                        esac
                        ;;
                esac
                ;;
        esac
    done
    handled=$now
    if [ "$disks" != "$last" ] || [ "$unchanged" -ge 49 ]; then
        echo "PASSIVISOR-DISKS$disks"
        last=$disks
        unchanged=0
    else
        unchanged=$((unchanged + 1))
    fi
    # The pass repeats every 0.1 s (it was 1 s): a hot-plugged disk then shows up in DISKS about
    # 0.1 s after the guest's kernel registered it, instead of up to a second later, which made
    # the time from AttachVolume to a visible disk mostly this sleep (bench/start.py measures that
    # time: start.attach_to_visible). Each pass reads /sys/block and then sleeps here; measured
    # under TCG on this machine kind, the idle guest then uses about 7 % of one host core (2 % with
    # the 1 s loop). The unchanged count above is 49 for the same reason: an unchanged DISKS line
    # is still repeated every 50 passes, 5 s, as the header promises.
    usleep 100000
done
