package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hangup-io/hangup/agent"
	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/probetest"
	"github.com/hangup-io/hangup/internal/testnet"
	"github.com/hangup-io/hangup/internal/testutil"
	"github.com/hangup-io/hangup/internal/wire"
)

// Modes of the test binary, for tests that need another user's process.
const (
	// cliEnv makes the test binary the hangup command: it runs its
	// arguments as the command line.
	cliEnv = "HANGUP_TEST_CLI"
	// serveEnv makes it a server that registers a loopback listener with
	// the agent at the socket it names, prints the port, and stays until
	// its stdin closes.
	serveEnv = "HANGUP_TEST_SERVE"
)

func TestMain(m *testing.M) {
	if os.Getenv(cliEnv) != "" {
		ctx, stop := context.WithTimeout(context.Background(), time.Minute)
		err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
		stop()
		if err != nil {
			fmt.Fprintln(os.Stderr, "hangup:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	if sock := os.Getenv(serveEnv); sock != "" {
		if err := serveRegistered(sock); err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func serveRegistered(sock string) error {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := wire.Dial(ctx, sock, wire.ClientConfig{Name: "other-user"})
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := c.Register(ctx, ln.(*net.TCPListener)); err != nil {
		return err
	}
	fmt.Println(ln.Addr().(*net.TCPAddr).Port)
	io.Copy(io.Discard, os.Stdin)
	return nil
}

// asUser starts a copy of the test binary as uid:gid in the given mode.
func asUser(t *testing.T, uid uint32, env string, args ...string) *exec.Cmd {
	t.Helper()
	dir, err := os.MkdirTemp("", "hangup-bin")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	bin, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, "hangup.test")
	if err := os.WriteFile(exe, bin, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	return cmd
}

func startAgentWith(t *testing.T, cfg agent.Config) *agent.Agent {
	t.Helper()
	cfg.Source = probetest.Load(t, bpf.Options{})
	dir, _ := os.MkdirTemp("", "hangup")
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg.SocketPath = filepath.Join(dir, "s")
	a, err := agent.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return a
}

// TestWatchFallsBack: with no agent on the socket, watch says so and loads
// a probe of its own.
func TestWatchFallsBack(t *testing.T) {
	testnet.RequireRoot(t)
	var stdout, stderr testutil.Buffer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"watch", "--socket.path", "/nonexistent/hangup.sock"}, &stdout, &stderr)
	}()
	waitFor(t, "watch to start", func() bool { return strings.Contains(stderr.String(), "with a probe of its own") })
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(stderr.String(), "no agent answers at /nonexistent/hangup.sock") {
		t.Errorf("watch does not say why it loads a probe:\n%s", stderr.String())
	}
}

// TestWatchThroughAgent: with an agent running, watch (as root) streams
// every server socket's events from it, including those of a listener no
// one registered, and loads no probe.
func TestWatchThroughAgent(t *testing.T) {
	pair := testnet.NewPair(t)
	a := startAgentWith(t, agent.Config{NoSeed: true})
	ln, err := pair.Server.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	ns, _ := pair.Server.NetNSCookie()

	var stdout, stderr testutil.Buffer
	done := make(chan error, 1)
	go func() {
		done <- run(context.Background(), []string{"watch", "--socket.path", a.SocketPath(), "--json", "--count", "2",
			"--port", port, "--netns", strconv.FormatUint(ns, 10), "--kind", "peer_reset,closed"}, &stdout, &stderr)
	}()
	waitFor(t, "watch to start", func() bool { return strings.Contains(stderr.String(), "watching") })
	if !strings.Contains(stderr.String(), "every server socket through the agent") {
		t.Errorf("watch does not say it streams from the agent:\n%s", stderr.String())
	}
	cookie := resetConnection(t, pair, ln)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("watch did not see 2 events; output:\n%s\n%s", stdout.String(), stderr.String())
	}
	var kinds []string
	for _, line := range strings.Split(strings.TrimSpace(stdout.String()), "\n") {
		var j jsonEvent
		if err := json.Unmarshal([]byte(line), &j); err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		if j.Cookie != cookie || j.NetNS != ns {
			t.Errorf("event of another socket: %+v", j)
		}
		kinds = append(kinds, j.Kind+"/"+j.Cause)
	}
	if strings.Join(kinds, " ") != "peer_reset/ closed/peer_reset" {
		t.Errorf("kinds %v, want peer_reset then closed/peer_reset", kinds)
	}
}

