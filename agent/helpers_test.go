package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/wire"
)

// fakeSource feeds events from a channel; for tests that need no kernel.
type fakeSource struct {
	ch    chan bpf.Event
	done  chan struct{}
	once  sync.Once
	mu    sync.Mutex
	ports map[uint16]bpf.PortCounters
	stats bpf.Stats
	track map[uint64]uint16
}

func newFakeSource() *fakeSource {
	return &fakeSource{ch: make(chan bpf.Event, 1024), done: make(chan struct{}),
		ports: map[uint16]bpf.PortCounters{}, track: map[uint64]uint16{}}
}

func (f *fakeSource) ReadInto(e *bpf.Event) error {
	select {
	case *e = <-f.ch:
		return nil
	case <-f.done:
		return bpf.ErrClosed
	}
}

// HookStats reports made-up run statistics of three programs on two hooks.
func (f *fakeSource) HookStats() ([]bpf.HookStats, error) {
	return []bpf.HookStats{
		{Hook: "inet_sock_set_state", RunCount: 10, RunTime: 5 * time.Microsecond},
		{Hook: "inet_sock_set_state", RunCount: 2, RunTime: time.Microsecond},
		{Hook: "tcp_retransmit_skb", RunCount: 1, RunTime: time.Microsecond},
	}, nil
}

func (f *fakeSource) PortCounters() (map[bpf.PortKey]bpf.PortCounters, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make(map[bpf.PortKey]bpf.PortCounters, len(f.ports))
	for k, v := range f.ports {
		out[bpf.PortKey{Port: k}] = v
	}
	return out, nil
}

func (f *fakeSource) Stats() (bpf.Stats, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.stats, nil
}

func (f *fakeSource) Track(cookie uint64, port uint16) error {
	f.mu.Lock()
	f.track[cookie] = port
	f.mu.Unlock()
	return nil
}

func (f *fakeSource) Untrack(cookie uint64) error {
	f.mu.Lock()
	delete(f.track, cookie)
	f.mu.Unlock()
	return nil
}

func (f *fakeSource) TrackedCookies(fn func(uint64) bool) error {
	f.mu.Lock()
	cookies := make([]uint64, 0, len(f.track))
	for c := range f.track {
		cookies = append(cookies, c)
	}
	f.mu.Unlock()
	for _, c := range cookies {
		if !fn(c) {
			break
		}
	}
	return nil
}

// Buffered tells the agent how many events wait (see backlogSource).
func (f *fakeSource) Buffered() int { return len(f.ch) }

func (f *fakeSource) Close() error {
	f.once.Do(func() { close(f.done) })
	return nil
}

// testLogger sends the agent's logs to the test log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tlogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tlogWriter struct{ t testing.TB }

func (w tlogWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// startAgent creates an agent on a socket in a temporary directory and runs
// it until the test ends.
func startAgent(t testing.TB, cfg Config) *Agent {
	t.Helper()
	if cfg.SocketPath == "" {
		// Unix socket paths are short; t.TempDir can be too long.
		dir, err := os.MkdirTemp("", "hangup")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		cfg.SocketPath = filepath.Join(dir, "s")
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent Run: %v", err)
		}
		if _, err := os.Stat(cfg.SocketPath); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("socket file left behind: %v", err)
		}
	})
	return a
}

// eventLog records what a subscriber receives.
type eventLog struct {
	mu      sync.Mutex
	cond    *sync.Cond
	events  []wire.Event
	dropped uint64
}

func newEventLog() *eventLog {
	l := &eventLog{}
	l.cond = sync.NewCond(&l.mu)
	return l
}

func (l *eventLog) add(e wire.Event) {
	l.mu.Lock()
	l.events = append(l.events, e)
	l.cond.Broadcast()
	l.mu.Unlock()
}

func (l *eventLog) drop(d wire.Dropped) {
	l.mu.Lock()
	l.dropped = d.Total
	l.cond.Broadcast()
	l.mu.Unlock()
}

// wait blocks until match holds for a recorded event, or fails after a
// generous timeout.
func (l *eventLog) wait(t testing.TB, what string, match func(*wire.Event) bool) wire.Event {
	t.Helper()
	e, ok := l.waitFor(20*time.Second, match)
	if !ok {
		t.Fatalf("no %s event; got:\n%s", what, l.dump())
	}
	return e
}

func (l *eventLog) waitFor(timeout time.Duration, match func(*wire.Event) bool) (wire.Event, bool) {
	timer := time.AfterFunc(timeout, func() {
		l.mu.Lock()
		l.cond.Broadcast()
		l.mu.Unlock()
	})
	defer timer.Stop()
	deadline := time.Now().Add(timeout)
	l.mu.Lock()
	defer l.mu.Unlock()
	for {
		for i := range l.events {
			if match(&l.events[i]) {
				return l.events[i], true
			}
		}
		if !time.Now().Before(deadline) {
			return wire.Event{}, false
		}
		l.cond.Wait()
	}
}

func (l *eventLog) all() []wire.Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]wire.Event(nil), l.events...)
}

func (l *eventLog) dump() string {
	var b strings.Builder
	for _, e := range l.all() {
		fmt.Fprintf(&b, "  %s cookie=%d cause=%s listener=%d local=%s remote=%s errno=%d\n",
			bpf.Kind(e.Kind), e.Cookie, bpf.Cause(e.Cause), e.Listener, e.Local, e.Remote, e.Errno)
	}
	if b.Len() == 0 {
		return "  (none)\n"
	}
	return b.String()
}

// subscribe dials the agent with an event log.
func subscribe(t testing.TB, a *Agent, name string) (*wire.Client, *eventLog) {
	t.Helper()
	l := newEventLog()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := wire.Dial(ctx, a.SocketPath(), wire.ClientConfig{Name: name, OnEvent: l.add, OnDropped: l.drop})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, l
}

func cookieKind(cookie uint64, k bpf.Kind) func(*wire.Event) bool {
	return func(e *wire.Event) bool { return e.Cookie == cookie && e.Kind == uint8(k) }
}
