package httpx

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/hangup-io/hangup/internal/testnet"
	"golang.org/x/sys/unix"
)

// TestUndeliveredWithoutWait: a response written to a client whose link
// was cut is counted undelivered although nobody called WaitDelivered: the
// drop-detecting options stay after the handler returned, until the bytes
// are acknowledged or the kernel gives up on them.
func TestUndeliveredWithoutWait(t *testing.T) {
	for _, src := range []Source{SourceEpoll, SourceBPF} {
		t.Run(string(src), func(t *testing.T) {
			pair := testnet.NewPair(t)
			m := newMonitor(t, Options{Source: src, DropTimeout: 2 * time.Second})
			ln, err := pair.Server.Listen("tcp", net.JoinHostPort(testnet.ServerAddr4.String(), "0"))
			if err != nil {
				t.Fatal(err)
			}
			started := make(chan struct{}, 1)
			goOn := newGate(t)
			ts := serve(t, m, ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				started <- struct{}{}
				<-goOn.ch
				io.WriteString(w, strings.Repeat("confirmation ", 1000))
			}), nil)
			c, err := pair.Client.Dial("tcp", ts.addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			rawGet(t, c, "/")
			waitFor(t, started, "the handler")
			pair.Cut()
			goOn.open()
			eventually(t, "the response is counted undelivered", func() bool { return m.Stats().Undelivered == 1 })
		})
	}
}

// TestDeliveredNotCounted: a response the client read is not counted
// undelivered, and the options come back once it is acknowledged.
func TestDeliveredNotCounted(t *testing.T) {
	m := newMonitor(t, Options{Source: SourceEpoll, DropTimeout: 2 * time.Second})
	conns := make(chan *conn, 1)
	ts := serve(t, m, loopback(t), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conns <- FromContext(r.Context()).c
		io.WriteString(w, strings.Repeat("confirmation ", 1000))
	}), nil)
	c, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rawGet(t, c, "/")
	resp := readResponse(t, c)
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	sc := waitFor(t, conns, "the handler")
	eventually(t, "the drain ends", func() bool { return !sc.tuned.Load() && sc.pending.Load() == nil })
	if got := readSockopts(t, sc); got.userTimeout != 0 {
		t.Errorf("idle connection kept user timeout %d", got.userTimeout)
	}
	reset(t, c)
	waitFor(t, ts.closed, "net/http to close the connection")
	if n := m.Stats().Undelivered; n != 0 {
		t.Errorf("undelivered = %d for a response the client read", n)
	}
}

// TestConnCloseDelivery: WaitDelivered confirms the delivery of a response
// on a connection net/http closes after it (Connection: close), where the
// socket is gone from net/http by the time the client acknowledged.
func TestConnCloseDelivery(t *testing.T) {
	for _, src := range []Source{SourceEpoll, SourceBPF} {
		for _, proto := range []string{"HTTP/1.1\r\nConnection: close", "HTTP/1.0"} {
			t.Run(string(src)+"/"+strings.Fields(proto)[0], func(t *testing.T) {
				res := make(chan error, 1)
				m := newMonitor(t, Options{Source: src})
				ts := serve(t, m, loopback(t), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					st := FromContext(r.Context())
					io.WriteString(w, "order confirmed\n")
					st.Finish()
					ctx, cancel := context.WithTimeout(context.Background(), wait)
					defer cancel()
					res <- st.WaitDelivered(ctx)
				}), nil)
				c, err := net.Dial("tcp", ts.addr)
				if err != nil {
					t.Fatal(err)
				}
				fmt.Fprintf(c, "GET / %s\r\nHost: t\r\n\r\n", proto)
				c.SetReadDeadline(time.Now().Add(wait))
				b, _ := io.ReadAll(c) // to the server's FIN
				c.Close()
				if !strings.Contains(string(b), "order confirmed") {
					t.Fatalf("response %q", b)
				}
				if err := waitFor(t, res, "WaitDelivered"); err != nil {
					t.Errorf("delivered response: WaitDelivered = %v", err)
				}
				if n := m.Stats().Undelivered; n != 0 {
					t.Errorf("undelivered = %d", n)
				}
			})
		}
	}
}

