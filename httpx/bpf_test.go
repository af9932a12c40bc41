package httpx

import (
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hangup-io/hangup/bpf"
	_ "github.com/hangup-io/hangup/httpx/bpfsource" // SourceBPF in tests
	"github.com/hangup-io/hangup/httpx/internal/detect"
)

// failBPF makes SourceBPF fail to start, as without privileges, until the
// test ends; onLoad, if not nil, runs at each attempt.
func failBPF(t testing.TB, onLoad func()) {
	orig := detect.BPF()
	detect.RegisterBPF(func(detect.BPFOptions, detect.Sink, *slog.Logger) (detect.Source, error) {
		if onLoad != nil {
			onLoad()
		}
		return nil, fmt.Errorf("loading: %w", bpf.ErrPermission)
	})
	t.Cleanup(func() { detect.RegisterBPF(orig) })
}

// nopDetect is a detect.Source that reports nothing by itself.
type nopDetect struct{}

func (nopDetect) WatchPort(uint64, uint16) error { return nil }
func (nopDetect) Close() error                   { return nil }

// trackRecorder passes a detect.Source through and records what httpx
// asks it to track.
type trackRecorder struct {
	detect.Source
	tracked chan uint64
}

func (r trackRecorder) Track(cookie uint64, port uint16) error {
	select {
	case r.tracked <- cookie:
	default:
	}
	return r.Source.(detect.Tracker).Track(cookie, port)
}

// TestBPFTracksLongRequests: the kernel may skip the probe's run for a
// passive open (a run nested in its own, on one CPU), and an untracked
// connection's silent drop would go unnoticed while the handler has read
// only part of the body (net/http then reads nothing). A request that
// lives long enough to need drop detection has its connection tracked,
// and the probe's report of its death reaches the handler.
func TestBPFTracksLongRequests(t *testing.T) {
	if detect.BPF() == nil {
		t.Fatal("the in-process probe is not linked")
	}
	orig := detect.BPF()
	tracked := make(chan uint64, 1)
	detect.RegisterBPF(func(o detect.BPFOptions, sink detect.Sink, log *slog.Logger) (detect.Source, error) {
		src, err := orig(o, sink, log)
		if err != nil {
			return nil, err
		}
		return trackRecorder{src, tracked}, nil
	})
	t.Cleanup(func() { detect.RegisterBPF(orig) })

	const drop = 2 * time.Second
	started, results := make(chan struct{}, 1), make(chan result, 1)
	wait := waitingHandler(started, results)
	pair, ts := netServer(t, Options{Source: SourceBPF, DropTimeout: drop}, func(w http.ResponseWriter, r *http.Request) {
		r.Body.Read(make([]byte, 10)) // part of the body: net/http reads no further
		wait(w, r)
	})
	c, err := pair.Client.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n%s", strings.Repeat("x", 1000))
	waitFor(t, started, "handler")
	cookie := waitFor(t, tracked, "Track of the long request's connection")
	if cookie == 0 {
		t.Fatal("tracked cookie 0")
	}
	cut := time.Now()
	pair.Cut()
	res := waitFor(t, results, "handler result")
	t.Logf("noticed %s after the cut: %+v", time.Since(cut), res)
	if res.woke != "ctx" || res.status != StatusAborted || !isTimeoutReason(res.reason) {
		t.Errorf("got %+v, want ABORTED with a timeout reason", res)
	}
}
