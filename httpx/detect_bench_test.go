package httpx_test

// Benchmarks of what a detection costs in time, through the public API
// only: how soon a handler's context is done after its client goes away
// (BenchmarkDetect, BenchmarkSilentDrop), and what the State features cost
// when a handler uses them (BenchmarkFeatureCost). `make bench`
// (internal/benchrun) runs them and puts their metrics in
// docs/benchmarks.md.

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hangup-io/hangup/httpx"
	_ "github.com/hangup-io/hangup/httpx/bpfsource" // SourceBPF
	"github.com/hangup-io/hangup/internal/benchrun/agentproc"
	"github.com/hangup-io/hangup/internal/testnet"
	"github.com/hangup-io/hangup/internal/testutil"
)

// detectBound is how long a detection trial waits for the handler's
// context before counting the trial as missed.
const detectBound = 250 * time.Millisecond

// benchServer is a loopback (or test host) HTTP server whose handler
// reports when it has the request and when its context is done.
type benchServer struct {
	addr    string
	started chan struct{}
	done    chan time.Time // zero: the bound passed first
	bound   time.Duration
	close   func()
}

// startBenchServer serves on ln, behind a Monitor with opts unless plain
// is set. Requests to /read have their whole body read first. With
// SourceAgent it waits until agent has the listener. The server closes
// when b ends.
func startBenchServer(b *testing.B, ln net.Listener, plain bool, opts httpx.Options, agent *agentproc.Agent, bound time.Duration) *benchServer {
	b.Helper()
	s := &benchServer{started: make(chan struct{}, 1), done: make(chan time.Time, 1), bound: bound}
	var h http.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/read" {
			io.Copy(io.Discard, r.Body)
		}
		s.started <- struct{}{}
		t := time.NewTimer(s.bound)
		defer t.Stop()
		select {
		case <-r.Context().Done():
			s.done <- time.Now()
		case <-t.C:
			s.done <- time.Time{}
		}
	})
	srv := &http.Server{Handler: h, ErrorLog: slog.NewLogLogger(slog.DiscardHandler, slog.LevelError)}
	var m *httpx.Monitor
	if !plain {
		opts.Logger = slog.New(slog.DiscardHandler)
		var err error
		if m, err = httpx.New(opts); err != nil {
			b.Fatal(err)
		}
		if opts.Source != httpx.SourceAgent && m.Source() != opts.Source {
			m.Close()
			testnet.SkipOrFail(b, "source %s did not start (fell back to %s): it needs root (CAP_BPF, CAP_PERFMON)", opts.Source, m.Source())
		}
		srv.Handler = m.Handler(h)
		m.Configure(srv)
		ln = m.Listener(ln)
	}
	s.addr = ln.Addr().String()
	served := make(chan struct{})
	go func() { defer close(served); srv.Serve(ln) }()
	s.close = func() {
		srv.Close()
		<-served
		if m != nil {
			m.Close()
		}
	}
	b.Cleanup(s.close)
	if agent != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := agent.WaitRegistered(ctx, ln.Addr()); err != nil {
			b.Fatal(err)
		}
	}
	return s
}

// waitStarted waits for the handler to have the request.
func (s *benchServer) waitStarted(b *testing.B) {
	select {
	case <-s.started:
	case <-time.After(10 * time.Second):
		b.Fatal("the handler did not get the request within 10s")
	}
}

// waitDone returns when the handler saw its context done (zero: never,
// within the bound).
func (s *benchServer) waitDone(b *testing.B) time.Time {
	select {
	case t := <-s.done:
		return t
	case <-time.After(s.bound + 10*time.Second):
		b.Fatal("the handler did not end")
		return time.Time{}
	}
}

// startAgent runs a real hangupd as root with a private socket, stopped
// when b ends.
func startAgent(b *testing.B) *agentproc.Agent {
	b.Helper()
	if os.Geteuid() != 0 {
		testnet.SkipOrFail(b, "the agent source needs a real hangupd, which needs root")
	}
	a, err := agentproc.Start(testutil.BuildHangupd(b), nil, "--seed.disable")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(a.Stop)
	return a
}

func loopbackListener(b *testing.B) net.Listener {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	return ln
}

