//go:build linux

package bpf_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/probetest"
	"github.com/hangup-io/hangup/internal/testnet"
)

// families runs a subtest per address family: IPv6 must work as IPv4 does.
var families = []struct {
	name   string
	net    string
	server netip.Addr
}{
	{"ipv4", "tcp4", testnet.ServerAddr4},
	{"ipv6", "tcp6", testnet.ServerAddr6},
}

// env is one test's hosts, probe and recorded events (its own namespace only).
type env struct {
	pair  *testnet.Pair
	probe *bpf.Probe
	rec   *probetest.Recorder
}

// loaders load the probe with the hook variants of this kernel, and with
// the oldest ones (Linux 6.1's tracepoint signatures), which must classify
// the same.
var loaders = []struct {
	name string
	load func(bpf.Options) (*bpf.Probe, error)
}{
	{"newest", bpf.Load},
	{"oldest", bpf.LoadOldest},
}

func newEnv(t *testing.T) *env {
	t.Helper()
	return newEnvWith(t, bpf.Load)
}

func newEnvWith(t *testing.T, load func(bpf.Options) (*bpf.Probe, error)) *env {
	t.Helper()
	pair := testnet.NewPair(t)
	p := probetest.LoadWith(t, load, bpf.Options{})
	ns, err := pair.Server.NetNSCookie()
	if err != nil {
		t.Fatal(err)
	}
	return &env{pair: pair, probe: p, rec: probetest.Record(t, p, probetest.InNetNS(ns))}
}

// conn is an accepted server connection and its client.
type conn struct {
	server, client net.Conn
	cookie         uint64 // SO_COOKIE of the accepted socket
	clientCookie   uint64
}

// connect listens in the server namespace, dials from the client namespace
// and returns both ends once the probe has seen the connection open.
func (e *env) connect(t *testing.T, network string, addr netip.Addr, port int) conn {
	t.Helper()
	ln, err := e.pair.Server.Listen(network, netip.AddrPortFrom(addr, uint16(port)).String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return e.dialListener(t, ln)
}

func (e *env) dialListener(t *testing.T, ln net.Listener) conn {
	t.Helper()
	cc, err := e.pair.Client.Dial(ln.Addr().Network(), ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	sc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sc.Close() })
	var c conn
	c.server, c.client = sc, cc
	if c.cookie, err = testnet.SocketCookie(sc); err != nil {
		t.Fatal(err)
	}
	if c.clientCookie, err = testnet.SocketCookie(cc); err != nil {
		t.Fatal(err)
	}
	opened := e.rec.Wait(t, 5*time.Second, "opened", probetest.Cookie(c.cookie, bpf.KindOpened))
	if opened.Local.String() != sc.LocalAddr().String() || opened.Remote.String() != sc.RemoteAddr().String() {
		t.Errorf("opened event addresses %s <- %s, conn has %s <- %s",
			opened.Local, opened.Remote, sc.LocalAddr(), sc.RemoteAddr())
	}
	return c
}

// kinds lists the kinds of one socket's events, in ring-buffer order.
func (e *env) kinds(cookie uint64) []bpf.Kind {
	var ks []bpf.Kind
	for _, ev := range e.rec.Events(func(ev *bpf.Event) bool { return ev.Cookie == cookie }) {
		ks = append(ks, ev.Kind)
	}
	return ks
}

