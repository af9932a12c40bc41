package agent

import (
	"context"
	"errors"
	"net"
	"os"
	"testing"
	"time"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/wire"
)

// TestWatch: a session of the agent's own user that sends Watch sees every
// event once, those of another session's listener with that listener's id
// and those of a port nobody registered with listener 0; sessions that did
// not watch still see only their own; a session ended removes the watcher.
func TestWatch(t *testing.T) {
	src := newFakeSource()
	a := startAgent(t, Config{Source: src, NoSeed: true})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	lnA, lnOther := hostListener(t), hostListener(t)
	ca, logA := subscribe(t, a, "a")
	regA, err := ca.Register(ctx, lnA.(*net.TCPListener))
	if err != nil {
		t.Fatal(err)
	}
	cw, logW := subscribe(t, a, "watcher")
	if cw.Version() != wire.WatchVersion {
		t.Fatalf("session version %d, want %d", cw.Version(), wire.WatchVersion)
	}
	w, err := cw.Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// The test runs as the agent's user (it is in this process).
	if !w.All || os.Geteuid() != os.Getuid() {
		t.Errorf("Watching %+v, want All for the agent's own user", w)
	}
	// A watcher that also registers gets its own listener's events once.
	lnW := hostListener(t)
	regW, err := cw.Register(ctx, lnW.(*net.TCPListener))
	if err != nil {
		t.Fatal(err)
	}

	src.ch <- hostEvent(t, lnA, 1, bpf.KindOpened)
	src.ch <- hostEvent(t, lnOther, 2, bpf.KindOpened)
	src.ch <- hostEvent(t, lnW, 3, bpf.KindOpened)
	src.ch <- hostEvent(t, lnA, 1, bpf.KindPeerReset)
	if e := logW.wait(t, "A's reset", cookieKind(1, bpf.KindPeerReset)); e.Listener != regA.Listener {
		t.Errorf("watched event of A's listener has listener %d, want %d", e.Listener, regA.Listener)
	}
	if e := logW.wait(t, "unregistered port", cookieKind(2, bpf.KindOpened)); e.Listener != 0 {
		t.Errorf("watched event of no listener has listener %d, want 0", e.Listener)
	}
	if e := logW.wait(t, "own listener", cookieKind(3, bpf.KindOpened)); e.Listener != regW.Listener {
		t.Errorf("own event has listener %d, want %d", e.Listener, regW.Listener)
	}
	logA.wait(t, "A's own reset", cookieKind(1, bpf.KindPeerReset))
	count := map[uint64]int{}
	for _, e := range logW.all() {
		count[e.Cookie]++
	}
	if count[1] != 2 || count[2] != 1 || count[3] != 1 {
		t.Errorf("watcher got events per cookie %v, want 1:2 2:1 3:1 (each once)", count)
	}
	for _, e := range logA.all() {
		if e.Cookie != 1 {
			t.Errorf("a session that did not watch got %+v", e)
		}
	}

	// Watching twice is harmless; after the session ends it is no watcher.
	if _, err := cw.Watch(ctx); err != nil {
		t.Errorf("second Watch: %v", err)
	}
	cw.Close()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		a.routes.mu.RLock()
		n := len(a.routes.watchers)
		a.routes.mu.RUnlock()
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d watchers left after the session ended", n)
		}
	}
	if _, err := cw.Watch(ctx); !errors.Is(err, wire.ErrClientClosed) {
		t.Errorf("Watch on a closed client: %v", err)
	}
}

// TestWatchNeedsVersion3: in a session of version 2 (an older client), a
// Watch is answered with an Error for its request, and the session goes on.
func TestWatchNeedsVersion3(t *testing.T) {
	a := startAgent(t, Config{Source: newFakeSource(), NoSeed: true})
	r := dialRaw(t, a)
	h := rawHello("v2")
	h.MaxVersion = 2
	r.send(wire.Frame{Type: wire.TypeHello, Version: 2, Hello: h}, -1)
	if f := r.next(); f.Type != wire.TypeWelcome || f.Version != 2 {
		t.Fatalf("got %s in version %d, want welcome in version 2", f.Type, f.Version)
	}
	r.conn.SetVersion(2)
	r.send(wire.Frame{Type: wire.TypeWatch, Watch: wire.Watch{Request: 9}}, -1)
	if e := r.expectError(wire.CodeUnexpected, false); e.Request != 9 {
		t.Errorf("error for request %d, want 9", e.Request)
	}
	r.send(wire.Frame{Type: wire.TypeStatusRequest}, -1)
	for f := r.next(); f.Type != wire.TypeStatusEnd; f = r.next() {
	}
}
