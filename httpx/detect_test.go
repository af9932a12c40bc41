package httpx

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hangup-io/hangup/internal/testnet"
)

// Detection tests: a real server in one network namespace, a real client in
// another, joined by a veth link the test can cut; both sources.

var detectSources = []Source{SourceBPF, SourceEpoll}

func forSources(t *testing.T, fn func(t *testing.T, src Source)) {
	for _, src := range detectSources {
		t.Run(string(src), func(t *testing.T) { fn(t, src) })
	}
}

// netServer starts a monitored server on the pair's server host.
func netServer(t *testing.T, opts Options, h http.HandlerFunc) (*testnet.Pair, *testServer) {
	t.Helper()
	pair := testnet.NewPair(t)
	m := newMonitor(t, opts)
	ln, err := pair.Server.Listen("tcp", net.JoinHostPort(testnet.ServerAddr4.String(), "0"))
	if err != nil {
		t.Fatal(err)
	}
	return pair, serve(t, m, ln, h, nil)
}

// waitingHandler reports started, then waits for its context (or, if
// detection fails, for the generous bound) and reports what it saw.
func waitingHandler(started chan<- struct{}, results chan<- result) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		st := FromContext(r.Context())
		started <- struct{}{}
		woke := "timer"
		select {
		case <-r.Context().Done():
			woke = "ctx"
		case <-time.After(wait):
		}
		results <- result{status: st.Status(), reason: st.AbortReason(), cause: context.Cause(r.Context()), woke: woke}
	}
}