func TestPeerReset(t *testing.T) {
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			e := newEnv(t)
			c := e.connect(t, f.net, f.server, 0)
			if err := c.client.(*net.TCPConn).SetLinger(0); err != nil {
				t.Fatal(err)
			}
			c.client.Close() // RST
			ev := e.rec.Wait(t, 5*time.Second, "peer_reset", probetest.Cookie(c.cookie, bpf.KindPeerReset))
			if ev.Cookie != c.cookie {
				t.Fatalf("cookie %d, want the accepted conn's SO_COOKIE %d", ev.Cookie, c.cookie)
			}
			closed := e.rec.Wait(t, 5*time.Second, "closed", probetest.Cookie(c.cookie, bpf.KindClosed))
			if closed.Cause != bpf.CausePeerReset || closed.Err != syscall.ECONNRESET {
				t.Errorf("closed: cause %s err %v, want peer_reset ECONNRESET", closed.Cause, closed.Err)
			}
			if closed.Local.Port() != ev.Local.Port() || closed.Local.Port() == 0 {
				t.Errorf("closed event lost the local port: %s (reset had %s)", closed.Local, ev.Local)
			}
			if ev.Time.Before(time.Now().Add(-time.Minute)) || ev.Time.After(time.Now()) {
				t.Errorf("event wall time %s is not now", ev.Time)
			}
			checkNoEvents(t, e, c.clientCookie)
		})
	}
}

func TestPeerFIN(t *testing.T) {
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			e := newEnv(t)
			c := e.connect(t, f.net, f.server, 0)
			if err := c.client.(*net.TCPConn).CloseWrite(); err != nil { // half-close: FIN
				t.Fatal(err)
			}
			fin := e.rec.Wait(t, 5*time.Second, "peer_fin", probetest.Cookie(c.cookie, bpf.KindPeerFIN))
			if fin.State != bpf.StateCloseWait || fin.OldState != bpf.StateEstablished {
				t.Errorf("peer_fin %s -> %s, want ESTABLISHED -> CLOSE_WAIT", fin.OldState, fin.State)
			}
			// The server can still answer a half-closed client, then closes normally.
			if _, err := c.server.Write([]byte("bye")); err != nil {
				t.Fatal(err)
			}
			c.server.Close()
			c.client.SetReadDeadline(time.Now().Add(5 * time.Second))
			if b, err := io.ReadAll(c.client); err != nil || string(b) != "bye" {
				t.Fatalf("client read %q, %v", b, err)
			}
			closed := e.rec.Wait(t, 5*time.Second, "closed", probetest.Cookie(c.cookie, bpf.KindClosed))
			if closed.Cause != bpf.CauseNormal {
				t.Errorf("closed cause %s, want normal", closed.Cause)
			}
			checkNoEvents(t, e, c.clientCookie)
		})
	}
}

// TestLinkCutWhileWriting: the client vanishes while the server sends; the
// server socket has TCP_USER_TIMEOUT=1s, so the kernel retransmits, gives up
// with ETIMEDOUT, and closes the connection.
func TestLinkCutWhileWriting(t *testing.T) {
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			e := newEnv(t)
			c := e.connect(t, f.net, f.server, 0)
			testnet.SetUserTimeout(t, c.server, time.Second)
			e.pair.Cut()
			writeErr := make(chan error, 1)
			go func() {
				buf := make([]byte, 16<<10)
				for {
					if _, err := c.server.Write(buf); err != nil {
						writeErr <- err
						return
					}
				}
			}()
			closed := e.rec.Wait(t, 30*time.Second, "closed", probetest.Cookie(c.cookie, bpf.KindClosed))
			if closed.Cause != bpf.CauseTimeout || closed.Err != syscall.ETIMEDOUT {
				t.Errorf("closed: cause %s err %v, want timeout ETIMEDOUT", closed.Cause, closed.Err)
			}
			if closed.Retransmits == 0 {
				t.Error("closed event reports no retransmissions")
			}
			requireOrder(t, e.kinds(c.cookie), bpf.KindOpened, bpf.KindRetransmit, bpf.KindError, bpf.KindClosed)
			errEv := e.rec.Wait(t, time.Second, "error", probetest.Cookie(c.cookie, bpf.KindError))
			if errEv.Err != syscall.ETIMEDOUT {
				t.Errorf("error event errno %v, want ETIMEDOUT", errEv.Err)
			}
			if err := <-writeErr; !errors.Is(err, syscall.ETIMEDOUT) {
				t.Errorf("server write error %v, want ETIMEDOUT", err)
			}
		})
	}
}

