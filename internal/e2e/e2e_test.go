package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/httpx"
	"github.com/hangup-io/hangup/internal/testnet"
	"github.com/hangup-io/hangup/internal/testutil"
	"github.com/hangup-io/hangup/internal/wire"
)

// The test binary doubles as the server: run with modeEnv=server, TestMain
// runs childServer instead of the tests.
const (
	modeEnv   = "HANGUP_E2E_CHILD"
	socketEnv = "HANGUP_E2E_SOCKET"
	portEnv   = "HANGUP_E2E_PORT"

	nobody     = 65534 // uid of nobody and gid of nogroup
	serverPort = 8080

	// Generous bounds for waits; nothing is asserted about speed.
	wait        = 60 * time.Second
	handlerWait = 30 * time.Second // a handler's own bound on waiting for its abort
	childLife   = 5 * time.Minute  // the child exits after this even if nobody tells it
)

func TestMain(m *testing.M) {
	if os.Getenv(modeEnv) == "server" {
		os.Exit(childServer())
	}
	os.Exit(m.Run())
}

// TestUnprivilegedServer: an httpx server running as nobody, with no
// capabilities, in its own network namespace, whose only detection source
// is the real agent (hangupd, a separate root process holding the kernel
// probe), gets its requests ABORTED with the right reason when the client
// resets, half-closes (both while most of the request body is unread,
// where net/http never notices) or vanishes behind a cut link (turned into
// a keepalive timeout by the server's 2s drop timeout).
//
// The server reports each request from a shutdown function as a line on
// its stdout. The agent's status confirms that the listener was
// registered by uid nobody from the server's namespace, and that the
// agent delivered the connection's events to it before the request was
// reported aborted.
func TestUnprivilegedServer(t *testing.T) {
	pair := testnet.NewPair(t)
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		testnet.SkipOrFail(t, "dropping privileges needs setpriv from util-linux: %v", err)
	}
	if _, err := exec.LookPath("nft"); err != nil {
		testnet.SkipOrFail(t, "cutting the link needs nft from nftables: %v", err)
	}
	nsCookie, err := pair.Server.NetNSCookie()
	if err != nil {
		t.Fatal(err)
	}

	sock := socketPath(t)
	startAgent(t, sock)
	status := statusClient(t, sock)
	srv := startServer(t, pair, setpriv, sock)
	srv.lines.wait(t, srv, "READY")

	// Connect only once the agent holds the listener, so that it covers
	// every connection from its start.
	var row wire.StatusListener
	deadline := time.Now().Add(wait)
	for {
		var ok bool
		if row, ok = serverRow(t, status, nsCookie); ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent never listed a listener of uid %d on port %d in %s", nobody, serverPort, pair.Server.NS)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("agent status: subscriber %d %q pid %d uid %d, listener %d at %s in netns %d",
		row.Subscriber, row.Name, row.PID, row.UID, row.Listener, row.Addr, row.NetNS)

	addr := net.JoinHostPort(testnet.ServerAddr4.String(), strconv.Itoa(serverPort))
	for _, sc := range []struct {
		how  string
		want httpx.Reason
	}{
		{"rst", httpx.ReasonPeerReset},
		{"fin", httpx.ReasonPeerFIN},
		{"cut", httpx.ReasonKeepaliveTimeout}, // last: it drops all of the client's TCP traffic
	} {
		path := "/" + sc.how
		before := mustRow(t, status, nsCookie).Delivered
		c, err := pair.Client.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		// Most of the body never comes: the handler reads none of it.
		if _, err := fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: e2e\r\nContent-Length: 1000000\r\n\r\npartial", path); err != nil {
			t.Fatal(err)
		}
		srv.lines.wait(t, srv, "STARTED path="+path)
		switch sc.how {
		case "rst":
			if err := c.(*net.TCPConn).SetLinger(0); err != nil {
				t.Fatal(err)
			}
			c.Close()
		case "fin":
			if err := c.(*net.TCPConn).CloseWrite(); err != nil {
				t.Fatal(err)
			}
		case "cut":
			pair.Cut()
		}
		line := srv.lines.wait(t, srv, "RESULT path="+path)
		t.Logf("%s: %s", sc.how, line)
		got := fields(line)
		want := map[string]string{
			"status": httpx.StatusAborted.String(),
			"reason": sc.want.String(),
			"source": string(httpx.SourceAgent),
			"woke":   "ctx",     // the context was cancelled before the handler's own bound
			"cause":  "aborted", // errors.Is(context.Cause(ctx), httpx.ErrAborted)
		}
		for k, v := range want {
			if got[k] != v {
				t.Errorf("%s: %s=%q, want %q (line %q)", sc.how, k, got[k], v, line)
			}
		}
		// The agent wrote at least the connection's opened event and the
		// event that aborted it to the server. Its counter moves just after
		// each write returns, so the server may report first: poll.
		var after uint64
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if after = mustRow(t, status, nsCookie).Delivered; after-before >= 2 || time.Now().After(deadline) {
				break
			}
		}
		if after-before < 2 {
			t.Errorf("%s: the agent delivered %d events to the server for the request, want at least 2", sc.how, after-before)
		}
	}

	srv.stop(t)
}

