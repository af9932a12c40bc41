package agent

import (
	"context"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/probetest"
	"github.com/hangup-io/hangup/internal/testnet"
	"github.com/hangup-io/hangup/internal/wire"
)

func listenerCookie(t *testing.T, ln net.Listener) uint64 {
	t.Helper()
	rc, err := ln.(*net.TCPListener).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var c uint64
	var cerr error
	rc.Control(func(fd uintptr) { c, cerr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE) })
	if cerr != nil {
		t.Fatal(cerr)
	}
	return c
}

// Registering one listener twice gives one route: each event arrives once.
func TestSameListenerTwice(t *testing.T) {
	src := newFakeSource()
	a := startAgent(t, Config{Source: src, NoSeed: true})
	ln := hostListener(t)
	c, log := subscribe(t, a, "twice")
	ctx := context.Background()
	r1, err := c.Register(ctx, ln.(*net.TCPListener))
	if err != nil {
		t.Fatal(err)
	}
	r2, err := c.Register(ctx, ln.(*net.TCPListener))
	if err != nil {
		t.Fatal(err)
	}
	if r1.Listener != r2.Listener {
		t.Errorf("second registration got listener %d, first %d", r2.Listener, r1.Listener)
	}
	src.ch <- hostEvent(t, ln, 1, bpf.KindPeerReset)
	src.ch <- hostEvent(t, ln, 2, bpf.KindOpened) // a marker: everything before it has been delivered
	log.wait(t, "marker", cookieKind(2, bpf.KindOpened))
	n := 0
	for _, e := range log.all() {
		if e.Cookie == 1 {
			n++
		}
	}
	if n != 1 {
		t.Errorf("event delivered %d times, want once", n)
	}
}

// A listener that closed is no longer routed: its port may next belong to
// someone else, whose connections the first subscriber must not see.
func TestListenerClosedDropsRoute(t *testing.T) {
	src := newFakeSource()
	a := startAgent(t, Config{Source: src, NoSeed: true})
	ln := hostListener(t)
	c, log := subscribe(t, a, "closer")
	if _, err := c.Register(context.Background(), ln.(*net.TCPListener)); err != nil {
		t.Fatal(err)
	}
	closed := hostEvent(t, ln, listenerCookie(t, ln), bpf.KindListenerClosed)
	src.ch <- closed
	src.ch <- hostEvent(t, ln, 7, bpf.KindPeerReset) // the port's next owner
	// A second subscriber's marker shows the agent handled both events.
	other := hostListener(t)
	c2, log2 := subscribe(t, a, "marker")
	if _, err := c2.Register(context.Background(), other.(*net.TCPListener)); err != nil {
		t.Fatal(err)
	}
	src.ch <- hostEvent(t, other, 8, bpf.KindOpened)
	log2.wait(t, "marker", cookieKind(8, bpf.KindOpened))
	for _, e := range log.all() {
		t.Errorf("closed listener's subscriber received %+v", e)
	}
	rows, _, err := c.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rows {
		if r.Subscriber != 0 && r.Name == "closer" && r.Listeners != 0 {
			t.Errorf("status still lists %d listeners for the closed one", r.Listeners)
		}
	}
}

// The same with the real probe: a subscriber's listener closes, another
// process listens on the port, and its clients stay invisible to the first.
func TestListenerClosedRealProbe(t *testing.T) {
	pair := testnet.NewPair(t)
	probe := probetest.Load(t, bpf.Options{})
	a := startAgent(t, Config{Source: probe, NoSeed: true})
	const p = 24311 // outside the ephemeral range, used by no other test
	first := listenAt(t, pair.Server, p)
	ca, logA := subscribe(t, a, "first")
	if _, err := ca.Register(context.Background(), first.(*net.TCPListener)); err != nil {
		t.Fatal(err)
	}
	first.Close()
	second := listenAt(t, pair.Server, p)
	cb, logB := subscribe(t, a, "second")
	if _, err := cb.Register(context.Background(), second.(*net.TCPListener)); err != nil {
		t.Fatal(err)
	}
	client, err := pair.Client.Dial("tcp4", net.JoinHostPort(testnet.ServerAddr4.String(), "24311"))
	if err != nil {
		t.Fatal(err)
	}
	_, cookie := accept(t, serve(t, second))
	client.(*net.TCPConn).SetLinger(0)
	client.Close()
	logB.wait(t, "the new owner's reset", cookieKind(cookie, bpf.KindPeerReset))
	for _, e := range logA.all() {
		t.Errorf("the closed listener's subscriber received %+v", e)
	}
}

