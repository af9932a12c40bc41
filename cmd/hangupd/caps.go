package main

import (
	"errors"
	"fmt"
	"log/slog"
	"math/bits"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// capNames are the kernel's capability names, by number (capability.h).
var capNames = [...]string{
	"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
	"CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
	"CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK",
	"CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE",
	"CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE",
	"CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
	"CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
	"CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
	"CAP_CHECKPOINT_RESTORE",
}

// capSet is a set of capabilities, bit n for capability n.
type capSet uint64

func capOf(n int) capSet { return 1 << uint(n) }

// Names lists the set's capabilities by name, lowest number first.
func (s capSet) Names() []string {
	names := []string{}
	for v := uint64(s); v != 0; v &= v - 1 {
		n := bits.TrailingZeros64(v)
		if n < len(capNames) {
			names = append(names, capNames[n])
		} else {
			names = append(names, "CAP_"+strconv.Itoa(n))
		}
	}
	return names
}

// String gives the names joined by commas, or "none".
func (s capSet) String() string {
	if s == 0 {
		return "none"
	}
	return strings.Join(s.Names(), ",")
}

// parseCaps reads a comma-separated list of capability names, with or
// without the CAP_ prefix, in any case.
func parseCaps(list string) (capSet, error) {
	var s capSet
	for _, f := range strings.Split(list, ",") {
		f = strings.ToUpper(strings.TrimSpace(f))
		if f == "" {
			continue
		}
		if !strings.HasPrefix(f, "CAP_") {
			f = "CAP_" + f
		}
		n := -1
		for i, name := range capNames {
			if name == f {
				n = i
			}
		}
		if n < 0 {
			return 0, fmt.Errorf("unknown capability %q", f)
		}
		s |= capOf(n)
	}
	return s, nil
}

// processCaps are the capability sets of the calling thread.
type processCaps struct {
	effective, permitted, inheritable, bounding capSet
}

func readCaps() (processCaps, error) {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return processCaps{}, fmt.Errorf("capget: %w", err)
	}
	join := func(lo, hi uint32) capSet { return capSet(uint64(hi)<<32 | uint64(lo)) }
	pc := processCaps{
		effective:   join(data[0].Effective, data[1].Effective),
		permitted:   join(data[0].Permitted, data[1].Permitted),
		inheritable: join(data[0].Inheritable, data[1].Inheritable),
	}
	for n := 0; n < 64; n++ {
		in, err := unix.PrctlRetInt(unix.PR_CAPBSET_READ, uintptr(n), 0, 0, 0)
		if err != nil {
			break // past the kernel's last capability
		}
		if in == 1 {
			pc.bounding |= capOf(n)
		}
	}
	return pc, nil
}

// errCgo is returned when the capabilities of every thread cannot be
// changed at once: the runtime supports that only without cgo.
var errCgo = errors.New("this hangupd links cgo, which keeps the capabilities of all threads from being changed (build it with CGO_ENABLED=0)")

// allThreads runs a system call on every thread of the process: the
// capability sets and no_new_privs belong to each thread, not the process.
func allThreads(trap, a1, a2, a3 uintptr) error {
	_, _, errno := syscall.AllThreadsSyscall(trap, a1, a2, a3)
	switch {
	case errno == syscall.ENOTSUP:
		return errCgo
	case errno != 0:
		return errno
	}
	return nil
}

// capsetAll sets the capability sets of every thread. The kernel lets a
// thread only lower its permitted set and raise its effective set within
// the permitted one.
func capsetAll(eff, prm, inh capSet) error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	data := [2]unix.CapUserData{
		{Effective: uint32(eff), Permitted: uint32(prm), Inheritable: uint32(inh)},
		{Effective: uint32(eff >> 32), Permitted: uint32(prm >> 32), Inheritable: uint32(inh >> 32)},
	}
	err := allThreads(unix.SYS_CAPSET, uintptr(unsafe.Pointer(&hdr)), uintptr(unsafe.Pointer(&data[0])), 0)
	runtime.KeepAlive(&hdr)
	runtime.KeepAlive(&data)
	if err != nil {
		return fmt.Errorf("capset: %w", err)
	}
	return nil
}

// capsNeeded are the capabilities hangupd uses after its start: a listener
// that a subscriber registers in another network namespace is opened with
// SIOCGSKNS (CAP_NET_ADMIN) and entered with setns (CAP_SYS_ADMIN) for the
// sock_diag dump of its older connections. Reading the probe's ring buffer
// and maps needs no capability on the descriptors it already holds, except
// on kernels before 6.5 with kernel.unprivileged_bpf_disabled set, where
// every bpf() call needs CAP_BPF: dropCaps finds that out by trying.
func capsNeeded(seed bool) capSet {
	if !seed {
		return 0
	}
	return capOf(unix.CAP_NET_ADMIN) | capOf(unix.CAP_SYS_ADMIN)
}

// dropCaps lowers the process to keep plus what check shows it still needs,
// and logs what it kept and dropped. check reads the probe's maps; when it
// fails with only keep effective, CAP_BPF is tried too. The bounding set
// is lowered first (with CAP_SETPCAP, while it is held), so that no exec
// could regain a dropped capability, and no_new_privs is set.
func dropCaps(log *slog.Logger, keep capSet, check func() error) error {
	before, err := readCaps()
	if err != nil {
		return err
	}
	keep &= before.permitted
	// A trial with only keep effective: the permitted set still holds the
	// rest, so a failure can be undone.
	if err := capsetAll(keep, before.permitted, before.inheritable); err != nil {
		return err
	}
	if check() != nil && before.permitted&capOf(unix.CAP_BPF) != 0 {
		log.Info("reading the probe's maps needs CAP_BPF on this kernel: keeping it", "component", "caps")
		keep |= capOf(unix.CAP_BPF)
	}
	if err := capsetAll(before.effective, before.permitted, before.inheritable); err != nil {
		return err
	}
	if before.effective&capOf(unix.CAP_SETPCAP) != 0 {
		for v := uint64(before.bounding &^ keep); v != 0; v &= v - 1 {
			if err := allThreads(unix.SYS_PRCTL, unix.PR_CAPBSET_DROP, uintptr(bits.TrailingZeros64(v)), 0); err != nil {
				return fmt.Errorf("dropping from the bounding set: %w", err)
			}
		}
	}
	if err := allThreads(unix.SYS_PRCTL, unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0); err != nil {
		return fmt.Errorf("clearing the ambient set: %w", err)
	}
	if err := allThreads(unix.SYS_PRCTL, unix.PR_SET_NO_NEW_PRIVS, 1, 0); err != nil {
		return fmt.Errorf("setting no_new_privs: %w", err)
	}
	if err := capsetAll(keep, keep, 0); err != nil {
		return err
	}
	after, err := readCaps()
	if err != nil {
		return err
	}
	if err := check(); err != nil {
		return fmt.Errorf("the probe's maps are unreadable with %s: %w", after.effective, err)
	}
	log.Info("capabilities dropped", "component", "caps", "kept", after.effective.String(),
		"dropped", (before.permitted &^ after.permitted).String(), "bounding", after.bounding.String())
	return nil
}