// socketPath returns a short socket path (unix socket paths are limited to
// 108 bytes) in a fresh directory that nobody may traverse.
func socketPath(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "hx")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, "s")
}

// binDir returns a fresh directory that nobody may read and traverse (the
// go tool's build directories are 0700).
func binDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "hangup-e2e")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// startAgent builds hangupd and runs it on sock, the socket's group
// nogroup, until the test ends; it waits until the agent answers. It skips
// (or fails under HANGUP_REQUIRE_BPF=1) when the probe cannot load.
func startAgent(t *testing.T, sock string) {
	t.Helper()
	bin := testutil.BuildHangupd(t)
	out := &testutil.Buffer{}
	cmd := exec.Command(bin, "--socket.path", sock, "--socket.group", strconv.Itoa(nobody),
		"--web.listen-address", "127.0.0.1:0", "--log.level", "debug")
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		select {
		case <-exited:
		default:
			cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("hangupd (pid %d) log:\n%s", cmd.Process.Pid, out)
		}
	})
	deadline := time.Now().Add(wait)
	for {
		select {
		case <-exited:
			log := out.String()
			if strings.Contains(log, "operation not permitted") || strings.Contains(log, "not supported") {
				testnet.SkipOrFail(t, "hangupd cannot load the probe:\n%s", log)
			}
			t.Fatalf("hangupd exited:\n%s", log)
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := wire.Dial(ctx, sock, wire.ClientConfig{Name: "e2e-ready"})
		cancel()
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("hangupd does not answer on %s: %v\n%s", sock, err, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// statusClient opens a session with the agent for status requests.
func statusClient(t *testing.T, sock string) *wire.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	c, err := wire.Dial(ctx, sock, wire.ClientConfig{Name: "e2e-status"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// serverRow returns the agent's status row of the server's listener: uid
// nobody (as the kernel reports the subscriber's credentials), port
// serverPort, in the server's network namespace.
func serverRow(t *testing.T, c *wire.Client, netns uint64) (wire.StatusListener, bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	rows, _, err := c.Status(ctx)
	if err != nil {
		t.Fatalf("agent status: %v", err)
	}
	for _, r := range rows {
		if r.UID == nobody && r.Listener != 0 && r.NetNS == netns && r.Addr.Port() == serverPort {
			return r, true
		}
	}
	return wire.StatusListener{}, false
}

func mustRow(t *testing.T, c *wire.Client, netns uint64) wire.StatusListener {
	t.Helper()
	r, ok := serverRow(t, c, netns)
	if !ok {
		t.Fatal("the server's listener is gone from the agent's status")
	}
	return r
}

// fields parses "WORD k=v k=v ...".
func fields(line string) map[string]string {
	m := map[string]string{}
	for _, f := range strings.Fields(line)[1:] {
		if k, v, ok := strings.Cut(f, "="); ok {
			m[k] = v
		}
	}
	return m
}

// lineLog collects a process's stdout lines.
type lineLog struct {
	mu      sync.Mutex
	lines   []string
	changed chan struct{} // closed and replaced when a line comes
}

func newLineLog() *lineLog { return &lineLog{changed: make(chan struct{})} }

func (l *lineLog) add(line string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, line)
	close(l.changed)
	l.changed = make(chan struct{})
}

func (l *lineLog) find(prefix string) (string, bool, <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, line := range l.lines {
		if line == prefix || strings.HasPrefix(line, prefix+" ") {
			return line, true, nil
		}
	}
	return "", false, l.changed
}

// wait returns the first line that is prefix or starts with prefix and a
// space, waiting for it while the server runs.
func (l *lineLog) wait(t *testing.T, p *serverProc, prefix string) string {
	t.Helper()
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		line, ok, changed := l.find(prefix)
		if ok {
			return line
		}
		select {
		case <-changed:
		case <-p.exited:
			if line, ok, _ := l.find(prefix); ok {
				return line
			}
			t.Fatalf("the server exited (%v) before printing %q", p.cmd.ProcessState, prefix)
		case <-timer.C:
			t.Fatalf("the server did not print %q", prefix)
		}
	}
}

// serverProc is the unprivileged server: this test binary run as nobody in
// the server's network namespace.
type serverProc struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  *lineLog
	stderr *testutil.Buffer
	exited chan struct{} // closed when the process was reaped and its stdout read
	err    error         // Wait's result, once exited is closed
}

// startServer runs a copy of the test binary in child mode, entering the
// server's namespace as root (ip netns exec) and only then dropping to
// nobody:nogroup with no supplementary groups and no capabilities
// (setpriv), and kills it when the test ends.
func startServer(t *testing.T, pair *testnet.Pair, setpriv, sock string) *serverProc {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := binDir(t)
	bin := filepath.Join(dir, "server.test")
	copyFile(t, self, bin)

	id := strconv.Itoa(nobody)
	cmd := exec.Command("ip", "netns", "exec", pair.Server.NS,
		setpriv, "--reuid="+id, "--regid="+id, "--clear-groups",
		"--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
		bin, "-test.run=^$")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), modeEnv+"=server", socketEnv+"="+sock, portEnv+"="+strconv.Itoa(serverPort))
	p := &serverProc{cmd: cmd, lines: newLineLog(), stderr: &testutil.Buffer{}, exited: make(chan struct{})}
	cmd.Stderr = p.stderr
	if p.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			p.lines.add(sc.Text())
		}
		p.err = cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			cmd.Process.Kill()
			<-p.exited
		}
		if t.Failed() {
			p.lines.mu.Lock()
			out := strings.Join(p.lines.lines, "\n")
			p.lines.mu.Unlock()
			t.Logf("server (pid %d) stdout:\n%s\nstderr:\n%s", cmd.Process.Pid, out, p.stderr)
		}
	})
	return p
}

