//go:build linux

package bpf_test

import (
	"errors"
	"net"
	"testing"
	"time"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/probetest"
	"github.com/hangup-io/hangup/internal/testnet"
)

// TestWatchedOnly: a WatchedOnly probe writes the client-gone events of a
// watched port and nothing of an unwatched port on the same probe, and its
// counters count both.
func TestWatchedOnly(t *testing.T) {
	pair := testnet.NewPair(t)
	p := probetest.Load(t, bpf.Options{WatchedOnly: true})
	ns, err := pair.Server.NetNSCookie()
	if err != nil {
		t.Fatal(err)
	}
	rec := probetest.Record(t, p, probetest.InNetNS(ns))
	listen := func() (net.Listener, uint16) {
		ln, err := pair.Server.Listen("tcp4", testnet.ServerAddr4.String()+":0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		return ln, uint16(ln.Addr().(*net.TCPAddr).Port)
	}
	watchedLn, watchedPort := listen()
	otherLn, otherPort := listen()
	if err := p.Watch(ns, watchedPort); err != nil {
		t.Fatal(err)
	}
	if err := p.Watch(ns, watchedPort); err != nil {
		t.Fatalf("watching twice: %v", err)
	}

	// The unwatched port first: once the watched port's events have been
	// read, any record of the unwatched one would have been read before.
	other := resetByClient(t, pair, otherLn)
	probetest.WaitCounters(t, p, probetest.Port(t, pair.Server, otherPort), func(c bpf.PortCounters) bool { return c.ClosedTotal() == 1 })
	watched := resetByClient(t, pair, watchedLn)
	rec.Wait(t, 5*time.Second, "peer_reset", probetest.Cookie(watched, bpf.KindPeerReset))
	closed := rec.Wait(t, 5*time.Second, "closed", probetest.Cookie(watched, bpf.KindClosed))
	if closed.Cause != bpf.CausePeerReset {
		t.Errorf("closed cause %s, want peer_reset", closed.Cause)
	}
	if evs := rec.Events(func(e *bpf.Event) bool { return e.Cookie == other }); len(evs) != 0 {
		t.Errorf("unwatched port %d produced records: %v", otherPort, evs)
	}
	if evs := rec.Events(probetest.Cookie(watched, bpf.KindOpened)); len(evs) != 0 {
		t.Errorf("routine records written in watched-only mode: %v", evs)
	}
	for _, port := range []uint16{watchedPort, otherPort} {
		want := bpf.PortCounters{Opened: 1, PeerReset: 1, Errors: 1}
		want.Closed[bpf.CausePeerReset] = 1
		probetest.WaitCounters(t, p, probetest.Port(t, pair.Server, port), func(c bpf.PortCounters) bool { return c == want })
	}

	// After Unwatch, the port's events stop.
	if err := p.Unwatch(ns, watchedPort); err != nil {
		t.Fatal(err)
	}
	if err := p.Unwatch(ns, watchedPort); err != nil {
		t.Fatalf("unwatching twice: %v", err)
	}
	late := resetByClient(t, pair, watchedLn)
	probetest.WaitCounters(t, p, probetest.Port(t, pair.Server, watchedPort), func(c bpf.PortCounters) bool { return c.ClosedTotal() == 2 })
	if err := p.Watch(ns, otherPort); err != nil {
		t.Fatal(err)
	}
	marker := resetByClient(t, pair, otherLn)
	rec.Wait(t, 5*time.Second, "closed", probetest.Cookie(marker, bpf.KindClosed))
	if evs := rec.Events(func(e *bpf.Event) bool { return e.Cookie == late }); len(evs) != 0 {
		t.Errorf("unwatched port %d produced records: %v", watchedPort, evs)
	}
}

func TestWatchNeedsWatchedOnly(t *testing.T) {
	p := probetest.Load(t, bpf.Options{})
	if err := p.Watch(1, 80); !errors.Is(err, bpf.ErrNotWatchedOnly) {
		t.Errorf("Watch on a probe without WatchedOnly: %v, want ErrNotWatchedOnly", err)
	}
	if err := p.Unwatch(1, 80); !errors.Is(err, bpf.ErrNotWatchedOnly) {
		t.Errorf("Unwatch on a probe without WatchedOnly: %v, want ErrNotWatchedOnly", err)
	}
	w := probetest.Load(t, bpf.Options{WatchedOnly: true})
	if err := w.Watch(1, 0); err == nil {
		t.Error("Watch of port 0 succeeded")
	}
}

// resetByClient connects to ln from the client host, resets the connection
// from the client, and returns the server socket's cookie.
func resetByClient(t *testing.T, pair *testnet.Pair, ln net.Listener) uint64 {
	t.Helper()
	cc, sc, cookie := connect(t, pair, ln)
	t.Cleanup(func() { sc.Close() })
	cc.(*net.TCPConn).SetLinger(0)
	cc.Close()
	return cookie
}

// connect dials ln from the client host and returns both ends and the
// server socket's cookie.
func connect(t *testing.T, pair *testnet.Pair, ln net.Listener) (client, server net.Conn, cookie uint64) {
	t.Helper()
	cc, err := pair.Client.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	sc, err := ln.Accept()
	if err != nil {
		cc.Close()
		t.Fatal(err)
	}
	if cookie, err = testnet.SocketCookie(sc); err != nil {
		cc.Close()
		sc.Close()
		t.Fatal(err)
	}
	return cc, sc, cookie
}

// TestCountersPerNamespace: the same port in two namespaces has two sets of
// counters, keyed by each namespace's inode.
func TestCountersPerNamespace(t *testing.T) {
	a, b := testnet.NewPair(t), testnet.NewPair(t)
	p := probetest.Load(t, bpf.Options{})
	const port = 24244
	for i, pair := range []*testnet.Pair{a, b} {
		ln, err := pair.Server.Listen("tcp4", net.JoinHostPort(testnet.ServerAddr4.String(), "24244"))
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		for range i + 1 {
			resetByClient(t, pair, ln)
		}
	}
	for i, pair := range []*testnet.Pair{a, b} {
		want := bpf.PortCounters{Opened: uint64(i + 1), PeerReset: uint64(i + 1), Errors: uint64(i + 1)}
		want.Closed[bpf.CausePeerReset] = uint64(i + 1)
		probetest.WaitCounters(t, p, probetest.Port(t, pair.Server, port), func(c bpf.PortCounters) bool { return c == want })
	}
}

// TestWakeWatchedOnly: every record is written, but only a watched port's
// client-gone event wakes the reader. With a poll interval of an hour and a
// ring too large for the wakeup threshold, an unwatched port's reset stays
// unread until the watched port's reset wakes the reader, which then reads
// both.
func TestWakeWatchedOnly(t *testing.T) {
	pair := testnet.NewPair(t)
	p := probetest.Load(t, bpf.Options{WakeWatchedOnly: true, FlushInterval: time.Hour, RingBufferSize: 64 << 20})
	ns, err := pair.Server.NetNSCookie()
	if err != nil {
		t.Fatal(err)
	}
	rec := probetest.Record(t, p, probetest.InNetNS(ns))
	listen := func() (net.Listener, uint16) {
		ln, err := pair.Server.Listen("tcp4", testnet.ServerAddr4.String()+":0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		return ln, uint16(ln.Addr().(*net.TCPAddr).Port)
	}
	watchedLn, watchedPort := listen()
	otherLn, otherPort := listen()
	if err := p.Watch(ns, watchedPort); err != nil {
		t.Fatal(err)
	}
	// The reader reads once when it starts, whatever is in the ring; on a
	// slow machine (a TCG guest) that first read can come late. A watched
	// reset read to the end shows the reader running; then it waits.
	first := resetByClient(t, pair, watchedLn)
	rec.Wait(t, 5*time.Second, "closed", probetest.Cookie(first, bpf.KindClosed))
	time.Sleep(100 * time.Millisecond)

	other := resetByClient(t, pair, otherLn)
	probetest.WaitCounters(t, p, probetest.Port(t, pair.Server, otherPort), func(c bpf.PortCounters) bool { return c.ClosedTotal() == 1 })
	time.Sleep(200 * time.Millisecond) // a wakeup, had there been one, would have been read by now
	if evs := rec.Events(func(e *bpf.Event) bool { return e.Cookie == other && e.Kind != bpf.KindOpened }); len(evs) != 0 {
		t.Fatalf("an unwatched port's reset woke the reader: %v", evs)
	}
	watched := resetByClient(t, pair, watchedLn)
	rec.Wait(t, 5*time.Second, "closed", probetest.Cookie(watched, bpf.KindClosed))
	rec.Wait(t, 5*time.Second, "closed", probetest.Cookie(other, bpf.KindClosed))
	if evs := rec.Events(probetest.Cookie(watched, bpf.KindOpened)); len(evs) != 1 {
		t.Errorf("routine records are kept: %d opened records for the watched connection", len(evs))
	}
}
