package httpx

import (
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// Releasing a timed-out request, and detection, must not depend on what a
// stuck handler is blocked on.

// TestReadFromStuckSourceReleased: a handler stuck in io.Copy from a source
// that never delivers (an upstream that stalls, ignoring the context) is
// released after its time limit and grace, and, having sent nothing, gets
// 503.
func TestReadFromStuckSourceReleased(t *testing.T) {
	pr, pw := io.Pipe()
	ts := abortServer(t, Options{TimeLimit: 20 * time.Millisecond, TimeoutGrace: 50 * time.Millisecond},
		func(w http.ResponseWriter, r *http.Request) {
			io.Copy(w, pr)
		})
	t.Cleanup(func() { pw.Close() }) // before the server's cleanup waits for the handler
	client := &http.Client{Timeout: wait}
	resp, err := client.Get("http://" + ts.addr + "/")
	if err != nil {
		t.Fatalf("client not released: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("status code %d, want 503: nothing was written", resp.StatusCode)
	}
}

// TestReadFromPartialThenStuckReleased: the same handler after its source
// delivered part of the body (more than net/http buffers): released, no
// 503, the part it sent arrives, and the response is not made to look
// complete.
func TestReadFromPartialThenStuckReleased(t *testing.T) {
	part := strings.Repeat("partial ", 8<<10)
	pr, pw := io.Pipe()
	wrote := make(chan struct{})
	ts := abortServer(t, Options{TimeLimit: 20 * time.Millisecond, TimeoutGrace: 50 * time.Millisecond},
		func(w http.ResponseWriter, r *http.Request) {
			go func() {
				pw.Write([]byte(part)) // the first chunk, then the source stalls
				close(wrote)
			}()
			io.Copy(w, pr)
		})
	t.Cleanup(func() { pw.Close(); <-wrote })
	client := &http.Client{Timeout: wait}
	resp, err := client.Get("http://" + ts.addr + "/")
	if err != nil {
		t.Fatalf("client not released: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || string(body) != part {
		t.Errorf("got %d and %d bytes, want 200 and the %d bytes sent", resp.StatusCode, len(body), len(part))
	}
	var ne net.Error
	switch {
	case err == nil:
		t.Error("a response cut short by the timeout looked complete")
	case errors.As(err, &ne) && ne.Timeout():
		t.Errorf("client not released: %v", err)
	}
}

// TestTimeLimitPartialBodyNo503: a handler that wrote part of its body
// before its time limit expired gets no 503, whether it then returns or is
// released stuck.
func TestTimeLimitPartialBodyNo503(t *testing.T) {
	for _, stuck := range []bool{false, true} {
		t.Run(map[bool]string{false: "returns", true: "stuck"}[stuck], func(t *testing.T) {
			unblock := newGate(t)
			ts := abortServer(t, Options{TimeLimit: 20 * time.Millisecond, TimeoutGrace: 50 * time.Millisecond},
				func(w http.ResponseWriter, r *http.Request) {
					io.WriteString(w, "partial")
					w.(http.Flusher).Flush()
					<-r.Context().Done()
					if stuck {
						<-unblock.ch
					}
				})
			resp, err := http.Get("http://" + ts.addr + "/")
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK || string(body) != "partial" {
				t.Errorf("got %d %q, want 200 \"partial\"", resp.StatusCode, body)
			}
			unblock.open()
		})
	}
}

// TestShutdownFunctionsOnceOnGrace: the shutdown functions of a handler
// released by the grace run once, at the grace, and not again when the
// handler finally returns.
func TestShutdownFunctionsOnceOnGrace(t *testing.T) {
	var runs atomic.Int32
	ran := make(chan struct{}, 2)
	unblock := newGate(t)
	returned := make(chan struct{})
	ts := abortServer(t, Options{TimeLimit: 20 * time.Millisecond, TimeoutGrace: 50 * time.Millisecond},
		func(w http.ResponseWriter, r *http.Request) {
			defer close(returned)
			st := FromContext(r.Context())
			st.RegisterShutdown(func() { runs.Add(1); ran <- struct{}{} })
			<-unblock.ch // ignores its context
		})
	resp, err := http.Get("http://" + ts.addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	waitFor(t, ran, "shutdown functions")
	unblock.open()
	waitFor(t, returned, "the handler to return")
	if err := ts.m.Wait(t.Context()); err != nil {
		t.Fatal(err)
	}
	if n := runs.Load(); n != 1 {
		t.Errorf("shutdown function ran %d times, want 1", n)
	}
	if n := ts.m.Stats().Requests[StatusTimeout]; n != 1 {
		t.Errorf("timeout outcomes %d, want 1", n)
	}
}

// TestDetectionNotBlockedByStuckReadFrom: request A is stuck in io.Copy
// from a source that stalls; A's client resets, then B's. B's reset is
// detected: handling A's abort does not stall the detection loop.
func TestDetectionNotBlockedByStuckReadFrom(t *testing.T) {
	pr, pw := io.Pipe()
	detectionNotBlocked(t, nil, func(w http.ResponseWriter) { io.Copy(w, pr) }, func() { pw.Close() })
}

// TestDetectionNotBlockedByBlockedWriter: the same with A blocked inside a
// write, in the writer of a middleware around the Monitor's handler that
// waits for something else than the client.
func TestDetectionNotBlockedByBlockedWriter(t *testing.T) {
	throttle := newGate(t)
	wrap := func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/a" {
				w = &gatedWriter{ResponseWriter: w, g: throttle}
			}
			h.ServeHTTP(w, r)
		})
	}
	detectionNotBlocked(t, wrap, func(w http.ResponseWriter) { io.WriteString(w, "blocks") }, throttle.open)
}

// gatedWriter's writes after the first wait for its gate.
type gatedWriter struct {
	http.ResponseWriter
	g      *gate
	writes int
}

func (w *gatedWriter) Write(p []byte) (int, error) {
	if w.writes++; w.writes > 1 {
		<-w.g.ch
	}
	return w.ResponseWriter.Write(p)
}

func (w *gatedWriter) Flush() { w.ResponseWriter.(http.Flusher).Flush() }

// detectionNotBlocked runs request A, which wrote a little and then is
// stuck in stuckA until unstick, and request B on another connection;
// A's client resets, and once A is marked aborted, B's client resets.
func detectionNotBlocked(t *testing.T, wrap func(http.Handler) http.Handler, stuckA func(http.ResponseWriter), unstick func()) {
	aState := make(chan *State, 1)
	bStarted := make(chan struct{}, 1)
	bWoke := make(chan string, 1)
	m := newMonitor(t, Options{Source: SourceEpoll})
	ts := serve(t, m, loopback(t), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/a" {
			io.WriteString(w, "hello")
			w.(http.Flusher).Flush()
			aState <- FromContext(r.Context())
			stuckA(w)
			return
		}
		bStarted <- struct{}{}
		select {
		case <-r.Context().Done():
			bWoke <- "ctx"
		case <-time.After(wait):
			bWoke <- "timer"
		}
	}), wrap)
	t.Cleanup(unstick) // before the server's cleanup waits for A
	ca, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	rawGet(t, ca, "/a")
	stA := waitFor(t, aState, "handler A")
	cb, err := net.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	rawRequest(t, cb, "/b")
	waitFor(t, bStarted, "handler B")
	reset(t, ca)
	eventually(t, "A is marked aborted", stA.Aborted)
	reset(t, cb)
	if got := waitFor(t, bWoke, "handler B"); got != "ctx" {
		t.Error("B's reset not detected: the detection loop is stuck on A")
	}
}
