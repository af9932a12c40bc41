package httpx

import (
	"net/http"
	"reflect"
	"runtime/debug"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

type handler struct {
	m *Monitor
	h http.Handler
}

// Handler returns a handler that runs h with a State for every request
// (see FromContext), which is also the request's context.
//
// HTTP/1.x handlers run on net/http's own goroutine: while the client is
// there, a request costs its State and a copy of the Request, nothing else.
// HTTP/2 handlers, and every handler with Options.Detach, run in a
// goroutine of their own, so that Finish can hand the response back to
// net/http while they go on. A panic in h is logged with its stack and
// re-panicked, so net/http and outer middleware see it as usual, unless the
// response was already handed back: then it is only logged.
//
// Place it innermost, around the application handler. Requests on
// connections that Configure did not see get a State without detection.
func (m *Monitor) Handler(h http.Handler) http.Handler {
	return &handler{m: m, h: h}
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	m := h.m
	c, _ := r.Context().Value(connKey{}).(*conn)
	s := &State{parent: r.Context(), m: m, c: c, proto: r.ProtoMajor,
		reqMinor: uint8(r.ProtoMinor), reqClose: r.Close, reqHead: r.Method == http.MethodHead}
	s.w.s, s.w.rw = s, w
	if c != nil {
		c.begin(s)
		if r.ProtoMajor >= 2 || r.Body != http.NoBody || m.opts.IgnoreHalfClose {
			// net/http's background read does not cover the request
			// (see epollSource).
			c.arm()
		}
	}
	if m.opts.TimeLimit > 0 {
		s.SetTimeLimit(m.opts.TimeLimit)
	}
	r = r.WithContext(s)
	if r.ProtoMajor >= 2 || m.opts.Detach {
		s.serveDetached(h.h, r)
		return
	}
	defer s.afterInline()
	h.h.ServeHTTP(s.w.handlerWriter(), r)
}

// afterInline ends an inline request when its handler returned or
// panicked: a timed-out request that wrote nothing gets its 503, the
// request ends, and a panic goes on up.
func (s *State) afterInline() {
	p := recover()
	if p != nil && p != http.ErrAbortHandler {
		// net/http logs the re-panic below with its own stack; this is
		// where it happened.
		s.m.log.Error("handler panicked", "err", panicErr(p), "stack", string(debug.Stack()))
	}
	timedOut := s.timedOut.Load()
	// A timed-out handler that wrote nothing gets 503, also when it ended
	// by writing after the timeout (which panics with ErrAbortHandler).
	endedByTimeout := timedOut && (p == nil || p == http.ErrAbortHandler)
	if !s.w.released.Load() {
		if partial := s.w.release(endedByTimeout, false); endedByTimeout && !partial {
			p = nil
		}
	} else if p == http.ErrAbortHandler {
		p = nil // the client has its response already (Finish, grace)
	}
	s.end()
	s.closeHijacked()
	if s.finished() {
		s.m.work.done()
	}
	if p != nil {
		panic(p)
	}
}

func (s *State) finished() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.x != nil && s.x.finished
}

// releaseStuck releases the client of an inline handler that is still
// running after its time limit and grace: a 503 if it sent nothing, else
// the end of the connection, so that the partial response does not look
// complete.
func (s *State) releaseStuck() {
	s.settle()
	if partial := s.w.release(true, true); partial && s.c != nil {
		s.c.control(func(fd int) { _ = unix.Shutdown(fd, unix.SHUT_RDWR) })
	}
}

// detached is what a request whose handler runs in its own goroutine needs.
type detached struct {
	done     chan struct{} // the handler returned
	finish   chan struct{} // Finish was called, or the grace expired
	served   chan struct{} // ServeHTTP returned: net/http owns the response
	once     sync.Once
	panicVal any // set before done is closed
}

// release makes ServeHTTP return without waiting for the handler.
func (d *detached) release() { d.once.Do(func() { close(d.finish) }) }

// serveDetached runs the handler in its own goroutine and waits for it, for
// Finish, or for the timeout grace.
func (s *State) serveDetached(h http.Handler, r *http.Request) {
	run := &detached{done: make(chan struct{}), finish: make(chan struct{}), served: make(chan struct{})}
	s.mu.Lock()
	s.xLocked().run = run
	s.mu.Unlock()
	s.m.work.add()
	go s.runDetached(run, h, r)

	var stuck bool
	select {
	case <-run.done:
	case <-run.finish:
		select {
		case <-run.done:
		default:
			// The handler goes on without its response (Finish, or the
			// timeout grace expired). HTTP/2 sends what is buffered now,
			// so that WaitDelivered covers it; HTTP/1.x keeps it, so that
			// net/http can still frame a short response with
			// Content-Length.
			stuck = s.TimedOut()
			if r.ProtoMajor == 2 && !stuck {
				s.w.flushForDelivery()
			}
		}
	}
	var p any
	select {
	case <-run.done:
		p = run.panicVal
	default:
	}
	timedOut := s.TimedOut()
	endedByTimeout := timedOut && (p == nil || p == http.ErrAbortHandler)
	if stuck {
		s.settle() // release flushes the response now
	}
	partial := s.w.release(endedByTimeout, stuck)
	if endedByTimeout && !partial {
		p = nil
	}
	s.leave()
	close(run.served)
	switch {
	case p != nil:
		panic(p)
	case stuck && partial:
		// A timed-out handler that already sent part of a response: end
		// the response abnormally rather than let it look complete.
		panic(http.ErrAbortHandler)
	}
}

