package httpx

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
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
// underlying writer has them, http.Hijacker and http.Pusher; Unwrap lets
// http.ResponseController reach deadlines and full duplex.
//
// mu is held only while net/http's ResponseWriter is in use, never while
// waiting for anything else (a ReadFrom source, say), so that release
// takes it back in bounded time: a write blocked on the client is cut
// short by a past write deadline. The detection goroutines never take it.
type responseWriter struct {
	s        *State
	rw       http.ResponseWriter
	released atomic.Bool  // set with mu held; read without it on fast paths
	cut      atomic.Bool  // release set a past write deadline: write errors are its own
	written  atomic.Int64 // body bytes accepted by the underlying writer

	mu          sync.Mutex
	wroteHeader bool // a status or body was sent (or the connection hijacked)
	status      int  // the status sent, 0 before
	spare       http.Header
}

// The wrappers below are responseWriter for an underlying writer that is an
// http.Hijacker (HTTP/1.x), an http.Pusher (HTTP/2), or both, so that a
// type assertion finds Hijack and Push exactly when they can work.
type (
	hijackWriter     struct{ *responseWriter }
	pushWriter       struct{ *responseWriter }
	hijackPushWriter struct{ *responseWriter }
)

// handlerWriter returns the ResponseWriter the handler gets: w itself, or
// w in a wrapper that adds Hijack or Push. The wrappers are one pointer, so
// none of this allocates.
func (w *responseWriter) handlerWriter() http.ResponseWriter {
	_, hijacker := w.rw.(http.Hijacker)
	_, pusher := w.rw.(http.Pusher)
	switch {
	case hijacker && pusher:
		return hijackPushWriter{w}
	case hijacker:
		return hijackWriter{w}
	case pusher:
		return pushWriter{w}
	}
	return w
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
	if !w.wroteHeader && (code >= 200 || code == http.StatusSwitchingProtocols) {
		w.wroteHeader, w.status = true, code
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
	if w.s.stop.Load() {
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
	// net/http sends the header at the first Write, even an empty one.
	w.sentLocked()
	n, err := w.rw.Write(p)
	w.written.Add(int64(n))
	w.mu.Unlock()
	if err != nil {
		w.writeFailed(err)
	}
	return n, err
}

// sentLocked notes that net/http has the status (200 unless WriteHeader
// said otherwise).
func (w *responseWriter) sentLocked() {
	if !w.wroteHeader {
		w.wroteHeader, w.status = true, http.StatusOK
	}
}

// writeFailed marks the request aborted by a failed write, unless the
// failure is the past write deadline set by release.
func (w *responseWriter) writeFailed(err error) {
	if !w.cut.Load() {
		w.s.writeFailed(err)
	}
}

// ReadFrom copies src into the response. A regular file goes through the
// underlying writer's ReadFrom (sendfile on HTTP/1.x): reading it never
// waits for long, and a write deadline cuts the copy short. Any other
// source is copied in chunks through Write, so that reading it, which may
// block for ever, happens without the writer's lock, and each chunk is an
// output that ends the handler after an abort or a timeout.
func (w *responseWriter) ReadFrom(src io.Reader) (int64, error) {
	if err := w.output(); err != nil {
		return 0, err
	}
	rf, ok := w.rw.(io.ReaderFrom)
	if !ok || !isRegularFile(src) {
		return io.Copy(writerOnly{w}, src)
	}
	w.mu.Lock()
	if w.released.Load() {
		w.mu.Unlock()
		return 0, ErrFinished
	}
	n, err := rf.ReadFrom(src)
	if n > 0 {
		w.sentLocked()
	}
	w.written.Add(n)
	w.mu.Unlock()
	if err != nil && isWriteErr(err) {
		w.writeFailed(err)
	}
	return n, err
}

// isRegularFile reports whether src reads a regular file, directly or
// through an io.LimitedReader (as io.CopyN and http.ServeContent do).
func isRegularFile(src io.Reader) bool {
	if lr, ok := src.(*io.LimitedReader); ok {
		src = lr.R
	}
	f, ok := src.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode().IsRegular()
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
		w.sentLocked()
	}
	w.mu.Unlock()
	if err != nil && !errors.Is(err, http.ErrNotSupported) {
		w.writeFailed(err)
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
func (w hijackWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) { return w.hijack() }

// Push initiates an HTTP/2 server push. Like Write, it ends the handler
// after an abort or a timeout; after the response was released it returns
// ErrFinished.
func (w pushWriter) Push(target string, opts *http.PushOptions) error { return w.push(target, opts) }

// Hijack takes over the connection, as hijackWriter.Hijack.
func (w hijackPushWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) { return w.hijack() }

// Push initiates a server push, as pushWriter.Push.
func (w hijackPushWriter) Push(target string, opts *http.PushOptions) error {
	return w.push(target, opts)
}

func (w *responseWriter) hijack() (net.Conn, *bufio.ReadWriter, error) {
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
		w.sentLocked()
	}
	return c, brw, err
}

func (w *responseWriter) push(target string, opts *http.PushOptions) error {
	if err := w.output(); err != nil {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.released.Load() {
		return ErrFinished
	}
	return w.rw.(http.Pusher).Push(target, opts)
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

// bodyWritten reports whether body bytes were written. It takes no lock:
// the detection goroutines call it.
func (w *responseWriter) bodyWritten() bool { return w.written.Load() > 0 }

// release hands the response back to net/http. When the handler timed out
// before writing anything it answers 503 first. stuck says the handler is
// still running after the grace: a write it is blocked in is cut short by
// a past write deadline, a read of the request body by a past read
// deadline, and the 503 closes the connection so that net/http does not
// wait for the body. It reports whether a partial response was already
// sent.
func (w *responseWriter) release(timedOut, stuck bool) (partial bool) {
	if stuck {
		rc := http.NewResponseController(w.rw)
		_ = rc.SetReadDeadline(time.Now())
		if !w.mu.TryLock() {
			w.cut.Store(true)
			_ = rc.SetWriteDeadline(time.Now())
			w.mu.Lock()
		}
	} else {
		w.mu.Lock()
	}
	defer w.mu.Unlock()
	if w.released.Load() {
		return w.wroteHeader
	}
	partial = w.wroteHeader
	if timedOut && !w.wroteHeader {
		const msg = "Service Unavailable: request time limit exceeded\n"
		h := w.rw.Header()
		h.Set("Content-Type", "text/plain; charset=utf-8")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Content-Length", strconv.Itoa(len(msg)))
		if stuck {
			h.Set("Connection", "close")
		}
		w.rw.WriteHeader(http.StatusServiceUnavailable)
		_, _ = io.WriteString(w.rw, msg)
		if stuck {
			_ = flushUnderlying(w.rw)
		}
		w.wroteHeader, w.status = true, http.StatusServiceUnavailable
	}
	w.released.Store(true)
	return partial
}

// WriteString is Write for a string, without copying it when the
// underlying writer takes strings (net/http's does).
func (w *responseWriter) WriteString(str string) (int, error) {
	sw, ok := w.rw.(io.StringWriter)
	if !ok {
		return w.Write([]byte(str))
	}
	if err := w.output(); err != nil {
		return 0, err
	}
	w.mu.Lock()
	if w.released.Load() {
		w.mu.Unlock()
		return 0, ErrFinished
	}
	w.sentLocked()
	n, err := sw.WriteString(str)
	w.written.Add(int64(n))
	w.mu.Unlock()
	if err != nil {
		w.writeFailed(err)
	}
	return n, err
}