// TestLinkCutIdleKeepalive: the client vanishes from an idle connection; only
// keepalive can notice, and the probe must say it was keepalive.
func TestLinkCutIdleKeepalive(t *testing.T) {
	for _, l := range loaders {
		for _, f := range families {
			t.Run(l.name+"/"+f.name, func(t *testing.T) { linkCutIdleKeepalive(t, l.load, f.net, f.server) })
		}
	}
}

func linkCutIdleKeepalive(t *testing.T, load func(bpf.Options) (*bpf.Probe, error), network string, server netip.Addr) {
	e := newEnvWith(t, load)
	c := e.connect(t, network, server, 0)
	err := c.server.(*net.TCPConn).SetKeepAliveConfig(net.KeepAliveConfig{
		Enable: true, Idle: time.Second, Interval: time.Second, Count: 2,
	})
	if err != nil {
		t.Fatal(err)
	}
	e.pair.Cut()
	closed := e.rec.Wait(t, 30*time.Second, "closed", probetest.Cookie(c.cookie, bpf.KindClosed))
	if closed.Cause != bpf.CauseKeepaliveTimeout || closed.Err != syscall.ETIMEDOUT {
		t.Errorf("closed: cause %s err %v, want keepalive_timeout ETIMEDOUT", closed.Cause, closed.Err)
	}
	requireOrder(t, e.kinds(c.cookie), bpf.KindOpened, bpf.KindLocalReset, bpf.KindError, bpf.KindClosed)
	if n := len(e.rec.Events(probetest.Cookie(c.cookie, bpf.KindRetransmit))); n != 0 {
		t.Errorf("%d retransmission events on an idle connection", n)
	}
}

// TestActiveConnectionsIgnored: connections this host opens produce no events.
func TestActiveConnectionsIgnored(t *testing.T) {
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			e := newEnv(t)
			// Both ends in the server namespace: the dialing socket is active.
			ln, err := e.pair.Server.Listen(f.net, netip.AddrPortFrom(f.server, 0).String())
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			dialer, err := e.pair.Server.Dial(f.net, ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			accepted, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer accepted.Close()
			dcookie, _ := testnet.SocketCookie(dialer)
			acookie, _ := testnet.SocketCookie(accepted)
			dialer.(*net.TCPConn).SetLinger(0)
			dialer.Close()
			// The dialer's close happens before the passive side sees the RST,
			// so any event of the dialer would precede this one in the ring.
			e.rec.Wait(t, 5*time.Second, "peer_reset", probetest.Cookie(acookie, bpf.KindPeerReset))
			checkNoEvents(t, e, dcookie)
		})
	}
}