// stop closes the server's stdin, which makes it shut down, and checks that
// it exited cleanly (a data race in it would make it exit 66).
func (p *serverProc) stop(t *testing.T) {
	t.Helper()
	p.stdin.Close()
	select {
	case <-p.exited:
	case <-time.After(wait):
		t.Fatal("the server did not exit after its stdin closed")
	}
	if p.err != nil {
		t.Errorf("server: %v\n%s", p.err, p.stderr)
	}
	if _, ok, _ := p.lines.find("DONE"); !ok {
		t.Error("the server did not print DONE")
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	src, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
}

// childServer is the server, run as nobody in the server's namespace: it
// checks that it has no privileges, serves with the agent as its only
// source, and prints READY, then STARTED and RESULT lines per request, and
// DONE when its stdin closes. It returns the exit code.
func childServer() int {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	fail := func(format string, args ...any) int {
		fmt.Fprintf(os.Stderr, "server: "+format+"\n", args...)
		return 1
	}
	if err := unprivileged(); err != nil {
		return fail("%v", err)
	}

	var outMu sync.Mutex
	say := func(format string, args ...any) {
		outMu.Lock()
		defer outMu.Unlock()
		fmt.Fprintf(os.Stdout, format+"\n", args...)
	}

	m, err := httpx.New(httpx.Options{
		Source:      httpx.SourceAgent,
		AgentSocket: os.Getenv(socketEnv),
		DropTimeout: 2 * time.Second,
		Logger:      log,
	})
	if err != nil {
		return fail("httpx.New: %v", err)
	}
	defer m.Close()
	if s := m.Source(); s != httpx.SourceAgent {
		return fail("detection source %s, want %s (is the agent's socket reachable?)", s, httpx.SourceAgent)
	}

	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		st := httpx.FromContext(r.Context())
		var (
			mu         sync.Mutex
			woke, caus = "running", "none"
		)
		st.RegisterShutdown(func() {
			mu.Lock()
			defer mu.Unlock()
			say("RESULT path=%s status=%s reason=%s source=%s woke=%s cause=%s",
				r.URL.Path, st.Status(), st.AbortReason(), m.Source(), woke, caus)
		})
		say("STARTED path=%s", r.URL.Path)
		// Read nothing of the body: wait for the abort.
		how := "timer"
		select {
		case <-r.Context().Done():
			how = "ctx"
		case <-time.After(handlerWait):
		}
		cause := "other"
		if err := context.Cause(r.Context()); errors.Is(err, httpx.ErrAborted) {
			cause = "aborted"
		} else if err == nil {
			cause = "none"
		}
		mu.Lock()
		woke, caus = how, cause
		mu.Unlock()
	})
	srv := &http.Server{Handler: m.Handler(h), ReadHeaderTimeout: wait}
	m.Configure(srv)
	ln, err := net.Listen("tcp", ":"+os.Getenv(portEnv))
	if err != nil {
		return fail("listen: %v", err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(m.Listener(ln)) }()
	say("READY addr=%s uid=%d", ln.Addr(), os.Geteuid())

	quit := make(chan struct{})
	go func() {
		io.Copy(io.Discard, os.Stdin)
		close(quit)
	}()
	select {
	case <-quit:
	case <-time.After(childLife):
		log.Error("nobody told the server to stop; stopping")
	case err := <-served:
		return fail("serve: %v", err)
	}
	srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if err := m.Wait(ctx); err != nil {
		return fail("waiting for handlers: %v", err)
	}
	if err := m.Close(); err != nil {
		return fail("closing the monitor: %v", err)
	}
	say("DONE")
	return 0
}

