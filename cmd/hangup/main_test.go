package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hangup-io/hangup/agent"
	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/testnet"
	"github.com/hangup-io/hangup/internal/testutil"
	"github.com/hangup-io/hangup/internal/wire"
)

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// startWatch runs `hangup watch args...` in the background.
func startWatch(t *testing.T, args ...string) (*testutil.Buffer, <-chan error) {
	t.Helper()
	var stdout, stderr testutil.Buffer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, append([]string{"watch"}, args...), &stdout, &stderr) }()
	t.Cleanup(cancel)
	waitFor(t, "watch to start", func() bool {
		select {
		case err := <-done:
			if errors.Is(err, bpf.ErrPermission) || errors.Is(err, bpf.ErrNotSupported) {
				testnet.SkipOrFail(t, "watch cannot load the probe: %v", err)
			}
			t.Fatalf("watch ended early: %v\n%s", err, stderr.String())
		default:
		}
		return strings.Contains(stderr.String(), "watching")
	})
	return &stdout, done
}

func resetConnection(t *testing.T, pair *testnet.Pair, ln net.Listener) uint64 {
	t.Helper()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	c, err := pair.Client.Dial("tcp", net.JoinHostPort(testnet.ServerAddr4.String(), strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)))
	if err != nil {
		t.Fatal(err)
	}
	s := <-accepted
	t.Cleanup(func() { s.Close() })
	cookie, err := testnet.SocketCookie(s)
	if err != nil {
		t.Fatal(err)
	}
	c.(*net.TCPConn).SetLinger(0)
	c.Close()
	return cookie
}

func TestWatch(t *testing.T) {
	pair := testnet.NewPair(t)
	ln, err := pair.Server.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	ns, _ := pair.Server.NetNSCookie()

	t.Run("json", func(t *testing.T) {
		out, done := startWatch(t, "--no-agent", "--port", port, "--kind", "peer_reset,closed", "--json", "--count", "2",
			"--netns", strconv.FormatUint(ns, 10))
		cookie := resetConnection(t, pair, ln)
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("watch did not see 2 events; output:\n%s", out.String())
		}
		var kinds []string
		for _, line := range strings.Split(strings.TrimSpace(out.String()), "\n") {
			var j jsonEvent
			if err := json.Unmarshal([]byte(line), &j); err != nil {
				t.Fatalf("line %q: %v", line, err)
			}
			if j.Cookie != cookie || j.NetNS != ns || !strings.HasSuffix(j.Local, ":"+port) {
				t.Errorf("event of another socket: %+v", j)
			}
			kinds = append(kinds, j.Kind+"/"+j.Cause)
		}
		if strings.Join(kinds, " ") != "peer_reset/ closed/peer_reset" {
			t.Errorf("kinds %v, want peer_reset then closed/peer_reset", kinds)
		}
	})
	t.Run("human", func(t *testing.T) {
		// --netns too: other packages' tests may use the same port number
		// in their own namespaces.
		out, done := startWatch(t, "--no-agent", "--port", port, "--kind", "opened", "--count", "1",
			"--netns", strconv.FormatUint(ns, 10))
		cookie := resetConnection(t, pair, ln)
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("watch saw nothing; output:\n%s", out.String())
		}
		line := out.String()
		if !strings.Contains(line, "opened cookie="+strconv.FormatUint(cookie, 10)) || !strings.Contains(line, "10.77.0.1:"+port) {
			t.Errorf("line %q", line)
		}
	})
}

func TestWatchFlags(t *testing.T) {
	var out, errb bytes.Buffer
	if err := run(context.Background(), []string{"watch", "--kind", "nonsense"}, &out, &errb); err == nil {
		t.Error("bad kind accepted")
	}
	if err := run(context.Background(), []string{"watch", "--port", "70000"}, &out, &errb); err == nil {
		t.Error("bad port accepted")
	}
	if err := run(context.Background(), []string{"frobnicate"}, &out, &errb); err == nil {
		t.Error("unknown command accepted")
	}
}

func startAgent(t *testing.T) *agent.Agent {
	t.Helper()
	return startAgentWith(t, agent.Config{})
}

func TestStatus(t *testing.T) {
	testnet.RequireRoot(t)
	a := startAgent(t)
	c, err := wire.Dial(context.Background(), a.SocketPath(), wire.ClientConfig{Name: "webshop"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if _, err := c.Register(context.Background(), ln.(*net.TCPListener)); err != nil {
		t.Fatal(err)
	}

	var out, errb bytes.Buffer
	if err := run(context.Background(), []string{"status", "--socket.path", a.SocketPath()}, &out, &errb); err != nil {
		t.Fatalf("%v\n%s", err, errb.String())
	}
	t.Logf("status:\n%s", out.String())
	if !strings.Contains(out.String(), "webshop") || !strings.Contains(out.String(), ln.Addr().String()) {
		t.Errorf("status lacks the subscriber or its listener")
	}
	out.Reset()
	if err := run(context.Background(), []string{"status", "--json", "--socket.path", a.SocketPath()}, &out, &errb); err != nil {
		t.Fatal(err)
	}
	var st struct {
		Agent       wire.StatusEnd
		Subscribers []wire.StatusListener
	}
	if err := json.Unmarshal(out.Bytes(), &st); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	// The first status session may not be gone from the agent yet: at
	// least webshop and this one.
	var webshop int
	for _, r := range st.Subscribers {
		if r.Name == "webshop" {
			webshop++
		}
	}
	if webshop != 1 || st.Agent.Subscribers < 2 {
		t.Errorf("status json: %+v", st)
	}
	if err := run(context.Background(), []string{"status", "--socket.path", a.SocketPath() + ".none"}, &out, &errb); err == nil {
		t.Error("status without an agent succeeded")
	}
}

func TestDoctor(t *testing.T) {
	testnet.RequireRoot(t)
	a := startAgent(t)
	var out, errb bytes.Buffer
	err := run(context.Background(), []string{"doctor", "--socket.path", a.SocketPath()}, &out, &errb)
	t.Logf("doctor:\n%s", out.String())
	if err != nil {
		if strings.Contains(out.String(), "bpf() permission: missing") {
			testnet.SkipOrFail(t, "no BPF privileges")
		}
		t.Fatalf("doctor failed on a host that runs the agent: %v", err)
	}
	if !strings.Contains(out.String(), "every tracepoint the probe needs is present") {
		t.Error("the kernel check does not say what it checked")
	}
	for _, h := range hooks {
		if !strings.Contains(out.String(), "[ok  ] hook tp_btf/"+h) {
			t.Errorf("hook %s not reported ok", h)
		}
	}

	out.Reset()
	err = run(context.Background(), []string{"doctor", "--socket.path", "/nonexistent/hangup.sock"}, &out, &errb)
	if !errors.Is(err, errFailed) {
		t.Errorf("doctor without an agent: %v, want a failure", err)
	}
	if !strings.Contains(out.String(), "[FAIL] agent socket") || !strings.Contains(out.String(), "fix: start the agent") {
		t.Errorf("doctor output lacks the agent failure and its fix:\n%s", out.String())
	}
	out.Reset()
	if err := run(context.Background(), []string{"doctor", "--no-agent", "--socket.path", "/nonexistent/hangup.sock"}, &out, &errb); err != nil {
		t.Errorf("doctor --no-agent: %v", err)
	}
}
