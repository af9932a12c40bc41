package agent

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/wire"
	"golang.org/x/sys/unix"
)

// rawSession is a subscriber that speaks frames by hand.
type rawSession struct {
	t    *testing.T
	conn *wire.Conn
}

func dialRaw(t *testing.T, a *Agent) *rawSession {
	t.Helper()
	uc, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: a.SocketPath(), Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { uc.Close() })
	return &rawSession{t: t, conn: wire.NewConn(uc)}
}

func (r *rawSession) send(f wire.Frame, fd int) {
	r.t.Helper()
	if err := r.conn.WriteFrame(&f, fd); err != nil {
		r.t.Fatal(err)
	}
}

// rawHello is a Hello as this version's client sends it.
func rawHello(name string) wire.Hello {
	return wire.Hello{Name: name, MinVersion: wire.MinVersion, MaxVersion: wire.MaxVersion, MaxPacket: wire.MaxPacketSize}
}

func (r *rawSession) hello() {
	r.t.Helper()
	r.send(wire.Frame{Type: wire.TypeHello, Hello: rawHello("raw")}, -1)
	if f := r.next(); f.Type != wire.TypeWelcome {
		r.t.Fatalf("got %s, want welcome", f.Type)
	}
}

// next reads the next frame, failing after a generous timeout.
func (r *rawSession) next() wire.Frame {
	r.t.Helper()
	r.conn.UnixConn().SetReadDeadline(time.Now().Add(10 * time.Second))
	var f wire.Frame
	fd, err := r.conn.ReadFrame(&f)
	if fd >= 0 {
		r.t.Errorf("agent sent a descriptor")
		unix.Close(fd)
	}
	if err != nil {
		r.t.Fatalf("reading from agent: %v", err)
	}
	return f
}

// expectError reads an Error frame with the code and, if fatal, the end of
// the session.
func (r *rawSession) expectError(code uint16, fatal bool) wire.Error {
	r.t.Helper()
	f := r.next()
	if f.Type != wire.TypeError || f.Error.Code != code || f.Error.Fatal != fatal {
		r.t.Fatalf("got %s %+v, want error code %d fatal=%v", f.Type, f.Error, code, fatal)
	}
	r.t.Logf("agent said: %v", &f.Error)
	if fatal {
		r.conn.UnixConn().SetReadDeadline(time.Now().Add(10 * time.Second))
		var g wire.Frame
		if _, err := r.conn.ReadFrame(&g); err == nil {
			r.t.Fatalf("session still open after a fatal error: got %s", g.Type)
		}
	}
	return f.Error
}

func listenerFD(t *testing.T, ln net.Listener) int {
	t.Helper()
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return int(f.Fd())
}

