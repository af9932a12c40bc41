package httpx

import (
	"context"
	"net/http"
	"runtime/debug"
)

type handler struct {
	m *Monitor
	h http.Handler
}

// Handler returns a handler that runs h with a State for every request
// (see FromContext). h runs in its own goroutine so that Finish and the
// time limit can hand the response back to net/http while h goes on;
// ServeHTTP waits for h, for Finish, or for the timeout grace. A panic in
// h is logged with its stack and re-panicked in ServeHTTP, so net/http and
// outer middleware see it as usual, unless the response was already handed
// back: then it is only logged.
//
// Place it innermost, around the application handler: middleware around it
// (compression, logging) then completes when Finish is called. Requests on
// connections that Configure did not see get a State without detection.
func (m *Monitor) Handler(h http.Handler) http.Handler {
	return &handler{m: m, h: h}
}

type connKey struct{}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	m := h.m
	c, _ := r.Context().Value(connKey{}).(*conn)
	s := &State{
		m:        m,
		c:        c,
		proto:    r.ProtoMajor,
		done:     make(chan struct{}),
		finishCh: make(chan struct{}),
		servedCh: make(chan struct{}),
	}
	s.ctx, s.cancel, s.stopDeadline = handlerContext(r.Context(), s)
	var hw http.ResponseWriter
	s.w, hw = newWriter(s, w)
	if c != nil {
		c.attach(s)
	}
	if m.opts.TimeLimit > 0 {
		s.SetTimeLimit(m.opts.TimeLimit)
	}
	parent := r.Context()
	stop := context.AfterFunc(parent, func() { s.parentCanceled(parent) })

	m.work.add()
	go s.run(h.h, hw, r.WithContext(s.ctx))

	var stuck bool
	select {
	case <-s.done:
	case <-s.finishCh:
		select {
		case <-s.done:
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
	stop()

	s.mu.Lock()
	s.released = true
	p := s.panicVal
	timedOut := s.status&StatusTimeout != 0
	s.mu.Unlock()
	// A timed-out handler that wrote nothing gets 503, also when it ended
	// by writing after the timeout (which panics with ErrAbortHandler).
	endedByTimeout := timedOut && (p == nil || p == http.ErrAbortHandler)
	partial := s.w.release(endedByTimeout, stuck)
	if endedByTimeout && !partial {
		p = nil
	}
	s.detach()
	if c != nil {
		c.mu.Lock()
		seq := c.idleSeq
		c.mu.Unlock()
		s.mu.Lock()
		s.releaseSeq = seq
		s.mu.Unlock()
	}
	close(s.servedCh)
	switch {
	case p != nil:
		panic(p)
	case stuck && partial:
		// A timed-out handler that already sent part of a response: end
		// the response abnormally rather than let it look complete.
		panic(http.ErrAbortHandler)
	}
}

// run runs the handler and then ends the request.
func (s *State) run(h http.Handler, w http.ResponseWriter, r *http.Request) {
	defer s.m.work.done()
	defer func() {
		if p := recover(); p != nil {
			s.mu.Lock()
			if s.released {
				s.mu.Unlock()
				if p != http.ErrAbortHandler {
					s.m.log.Error("handler panicked after its response was finished", "err", panicErr(p))
				}
			} else {
				s.panicVal = p
				s.mu.Unlock()
				if p != http.ErrAbortHandler {
					// net/http will log the panic with the stack of its
					// re-panic in ServeHTTP; this is where it happened.
					s.m.log.Error("handler panicked", "err", panicErr(p), "stack", string(debug.Stack()))
				}
			}
		}
		s.end()
		close(s.done)
	}()
	h.ServeHTTP(w, r)
}

// handlerContext returns the handler's context: parent's values and
// deadline, but not its cancellation, which httpx decides on (see
// State.parentCanceled). stop releases the deadline's timer; it is nil when
// parent has no deadline.
func handlerContext(parent context.Context, s *State) (ctx context.Context, cancel context.CancelCauseFunc, stop context.CancelFunc) {
	ctx = context.WithValue(context.WithoutCancel(parent), stateKey{}, s)
	if d, ok := parent.Deadline(); ok {
		ctx, stop = context.WithDeadline(ctx, d)
	}
	ctx, cancel = context.WithCancelCause(ctx)
	return ctx, cancel, stop
}
