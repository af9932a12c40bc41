package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/wire"
	"golang.org/x/sys/unix"
)

// hooks are the probe's tracepoints, in the order bpf.Load attaches them.
var hooks = []string{
	"inet_sock_set_state", "tcp_receive_reset", "tcp_send_reset",
	"inet_sk_error_report", "tcp_retransmit_skb", "tcp_destroy_sock",
}

// Capability numbers (linux/capability.h).
const (
	capNetAdmin = 12
	capSysAdmin = 21
	capPerfmon  = 38
	capBPF      = 39
)

// check is one line of the doctor's report.
type check struct {
	name   string
	ok     bool
	warn   bool // a failure that degrades hangup but does not stop it
	detail string
	fix    string
}

// doctor checks what the agent needs and prints a fix for each failure. It
// returns errFailed (exit status 1) when something required is missing.
func doctor(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("hangup doctor", flag.ContinueOnError)
	fs.SetOutput(stderr)
	sock := fs.String("socket.path", wire.DefaultSocketPath, "the agent's socket")
	noAgent := fs.Bool("no-agent", false, "do not require a running agent")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var checks []check
	checks = append(checks, checkKernel())
	checks = append(checks, checkBTF())
	checks = append(checks, checkCaps()...)
	checks = append(checks, checkProbe()...)
	agent := checkAgent(ctx, *sock)
	if *noAgent && !agent.ok {
		agent.warn = true
	}
	checks = append(checks, agent)

	failed := false
	for _, c := range checks {
		mark := "ok  "
		switch {
		case !c.ok && c.warn:
			mark = "warn"
		case !c.ok:
			mark = "FAIL"
			failed = true
		}
		fmt.Fprintf(stdout, "[%s] %s: %s\n", mark, c.name, c.detail)
		if !c.ok && c.fix != "" {
			fmt.Fprintf(stdout, "       fix: %s\n", c.fix)
		}
	}
	if failed {
		fmt.Fprintln(stdout, "\nhangup cannot run on this host as it is: see the fixes above.")
		return errFailed
	}
	return nil
}

// checkKernel reports the release and whether its BTF offers every
// tracepoint the probe needs, with a signature it has a program for. The
// probe check below then loads it, which also tries the BPF helpers.
func checkKernel() check {
	c := check{name: "kernel"}
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		c.detail = err.Error()
		return c
	}
	c.detail = "Linux " + unix.ByteSliceToString(u.Release[:])
	if err := bpf.CheckKernel(); err != nil {
		c.detail += ": " + err.Error()
		c.fix = fixFor(err)
		return c
	}
	c.ok = true
	c.detail += ": every tracepoint the probe needs is present"
	return c
}

func checkBTF() check {
	c := check{name: "kernel BTF"}
	fi, err := os.Stat("/sys/kernel/btf/vmlinux")
	if err != nil {
		c.detail = "/sys/kernel/btf/vmlinux: " + err.Error()
		c.fix = "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (most distribution kernels are); check that sysfs is mounted"
		return c
	}
	c.ok = true
	c.detail = fmt.Sprintf("/sys/kernel/btf/vmlinux (%d KiB)", fi.Size()/1024)
	return c
}

// effectiveCaps reads CapEff from /proc/self/status.
func effectiveCaps() (uint64, error) {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "CapEff:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	return 0, errors.New("no CapEff line in /proc/self/status")
}