// TestPortCountersMatchEvents: the kernel's exact per-port counters agree
// with the events of the same run.
func TestPortCountersMatchEvents(t *testing.T) {
	pair := testnet.NewPair(t)
	p := probetest.Load(t, bpf.Options{})
	ns, err := pair.Server.NetNSCookie()
	if err != nil {
		t.Fatal(err)
	}
	rec := probetest.Record(t, p, probetest.InNetNS(ns))
	e := &env{pair: pair, probe: p, rec: rec}
	// A port outside the ephemeral range, used by no other test, so that
	// parallel packages cannot add to its counters.
	const port = 24242
	ln, err := pair.Server.Listen("tcp4", fmt.Sprintf("%s:%d", testnet.ServerAddr4, port))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	const n = 5
	var cookies []uint64
	for i := range 3 * n {
		c := e.dialListener(t, ln)
		cookies = append(cookies, c.cookie)
		switch i % 3 {
		case 0: // client reset
			c.client.(*net.TCPConn).SetLinger(0)
			c.client.Close()
		case 1: // client FIN, then the server closes
			c.client.(*net.TCPConn).CloseWrite()
			e.rec.Wait(t, 5*time.Second, "peer_fin", probetest.Cookie(c.cookie, bpf.KindPeerFIN))
			c.server.Close()
		case 2: // the server aborts: unread data makes close send RST
			c.client.Write([]byte("unread"))
			waitReadable(t, c.server)
			c.server.Close()
		}
	}
	for _, ck := range cookies {
		e.rec.Wait(t, 10*time.Second, "closed", probetest.Cookie(ck, bpf.KindClosed))
	}

	var want bpf.PortCounters
	for _, ev := range rec.Events(func(ev *bpf.Event) bool { return ev.Local.Port() == port }) {
		switch ev.Kind {
		case bpf.KindOpened:
			want.Opened++
		case bpf.KindPeerFIN:
			want.PeerFIN++
		case bpf.KindPeerReset:
			want.PeerReset++
		case bpf.KindLocalReset:
			want.LocalReset++
		case bpf.KindRetransmit:
			want.Retransmits++
		case bpf.KindError:
			want.Errors++
		case bpf.KindClosed:
			want.Closed[ev.Cause]++
		}
	}
	if want.Opened != 3*n || want.Closed[bpf.CausePeerReset] != n || want.Closed[bpf.CauseLocalReset] != n {
		t.Errorf("events: %+v; want %d opened, %d closed by peer_reset and %d by local_reset", want, 3*n, n, n)
	}
	counters, err := p.PortCounters()
	if err != nil {
		t.Fatal(err)
	}
	got := counters[probetest.Port(t, pair.Server, port)]
	if got.RetransmittedSegments < got.Retransmits {
		t.Errorf("%d retransmitted segments in %d retransmissions", got.RetransmittedSegments, got.Retransmits)
	}
	want.RetransmittedSegments = got.RetransmittedSegments // events do not carry it
	if got != want {
		t.Errorf("port %d counters\n got %+v\nwant %+v (from events)", port, got, want)
	}
	st, err := p.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if st.Lost != 0 {
		t.Errorf("%d events lost", st.Lost)
	}
}

