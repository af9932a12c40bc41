package httpx

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// responseWriter is the ResponseWriter handlers get. It ends the handler at
// its next output after an abort or a timeout (panicking with
// http.ErrAbortHandler, as PHP ends a script at its next output), and stops
// every use of net/http's ResponseWriter once the response has been
// released by Finish or by the timeout grace, since net/http owns it again
// from then on.
//
// It keeps http.Flusher (and FlushError), io.ReaderFrom and, when the
// underlying writer has it, http.Hijacker; Unwrap lets
// http.ResponseController reach deadlines and full duplex.
type responseWriter struct {
	s        *State
	rw       http.ResponseWriter
	released atomic.Bool // set with mu held; read without it on fast paths

	mu          sync.Mutex
	wroteHeader bool  // a status or body was sent (or the connection hijacked)
	written     int64 // body bytes accepted by the underlying writer
	spare       http.Header
}

// hijackWriter is responseWriter for an underlying writer that is an
// http.Hijacker (HTTP/1.x), so a type assertion finds Hijack exactly when
// it can work.
type hijackWriter struct{ *responseWriter }

func newWriter(s *State, w http.ResponseWriter) (*responseWriter, http.ResponseWriter) {
	rw := &responseWriter{s: s, rw: w}
	if _, ok := w.(http.Hijacker); ok {
		return rw, hijackWriter{rw}
	}
	return rw, rw
}

// Unwrap returns net/http's ResponseWriter, for http.ResponseController.
// Using it after Finish, or after a timed-out handler was released, races
// with net/http.
func (w *responseWriter) Unwrap() http.ResponseWriter { return w.rw }

// Header returns the response headers. After the response was released it
// returns a private map whose changes go nowhere.
func (w *responseWriter) Header() http.Header {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.released.Load() {
		if w.spare == nil {
			w.spare = make(http.Header)
		}
		return w.spare
	}
	return w.rw.Header()
}

// WriteHeader sends the status line. It does nothing after the response
// was released.
func (w *responseWriter) WriteHeader(code int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.released.Load() {
		return
	}
	if code >= 200 || code == http.StatusSwitchingProtocols {
		w.wroteHeader = true
	}
	w.rw.WriteHeader(code)
}

// output is the check that precedes every output: ErrFinished after the
// response was released, and the end of the handler after an abort that is
// not ignored or a timeout.
func (w *responseWriter) output() error {
	if w.released.Load() {
		return ErrFinished
	}
	if w.s.mustStop() {
		panic(http.ErrAbortHandler)
	}
	return nil
}

// Write writes body bytes. After an abort (unless ignored) or a timeout it
// panics with http.ErrAbortHandler; after Finish it returns ErrFinished. A
// failed write marks the request aborted with ReasonWriteError.
func (w *responseWriter) Write(p []byte) (int, error) {
	if err := w.output(); err != nil {
		return 0, err
	}
	w.mu.Lock()
	if w.released.Load() {
		w.mu.Unlock()
		return 0, ErrFinished
	}
	w.wroteHeader = true
	n, err := w.rw.Write(p)
	w.written += int64(n)
	w.mu.Unlock()
	if err != nil {
		w.s.abort(ReasonWriteError, time.Now())
	}
	return n, err
}

// ReadFrom copies src into the response, with the underlying writer's
// ReadFrom (sendfile for files on HTTP/1.x) when it has one.
func (w *responseWriter) ReadFrom(src io.Reader) (int64, error) {
	if err := w.output(); err != nil {
		return 0, err
	}
	w.mu.Lock()
	if w.released.Load() {
		w.mu.Unlock()
		return 0, ErrFinished
	}
	w.wroteHeader = true
	var (
		n   int64
		err error
	)
	if rf, ok := w.rw.(io.ReaderFrom); ok {
		n, err = rf.ReadFrom(src)
	} else {
		n, err = io.Copy(writerOnly{w.rw}, src)
	}
	w.written += n
	w.mu.Unlock()
	if err != nil && isWriteErr(err) {
		w.s.abort(ReasonWriteError, time.Now())
	}
	return n, err
}

// isWriteErr tells a failed write from a failed read of the source; net/http
// does not say which, so only network errors count.
func isWriteErr(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) || errors.Is(err, net.ErrClosed)
}

type writerOnly struct{ io.Writer }

// Flush sends buffered data to the client. Like Write, it ends the handler
// after an abort or a timeout.
func (w *responseWriter) Flush() { _ = w.FlushError() }

// FlushError is Flush returning the error, for http.ResponseController.
func (w *responseWriter) FlushError() error {
	if err := w.output(); err != nil {
		return err
	}
	w.mu.Lock()
	if w.released.Load() {
		w.mu.Unlock()
		return ErrFinished
	}
	err := flushUnderlying(w.rw)
	if err == nil {
		w.wroteHeader = true
	}
	w.mu.Unlock()
	if err != nil && !errors.Is(err, http.ErrNotSupported) {
		w.s.abort(ReasonWriteError, time.Now())
	}
	return err
}

func flushUnderlying(rw http.ResponseWriter) error {
	switch f := rw.(type) {
	case interface{ FlushError() error }:
		return f.FlushError()
	case http.Flusher:
		f.Flush()
		return nil
	}
	return http.ErrNotSupported
}

// Hijack takes over the connection (HTTP/1.x only). The request stays
// tracked until the handler returns, but the detection source stops
// watching the connection.
func (w hijackWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	if err := w.output(); err != nil {
		return nil, nil, err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.released.Load() {
		return nil, nil, ErrFinished
	}
	c, brw, err := w.rw.(http.Hijacker).Hijack()
	if err == nil {
		w.wroteHeader = true
	}
	return c, brw, err
}

// flushForDelivery flushes what the handler wrote so far, without the abort
// check: WaitDelivered wants the bytes in the kernel either way.
func (w *responseWriter) flushForDelivery() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.released.Load() {
		_ = flushUnderlying(w.rw)
	}
}

func (w *responseWriter) bodyWritten() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.written > 0
}

// release hands the response back to net/http. When the handler timed out
// before writing anything it answers 503 first. stuck says the handler is
// still running after the grace: a write it is blocked in is cut short by a
// past write deadline. It reports whether a partial response was already
// sent.
func (w *responseWriter) release(timedOut, stuck bool) (partial bool) {
	if !w.mu.TryLock() {
		if stuck {
			_ = http.NewResponseController(w.rw).SetWriteDeadline(time.Now())
		}
		w.mu.Lock()
	}
	defer w.mu.Unlock()
	partial = w.wroteHeader
	if timedOut && !w.wroteHeader {
		http.Error(w.rw, "Service Unavailable: request time limit exceeded", http.StatusServiceUnavailable)
		w.wroteHeader = true
	}
	w.released.Store(true)
	return partial
}
