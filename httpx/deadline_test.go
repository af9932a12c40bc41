package httpx

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// TestOuterDeadline: a middleware around the Monitor's handler gives the
// request a deadline. The handler sees it, its context ends when it
// expires, and that is no client abort: the request stays NORMAL and
// counts as such.
func TestOuterDeadline(t *testing.T) {
	type obs struct {
		hasDeadline bool
		deadline    time.Time
		err, cause  error
		status      Status
		reason      Reason
	}
	var outer time.Time
	out := make(chan obs, 1)
	m := newMonitor(t, Options{Source: SourceEpoll})
	ts := serve(t, m, loopback(t), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		st := FromContext(r.Context())
		var o obs
		o.deadline, o.hasDeadline = r.Context().Deadline()
		select {
		case <-r.Context().Done():
		case <-time.After(wait):
		}
		o.err, o.cause = r.Context().Err(), context.Cause(r.Context())
		o.status, o.reason = st.Status(), st.AbortReason()
		out <- o
	}), func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			ctx, cancel := context.WithTimeout(r.Context(), 50*time.Millisecond)
			defer cancel()
			outer, _ = ctx.Deadline()
			h.ServeHTTP(w, r.WithContext(ctx))
		})
	})
	resp, err := http.Get("http://" + ts.addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	o := waitFor(t, out, "handler")
	if !o.hasDeadline || !o.deadline.Equal(outer) {
		t.Errorf("handler's deadline %v (%v), want the outer one, %v", o.deadline, o.hasDeadline, outer)
	}
	if !errors.Is(o.err, context.DeadlineExceeded) || !errors.Is(o.cause, context.DeadlineExceeded) {
		t.Errorf("context error %v, cause %v; want the deadline", o.err, o.cause)
	}
	if o.status != StatusNormal || o.reason != ReasonNone {
		t.Errorf("status %s reason %s, want NORMAL none", o.status, o.reason)
	}
	eventually(t, "the request is counted", func() bool { return m.Stats().Requests[StatusNormal] == 1 })
	for r, n := range m.Stats().Aborts {
		if n != 0 {
			t.Errorf("aborts{reason=%s} = %d, want none", r, n)
		}
	}
}

// TestOuterCancelIsAbort: a parent context that ends without a deadline
// and without anything the socket shows is still a cancellation. Its time
// says nothing about detection: no latency is observed.
func TestOuterCancelIsAbort(t *testing.T) {
	out := make(chan result, 1)
	m := newMonitor(t, Options{Source: SourceEpoll})
	ts := serve(t, m, loopback(t), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		st := FromContext(r.Context())
		select {
		case <-r.Context().Done():
		case <-time.After(wait):
		}
		out <- result{status: st.Status(), reason: st.AbortReason(), cause: context.Cause(r.Context())}
	}), func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			ctx, cancel := context.WithCancel(r.Context())
			cancel()
			h.ServeHTTP(w, r.WithContext(ctx))
		})
	})
	resp, err := http.Get("http://" + ts.addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	res := waitFor(t, out, "handler")
	if res.status != StatusAborted || res.reason != ReasonCanceled || !errors.Is(res.cause, ErrAborted) {
		t.Errorf("got %+v, want ABORTED canceled", res)
	}
	if n := m.Stats().Aborts[ReasonCanceled]; n != 1 {
		t.Errorf("aborts{reason=canceled} = %d, want 1", n)
	}
	if n := latencySamples(t, m); n != 0 {
		t.Errorf("%d detection latencies observed for a cancellation, want 0", n)
	}
}

// latencySamples returns the detection latency histogram's sample count.
func latencySamples(t *testing.T, m *Monitor) uint64 {
	t.Helper()
	reg := prometheus.NewRegistry()
	reg.MustRegister(m)
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() == "hangup_http_abort_detection_latency_seconds" {
			return f.GetMetric()[0].GetHistogram().GetSampleCount()
		}
	}
	t.Fatal("no latency histogram")
	return 0
}