// TestSeededConnection: a connection opened before the probe loaded is
// tracked once Track is called with its cookie.
func TestSeededConnection(t *testing.T) {
	pair := testnet.NewPair(t)
	testnet.RequireRoot(t)
	ln, err := pair.Server.Listen("tcp4", testnet.ServerAddr4.String()+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cc, err := pair.Client.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	sc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	cookie, _ := testnet.SocketCookie(sc)

	p := probetest.Load(t, bpf.Options{})
	ns, _ := pair.Server.NetNSCookie()
	rec := probetest.Record(t, p, probetest.InNetNS(ns))
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	if err := p.Track(cookie, port); err != nil {
		t.Fatal(err)
	}
	cc.(*net.TCPConn).SetLinger(0)
	cc.Close()
	closed := rec.Wait(t, 5*time.Second, "closed", probetest.Cookie(cookie, bpf.KindClosed))
	if closed.Cause != bpf.CausePeerReset || closed.Local.Port() != port {
		t.Errorf("closed %s, want peer_reset on port %d", closed.String(), port)
	}
	if got := len(rec.Events(probetest.Cookie(cookie, bpf.KindOpened))); got != 0 {
		t.Errorf("%d opened events for a seeded connection", got)
	}
	// The entry is gone once the socket is destroyed.
	sc.Close()
	deadline := time.Now().Add(5 * time.Second)
	for tracked(t, p, cookie) {
		if time.Now().After(deadline) {
			t.Fatal("connection still tracked after close")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func tracked(t *testing.T, p *bpf.Probe, cookie uint64) bool {
	found := false
	if err := p.TrackedCookies(func(c uint64) bool { found = c == cookie; return !found }); err != nil {
		t.Fatal(err)
	}
	return found
}

// TestCloseReleasesEverything: loading and closing leaks no descriptors, and
// a blocked Read returns ErrClosed.
func TestCloseReleasesEverything(t *testing.T) {
	testnet.RequireRoot(t)
	before := openFDs(t)
	p := probetest.Load(t, bpf.Options{RingBufferSize: 4096, MaxConnections: 1024})
	done := make(chan error, 1)
	go func() {
		// Listener closes anywhere on the host are events too: read on
		// until Close ends the reads.
		for {
			if _, err := p.Read(); err != nil {
				done <- err
				return
			}
		}
	}()
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, bpf.ErrClosed) {
		t.Fatalf("Read after Close: %v, want ErrClosed", err)
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if after := openFDs(t); after != before {
		t.Errorf("%d descriptors open before Load, %d after Close", before, after)
	}
}

func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func checkNoEvents(t *testing.T, e *env, cookie uint64) {
	t.Helper()
	if evs := e.rec.Events(func(ev *bpf.Event) bool { return ev.Cookie == cookie }); len(evs) != 0 {
		t.Errorf("the client (active) socket produced %d events: %v", len(evs), evs)
	}
}

// requireOrder checks that want appears as a subsequence of got.
func requireOrder(t *testing.T, got []bpf.Kind, want ...bpf.Kind) {
	t.Helper()
	i := 0
	for _, k := range got {
		if i < len(want) && k == want[i] {
			i++
		}
	}
	if i != len(want) {
		t.Errorf("events %v do not contain %v in order", got, want)
	}
}

// waitReadable waits until data is queued on c without reading it.
func waitReadable(t *testing.T, c net.Conn) {
	t.Helper()
	rc, _ := c.(*net.TCPConn).SyscallConn()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		var n int
		rc.Control(func(fd uintptr) { n, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ) })
		if n > 0 {
			return
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatal("no data arrived")
}

// TestCountersExactWhenRingFull: with a one-page ring buffer that nobody
// reads, most events are lost, and the counters are still exact.
func TestCountersExactWhenRingFull(t *testing.T) {
	pair := testnet.NewPair(t)
	p := probetest.Load(t, bpf.Options{RingBufferSize: 4096})
	const port, n = 24243, 100 // a port no other test uses, outside the ephemeral range
	ln, err := pair.Server.Listen("tcp4", fmt.Sprintf("%s:%d", testnet.ServerAddr4, port))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for range n {
		resetByClient(t, pair, ln)
	}
	want := bpf.PortCounters{Opened: n, PeerReset: n, Errors: n}
	want.Closed[bpf.CausePeerReset] = n
	probetest.WaitCounters(t, p, probetest.Port(t, pair.Server, port), func(c bpf.PortCounters) bool { return c == want })
	st, err := p.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if st.Lost == 0 || st.Events+st.Lost < 4*n {
		t.Errorf("stats %+v: want lost events (4 events per connection into a one-page ring)", st)
	}
}

// TestListenerClosed: closing a listener reports its cookie (the one
// SO_COOKIE gives on the listening fd), so that routes keyed by it can be
// dropped before the port is reused. Go listens with MPTCP by default, where
// the kernel's listener is a TCP subflow under the socket the fd holds.
func TestListenerClosed(t *testing.T) {
	for _, mptcp := range []bool{false, true} {
		t.Run(map[bool]string{false: "tcp", true: "mptcp"}[mptcp], func(t *testing.T) {
			e := newEnv(t)
			var ln net.Listener
			err := e.pair.Server.Do(func() (err error) {
				var lc net.ListenConfig
				lc.SetMultipathTCP(mptcp)
				ln, err = lc.Listen(context.Background(), "tcp4", testnet.ServerAddr4.String()+":0")
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			rc, err := ln.(*net.TCPListener).SyscallConn()
			if err != nil {
				t.Fatal(err)
			}
			var cookie uint64
			var cerr error
			rc.Control(func(fd uintptr) { cookie, cerr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE) })
			if cerr != nil {
				t.Fatal(cerr)
			}
			ln.Close()
			e.rec.Wait(t, 5*time.Second, "listener_closed", probetest.Cookie(cookie, bpf.KindListenerClosed))
		})
	}
}
