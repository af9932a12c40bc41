//go:build linux

package bpf_test

import (
	"net"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/probetest"
	"github.com/hangup-io/hangup/internal/testnet"
)

// TestLingerZeroCloseIsLocalReset: a server that closes with SO_LINGER 0
// (HAProxy's nolinger, nginx's reset_timedout_connection) aborts the
// connection itself; the ECONNRESET the kernel then sets is no error.
func TestLingerZeroCloseIsLocalReset(t *testing.T) {
	for _, l := range loaders {
		t.Run(l.name, func(t *testing.T) { lingerZeroClose(t, l.load) })
	}
}

func lingerZeroClose(t *testing.T, load func(bpf.Options) (*bpf.Probe, error)) {
	e := newEnvWith(t, load)
	ln, err := e.pair.Server.Listen("tcp4", testnet.ServerAddr4.String()+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c := e.dialListener(t, ln)
	if err := c.server.(*net.TCPConn).SetLinger(0); err != nil {
		t.Fatal(err)
	}
	c.server.Close()
	closed := e.rec.Wait(t, 5*time.Second, "closed", probetest.Cookie(c.cookie, bpf.KindClosed))
	if closed.Cause != bpf.CauseLocalReset {
		t.Errorf("closed %s, want cause local_reset", closed.String())
	}
	requireOrder(t, e.kinds(c.cookie), bpf.KindOpened, bpf.KindLocalReset, bpf.KindClosed)
	if evs := e.rec.Events(probetest.Cookie(c.cookie, bpf.KindError)); len(evs) != 0 {
		t.Errorf("error events for a local abort: %v", evs)
	}
	want := bpf.PortCounters{Opened: 1, LocalReset: 1}
	want.Closed[bpf.CauseLocalReset] = 1
	key := probetest.Port(t, e.pair.Server, uint16(ln.Addr().(*net.TCPAddr).Port))
	probetest.WaitCounters(t, e.probe, key, func(c bpf.PortCounters) bool { return c == want })
}

// TestZeroWindowProbeTimeoutAfterRetransmission: a connection that once
// retransmitted (the link dropped for a moment) later dies of unanswered
// zero-window probes: the cause is probe_timeout, decided from what is
// outstanding at death, not from the lifetime retransmission count.
func TestZeroWindowProbeTimeoutAfterRetransmission(t *testing.T) {
	e := newEnv(t)
	c := e.connect(t, "tcp4", testnet.ServerAddr4, 0)
	// An early loss, recovered.
	e.pair.Cut()
	if _, err := c.server.Write([]byte("lost once")); err != nil {
		t.Fatal(err)
	}
	e.rec.Wait(t, 10*time.Second, "retransmit", probetest.Cookie(c.cookie, bpf.KindRetransmit))
	e.pair.Restore()
	waitTCPInfo(t, c.server, "the lost segment acknowledged", func(ti *unix.TCPInfo) bool {
		return ti.Unacked == 0 && ti.Total_retrans > 0
	})
	// The client stops reading: its window closes with data queued.
	testnet.SetUserTimeout(t, c.server, time.Second)
	go func() {
		buf := make([]byte, 64<<10)
		for {
			if _, err := c.server.Write(buf); err != nil {
				return
			}
		}
	}()
	waitTCPInfo(t, c.server, "a zero window with data queued", func(ti *unix.TCPInfo) bool {
		return ti.Snd_wnd == 0 && ti.Unacked == 0 && ti.Notsent_bytes > 0
	})
	e.pair.Cut()
	// Nothing the client sends arrives from now on: the window stays shut.
	waitTCPInfo(t, c.server, "a zero window with data queued, after the cut", func(ti *unix.TCPInfo) bool {
		return ti.Snd_wnd == 0 && ti.Unacked == 0 && ti.Notsent_bytes > 0
	})
	closed := e.rec.Wait(t, 30*time.Second, "closed", probetest.Cookie(c.cookie, bpf.KindClosed))
	if closed.Cause != bpf.CauseProbeTimeout || closed.Err != syscall.ETIMEDOUT {
		t.Errorf("closed %s, want cause probe_timeout ETIMEDOUT", closed.String())
	}
	if closed.Retransmits == 0 {
		t.Error("the connection reports no retransmission: the test did not set up what it means to")
	}
}

// TestSelfConnectIgnored: a TCP self-connect (a simultaneous open: SYN_SENT
// -> SYN_RECV -> ESTABLISHED on a socket that never listened) is not a
// server connection.
func TestSelfConnectIgnored(t *testing.T) {
	e := newEnv(t)
	var fd int
	err := e.pair.Server.Do(func() (err error) {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		addr := &unix.SockaddrInet4{Addr: testnet.ServerAddr4.As4()}
		if err := unix.Bind(fd, addr); err != nil {
			return err
		}
		sa, err := unix.Getsockname(fd)
		if err != nil {
			return err
		}
		addr.Port = sa.(*unix.SockaddrInet4).Port
		return unix.Connect(fd, addr)
	})
	if err != nil {
		t.Fatalf("self-connect: %v", err)
	}
	defer unix.Close(fd)
	cookie, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		t.Fatal(err)
	}
	// Abort it: a tracked connection would report the reset and the close.
	if err := unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1}); err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	// A real server connection afterwards: its events come after any of
	// the self-connect's.
	c := e.connect(t, "tcp4", testnet.ServerAddr4, 0)
	c.client.(*net.TCPConn).SetLinger(0)
	c.client.Close()
	e.rec.Wait(t, 5*time.Second, "closed", probetest.Cookie(c.cookie, bpf.KindClosed))
	if evs := e.rec.Events(func(ev *bpf.Event) bool { return ev.Cookie == cookie }); len(evs) != 0 {
		t.Errorf("the self-connected socket produced events: %v", evs)
	}
}

func waitTCPInfo(t *testing.T, c net.Conn, what string, ok func(*unix.TCPInfo) bool) {
	t.Helper()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var ti *unix.TCPInfo
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		var gerr error
		rc.Control(func(fd uintptr) { ti, gerr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) })
		if gerr != nil {
			t.Fatal(gerr)
		}
		if ok(ti) {
			return
		}
	}
	t.Fatalf("waiting for %s: tcp_info %+v", what, ti)
}