// resetLoopback connects to 127.0.0.1:port and resets the connection, and
// returns the client's address (the event's remote).
func resetLoopback(t *testing.T, port int) string {
	t.Helper()
	c, err := net.Dial("tcp4", "127.0.0.1:"+strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	addr := c.LocalAddr().String()
	time.Sleep(50 * time.Millisecond) // the server side established
	c.(*net.TCPConn).SetLinger(0)
	c.Close()
	return addr
}

// TestWatchScopedToUser: a user other than root and the agent's sees,
// through the agent, the events of the listeners its own servers
// registered, and not those of root's listeners.
func TestWatchScopedToUser(t *testing.T) {
	testnet.RequireRoot(t)
	const nobody = 65534
	a := startAgentWith(t, agent.Config{NoSeed: true, SocketGroup: strconv.Itoa(nobody)})
	if err := os.Chmod(filepath.Dir(a.SocketPath()), 0o755); err != nil {
		t.Fatal(err)
	}
	// Root's server, registered.
	rootLn, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer rootLn.Close()
	rc, err := wire.Dial(context.Background(), a.SocketPath(), wire.ClientConfig{Name: "root-server"})
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if _, err := rc.Register(context.Background(), rootLn.(*net.TCPListener)); err != nil {
		t.Fatal(err)
	}
	// nobody's server, registered by a process of nobody.
	srv := asUser(t, nobody, serveEnv+"="+a.SocketPath())
	stdin, _ := srv.StdinPipe()
	out, _ := srv.StdoutPipe()
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { stdin.Close(); srv.Wait() }()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("nobody's server: %v %q", err, line)
	}
	nobodyPort, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		t.Fatalf("nobody's server said %q", line)
	}
	rootPort := rootLn.Addr().(*net.TCPAddr).Port

	w := asUser(t, nobody, cliEnv+"=1", "watch", "--socket.path", a.SocketPath(), "--json", "--count", "1",
		"--kind", "peer_reset", "--port", fmt.Sprintf("%d,%d", rootPort, nobodyPort))
	var wout, werr testutil.Buffer
	w.Stdout, w.Stderr = &wout, &werr
	if err := w.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- w.Wait() }()
	defer w.Process.Kill()
	waitFor(t, "nobody's watch to start", func() bool { return strings.Contains(werr.String(), "watching") })
	if !strings.Contains(werr.String(), "registered") || strings.Contains(werr.String(), "a probe of its own") {
		t.Errorf("nobody's watch does not say it sees its own listeners through the agent:\n%s", werr.String())
	}
	// Root's connection first: if nobody saw it, it would be the one event.
	resetLoopback(t, rootPort)
	remote := resetLoopback(t, nobodyPort)
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("nobody's watch: %v\n%s", err, werr.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("nobody's watch saw nothing:\n%s\n%s", wout.String(), werr.String())
	}
	var j jsonEvent
	if err := json.Unmarshal([]byte(strings.TrimSpace(wout.String())), &j); err != nil {
		t.Fatalf("%v: %q", err, wout.String())
	}
	if j.Remote != remote || !strings.HasSuffix(j.Local, ":"+strconv.Itoa(nobodyPort)) {
		t.Errorf("nobody saw %+v, want the reset from %s to its own port %d", j, remote, nobodyPort)
	}
}
