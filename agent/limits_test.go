package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hangup-io/hangup/internal/testnet"
	"github.com/hangup-io/hangup/internal/wire"
)

// dialEnv makes the test binary a client that dials the agent socket it
// names, says "ok" or the error, and leaves (see TestMain).
const dialEnv = "HANGUP_TEST_DIAL"

func TestMain(m *testing.M) {
	if path := os.Getenv(benchSubscriberEnv); path != "" {
		if err := benchSubscriber(path); err != nil {
			fmt.Fprintln(os.Stderr, "bench subscriber:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	if path := os.Getenv(dialEnv); path != "" {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := wire.Dial(ctx, path, wire.ClientConfig{Name: "other-user"})
		if err != nil {
			fmt.Println(err)
			os.Exit(0)
		}
		c.Close()
		fmt.Println("ok")
		os.Exit(0)
	}
	if addr := os.Getenv(listenEnv); addr != "" {
		ln, err := net.Listen("tcp4", addr)
		if err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		fmt.Println("ready")
		io.Copy(io.Discard, os.Stdin) // until the test closes it
		ln.Close()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// listenEnv makes the test binary a server that listens on the address it
// names until its stdin closes (see TestMain).
const listenEnv = "HANGUP_TEST_LISTEN"

// dialAs dials the agent from a process running as uid and gid.
func dialAs(t *testing.T, a *Agent, uid, gid uint32) string {
	t.Helper()
	// A copy of the test binary that the user may run.
	dir, err := os.MkdirTemp("", "hangup-bin")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	bin, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, "agent.test")
	if err := os.WriteFile(exe, bin, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), dialEnv+"="+a.SocketPath())
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("client as uid %d: %v: %s", uid, err, out)
	}
	return strings.TrimSpace(string(out))
}

// One user's sessions and listeners are bounded, and reaching the bound
// locks out neither that user's later sessions (once one leaves) nor
// another user.
func TestPerUserLimits(t *testing.T) {
	testnet.RequireRoot(t)
	a := startAgent(t, Config{Source: newFakeSource(), NoSeed: true, SocketGroup: "65534",
		MaxSubscribersPerUser: 2, MaxListenersPerUser: 3})
	// The other user reaches the socket through its directory.
	if err := os.Chmod(filepath.Dir(a.SocketPath()), 0o755); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	c1, _ := subscribe(t, a, "one")
	c2, _ := subscribe(t, a, "two")
	_, err := wire.Dial(ctx, a.SocketPath(), wire.ClientConfig{Name: "three"})
	if !errors.Is(err, &wire.Error{Code: wire.CodeLimit}) {
		t.Errorf("a third session of one user: %v, want a limit error", err)
	}
	if got := dialAs(t, a, 65534, 65534); got != "ok" {
		t.Errorf("another user's session: %s", got)
	}

	// Listeners: three in all, over both sessions.
	for _, c := range []*wire.Client{c1, c1, c2} {
		if _, err := c.Register(ctx, hostListener(t).(*net.TCPListener)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c2.Register(ctx, hostListener(t).(*net.TCPListener)); !errors.Is(err, &wire.Error{Code: wire.CodeLimit}) {
		t.Errorf("a fourth listener of one user: %v, want a limit error", err)
	}
	// The first session leaves: its listeners and its session slot are
	// given back.
	c1.Close()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		a.mu.Lock()
		u := *a.userLocked(uint32(os.Getuid()))
		a.mu.Unlock()
		if u.sessions == 1 && u.listeners == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after one session left, the user holds %+v", u)
		}
	}
	if _, err := c2.Register(ctx, hostListener(t).(*net.TCPListener)); err != nil {
		t.Errorf("registering after the other session left: %v", err)
	}
	if _, err := wire.Dial(ctx, a.SocketPath(), wire.ClientConfig{Name: "again"}); err != nil {
		t.Errorf("a session after one left: %v", err)
	}
}

// Registrations that cost a sock_diag scan draw from the user's budget; an
// exhausted budget refuses the next one when the wait would be long (here:
// hours), the session goes on, and leaving does not refill the budget.
func TestSeedBudget(t *testing.T) {
	a := startAgent(t, Config{Source: newFakeSource(), SeedBurst: 2, SeedRate: 0.0001})
	c, _ := subscribe(t, a, "seeder")
	ctx := context.Background()
	for range 2 {
		if _, err := c.Register(ctx, hostListener(t).(*net.TCPListener)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Register(ctx, hostListener(t).(*net.TCPListener)); !errors.Is(err, &wire.Error{Code: wire.CodeLimit}) {
		t.Fatalf("a registration beyond the budget: %v, want a limit error", err)
	}
	if _, _, err := c.Status(ctx); err != nil {
		t.Fatalf("the session after the refusal: %v", err)
	}
	a.mu.Lock()
	tokens := a.userLocked(uint32(os.Getuid())).tokens
	a.mu.Unlock()
	if tokens >= 1 {
		t.Errorf("budget left: %v tokens", tokens)
	}
	c.Close()
	for deadline := time.Now().Add(10 * time.Second); len(a.subscribers()) != 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the session did not end")
		}
	}
	// Leaving does not refill the budget: a register-and-leave loop gains
	// nothing.
	a.mu.Lock()
	_, kept := a.users[uint32(os.Getuid())]
	a.mu.Unlock()
	if !kept {
		t.Error("the user's spent budget was forgotten when its session left")
	}
}

// A session holds no event queue before it says Hello, and its queue grows
// with use, keeps order across wrap-around, stops at the limit and gives
// its memory back when it drains.
func TestQueueGrows(t *testing.T) {
	a := startAgent(t, Config{Source: newFakeSource(), NoSeed: true})
	dialRaw(t, a)
	for deadline := time.Now().Add(10 * time.Second); len(a.subscribers()) == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no session")
		}
	}
	s := a.subscribers()[0]
	s.omu.Lock()
	held := cap(s.out.events.buf) + cap(s.out.ctrl) + cap(s.out.pkt)
	s.omu.Unlock()
	if held != 0 {
		t.Errorf("a session before hello holds %d queue entries", held)
	}

	var q eventQueue
	const limit = 1000
	next, want := uint64(0), uint64(0)
	for round := range 3 {
		for q.len() < 600 {
			next++
			if !q.push(&wire.Event{Cookie: next}, limit) {
				t.Fatalf("push refused at %d", q.len())
			}
		}
		for range 500 - round*100 {
			want++
			if got := q.at(0).Cookie; got != want {
				t.Fatalf("round %d: got cookie %d, want %d", round, got, want)
			}
			q.pop(1)
		}
	}
	for q.push(&wire.Event{}, limit) {
	}
	if q.len() != limit || len(q.buf) != limit {
		t.Errorf("queue at the limit: %d entries, capacity %d", q.len(), len(q.buf))
	}
	q.pop(q.len())
	if q.buf != nil {
		t.Errorf("a drained queue keeps %d entries", len(q.buf))
	}
}

// Negative limits are configuration errors, not endless loops.
func TestConfigRejectsNegative(t *testing.T) {
	for _, cfg := range []Config{
		{SeedRate: -1}, {SeedBurst: -1}, {MaxSubscribersPerUser: -3}, {QueueLen: -1}, {StallTimeout: -time.Second},
	} {
		cfg.Source = newFakeSource()
		cfg.SocketPath = shortPath(t)
		if a, err := New(cfg); err == nil {
			a.Close()
			t.Errorf("New(%+v) accepted a negative value", cfg)
		}
	}
}