func TestDetectPeerGoneWithBodyUnread(t *testing.T) {
	forSources(t, func(t *testing.T, src Source) {
		for _, how := range []string{"fin", "rst"} {
			t.Run(how, func(t *testing.T) {
				started, results := make(chan struct{}, 1), make(chan result, 1)
				pair, ts := netServer(t, Options{Source: src}, waitingHandler(started, results))
				c, err := pair.Client.Dial("tcp", ts.addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				rawRequest(t, c, "/upload") // most of the body never comes
				waitFor(t, started, "handler")
				want := ReasonPeerFIN
				if how == "fin" {
					if err := c.(*net.TCPConn).CloseWrite(); err != nil {
						t.Fatal(err)
					}
				} else {
					want = ReasonPeerReset
					reset(t, c)
				}
				res := waitFor(t, results, "handler result")
				if res.woke != "ctx" || res.status != StatusAborted || res.reason != want || !errors.Is(res.cause, ErrAborted) {
					t.Errorf("got %+v, want ABORTED %s before the handler's wait ended", res, want)
				}
				if n := ts.m.Stats().Aborts[want]; n != 1 {
					t.Errorf("aborts{reason=%s} = %d, want 1", want, n)
				}
			})
		}
	})
}

// TestDetectHalfClose: the client sends a complete request, then only a
// FIN (it may still read). net/http cancels the request context on it.
// It is an abort, peer_fin, by default; with IgnoreHalfClose the request
// stays NORMAL, its context live, and the client gets the response.
func TestDetectHalfClose(t *testing.T) {
	// quiet is how long the handler, once the FIN was seen everywhere,
	// gives httpx to (wrongly) end its context. Not a speed assertion:
	// longer only makes the test slower.
	const quiet = 2 * time.Second
	forSources(t, func(t *testing.T, src Source) {
		for _, ignore := range []bool{false, true} {
			t.Run(map[bool]string{false: "abort", true: "ignored"}[ignore], func(t *testing.T) {
				started := make(chan struct{}, 1)
				finSeen := make(chan struct{})
				results := make(chan result, 1)
				parents := make(chan context.Context, 1)
				pair := testnet.NewPair(t)
				m := newMonitor(t, Options{Source: src, IgnoreHalfClose: ignore})
				ln, err := pair.Server.Listen("tcp", net.JoinHostPort(testnet.ServerAddr4.String(), "0"))
				if err != nil {
					t.Fatal(err)
				}
				ts := serve(t, m, ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					st := FromContext(r.Context())
					started <- struct{}{}
					<-finSeen
					timer := time.NewTimer(quiet)
					defer timer.Stop()
					if !ignore {
						timer.Reset(wait)
					}
					woke := "timer"
					select {
					case <-r.Context().Done():
						woke = "ctx"
					case <-timer.C:
					}
					results <- result{status: st.Status(), reason: st.AbortReason(), cause: context.Cause(r.Context()), woke: woke}
					io.WriteString(w, "still here")
				}), func(h http.Handler) http.Handler {
					return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
						parents <- r.Context()
						h.ServeHTTP(w, r)
					})
				})
				c, err := pair.Client.Dial("tcp", ts.addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				rawGet(t, c, "/")
				waitFor(t, started, "handler")
				parent := waitFor(t, parents, "request context")
				if err := c.(*net.TCPConn).CloseWrite(); err != nil {
					t.Fatal(err)
				}
				// Both net/http and the source have seen the FIN.
				waitFor(t, parent.Done(), "net/http to cancel the request")
				var cn *conn
				eventually(t, "the source reports the FIN", func() bool {
					ts.m.mu.Lock()
					defer ts.m.mu.Unlock()
					for _, x := range ts.m.byNC {
						cn = x
					}
					if cn == nil {
						return false
					}
					return cn.state.Load()&connFIN != 0
				})
				close(finSeen)
				res := waitFor(t, results, "handler result")
				if ignore {
					if res.woke != "timer" || res.status != StatusNormal || res.reason != ReasonNone {
						t.Errorf("got %+v, want NORMAL with a live context", res)
					}
					resp := readResponse(t, c)
					body, _ := io.ReadAll(resp.Body)
					if string(body) != "still here" {
						t.Errorf("half-closed client got %q", body)
					}
				} else if res.woke != "ctx" || res.status != StatusAborted || res.reason != ReasonPeerFIN || !errors.Is(res.cause, ErrAborted) {
					t.Errorf("got %+v, want ABORTED peer_fin", res)
				}
				want := map[bool]uint64{false: 1, true: 0}[ignore]
				if st := ts.m.Stats(); st.Aborts[ReasonPeerFIN] != want || st.Aborts[ReasonCanceled] != 0 {
					t.Errorf("aborts %v, want peer_fin %d and no canceled", st.Aborts, want)
				}
			})
		}
	})
}

// TestDetectHalfCloseIgnoredThenReset: with IgnoreHalfClose, a reset after
// the FIN still counts, as peer_reset.
func TestDetectHalfCloseIgnoredThenReset(t *testing.T) {
	forSources(t, func(t *testing.T, src Source) {
		started := make(chan struct{}, 1)
		results := make(chan result, 1)
		pair, ts := netServer(t, Options{Source: src, IgnoreHalfClose: true}, func(w http.ResponseWriter, r *http.Request) {
			st := FromContext(r.Context())
			started <- struct{}{}
			io.Copy(io.Discard, r.Body)
			select {
			case <-r.Context().Done():
			case <-time.After(wait):
			}
			results <- result{status: st.Status(), reason: st.AbortReason()}
		})
		c, err := pair.Client.Dial("tcp", ts.addr)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
		waitFor(t, started, "handler")
		c.(*net.TCPConn).CloseWrite()
		reset(t, c)
		if res := waitFor(t, results, "status"); res.status != StatusAborted || res.reason != ReasonPeerReset {
			t.Errorf("got %+v, want ABORTED peer_reset", res)
		}
		if st := ts.m.Stats(); st.Aborts[ReasonPeerFIN] != 0 || st.Aborts[ReasonPeerReset] != 1 || st.Aborts[ReasonCanceled] != 0 {
			t.Errorf("aborts %v, want one reset and nothing else", st.Aborts)
		}
	})
}