// TestConnCloseNotDelivered: on a connection net/http closed, WaitDelivered
// still learns that the client vanished with the response unacknowledged.
func TestConnCloseNotDelivered(t *testing.T) {
	pair := testnet.NewPair(t)
	m := newMonitor(t, Options{Source: SourceEpoll, DropTimeout: 2 * time.Second})
	ln, err := pair.Server.Listen("tcp", net.JoinHostPort(testnet.ServerAddr4.String(), "0"))
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan struct{}, 1)
	goOn := newGate(t)
	res := make(chan error, 1)
	ts := serve(t, m, ln, confirmingHandler(started, func() *gate { return goOn }, wait, res), nil)
	c, err := pair.Client.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
	waitFor(t, started, "the handler")
	pair.Cut()
	goOn.open()
	if err := waitFor(t, res, "WaitDelivered"); !errors.Is(err, ErrNotDelivered) {
		t.Errorf("WaitDelivered = %v, want ErrNotDelivered", err)
	}
}

// TestClassifyOrderlyHUP: a socket that hung up without error after both
// sides sent FIN is an orderly close, not a reset; one reset by the
// client whose error a reader consumed is still a reset.
func TestClassifyOrderlyHUP(t *testing.T) {
	ln := loopback(t)
	defer ln.Close()
	classified := func(sv net.Conn, consume bool) Reason {
		t.Helper()
		raw, _ := sv.(*net.TCPConn).SyscallConn()
		var r Reason
		eventually(t, "the socket hangs up", func() bool {
			raw.Control(func(fd uintptr) {
				fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
				if n, _ := unix.Poll(fds, 0); n == 1 && fds[0].Revents&unix.POLLHUP != 0 {
					if consume {
						unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
					}
					r = classify(int(fd), uint32(fds[0].Revents))
				}
			})
			return r != ReasonNone
		})
		return r
	}
	pair := func() (net.Conn, net.Conn) {
		cl, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		sv, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		return cl, sv
	}

	// Our FIN first (net/http's Connection: close), then the client's.
	cl, sv := pair()
	io.WriteString(sv, "bye")
	sv.(*net.TCPConn).CloseWrite()
	io.ReadAll(cl)
	cl.Close()
	if r := classified(sv, false); r != ReasonPeerFIN {
		t.Errorf("orderly close after our FIN: %s, want %s", r, ReasonPeerFIN)
	}
	sv.Close()

	// The client's FIN first, then ours.
	cl, sv = pair()
	cl.(*net.TCPConn).CloseWrite()
	io.ReadAll(sv)
	io.WriteString(sv, "bye")
	sv.(*net.TCPConn).CloseWrite()
	io.ReadAll(cl)
	if r := classified(sv, false); r != ReasonPeerFIN {
		t.Errorf("orderly close after the client's FIN: %s, want %s", r, ReasonPeerFIN)
	}
	cl.Close()
	sv.Close()

	// A reset whose error was consumed.
	cl, sv = pair()
	io.WriteString(sv, "hi")
	io.ReadFull(cl, make([]byte, 2))
	reset(t, cl)
	if r := classified(sv, true); r != ReasonPeerReset {
		t.Errorf("reset: %s, want %s", r, ReasonPeerReset)
	}
	sv.Close()
}

// TestEpollWatchAfterClose: a watch racing the source's close never
// registers in a closed (or reused) epoll descriptor nor leaks its
// duplicate.
func TestEpollWatchAfterClose(t *testing.T) {
	src, err := startEpoll(func(*conn, Reason, time.Time) {}, false, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ln := loopback(t)
	defer ln.Close()
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	c, err := newConn(context.Background(), nil, nc)
	if err != nil {
		t.Fatal(err)
	}
	epfd := int(src.ep.Fd())
	if err := src.close(); err != nil {
		t.Fatal(err)
	}
	// The closed descriptor's number is usually taken again at once.
	other, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(other)
	before := countOpenFDs()
	if err := src.watch(c); err == nil {
		t.Errorf("watch after close succeeded (epfd %d, reused: %v)", epfd, other == epfd)
	}
	if after := countOpenFDs(); after != before {
		t.Errorf("open descriptors %d -> %d", before, after)
	}
}

func countOpenFDs() int {
	d, _ := os.ReadDir("/proc/self/fd")
	return len(d)
}
