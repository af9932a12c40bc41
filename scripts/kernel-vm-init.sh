#!/bin/sh
# /init of the test VMs that scripts/test-kernels.sh boots (busybox sh, PID 1).
# It prepares what the privileged tests need (proc, sys, bpf fs, the kernel
# modules they load, a loopback), runs each test binary listed in
# /tests/list, and writes their output between markers to the second serial
# port (/dev/ttyS1); the kernel's own console is ttyS0. Then it powers off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root TMPDIR=/tmp

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o mode=1777 tmp /tmp
mount -t tmpfs -o mode=0755 run /run
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null

out=/dev/ttyS1
stty -F "$out" raw -echo 2>/dev/null
say() { echo "$*" >"$out"; }

say "HANGUP-KERNEL $(uname -r)"
[ -e /sys/kernel/btf/vmlinux ] || say "HANGUP-ERROR /sys/kernel/btf/vmlinux is missing"

# Modules in load order, dependencies first (see modules.list).
while read -r mod; do
	[ -n "$mod" ] || continue
	insmod "/lib/modules/$mod" 2>"/tmp/insmod.err" ||
		say "HANGUP-ERROR insmod $mod: $(cat /tmp/insmod.err)"
done </modules.list
ip link set lo up

# Each line of /tests/list: package name, its directory (where the binary
# runs), then the test binary's flags.
. /tests/env
# Sysctls asked for by HANGUP_KERNEL_SYSCTLS (none by default: the tests
# run at the kernel's defaults).
for kv in $HANGUP_VM_SYSCTLS; do
	sysctl -w "$kv" >"$out" 2>&1 || say "HANGUP-ERROR sysctl $kv"
done
while read -r pkg dir flags; do
	[ -n "$pkg" ] || continue
	say "HANGUP-BEGIN $pkg"
	start=$(cut -d. -f1 /proc/uptime)
	# shellcheck disable=SC2086 # flags are words on purpose
	(cd "$dir" && "/tests/$pkg.test" $flags) >"$out" 2>&1
	rc=$?
	say "HANGUP-END $pkg rc=$rc seconds=$(($(cut -d. -f1 /proc/uptime) - start))"
done </tests/list
say "HANGUP-DONE"
sync
reboot -f