func TestDetectLinkCutWhileIdle(t *testing.T) {
	const drop = 2 * time.Second
	forSources(t, func(t *testing.T, src Source) {
		started, results := make(chan struct{}, 1), make(chan result, 1)
		pair, ts := netServer(t, Options{Source: src, DropTimeout: drop}, waitingHandler(started, results))
		c, err := pair.Client.Dial("tcp", ts.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		rawGet(t, c, "/think") // complete request: the handler is idle on the socket
		waitFor(t, started, "handler")
		cut := time.Now()
		pair.Cut()
		res := waitFor(t, results, "handler result")
		took := time.Since(cut)
		t.Logf("%s: %s after the cut", src, took)
		if res.woke != "ctx" || res.status != StatusAborted || !isTimeoutReason(res.reason) {
			t.Fatalf("got %+v, want ABORTED with a timeout reason", res)
		}
		if src == SourceBPF && res.reason != ReasonKeepaliveTimeout {
			t.Errorf("reason %s, want keepalive_timeout", res.reason)
		}
		// The feature's promise: the drop timeout, plus generous slack.
		if took > drop+8*time.Second {
			t.Errorf("noticed %s after the cut, drop timeout %s", took, drop)
		}
	})
}

func TestDetectLinkCutBeforeDelivery(t *testing.T) {
	const drop = 2 * time.Second
	forSources(t, func(t *testing.T, src Source) {
		for _, cut := range []bool{false, true} {
			t.Run(map[bool]string{false: "delivered", true: "cut"}[cut], func(t *testing.T) {
				started := make(chan struct{}, 1)
				delivery := make(chan error, 1)
				var goOn *gate
				pair, ts := netServer(t, Options{Source: src, DropTimeout: drop},
					confirmingHandler(started, func() *gate { return goOn }, wait, delivery))
				goOn = newGate(t)
				c, err := pair.Client.Dial("tcp", ts.addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				rawGet(t, c, "/order")
				waitFor(t, started, "handler")
				if cut {
					pair.Cut() // nothing the server writes from now on is acknowledged
				}
				goOn.open()
				if !cut {
					resp := readResponse(t, c)
					io.Copy(io.Discard, resp.Body)
				}
				err = waitFor(t, delivery, "delivery")
				undelivered := ts.m.Stats().Undelivered
				if cut {
					if !errors.Is(err, ErrNotDelivered) || undelivered != 1 {
						t.Errorf("WaitDelivered = %v, undelivered %d; want ErrNotDelivered, 1", err, undelivered)
					}
				} else if err != nil || undelivered != 0 {
					t.Errorf("WaitDelivered = %v, undelivered %d; want nil, 0", err, undelivered)
				}
			})
		}
	})
}

func TestDetectKeepAliveCloseIsNoAbort(t *testing.T) {
	forSources(t, func(t *testing.T, src Source) {
		statuses := make(chan Status, 2)
		pair, ts := netServer(t, Options{Source: src}, func(w http.ResponseWriter, r *http.Request) {
			st := FromContext(r.Context())
			st.RegisterShutdown(func() { statuses <- st.Status() })
			io.WriteString(w, "ok")
		})
		tr := &http.Transport{DialContext: pair.Client.Dialer()}
		client := &http.Client{Transport: tr}
		for range 2 {
			resp, err := client.Get("http://" + ts.addr + "/")
			if err != nil {
				t.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		tr.CloseIdleConnections() // FIN on an idle keep-alive connection
		waitFor(t, ts.closed, "the server to close its side")
		for range 2 {
			if s := waitFor(t, statuses, "status"); s != StatusNormal {
				t.Errorf("status %s, want NORMAL", s)
			}
		}
		st := ts.m.Stats()
		for r, n := range st.Aborts {
			if n != 0 {
				t.Errorf("aborts{reason=%s} = %d", r, n)
			}
		}
		if st.Requests[StatusNormal] != 2 {
			t.Errorf("requests %v", st.Requests)
		}
	})
}

// TestDetectResetAfterPipelinedRequest: a second request that arrives while
// the first one's handler runs stops net/http's background read, so
// net/http no longer notices the client leave. httpx still does: the probe
// at once; the epoll source, which registers a connection only for requests
// net/http's background read does not cover, once the request outlives the
// watchdog's tick (the watchdog registers it then, and asks the socket).
func TestDetectResetAfterPipelinedRequest(t *testing.T) {
	forSources(t, func(t *testing.T, src Source) {
		started, results := make(chan struct{}, 2), make(chan result, 2)
		pair, ts := netServer(t, Options{Source: src, DropTimeout: 2 * time.Second}, waitingHandler(started, results))
		c, err := pair.Client.Dial("tcp", ts.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		rawGet(t, c, "/first")
		waitFor(t, started, "handler")
		rawGet(t, c, "/pipelined")
		time.Sleep(20 * time.Millisecond) // net/http's background read takes its first byte
		reset(t, c)
		res := waitFor(t, results, "handler result")
		if res.woke != "ctx" || res.status != StatusAborted || res.reason != ReasonPeerReset || !errors.Is(res.cause, ErrAborted) {
			t.Errorf("got %+v, want ABORTED %s before the handler's wait ended", res, ReasonPeerReset)
		}
	})
}

// TestEpollRegistersOnlyWhatNetHTTPMisses: the epoll source registers no
// connection for bodiless HTTP/1.x requests, whose client net/http's
// background read watches, and registers one whose request has a body.
func TestEpollRegistersOnlyWhatNetHTTPMisses(t *testing.T) {
	m := newMonitor(t, Options{Source: SourceEpoll})
	ts := serve(t, m, loopback(t), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, "ok")
	}), nil)
	src := m.src.(*epollSource)
	registered := func() int {
		src.mu.Lock()
		defer src.mu.Unlock()
		return len(src.conns)
	}
	client := &http.Client{Transport: &http.Transport{}}
	defer client.CloseIdleConnections()
	done := func(resp *http.Response, err error) {
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	for range 3 {
		done(client.Get("http://" + ts.addr + "/"))
	}
	if n := registered(); n != 0 {
		t.Fatalf("%d connections registered after GET requests, want 0", n)
	}
	done(client.Post("http://"+ts.addr+"/", "text/plain", strings.NewReader("body")))
	if n := registered(); n != 1 {
		t.Fatalf("%d connections registered after a POST with a body, want 1", n)
	}
}

// TestDetectFINBeforeRequestStarts: the client sends a request with a body
// and its FIN at once, on a keep-alive connection whose first request
// ended, so that the FIN can arrive while no request is in flight (the
// in-process probe then writes its event without waking its reader). The
// request that starts next is still marked at once.
func TestDetectFINBeforeRequestStarts(t *testing.T) {
	forSources(t, func(t *testing.T, src Source) {
		started, results := make(chan struct{}, 1), make(chan result, 1)
		wait := waitingHandler(started, results)
		pair, ts := netServer(t, Options{Source: src}, func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/first" {
				io.WriteString(w, "ok")
				return
			}
			wait(w, r)
		})
		c, err := pair.Client.Dial("tcp", ts.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		rawGet(t, c, "/first")
		if resp := readResponse(t, c); resp.StatusCode != http.StatusOK {
			t.Fatalf("first request: %s", resp.Status)
		}
		rawRequest(t, c, "/second") // the body is never read
		if err := c.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		waitFor(t, started, "second handler")
		res := waitFor(t, results, "second result")
		if res.woke != "ctx" || res.status != StatusAborted || res.reason != ReasonPeerFIN {
			t.Errorf("got %+v, want ABORTED %s before the handler's wait ended", res, ReasonPeerFIN)
		}
	})
}