// detectCase is one way a client leaves.
type detectCase struct {
	name   string
	path   string // /read: the handler reads the whole body first
	header string // request head, with its Content-Length
	body   string // what the client sends of the body
	rst    bool   // reset (SO_LINGER 0 + Close) instead of FIN (CloseWrite)
}

var detectCases = func() []detectCase {
	var cs []detectCase
	for _, rst := range []bool{false, true} {
		how := "fin"
		if rst {
			how = "rst"
		}
		cs = append(cs,
			detectCase{name: how + "/body-read", path: "/read", header: "Content-Length: 5", body: "hello", rst: rst},
			detectCase{name: how + "/body-unread", path: "/unread", header: "Content-Length: 1000000", body: "hello", rst: rst})
	}
	return cs
}()

// BenchmarkDetect measures, for plain net/http and every httpx source,
// the time from a client's FIN or RST to the handler seeing its context
// done, with the request body read and unread. Each op is one trial on a
// new loopback connection; it reports the p50 and p90 in microseconds
// and the share of trials that saw nothing within detectBound (missed-%).
// A percentile that falls on a missed trial is not reported: net/http
// never notices a client that leaves with the body unread. Run it with
// -benchtime=200x.
func BenchmarkDetect(b *testing.B) {
	for _, src := range []string{"nethttp", "epoll", "bpf", "agent"} {
		b.Run(src, func(b *testing.B) {
			var agent *agentproc.Agent
			opts := httpx.Options{Source: httpx.Source(src)}
			switch src {
			case "bpf":
				if os.Geteuid() != 0 {
					testnet.SkipOrFail(b, "the bpf source needs root (CAP_BPF, CAP_PERFMON)")
				}
			case "agent":
				agent = startAgent(b)
				opts.AgentSocket = agent.Socket
			}
			s := startBenchServer(b, loopbackListener(b), src == "nethttp", opts, agent, detectBound)
			for _, dc := range detectCases {
				b.Run(dc.name, func(b *testing.B) { detectTrials(b, s, dc) })
			}
		})
	}
}

func detectTrials(b *testing.B, s *benchServer, dc detectCase) {
	var lat []time.Duration
	missed := 0
	for i := 0; i < b.N; i++ {
		c, err := net.Dial("tcp", s.addr)
		if err != nil {
			b.Fatal(err)
		}
		tc := c.(*net.TCPConn)
		if _, err := fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: bench\r\n%s\r\n\r\n%s", dc.path, dc.header, dc.body); err != nil {
			b.Fatal(err)
		}
		s.waitStarted(b)
		t0 := time.Now()
		if dc.rst {
			tc.SetLinger(0)
			c.Close()
		} else if err := tc.CloseWrite(); err != nil {
			b.Fatal(err)
		}
		t1 := s.waitDone(b)
		c.Close()
		if t1.IsZero() {
			missed++
		} else {
			lat = append(lat, t1.Sub(t0))
		}
		// A source that never notices: a few trials say so, the rest
		// would only wait out the bound.
		if missed >= 5 && len(lat) == 0 {
			break
		}
	}
	reportLatency(b, lat, missed, time.Microsecond, "us")
}

// reportLatency reports the p50 and p90 of lat (in unit, named suffix),
// counting each missed trial as slower than any, and the share missed.
func reportLatency(b *testing.B, lat []time.Duration, missed int, unit time.Duration, suffix string) {
	n := len(lat) + missed
	slices.Sort(lat)
	for _, q := range []struct {
		name string
		q    float64
	}{{"p50", 0.5}, {"p90", 0.9}} {
		i := int(q.q * float64(n-1))
		if i < len(lat) {
			b.ReportMetric(float64(lat[i])/float64(unit), q.name+"-"+suffix)
		}
	}
	if len(lat) > 0 {
		b.ReportMetric(float64(lat[len(lat)-1])/float64(unit), "max-"+suffix)
	}
	b.ReportMetric(100*float64(missed)/float64(n), "missed-%")
}