// unprivileged checks that the process is not root, has no capabilities
// at all, and cannot load the kernel probe.
func unprivileged() error {
	if os.Getuid() == 0 || os.Geteuid() == 0 || os.Getgid() == 0 || os.Getegid() == 0 {
		return fmt.Errorf("running as uid %d/%d gid %d/%d, want no root ids", os.Getuid(), os.Geteuid(), os.Getgid(), os.Getegid())
	}
	groups, err := os.Getgroups()
	if err != nil {
		return err
	}
	if len(groups) > 0 {
		return fmt.Errorf("supplementary groups %v, want none", groups)
	}
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return err
	}
	seen := 0
	for _, line := range strings.Split(string(status), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || !strings.HasPrefix(k, "Cap") {
			continue
		}
		seen++
		if n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64); err != nil || n != 0 {
			return fmt.Errorf("%s: %s, want no capabilities", k, strings.TrimSpace(v))
		}
	}
	if seen < 5 {
		return fmt.Errorf("found %d capability sets in /proc/self/status, want 5", seen)
	}
	p, err := bpf.Load(bpf.Options{})
	if err == nil {
		p.Close()
		return errors.New("loaded the kernel probe: the server is privileged")
	}
	if !errors.Is(err, bpf.ErrPermission) {
		return fmt.Errorf("loading the probe: %v, want %v", err, bpf.ErrPermission)
	}
	return nil
}
