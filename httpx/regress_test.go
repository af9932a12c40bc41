package httpx

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"syscall"
	"testing"
	"time"
)

// TestTimeLimitReleasesBlockedUpload: a handler blocked reading a slow
// upload is released at its time limit plus grace: the client gets its
// 503, inline and detached alike. (The body read is cut with a past read
// deadline, and the 503 closes the connection, so that net/http does not
// wait for the body.)
func TestTimeLimitReleasesBlockedUpload(t *testing.T) {
	for _, detach := range []bool{false, true} {
		t.Run(map[bool]string{false: "inline", true: "detached"}[detach], func(t *testing.T) {
			stuck := newGate(t)
			readErr := make(chan error, 1)
			ts := abortServer(t, Options{TimeLimit: 300 * time.Millisecond, TimeoutGrace: 200 * time.Millisecond, Detach: detach},
				func(w http.ResponseWriter, r *http.Request) {
					_, err := io.Copy(io.Discard, r.Body)
					readErr <- err
					<-stuck.ch // ignores its context: only the grace releases the client
				})
			c, err := net.Dial("tcp", ts.addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			rawRequest(t, c, "/upload") // the rest of the body never comes
			resp := readResponse(t, c)
			resp.Body.Close()
			if resp.StatusCode != http.StatusServiceUnavailable {
				t.Errorf("status %d, want 503", resp.StatusCode)
			}
			if err := waitFor(t, readErr, "the body read"); err == nil {
				t.Error("the blocked body read returned no error")
			}
		})
	}
}

// TestEpollLeavesTheResetToTheHandler: the epoll source learns of a reset
// without consuming the socket's pending error, so the handler's next read
// of the body fails with ECONNRESET, not a plain EOF.
func TestEpollLeavesTheResetToTheHandler(t *testing.T) {
	readErr := make(chan error, 1)
	ts := abortServer(t, Options{Source: SourceEpoll}, func(w http.ResponseWriter, r *http.Request) {
		st := FromContext(r.Context())
		st.IgnoreUserAbort(true)
		buf := make([]byte, len("partial"))
		if _, err := io.ReadFull(r.Body, buf); err != nil {
			readErr <- err
			return
		}
		deadline := time.Now().Add(wait)
		for !st.Aborted() && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		_, err := io.Copy(io.Discard, r.Body)
		readErr <- err
	})
	c, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	rawRequest(t, c, "/upload")
	time.Sleep(20 * time.Millisecond) // the partial body is read first
	reset(t, c)
	if err := waitFor(t, readErr, "the body read"); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("body read after the reset: %v, want ECONNRESET", err)
	}
}

// TestNilState: outside Handler FromContext returns nil, and every method
// of a nil State is safe: a NORMAL request whose end already came.
func TestNilState(t *testing.T) {
	st := FromContext(context.Background())
	if st != nil {
		t.Fatalf("FromContext outside Handler = %v", st)
	}
	if st.Status() != StatusNormal || st.Aborted() || st.TimedOut() || st.AbortReason() != ReasonNone {
		t.Error("nil State is not NORMAL")
	}
	if st.IgnoreUserAbort(true) {
		t.Error("IgnoreUserAbort on nil returned true")
	}
	st.SetTimeLimit(time.Second)
	st.Finish()
	ran := false
	st.RegisterShutdown(func() { ran = true })
	if !ran {
		t.Error("RegisterShutdown on nil did not run the function")
	}
	done := make(chan struct{})
	st.Go(func(context.Context) { close(done) })
	waitFor(t, done, "Go on nil")
	if err := st.WaitDelivered(context.Background()); !errors.Is(err, ErrDeliveryUnknown) {
		t.Errorf("WaitDelivered on nil: %v", err)
	}
}

// TestStreamingResetKeepsKernelReason: a streaming handler that hits a
// reset connection with a write before the source reports it records what
// happened to the connection (peer_reset), not write_error.
func TestStreamingResetKeepsKernelReason(t *testing.T) {
	forSources(t, func(t *testing.T, src Source) {
		results := make(chan result, 1)
		started := make(chan struct{}, 1)
		pair, ts := netServer(t, Options{Source: src}, func(w http.ResponseWriter, r *http.Request) {
			st := FromContext(r.Context())
			st.IgnoreUserAbort(true) // keep writing into the dead connection
			started <- struct{}{}
			chunk := make([]byte, 16<<10)
			deadline := time.Now().Add(wait)
			for time.Now().Before(deadline) {
				if _, err := w.Write(chunk); err != nil {
					break
				}
				w.(http.Flusher).Flush()
			}
			results <- result{status: st.Status(), reason: st.AbortReason()}
		})
		c, err := pair.Client.Dial("tcp", ts.addr)
		if err != nil {
			t.Fatal(err)
		}
		rawGet(t, c, "/stream")
		waitFor(t, started, "handler")
		reset(t, c)
		res := waitFor(t, results, "handler result")
		if res.status != StatusAborted || res.reason != ReasonPeerReset {
			t.Errorf("got %+v, want ABORTED peer_reset", res)
		}
		if n := ts.m.Stats().Aborts[ReasonWriteError]; n != 0 {
			t.Errorf("aborts{reason=write_error} = %d", n)
		}
	})
}