func (s *State) runDetached(run *detached, h http.Handler, r *http.Request) {
	defer s.m.work.done()
	defer func() {
		if p := recover(); p != nil {
			select {
			case <-run.served:
				if p != http.ErrAbortHandler {
					s.m.log.Error("handler panicked after its response was finished", "err", panicErr(p))
				}
			default:
				run.panicVal = p
				if p != http.ErrAbortHandler {
					s.m.log.Error("handler panicked", "err", panicErr(p), "stack", string(debug.Stack()))
				}
			}
		}
		s.end()
		close(run.done)
	}()
	h.ServeHTTP(s.w.handlerWriter(), r)
}

// Finish completes the response now and lets the handler go on, as PHP's
// fastcgi_finish_request. Later writes return ErrFinished; the request body
// and the ResponseWriter's headers must not be used any more. The request
// is no longer marked aborted by what happens to the connection, but it
// still can time out. Finish returns once the client has the response, or
// (see below) once its end is settled.
//
// A detached handler (HTTP/2, or Options.Detach) hands the response back to
// net/http as if it had returned, so every middleware around Handler
// completes its part, and net/http frames it (with Content-Length when it
// can), flushes it and keeps or closes the connection as it would have.
//
// An inline HTTP/1.x handler cannot return to net/http early. When Handler
// sits directly on net/http's ResponseWriter, Finish ends the response
// itself: headers and body so far are flushed (with Content-Length: 0 and
// Connection: close if nothing was sent yet), a chunked body gets its last
// chunk, and the connection is closed for writing, so the client has the
// whole response at once; the connection is not reused. Behind a
// middleware that wraps the ResponseWriter, which may still have to write
// (compression), the response is flushed and completes when the handler
// returns; this is logged once. Set Options.Detach to finish through
// middleware.
//
// Server shutdown: http.Server.Shutdown does not wait for a finished
// handler; Monitor.Shutdown does.
func (s *State) Finish() {
	if s == nil {
		return
	}
	s.mu.Lock()
	x := s.xLocked()
	already := x.finished
	x.finished = true
	// From here the response goes out ahead of the handler: a client that
	// reads it and closes has not aborted.
	s.settled = true
	run := x.run
	s.mu.Unlock()
	if run != nil {
		run.release()
		<-run.served
		return
	}
	if !already {
		// net/http's Shutdown no longer waits for the handler: the
		// Monitor's does (see afterInline).
		s.m.work.add()
		s.finishInline()
	}
}

// finishInline is Finish for an inline HTTP/1.x request.
func (s *State) finishInline() {
	w := &s.w
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.released.Load() {
		return
	}
	defer s.leave()
	if h := s.m.finishFlushed; h != nil {
		defer h()
	}
	if !isNetHTTPResponse(w.rw) {
		s.m.warnFinishOnce.Do(func() {
			s.m.log.Warn("Finish cannot complete a response before the handler returns when a middleware wraps the ResponseWriter; it completes when the handler returns (set Options.Detach to finish through middleware)",
				"writer", reflect.TypeOf(w.rw).String())
		})
		_ = flushUnderlying(w.rw)
		w.released.Store(true)
		return
	}
	if !w.wroteHeader {
		// Nothing sent yet: a complete, empty response now.
		h := w.rw.Header()
		if h.Get("Content-Length") == "" {
			h.Set("Content-Length", "0")
		}
		h.Set("Connection", "close")
		w.rw.WriteHeader(http.StatusOK)
		w.wroteHeader, w.status = true, http.StatusOK
		_ = flushUnderlying(w.rw)
		w.released.Store(true)
		return
	}
	chunked := s.chunkedLocked()
	_ = flushUnderlying(w.rw)
	nc, brw, err := http.NewResponseController(w.rw).Hijack()
	if err != nil {
		w.released.Store(true)
		return
	}
	if chunked {
		_, _ = brw.WriteString("0\r\n\r\n")
	}
	_ = brw.Flush()
	if cw, ok := nc.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
	s.mu.Lock()
	s.x.hijacked = nc
	s.mu.Unlock()
	w.released.Store(true)
}

// chunkedLocked reports whether net/http sends the response chunked, by
// its own rule: HTTP/1.1, a status and method with a body, no
// Content-Length and no Transfer-Encoding: identity from the handler.
func (s *State) chunkedLocked() bool {
	w := &s.w
	if s.reqMinor < 1 || s.reqHead || !bodyAllowed(w.status) {
		return false
	}
	h := w.rw.Header()
	if h.Get("Content-Length") != "" {
		return false
	}
	return !strings.EqualFold(h.Get("Transfer-Encoding"), "identity")
}

func bodyAllowed(status int) bool {
	return !(status >= 100 && status <= 199 || status == http.StatusNoContent || status == http.StatusNotModified)
}

// isNetHTTPResponse reports whether w is net/http's own HTTP/1.x
// ResponseWriter, so that an inline Finish may end the response itself.
func isNetHTTPResponse(w http.ResponseWriter) bool {
	return reflect.TypeOf(w).String() == "*http.response"
}

// closeHijacked closes a connection an inline Finish took over, once the
// handler returned.
func (s *State) closeHijacked() {
	s.mu.Lock()
	var nc interface{ Close() error }
	if s.x != nil && s.x.hijacked != nil {
		nc = s.x.hijacked
		s.x.hijacked = nil
	}
	s.mu.Unlock()
	if nc != nil {
		nc.Close()
	}
}
