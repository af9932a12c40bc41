package httpx

import (
	"bytes"
	"context"
	"strings"

	"log/slog"
	"net"
	"net/http"
	"testing"

	"github.com/hangup-io/hangup/internal/testnet"

	"github.com/prometheus/client_golang/prometheus"
)

func TestCollector(t *testing.T) {
	started, results := make(chan struct{}, 1), make(chan result, 1)
	ts := abortServer(t, Options{}, waitingHandler(started, results))
	c, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	rawRequest(t, c, "/")
	waitFor(t, started, "handler")
	reset(t, c)
	waitFor(t, results, "result")
	eventually(t, "the request is counted", func() bool { return ts.m.Stats().Requests[StatusAborted] == 1 })

	reg := prometheus.NewRegistry()
	reg.MustRegister(ts.m)
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range families {
		for _, m := range f.GetMetric() {
			key := f.GetName()
			for _, l := range m.GetLabel() {
				key += "{" + l.GetName() + "=" + l.GetValue() + "}"
			}
			switch {
			case m.Counter != nil:
				got[key] = m.Counter.GetValue()
			case m.Gauge != nil:
				got[key] = m.Gauge.GetValue()
			case m.Histogram != nil:
				got[key] = float64(m.Histogram.GetSampleCount())
			}
		}
	}
	want := map[string]float64{
		"hangup_http_requests_total{outcome=aborted}":         1,
		"hangup_http_requests_total{outcome=normal}":          0,
		"hangup_http_requests_total{outcome=aborted_timeout}": 0,
		"hangup_http_aborts_total{reason=peer_reset}":         1,
		"hangup_http_abort_detection_latency_seconds":         1,
		"hangup_http_undelivered_responses_total":             0,
		"hangup_http_detection_source{source=epoll}":          1,
		"hangup_http_detection_source{source=bpf}":            0,
	}
	for k, v := range want {
		if g, ok := got[k]; !ok || g != v {
			t.Errorf("%s = %v (present %v), want %v", k, g, ok, v)
		}
	}
}

func TestSourceLoggedOnce(t *testing.T) {
	var buf bytes.Buffer
	m, err := New(Options{Source: SourceEpoll, Logger: slog.New(slog.NewTextHandler(&buf, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if m.Source() != SourceEpoll || bytes.Count(buf.Bytes(), []byte("source=epoll")) != 1 {
		t.Errorf("source %s, log:\n%s", m.Source(), buf.String())
	}
	if _, err := New(Options{Source: "carrier-pigeon"}); err == nil {
		t.Error("unknown source accepted")
	}
}

// TestStreamReset: an HTTP/2 client that cancels one request resets its
// stream; the connection lives on, and only that request is aborted.
func TestStreamReset(t *testing.T) {
	started, results := make(chan struct{}, 1), make(chan result, 1)
	m := newMonitor(t, Options{Source: SourceEpoll})
	ts := serveWith(t, m, loopback(t), waitingHandler(started, results), nil, func(srv *http.Server) {
		srv.Protocols = new(http.Protocols)
		srv.Protocols.SetUnencryptedHTTP2(true)
	})
	tr := &http.Transport{Protocols: new(http.Protocols)}
	tr.Protocols.SetUnencryptedHTTP2(true)
	defer tr.CloseIdleConnections()
	req, _ := http.NewRequest("GET", "http://"+ts.addr+"/", nil)
	ctx, cancel := contextWithCancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		resp, err := tr.RoundTrip(req.WithContext(ctx))
		if err == nil {
			resp.Body.Close()
		}
	}()
	waitFor(t, started, "handler")
	cancel()
	<-done
	res := waitFor(t, results, "result")
	if res.woke != "ctx" || res.status != StatusAborted || res.reason != ReasonCanceled {
		t.Errorf("got %+v, want ABORTED canceled", res)
	}
}

func TestSourceFallsBackLoudly(t *testing.T) {
	failBPF(t, nil)
	var buf bytes.Buffer
	m, err := New(Options{Source: SourceBPF, Logger: slog.New(slog.NewTextHandler(&buf, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	log := buf.String()
	if m.Source() != SourceEpoll || !strings.Contains(log, "level=WARN") || !strings.Contains(log, "fallback=epoll") ||
		!strings.Contains(log, "err=") || !strings.Contains(log, "source=epoll") {
		t.Errorf("source %s, log:\n%s", m.Source(), log)
	}
}

// TestEventBeforeRegistration: an event for a connection that is not
// registered yet (a reset between accept and ConnContext) is remembered
// and applied when the connection is registered.
func TestEventBeforeRegistration(t *testing.T) {
	m := newMonitor(t, Options{Source: SourceNone})
	m.src = newCookieSource(SourceBPF, nopDetect{})
	ln := loopback(t)
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	cookie, err := testnet.SocketCookie(server)
	if err != nil {
		t.Fatal(err)
	}
	m.deliver(cookie+1, event{reason: ReasonPeerFIN}) // someone else's
	m.deliver(cookie, event{reason: ReasonPeerReset})
	ctx := m.connContext(context.Background(), server)
	c, _ := ctx.Value(connKey{}).(*conn)
	if c == nil || c.cookie != cookie || c.dead() != ReasonPeerReset {
		t.Fatalf("conn %+v", c)
	}
	m.connState(server, http.StateClosed)
}
