package httpx

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/hangup-io/hangup/internal/testnet"
	"golang.org/x/sys/unix"
)

// stall is what the server's socket says about a zero-window stall.
type stall struct {
	zero     bool          // the client's window is shut with data waiting
	lasted   time.Duration // since the last data was sent
	extended bool          // the watchdog moved the user timeout
}

func stallOf(t *testing.T, c *conn) stall {
	t.Helper()
	var (
		info *unix.TCPInfo
		uto  int
		serr error
	)
	if err := c.raw.Control(func(fd uintptr) {
		info, serr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
		if serr == nil {
			uto, serr = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT)
		}
	}); err != nil {
		t.Fatalf("the connection died while its client held a zero window (killed by TCP_USER_TIMEOUT?): %v", err)
	} else if serr != nil {
		t.Fatal(serr)
	}
	return stall{
		zero:     info.Snd_wnd == 0 && info.Notsent_bytes > 0 && info.Unacked == 0,
		lasted:   time.Duration(info.Last_data_sent) * time.Millisecond,
		extended: uto > c.m.drop.set.userTimeout,
	}
}

// waitStalled waits until the client has held a zero window for longer
// than d (without the watchdog, the kernel kills it after the user
// timeout).
func waitStalled(t *testing.T, c *conn, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d + wait)
	for {
		st := stallOf(t, c)
		if st.zero && st.lasted > d {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no zero-window stall kept alive for %s: %+v", d, st)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

var slowSources = []Source{SourceEpoll, SourceBPF}

// TestZeroWindowLiveClient: a client that stops reading (zero window) for
// several drop timeouts while answering the kernel's window probes is
// alive. With TCP_USER_TIMEOUT alone, Linux kills it once the stall lasts
// longer than the user timeout; the watchdog must keep it alive, and it
// then receives the whole response with the request still NORMAL.
func TestZeroWindowLiveClient(t *testing.T) {
	for _, src := range slowSources {
		t.Run(string(src), func(t *testing.T) {
			const (
				drop = 2 * time.Second
				size = 16 << 20
			)
			pair := testnet.NewPair(t)
			m := newMonitor(t, Options{Source: src, DropTimeout: drop})
			ln, err := pair.Server.Listen("tcp", net.JoinHostPort(testnet.ServerAddr4.String(), "0"))
			if err != nil {
				t.Fatal(err)
			}
			conns := make(chan *conn, 1)
			out := make(chan result, 1)
			ts := serve(t, m, ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				st := FromContext(r.Context())
				defer func() { out <- result{status: st.Status(), reason: st.AbortReason()} }()
				conns <- st.c
				w.Header().Set("Content-Length", "16777216")
				buf := make([]byte, 1<<16)
				for n := 0; n < size; n += len(buf) {
					if _, err := w.Write(buf); err != nil {
						return
					}
				}
			}), nil)
			c := slowReader(t, pair, ts.addr)
			sc := waitFor(t, conns, "the handler")

			// Alive but not reading, for three drop timeouts.
			waitStalled(t, sc, 3*drop)
			if s := stallOf(t, sc); !s.zero {
				t.Fatalf("stall ended on its own: %+v", s)
			}

			c.SetReadDeadline(time.Now().Add(wait))
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				t.Fatalf("reading the response: %v", err)
			}
			got, err := io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if err != nil || got != size {
				t.Errorf("live slow client got %d of %d bytes: %v", got, size, err)
			}
			res := waitFor(t, out, "the handler's end")
			if res.status != StatusNormal {
				t.Errorf("live slow client: request %s (%s), want NORMAL", res.status, res.reason)
			}
		})
	}
}

// TestZeroWindowDeadClient: a client that stops reading and then vanishes
// (link cut while its window is shut) is still detected: the request is
// marked aborted with a timeout reason.
func TestZeroWindowDeadClient(t *testing.T) {
	for _, src := range slowSources {
		t.Run(string(src), func(t *testing.T) {
			const drop = 2 * time.Second
			pair := testnet.NewPair(t)
			m := newMonitor(t, Options{Source: src, DropTimeout: drop})
			ln, err := pair.Server.Listen("tcp", net.JoinHostPort(testnet.ServerAddr4.String(), "0"))
			if err != nil {
				t.Fatal(err)
			}
			gone := newGate(t)
			conns := make(chan *conn, 1)
			out := make(chan result, 1)
			ts := serve(t, m, ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				st := FromContext(r.Context())
				// Room for the whole body in the kernel, so the handler is
				// not blocked in a write (which would race the source to
				// name the reason) when the client vanishes. The body fits
				// the send buffer the kernel really gave (net.core.wmem_max
				// caps it: 212992 by default) and is still far more than
				// the client's 32 KiB window.
				sndbuf := 1 << 20
				_ = st.c.raw.Control(func(fd uintptr) {
					_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF, 4<<20)
					if n, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF); err == nil {
						sndbuf = n // twice what was granted, bookkeeping included
					}
				})
				w.Write(make([]byte, min(1<<20, sndbuf/4)))
				w.(http.Flusher).Flush()
				conns <- st.c
				select {
				case <-r.Context().Done():
				case <-gone.ch:
				}
				out <- result{status: st.Status(), reason: st.AbortReason()}
			}), nil)
			slowReader(t, pair, ts.addr)
			sc := waitFor(t, conns, "the handler")
			waitStalled(t, sc, drop+drop/2)
			if s := stallOf(t, sc); !s.zero {
				t.Fatalf("stall ended on its own: %+v", s)
			}
			pair.Cut()
			cut := time.Now()
			res := waitFor(t, out, "the abort")
			t.Logf("aborted %s after the cut (%s)", time.Since(cut).Round(time.Millisecond), res.reason)
			if res.status != StatusAborted || !isTimeoutReason(res.reason) {
				t.Errorf("vanished slow client: request %s (%s), want ABORTED with a timeout reason", res.status, res.reason)
			}
		})
	}
}

// slowReader connects from the client host with a small receive buffer
// (so that a client that stops reading soon shows a zero window) and sends
// GET /; it reads nothing.
func slowReader(t *testing.T, pair *testnet.Pair, addr string) net.Conn {
	t.Helper()
	c, err := pair.Client.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.(*net.TCPConn).SetReadBuffer(32 << 10); err != nil {
		t.Fatal(err)
	}
	rawGet(t, c, "/")
	return c
}