func checkCaps() []check {
	caps, err := effectiveCaps()
	if err != nil {
		return []check{{name: "capabilities", detail: err.Error()}}
	}
	has := func(c int) bool { return caps&(1<<c) != 0 }
	load := check{name: "bpf() permission", ok: (has(capBPF) && has(capPerfmon)) || has(capSysAdmin)}
	if load.ok {
		load.detail = "CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) are effective"
	} else {
		load.detail = fmt.Sprintf("missing CAP_BPF/CAP_PERFMON (CapEff=%016x)", caps)
		load.fix = "run as root, or grant the capabilities: systemd AmbientCapabilities=CAP_BPF CAP_PERFMON (see deploy/systemd/hangupd.service), or setcap cap_bpf,cap_perfmon+ep on the binary"
	}
	seed := check{name: "seeding in other network namespaces", warn: true, ok: has(capNetAdmin) && has(capSysAdmin)}
	if seed.ok {
		seed.detail = "CAP_NET_ADMIN and CAP_SYS_ADMIN are effective"
	} else {
		seed.detail = "without CAP_NET_ADMIN and CAP_SYS_ADMIN, connections that a containerized server accepted before the agent started are not tracked"
		seed.fix = "add CAP_NET_ADMIN CAP_SYS_ADMIN to the agent's capabilities if servers run in their own network namespaces"
	}
	return []check{load, seed}
}

// checkProbe loads and attaches the probe, reporting each hook.
func checkProbe() []check {
	p, err := bpf.Load(bpf.Options{RingBufferSize: 4096, MaxConnections: 16})
	if err == nil {
		p.Close()
		out := make([]check, 0, len(hooks))
		for _, h := range hooks {
			out = append(out, check{name: "hook tp_btf/" + h, ok: true, detail: "loads and attaches"})
		}
		return out
	}
	fix := fixFor(err)
	var he *bpf.HookError
	if !errors.As(err, &he) {
		return []check{{name: "probe", detail: err.Error(), fix: fix}}
	}
	var out []check
	failedAt := -1
	for i, h := range hooks {
		switch {
		case h == he.Hook:
			failedAt = i
			out = append(out, check{name: "hook tp_btf/" + h, detail: fmt.Sprintf("%s failed: %v", he.Op, he.Err), fix: fix})
		case failedAt < 0:
			out = append(out, check{name: "hook tp_btf/" + h, ok: true, detail: "loads and attaches"})
		default:
			out = append(out, check{name: "hook tp_btf/" + h, warn: true, detail: "not tried (an earlier hook failed)"})
		}
	}
	if failedAt < 0 {
		out = append(out, check{name: "hook tp_btf/" + he.Hook, detail: fmt.Sprintf("%s failed: %v", he.Op, he.Err), fix: fix})
	}
	return out
}

func fixFor(err error) string {
	var ve *bpf.VerifierError
	switch {
	case errors.Is(err, bpf.ErrNotSupported):
		// Checked before verifier errors: a helper the kernel lacks is
		// reported by the verifier, and wrapped as not supported.
		return "the kernel lacks what the error names: hangup needs Linux 6.1 or newer built with CONFIG_DEBUG_INFO_BTF=y and CONFIG_BPF_SYSCALL=y"
	case errors.As(err, &ve):
		return "the kernel's verifier rejected the program: report it with the output of `hangupd --log.level=debug` and `uname -a`"
	case errors.Is(err, bpf.ErrPermission):
		return "run as root or grant CAP_BPF and CAP_PERFMON; with lockdown=confidentiality, tracing programs cannot read kernel memory at all"
	}
	return "see the error; `hangupd --log.level=debug` shows more"
}

func checkAgent(ctx context.Context, path string) check {
	c := check{name: "agent socket"}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	cl, err := wire.Dial(ctx, path, wire.ClientConfig{Name: "hangup-doctor"})
	if err != nil {
		c.detail = err.Error()
		switch {
		case errors.Is(err, os.ErrNotExist), errors.Is(err, unix.ECONNREFUSED):
			c.fix = "start the agent (systemctl start hangupd), or pass --socket.path where it listens"
		case errors.Is(err, os.ErrPermission):
			c.fix = "add this user to the socket's group (hangupd --socket.group) or run as root"
		default:
			c.fix = "check that hangupd is running and healthy (journalctl -u hangupd)"
		}
		return c
	}
	defer cl.Close()
	w := cl.Welcome()
	c.ok = true
	c.detail = fmt.Sprintf("%s answers (agent pid %d, protocol version %d)", path, w.AgentPID, cl.Version())
	return c
}