func hostListener(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// hostEvent is a fake probe event for a connection to ln.
func hostEvent(t *testing.T, ln net.Listener, cookie uint64, k bpf.Kind) bpf.Event {
	ns, err := currentNetNSCookie()
	if err != nil {
		t.Fatal(err)
	}
	return bpf.Event{Kind: k, Cookie: cookie, NetNS: ns,
		Local:  ln.Addr().(*net.TCPAddr).AddrPort(),
		Remote: netip.MustParseAddrPort("127.0.0.1:40000"),
		Time:   time.Now()}
}

func TestRouting(t *testing.T) {
	src := newFakeSource()
	a := startAgent(t, Config{Source: src, NoSeed: true})
	lnA, lnB := hostListener(t), hostListener(t)
	ca, logA := subscribe(t, a, "a")
	cb, logB := subscribe(t, a, "b")
	ctx := context.Background()
	regA, err := ca.Register(ctx, lnA.(*net.TCPListener))
	if err != nil {
		t.Fatal(err)
	}
	if regA.Addr != lnA.Addr().(*net.TCPAddr).AddrPort() {
		t.Errorf("registered address %s, want %s", regA.Addr, lnA.Addr())
	}
	if _, err := cb.Register(ctx, lnB.(*net.TCPListener)); err != nil {
		t.Fatal(err)
	}
	src.ch <- hostEvent(t, lnA, 1, bpf.KindOpened)
	src.ch <- hostEvent(t, lnA, 1, bpf.KindPeerReset)
	src.ch <- hostEvent(t, lnB, 2, bpf.KindOpened)
	e := logA.wait(t, "peer reset", cookieKind(1, bpf.KindPeerReset))
	if e.Listener != regA.Listener {
		t.Errorf("event for listener %d, want %d", e.Listener, regA.Listener)
	}
	logB.wait(t, "B's own", cookieKind(2, bpf.KindOpened))
	for _, e := range logB.all() {
		if e.Cookie == 1 {
			t.Errorf("subscriber B received A's event: %+v", e)
		}
	}
	for _, e := range logA.all() {
		if e.Cookie == 2 {
			t.Errorf("subscriber A received B's event: %+v", e)
		}
	}

	rows, end, err := ca.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if end.Subscribers != 2 || len(rows) != 2 || end.Events != 3 {
		t.Errorf("status: %d rows %+v, end %+v", len(rows), rows, end)
	}
}

func TestSocketMode(t *testing.T) {
	a := startAgent(t, Config{Source: newFakeSource(), NoSeed: true, SocketGroup: "0"})
	fi, err := os.Stat(a.SocketPath())
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o660 || fi.Mode().Type() != os.ModeSocket {
		t.Errorf("socket mode %s, want srw-rw----", fi.Mode())
	}
	if gid := fi.Sys().(*syscall.Stat_t).Gid; gid != 0 && os.Geteuid() == 0 {
		t.Errorf("socket group %d, want 0", gid)
	}
	// A path that is not a socket is left alone.
	notSock := shortPath(t)
	os.WriteFile(notSock, []byte("precious"), 0o600)
	if _, err := New(Config{Source: newFakeSource(), SocketPath: notSock}); err == nil {
		t.Error("agent replaced a regular file")
	}
	// A stale socket (no agent behind it) is replaced.
	stale := shortPath(t)
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: stale, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	if b, err := New(Config{Source: newFakeSource(), SocketPath: stale}); err != nil {
		t.Errorf("stale socket not replaced: %v", err)
	} else {
		b.Close()
	}
	// A second agent on the same path refuses to start.
	if _, err := New(Config{Source: newFakeSource(), SocketPath: a.SocketPath()}); err == nil {
		t.Error("a second agent started on a live socket")
	}
}

func TestBadInput(t *testing.T) {
	src := newFakeSource()
	a := startAgent(t, Config{Source: src, NoSeed: true, MaxListeners: 1, HelloTimeout: 300 * time.Millisecond})
	hello, _ := wire.Append(nil, &wire.Frame{Type: wire.TypeHello, Hello: rawHello("x")})

	t.Run("garbage", func(t *testing.T) {
		r := dialRaw(t, a)
		r.conn.WriteRaw([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
		r.expectError(wire.CodeMalformed, true)
	})
	t.Run("truncated", func(t *testing.T) {
		r := dialRaw(t, a)
		r.conn.WriteRaw(hello[:len(hello)-3])
		r.expectError(wire.CodeMalformed, true)
	})
	t.Run("too large", func(t *testing.T) {
		r := dialRaw(t, a)
		big := append(append([]byte(nil), hello...), make([]byte, 4096)...)
		r.conn.WriteRaw(big)
		r.expectError(wire.CodeMalformed, true)
	})
	t.Run("register before hello", func(t *testing.T) {
		r := dialRaw(t, a)
		r.send(wire.Frame{Type: wire.TypeRegister}, listenerFD(t, hostListener(t)))
		r.expectError(wire.CodeUnexpected, true)
	})
	t.Run("no hello", func(t *testing.T) {
		r := dialRaw(t, a)
		r.expectError(wire.CodeUnexpected, true)
	})
	t.Run("status request before hello", func(t *testing.T) {
		r := dialRaw(t, a)
		f, _ := wire.Append(nil, &wire.Frame{Type: wire.TypeStatusRequest})
		r.conn.WriteRaw(f)
		r.expectError(wire.CodeUnexpected, true)
	})
	t.Run("unknown type before hello", func(t *testing.T) {
		r := dialRaw(t, a)
		f, _ := wire.Append(nil, &wire.Frame{Type: wire.TypeStatusRequest})
		f[3] = 0xee // header byte 3 is the type
		r.conn.WriteRaw(f)
		r.expectError(wire.CodeUnknownType, true)
	})
	t.Run("vanishes", func(t *testing.T) {
		// A subscriber with a listener disappears while its events flow:
		// its session and route go, and another subscriber is served on.
		gone, stay := hostListener(t), hostListener(t)
		cg, _ := subscribe(t, a, "vanishing")
		if _, err := cg.Register(context.Background(), gone.(*net.TCPListener)); err != nil {
			t.Fatal(err)
		}
		cs, logS := subscribe(t, a, "staying")
		if _, err := cs.Register(context.Background(), stay.(*net.TCPListener)); err != nil {
			t.Fatal(err)
		}
		for i := range 100 {
			src.ch <- hostEvent(t, gone, uint64(1000+i), bpf.KindOpened)
		}
		cg.Close()
		for i := range 100 {
			src.ch <- hostEvent(t, gone, uint64(2000+i), bpf.KindOpened)
		}
		src.ch <- hostEvent(t, stay, 3000, bpf.KindOpened)
		logS.wait(t, "the staying subscriber's event", cookieKind(3000, bpf.KindOpened))
		// The session ends in steps (routes, then the session list): wait
		// for both.
		vanished := func() (routed, open bool) {
			a.routes.mu.RLock()
			_, routed = a.routes.byKey[connKey{netns: hostEvent(t, gone, 0, 0).NetNS, port: uint16(port(gone))}]
			a.routes.mu.RUnlock()
			for _, s := range a.subscribers() {
				s.mu.Lock()
				name := s.name
				s.mu.Unlock()
				open = open || name == "vanishing"
			}
			return routed, open
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			routed, open := vanished()
			if !routed && !open {
				break
			}
			if time.Now().After(deadline) {
				if routed {
					t.Error("the vanished subscriber's listener is still routed")
				}
				if open {
					t.Error("the vanished subscriber's session is still open")
				}
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
	t.Run("in session", func(t *testing.T) {
		r := dialRaw(t, a)
		r.hello()

		// A Register that claims a descriptor but carries none.
		reg, _ := wire.Append(nil, &wire.Frame{Type: wire.TypeRegister, Register: wire.Register{Request: 7}})
		r.conn.WriteRaw(reg)
		if e := r.expectError(wire.CodeMissingFD, false); e.Request != 7 {
			t.Errorf("error answers request %d, want 7", e.Request)
		}
		// A descriptor on a frame that takes none.
		r.conn.WriteRaw(hello, listenerFD(t, hostListener(t)))
		r.expectError(wire.CodeUnexpectedFD, false)
		// An unknown frame type.
		b := append([]byte(nil), hello...)
		b[3] = 77
		r.conn.WriteRaw(b)
		r.expectError(wire.CodeUnknownType, false)

		// Descriptors that are not listening TCP sockets.
		pr, pw, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		defer pr.Close()
		defer pw.Close()
		udp, _ := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
		defer unix.Close(udp)
		tcp, _ := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
		defer unix.Close(tcp)
		ln := hostListener(t)
		conn, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		cf, _ := conn.(*net.TCPConn).File()
		defer cf.Close()
		us, _ := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM, 0)
		defer unix.Close(us)
		for name, fd := range map[string]int{
			"pipe": int(pr.Fd()), "udp": udp, "unlistened tcp": tcp, "tcp connection": int(cf.Fd()), "unix": us,
		} {
			r.send(wire.Frame{Type: wire.TypeRegister, Register: wire.Register{Request: 9}}, fd)
			if e := r.expectError(wire.CodeNotListener, false); e.Request != 9 {
				t.Errorf("%s: error answers request %d", name, e.Request)
			}
		}

		// The session still works, up to the listener limit.
		r.send(wire.Frame{Type: wire.TypeRegister, Register: wire.Register{Request: 10}}, listenerFD(t, ln))
		if f := r.next(); f.Type != wire.TypeRegistered || f.Registered.Request != 10 {
			t.Fatalf("got %s %+v, want registered", f.Type, f)
		}
		r.send(wire.Frame{Type: wire.TypeRegister, Register: wire.Register{Request: 11}}, listenerFD(t, hostListener(t)))
		r.expectError(wire.CodeLimit, false)
	})

	// After all that, the agent serves a well-behaved subscriber.
	c, log := subscribe(t, a, "good")
	ln := hostListener(t)
	if _, err := c.Register(context.Background(), ln.(*net.TCPListener)); err != nil {
		t.Fatal(err)
	}
	src.ch <- hostEvent(t, ln, 42, bpf.KindClosed)
	log.wait(t, "closed", cookieKind(42, bpf.KindClosed))
}

func TestClientErrors(t *testing.T) {
	a := startAgent(t, Config{Source: newFakeSource(), NoSeed: true, MaxSubscribers: 1})
	c, _ := subscribe(t, a, "first")
	ctx := context.Background()

	// The subscriber limit.
	_, err := wire.Dial(ctx, a.SocketPath(), wire.ClientConfig{})
	if !errors.Is(err, &wire.Error{Code: wire.CodeLimit}) {
		t.Errorf("second subscriber: %v, want a limit error", err)
	}
	// A refused listener is a *wire.Error.
	pr, pw, _ := os.Pipe()
	defer pr.Close()
	defer pw.Close()
	if _, err := c.RegisterFD(ctx, int(pr.Fd())); !errors.Is(err, &wire.Error{Code: wire.CodeNotListener}) {
		t.Errorf("registering a pipe: %v", err)
	}
	// Close from another goroutine ends a blocked call and Done.
	go c.Close()
	<-c.Done()
	if !errors.Is(c.Err(), wire.ErrClientClosed) {
		t.Errorf("Err after Close = %v", c.Err())
	}
	if _, err := c.Register(ctx, hostListener(t).(*net.TCPListener)); !errors.Is(err, wire.ErrClientClosed) {
		t.Errorf("Register after Close = %v", err)
	}
	// No agent at all.
	if _, err := wire.Dial(ctx, a.SocketPath()+".missing", wire.ClientConfig{}); err == nil {
		t.Error("dialing a missing socket succeeded")
	}
}

func TestAgentGoesAway(t *testing.T) {
	src := newFakeSource()
	a, err := New(Config{Source: src, NoSeed: true, SocketPath: shortPath(t)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	c, _ := subscribe(t, a, "x")
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	<-c.Done()
	if !errors.Is(c.Err(), wire.ErrSessionEnded) {
		t.Errorf("Err = %v, want ErrSessionEnded", c.Err())
	}
	if _, err := os.Stat(a.SocketPath()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket not removed: %v", err)
	}
}

func shortPath(t *testing.T) string {
	dir, err := os.MkdirTemp("", "hangup")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir + "/s"
}

// A subscriber that never reads loses events, counted, while another one
// gets all of its own and the pipeline never waits.
func TestSlowSubscriber(t *testing.T) {
	src := newFakeSource()
	a := startAgent(t, Config{Source: src, NoSeed: true, QueueLen: 64, StallTimeout: 500 * time.Millisecond})
	lnSlow, lnFast := hostListener(t), hostListener(t)

	slow := dialRaw(t, a)
	slow.hello()
	slow.send(wire.Frame{Type: wire.TypeRegister, Register: wire.Register{Request: 1}}, listenerFD(t, lnSlow))
	if f := slow.next(); f.Type != wire.TypeRegistered {
		t.Fatalf("got %s", f.Type)
	}
	fast, log := subscribe(t, a, "fast")
	if _, err := fast.Register(context.Background(), lnFast.(*net.TCPListener)); err != nil {
		t.Fatal(err)
	}

	// Far more than the queue and the socket buffer hold.
	const n = 20000
	for i := range n {
		src.ch <- hostEvent(t, lnSlow, uint64(1_000_000+i), bpf.KindRetransmit)
	}
	for batch := range 20 {
		for i := range 50 {
			src.ch <- hostEvent(t, lnFast, uint64(batch*50+i+1), bpf.KindOpened)
		}
		last := uint64(batch*50 + 50)
		log.wait(t, "fast subscriber's", cookieKind(last, bpf.KindOpened))
	}
	if got := len(log.all()); got != 1000 {
		t.Errorf("fast subscriber got %d events, want 1000", got)
	}
	if a.dropped.Load() == 0 {
		t.Error("no drops counted for the subscriber that never reads")
	}
	t.Logf("dropped for the slow subscriber: %d of %d", a.dropped.Load(), n)

	// In the end the agent gives up on the subscriber that stopped reading.
	deadline := time.Now().Add(20 * time.Second)
	for len(a.subscribers()) != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("stalled subscriber still connected: %d subscribers", len(a.subscribers()))
		}
		time.Sleep(20 * time.Millisecond)
	}
	src.ch <- hostEvent(t, lnFast, 5000, bpf.KindClosed)
	log.wait(t, "fast subscriber's after the disconnect", cookieKind(5000, bpf.KindClosed))
}

func TestServerConns(t *testing.T) {
	ap := netip.MustParseAddrPort
	socks := []diagSocket{
		{state: tcpListen, local: ap("0.0.0.0:80")},
		{state: tcpListen, local: ap("10.0.0.1:443")},
		{state: tcpListen, local: ap("[::]:8080")},
		{state: tcpEstablished, local: ap("10.0.0.5:80"), cookie: 1},    // wildcard v4
		{state: tcpEstablished, local: ap("10.0.0.1:443"), cookie: 2},   // specific
		{state: tcpEstablished, local: ap("10.0.0.2:443"), cookie: 3},   // other address: client side
		{state: tcpEstablished, local: ap("10.0.0.1:55000"), cookie: 4}, // client side
		{state: tcpEstablished, local: ap("[fd00::1]:8080"), cookie: 5}, // v6 wildcard
		{state: tcpEstablished, local: ap("10.0.0.1:8080"), cookie: 6},  // v4 on dual-stack wildcard
		{state: 8, local: ap("10.0.0.5:80"), cookie: 7},                 // CLOSE_WAIT
		{state: tcpTimeWait, local: ap("10.0.0.5:80"), cookie: 8},
		{state: tcpSynRecv, local: ap("10.0.0.5:80"), cookie: 9},
	}
	got := map[uint64]bool{}
	for _, s := range serverConns(socks, 0) {
		got[s.cookie] = true
	}
	for _, c := range []uint64{1, 2, 5, 6, 7} {
		if !got[c] {
			t.Errorf("cookie %d not selected", c)
		}
	}
	for _, c := range []uint64{3, 4, 8, 9} {
		if got[c] {
			t.Errorf("cookie %d selected", c)
		}
	}
	if only := serverConns(socks, 443); len(only) != 1 || only[0].cookie != 2 {
		t.Errorf("port filter: %+v", only)
	}
}

func TestListenerMatches(t *testing.T) {
	a := netip.MustParseAddr
	cases := []struct {
		bind   string
		v6only bool
		conn   string
		want   bool
	}{
		{"0.0.0.0", false, "10.0.0.1", true},
		{"0.0.0.0", false, "fd00::1", false},
		{"::", false, "10.0.0.1", true},
		{"::", true, "10.0.0.1", false},
		{"::", true, "fd00::1", true},
		{"10.0.0.1", false, "10.0.0.1", true},
		{"10.0.0.1", false, "10.0.0.2", false},
	}
	for _, c := range cases {
		li := listenerInfo{addr: netip.AddrPortFrom(a(c.bind), 80), v6only: c.v6only}
		if got := li.matches(a(c.conn)); got != c.want {
			t.Errorf("listener %s v6only=%v, conn %s: %v, want %v", c.bind, c.v6only, c.conn, got, c.want)
		}
	}
}