// BenchmarkSilentDrop measures how soon a handler learns that its client
// vanished (link cut: no FIN, no RST) at DropTimeout 2s, 3s and 5s, with
// the client in its own network namespace. Each op is one trial: the
// link is cut right after the handler has the request, and the time until
// its context is done is recorded; it reports the p50 and the max in
// seconds, and max-of-timeout (the max over DropTimeout). A trial that
// sees nothing within three times DropTimeout counts as missed. Run it
// with -benchtime=5x; it takes minutes.
func BenchmarkSilentDrop(b *testing.B) {
	for _, src := range []httpx.Source{httpx.SourceEpoll, httpx.SourceBPF} {
		b.Run(string(src), func(b *testing.B) {
			for _, d := range []time.Duration{2 * time.Second, 3 * time.Second, 5 * time.Second} {
				b.Run(d.String(), func(b *testing.B) { dropTrials(b, src, d) })
			}
		})
	}
}

func dropTrials(b *testing.B, src httpx.Source, d time.Duration) {
	pair := testnet.NewPair(b)
	ln, err := pair.Server.Listen("tcp", net.JoinHostPort(testnet.ServerAddr4.String(), "0"))
	if err != nil {
		b.Fatal(err)
	}
	s := startBenchServer(b, ln, false, httpx.Options{Source: src, DropTimeout: d}, nil, 3*d)
	var lat []time.Duration
	missed := 0
	for i := 0; i < b.N; i++ {
		c, err := pair.Client.Dial("tcp", s.addr)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := io.WriteString(c, "GET /unread HTTP/1.1\r\nHost: bench\r\n\r\n"); err != nil {
			b.Fatal(err)
		}
		s.waitStarted(b)
		t0 := time.Now()
		pair.Cut()
		t1 := s.waitDone(b)
		pair.Restore()
		c.Close()
		if t1.IsZero() {
			missed++
		} else {
			lat = append(lat, t1.Sub(t0))
		}
	}
	reportLatency(b, lat, missed, time.Second, "s")
	if len(lat) > 0 && missed == 0 {
		b.ReportMetric(float64(lat[len(lat)-1])/float64(d), "max-of-timeout")
	}
}

// BenchmarkFeatureCost measures a keep-alive request through a loopback
// server behind a Monitor (epoll source) whose handler uses one State
// feature: none, Finish, a time limit, WaitDelivered. Compare each with
// "none" from the same run.
func BenchmarkFeatureCost(b *testing.B) {
	m, err := httpx.New(httpx.Options{Source: httpx.SourceEpoll, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	features := []struct {
		name string
		use  func(w http.ResponseWriter, r *http.Request, st *httpx.State)
	}{
		{"none", func(w http.ResponseWriter, r *http.Request, st *httpx.State) { io.WriteString(w, "ok") }},
		{"finish", func(w http.ResponseWriter, r *http.Request, st *httpx.State) {
			io.WriteString(w, "ok")
			st.Finish()
		}},
		{"timelimit", func(w http.ResponseWriter, r *http.Request, st *httpx.State) {
			st.SetTimeLimit(time.Minute)
			io.WriteString(w, "ok")
		}},
		{"waitdelivered", func(w http.ResponseWriter, r *http.Request, st *httpx.State) {
			io.WriteString(w, "ok")
			if err := st.WaitDelivered(r.Context()); err != nil {
				b.Error(err)
			}
		}},
	}
	for _, f := range features {
		b.Run(f.name, func(b *testing.B) {
			srv := &http.Server{Handler: m.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				f.use(w, r, httpx.FromContext(r.Context()))
			}))}
			m.Configure(srv)
			ln := loopbackListener(b)
			var wg sync.WaitGroup
			wg.Go(func() { srv.Serve(ln) })
			defer wg.Wait()
			defer srv.Close()
			tr := &http.Transport{}
			defer tr.CloseIdleConnections()
			client := &http.Client{Transport: tr}
			url := "http://" + ln.Addr().String() + "/"
			b.ReportAllocs()
			for b.Loop() {
				resp, err := client.Get(url)
				if err != nil {
					b.Fatal(err)
				}
				if body, _ := io.ReadAll(resp.Body); !strings.HasPrefix(string(body), "ok") {
					b.Fatalf("response %q", body)
				}
				resp.Body.Close()
			}
		})
	}
}
