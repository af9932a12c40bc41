package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hangup-io/hangup/internal/testnet"
	"github.com/hangup-io/hangup/internal/wire"
)

// init wires the main goroutine to the main thread, so that no goroutine
// of testnet's Host.Do runs there: a locked goroutine that ends on the
// main thread leaves it in the namespace it entered (the runtime cannot end
// the main thread), and /proc/PID/ns/net, which the agent's start-up scan
// reads, would show that namespace.
func init() { runtime.LockOSThread() }

func TestParseCaps(t *testing.T) {
	s, err := parseCaps("net_admin, CAP_SYS_ADMIN,,bpf")
	if err != nil {
		t.Fatal(err)
	}
	if want := capOf(unix.CAP_NET_ADMIN) | capOf(unix.CAP_SYS_ADMIN) | capOf(unix.CAP_BPF); s != want {
		t.Errorf("parsed %s, want %s", s, want)
	}
	if got := s.String(); got != "CAP_NET_ADMIN,CAP_SYS_ADMIN,CAP_BPF" {
		t.Errorf("String: %q", got)
	}
	if capSet(0).String() != "none" {
		t.Errorf("empty set: %q", capSet(0).String())
	}
	for _, bad := range []string{"CAP_NOPE", "sys admin", "CAP_"} {
		if _, err := parseCaps(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	for _, args := range [][]string{{"--caps.drop=some"}, {"--caps.keep=CAP_FLY"}} {
		if _, err := parseFlags(args, os.Stderr); err == nil {
			t.Errorf("%v accepted", args)
		}
	}
	st := "Name:\thangupd\nCapInh:\t0000000000000000\nCapEff:\t0000000000201000\n"
	if got, err := parseStatusCaps(st, "CapEff"); err != nil || got != capOf(unix.CAP_NET_ADMIN)|capOf(unix.CAP_SYS_ADMIN) {
		t.Errorf("CapEff: %s, %v", got, err)
	}
	if _, err := parseStatusCaps(st, "CapBnd"); err == nil {
		t.Error("a missing line gave no error")
	}
	if _, err := parseStatusCaps("CapEff:\tzz\n", "CapEff"); err == nil {
		t.Error("a bad number gave no error")
	}
}

// taskCaps reads field ("CapEff") of every thread of process pid, and
// fails unless all threads agree.
func taskCaps(t *testing.T, pid int, field string) capSet {
	t.Helper()
	dir := "/proc/" + strconv.Itoa(pid) + "/task"
	tasks, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var first capSet
	for i, task := range tasks {
		b, err := os.ReadFile(dir + "/" + task.Name() + "/status")
		if err != nil {
			continue // the thread ended
		}
		c, err := parseStatusCaps(string(b), field)
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			first = c
		} else if c != first {
			t.Errorf("thread %s: %s %s, thread %s: %s", task.Name(), field, c, tasks[0].Name(), first)
		}
	}
	return first
}

func statusCaps(t *testing.T, pid int, field string) capSet {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	c, err := parseStatusCaps(string(b), field)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestCapsDropped runs hangupd as root with the default --caps.drop=auto:
// once started, every thread holds only CAP_NET_ADMIN and CAP_SYS_ADMIN
// (effective, permitted and bounding), no_new_privs is set, and with them
// it still seeds, after the drop, the older connections of a listener in a
// network namespace that it could not see at start, streams their events
// and serves metrics.
func TestCapsDropped(t *testing.T) {
	testnet.RequireRoot(t)
	// A connection accepted before hangupd runs, in a namespace whose name
	// is gone before hangupd starts: only the registration's seeding (after
	// the drop) can find it.
	p := testnet.NewPair(t)
	ln, err := p.Server.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := p.Server.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	cookie, err := testnet.SocketCookie(server)
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("ip", "netns", "del", p.Server.NS).CombinedOutput(); err != nil {
		t.Fatalf("ip netns del: %v\n%s", err, out)
	}
	if l, _ := os.Readlink("/proc/self/ns/net"); l != "" {
		t.Logf("the test process is in %s", l)
	}

	d := startDaemon(t)
	pid := d.cmd.Process.Pid
	d.waitLog(t, `"msg":"capabilities dropped"`)
	want := capOf(unix.CAP_NET_ADMIN) | capOf(unix.CAP_SYS_ADMIN)
	if strings.Contains(d.logs.String(), "needs CAP_BPF on this kernel") {
		want |= capOf(unix.CAP_BPF) // kernels before 6.5 with unprivileged BPF disabled
	}
	for _, f := range []string{"CapEff", "CapPrm", "CapBnd"} {
		if got := taskCaps(t, pid, f); got != want {
			t.Errorf("%s %s, want %s", f, got, want)
		}
	}
	for _, f := range []string{"CapInh", "CapAmb"} {
		if got := taskCaps(t, pid, f); got != 0 {
			t.Errorf("%s %s, want none", f, got)
		}
	}
	if b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status"); !strings.Contains(string(b), "NoNewPrivs:\t1") {
		t.Error("no_new_privs not set")
	}
	if !strings.Contains(d.logs.String(), `"kept":"`+want.String()+`"`) {
		t.Errorf("the log does not say it kept %s", want)
	}

	events := make(chan wire.Event, 64)
	sub, err := wire.Dial(context.Background(), d.sock, wire.ClientConfig{Name: "capstest", OnEvent: func(e wire.Event) {
		if e.Cookie == cookie {
			events <- e
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := sub.Register(ctx, ln.(syscall.Conn)); err != nil {
		t.Fatalf("register: %v", err)
	}
	d.waitLog(t, `"msg":"seeded the listener's existing connections"`)
	if strings.Contains(d.logs.String(), `"msg":"seeding the listener's existing connections"`) {
		t.Errorf("seeding failed after the drop")
	}
	client.Close()
	select {
	case e := <-events:
		t.Logf("event of the seeded connection: %+v", e)
	case <-ctx.Done():
		t.Fatal("no event for the seeded connection")
	}
	if code, body := scrape(t, httpClient(), "http://"+d.addr+"/metrics", "", ""); code != 200 || !strings.Contains(body, "hangup_agent_seeded_connections_total") {
		t.Errorf("scrape after the drop: %d\n%s", code, body)
	}
	if err := d.stop(t); err != nil {
		t.Errorf("hangupd exit after SIGTERM: %v", err)
	}
}

// TestCapsOptions: --caps.drop=none keeps what hangupd was started with;
// --seed.disable leaves nothing to keep; --caps.keep adds to what is kept.
func TestCapsOptions(t *testing.T) {
	testnet.RequireRoot(t)
	mine := statusCaps(t, os.Getpid(), "CapEff")
	for _, tc := range []struct {
		args []string
		want capSet
	}{
		{[]string{"--caps.drop=none"}, mine},
		{[]string{"--seed.disable"}, 0},
		{[]string{"--seed.disable", "--caps.keep=sys_ptrace"}, capOf(unix.CAP_SYS_PTRACE) & mine},
	} {
		d := startDaemon(t, tc.args...)
		d.waitLog(t, `"component":"caps"`)
		if got := taskCaps(t, d.cmd.Process.Pid, "CapEff"); got != tc.want {
			t.Errorf("%v: CapEff %s, want %s", tc.args, got, tc.want)
		}
		if code, _ := scrape(t, httpClient(), "http://"+d.addr+"/metrics", "", ""); code != 200 {
			t.Errorf("%v: scrape status %d", tc.args, code)
		}
		if err := d.stop(t); err != nil {
			t.Errorf("%v: exit after SIGTERM: %v", tc.args, err)
		}
	}
}

// parseStatusCaps reads a capability line ("CapEff:") of /proc/PID/status.
func parseStatusCaps(status, field string) (capSet, error) {
	for _, line := range strings.Split(status, "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				return 0, fmt.Errorf("%s: %w", field, err)
			}
			return capSet(n), nil
		}
	}
	return 0, fmt.Errorf("no %s line", field)
}