// Entries whose closed event was lost leave the table at reconciliation.
func TestReconcile(t *testing.T) {
	src := newFakeSource()
	a, err := New(Config{Source: src, NoSeed: true, SocketPath: shortPath(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	for _, c := range []uint64{1, 2, 3} {
		a.table.observe(&bpf.Event{Kind: bpf.KindOpened, Cookie: c})
	}
	src.Track(2, 80) // the probe still tracks only 2
	n, err := a.reconcile()
	if err != nil {
		t.Fatal(err)
	}
	if n != 2 || a.table.len() != 1 {
		t.Errorf("reconcile removed %d, table has %d; want 2 removed, 1 left", n, a.table.len())
	}
}

// A session sees its own user's sessions in status; root and the agent's
// user see all.
func TestStatusVisibility(t *testing.T) {
	mk := func(uid uint32) *subscriber { return &subscriber{cred: unix.Ucred{Uid: uid}} }
	alice, bob, root := mk(1001), mk(1002), mk(0)
	if alice.sees(bob) || bob.sees(alice) {
		t.Error("one user sees another's sessions")
	}
	if !alice.sees(mk(1001)) || !root.sees(alice) {
		t.Error("a user must see its own sessions, root every session")
	}
}

// A listener shut down (SHUT_RD) right after its Register frame leaves
// while the agent inspects and seeds it: whatever the timing, no route
// outlives it, and the port's next owner's events never reach the first
// subscriber. Repeated, with the real probe, so that the close lands before,
// during and after the agent's work.
func TestRegisterShutdownRace(t *testing.T) {
	pair := testnet.NewPair(t)
	probe := probetest.Load(t, bpf.Options{})
	a := startAgent(t, Config{Source: probe, SeedBurst: 1000, SeedRate: 1000})
	const p = 24321 // outside the ephemeral range, used by no other test
	ns, err := pair.Server.NetNSCookie()
	if err != nil {
		t.Fatal(err)
	}
	r := dialRaw(t, a)
	r.hello()
	answers := map[wire.Type]int{}
	for i := range 40 {
		ln := listenAt(t, pair.Server, p)
		f, err := ln.(*net.TCPListener).File()
		if err != nil {
			t.Fatal(err)
		}
		fd := int(f.Fd())
		r.send(wire.Frame{Type: wire.TypeRegister, Register: wire.Register{Request: uint32(i + 1)}}, fd)
		// Spread the close over the agent's work: from at once to well
		// after a registration takes.
		time.Sleep(time.Duration(i%20) * 100 * time.Microsecond)
		if err := unix.Shutdown(fd, unix.SHUT_RD); err != nil {
			t.Fatal(err)
		}
		ans := r.next()
		answers[ans.Type]++
		if ans.Type == wire.TypeError && ans.Error.Code != wire.CodeNotListener {
			t.Fatalf("register %d: %+v", i+1, ans.Error)
		}
		f.Close()
		ln.Close()
	}
	t.Logf("answers: %d registered, %d refused", answers[wire.TypeRegistered], answers[wire.TypeError])
	// The close events of those registered before their shutdown may
	// still be on their way through the ring buffer.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		a.routes.mu.RLock()
		left := len(a.routes.byKey[connKey{netns: ns, port: p}])
		a.routes.mu.RUnlock()
		if left == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d routes left for listeners that were shut down", left)
		}
	}

	// The port's next owner, and its client's reset.
	next := listenAt(t, pair.Server, p)
	cb, logB := subscribe(t, a, "next owner")
	if _, err := cb.Register(context.Background(), next.(*net.TCPListener)); err != nil {
		t.Fatal(err)
	}
	client, err := pair.Client.Dial("tcp4", net.JoinHostPort(testnet.ServerAddr4.String(), "24321"))
	if err != nil {
		t.Fatal(err)
	}
	_, cookie := accept(t, serve(t, next))
	client.(*net.TCPConn).SetLinger(0)
	client.Close()
	logB.wait(t, "the next owner's reset", cookieKind(cookie, bpf.KindPeerReset))
	// Anything routed to the first session was written before B's event;
	// a status answer comes after it.
	r.send(wire.Frame{Type: wire.TypeStatusRequest}, -1)
	for {
		f := r.next()
		if f.Type == wire.TypeEvent {
			t.Errorf("the shut-down listeners' session received %+v", f.Event)
		}
		if f.Type == wire.TypeStatusEnd {
			break
		}
	}
}

// A listener whose close event was lost (a full ring buffer) loses its
// route when the agent reconciles after the loss; a live one keeps it.
func TestReconcileRoutes(t *testing.T) {
	testnet.RequireRoot(t)
	src := newFakeSource()
	a := startAgent(t, Config{Source: src, NoSeed: true})
	gone, live := hostListener(t), hostListener(t)
	// Go listens with MPTCP where it can: one plain TCP listener too.
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	plain, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c, _ := subscribe(t, a, "lost close")
	for _, ln := range []net.Listener{gone, live, plain} {
		if _, err := c.Register(context.Background(), ln.(*net.TCPListener)); err != nil {
			t.Fatal(err)
		}
	}
	gone.Close() // and no listener_closed event reaches the agent
	plain.Close()
	n, err := a.reconcileRoutes()
	if err != nil {
		t.Fatal(err)
	}
	routed := func(ln net.Listener) bool {
		ns, _ := currentNetNSCookie()
		a.routes.mu.RLock()
		defer a.routes.mu.RUnlock()
		return len(a.routes.byKey[connKey{netns: ns, port: uint16(port(ln))}]) > 0
	}
	if n != 2 || routed(gone) || routed(plain) || !routed(live) {
		t.Errorf("reconcile removed %d routes; closed listeners routed %v %v, live one %v", n, routed(gone), routed(plain), routed(live))
	}
}
