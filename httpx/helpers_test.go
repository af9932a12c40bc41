package httpx

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangup-io/hangup/internal/testnet"
)

// wait is the generous bound for waiting on an event in tests; it is
// never asserted as a speed.
const wait = 20 * time.Second

func newMonitor(t testing.TB, opts Options) *Monitor {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	m, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if opts.Source != SourceAuto && m.Source() != opts.Source {
		m.Close()
		testnet.SkipOrFail(t, "source %s unavailable (got %s)", opts.Source, m.Source())
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Errorf("closing monitor: %v", err)
		}
	})
	return m
}

type testServer struct {
	m      *Monitor
	srv    *http.Server
	addr   string
	closed chan net.Conn // connections net/http closed
}

// serve runs a real http.Server with m on ln until the test ends. wrap, if
// not nil, wraps the Monitor's handler (outer middleware).
func serve(t testing.TB, m *Monitor, ln net.Listener, h http.Handler, wrap func(http.Handler) http.Handler) *testServer {
	t.Helper()
	return serveWith(t, m, ln, h, wrap, nil)
}

// serveWith is serve with a function that configures the server first;
// a server with a TLSConfig is started with ServeTLS.
func serveWith(t testing.TB, m *Monitor, ln net.Listener, h http.Handler, wrap func(http.Handler) http.Handler, configure func(*http.Server)) *testServer {
	t.Helper()
	var root http.Handler = m.Handler(h)
	if wrap != nil {
		root = wrap(root)
	}
	ts := &testServer{m: m, addr: ln.Addr().String(), closed: make(chan net.Conn, 64)}
	ts.srv = &http.Server{
		Handler:  root,
		ErrorLog: log.New(io.Discard, "", 0),
		ConnState: func(c net.Conn, s http.ConnState) {
			if s == http.StateClosed {
				select {
				case ts.closed <- c:
				default:
				}
			}
		},
	}
	if configure != nil {
		configure(ts.srv)
	}
	m.Configure(ts.srv)
	errc := make(chan error, 1)
	go func() {
		if ts.srv.TLSConfig != nil {
			errc <- ts.srv.ServeTLS(ln, "", "")
		} else {
			errc <- ts.srv.Serve(ln)
		}
	}()
	t.Cleanup(func() {
		openGates(t)
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		if err := m.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-errc; err != http.ErrServerClosed {
			t.Errorf("serve: %v", err)
		}
	})
	return ts
}

func loopback(t testing.TB) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// result is what a test handler reports.
type result struct {
	status Status
	reason Reason
	cause  error
	woke   string // "ctx" or "timer"
}

// waitFor receives from ch or fails the test after the generous bound.
func waitFor[T any](t testing.TB, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(wait):
		t.Fatalf("timed out waiting for %s", what)
	}
	panic("unreachable")
}

// eventually polls cond until it holds or fails the test.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(wait)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// rawRequest sends a POST with a large declared body of which only a few
// bytes are sent, so that the body stays unread on the server.
func rawRequest(t testing.TB, c net.Conn, path string) {
	t.Helper()
	_, err := fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: test\r\nContent-Length: 1000000\r\n\r\npartial", path)
	if err != nil {
		t.Fatal(err)
	}
}

// rawGet sends a complete GET.
func rawGet(t testing.TB, c net.Conn, path string) {
	t.Helper()
	if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: test\r\n\r\n", path); err != nil {
		t.Fatal(err)
	}
}

func reset(t testing.TB, c net.Conn) {
	t.Helper()
	if err := c.(*net.TCPConn).SetLinger(0); err != nil {
		t.Fatal(err)
	}
	c.Close()
}

func readResponse(t testing.TB, c net.Conn) *http.Response {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(wait))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// gate is a channel closed once, in the test's cleanup at the latest, so a
// blocked handler never outlives its test.
type gate struct {
	once sync.Once
	ch   chan struct{}
}

var (
	gatesMu sync.Mutex
	gates   = map[testing.TB][]*gate{}
)

// newGate returns a gate that serve's cleanup opens before it shuts the
// server down.
func newGate(t testing.TB) *gate {
	g := &gate{ch: make(chan struct{})}
	gatesMu.Lock()
	gates[t] = append(gates[t], g)
	gatesMu.Unlock()
	t.Cleanup(g.open)
	return g
}

func openGates(t testing.TB) {
	gatesMu.Lock()
	gs := gates[t]
	delete(gates, t)
	gatesMu.Unlock()
	for _, g := range gs {
		g.open()
	}
}

func (g *gate) open() { g.once.Do(func() { close(g.ch) }) }

func isTimeoutReason(r Reason) bool { return r == ReasonTimeout || r == ReasonKeepaliveTimeout }

func contains(s, sub string) bool { return strings.Contains(s, sub) }

func contextWithCancel() (context.Context, context.CancelFunc) {
	return context.WithCancel(context.Background())
}

// confirmingHandler signals started, waits for goOn, writes a confirmation,
// finishes the response and sends the result of waiting up to wait for its
// delivery on res.
func confirmingHandler(started chan<- struct{}, goOn func() *gate, wait time.Duration, res chan<- error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		st := FromContext(r.Context())
		started <- struct{}{}
		<-goOn().ch
		io.WriteString(w, strings.Repeat("confirmation ", 1000))
		st.Finish()
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		res <- st.WaitDelivered(ctx)
	}
}
