package httpx

import (
	"context"
	"errors"
	"net/http"
	"runtime/debug"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// State is one request's connection state: PHP's connection handling
// functions, per request. Get it with FromContext. Its methods are safe for
// concurrent use, from the handler, its goroutines and its shutdown
// functions.
type State struct {
	m     *Monitor
	c     *conn // nil when the connection is not tracked
	w     *responseWriter
	proto int // the request's ProtoMajor
	ctx   context.Context

	cancel       context.CancelCauseFunc
	stopDeadline context.CancelFunc // releases the outer deadline's timer, if any

	done      chan struct{} // the handler returned
	finishCh  chan struct{} // Finish was called
	servedCh  chan struct{} // ServeHTTP returned: net/http owns the response
	finishOne sync.Once
	endOnce   sync.Once

	mu          sync.Mutex
	status      Status
	reason      Reason
	ignore      bool
	detached    bool // no longer marked by the connection (released or ended)
	ended       bool
	released    bool
	panicVal    any
	limit       *time.Timer
	limitGen    uint64
	grace       *time.Timer
	shutdownFns []func()
	shutdownRan bool
	undelivered bool
	releaseSeq  uint64 // conn.idleSeq when the response was released
}

type stateKey struct{}

// FromContext returns the State of the request whose context (or a context
// derived from it) is ctx, or nil when the request did not go through a
// Monitor's Handler.
func FromContext(ctx context.Context) *State {
	s, _ := ctx.Value(stateKey{}).(*State)
	return s
}

// Status returns the connection status, PHP's connection_status(). It can
// be read at any time, also from shutdown functions and after the handler
// returned.
func (s *State) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.status
}

// Aborted reports whether the client went away, PHP's connection_aborted().
func (s *State) Aborted() bool { return s.Status()&StatusAborted != 0 }

// TimedOut reports whether the time limit expired.
func (s *State) TimedOut() bool { return s.Status()&StatusTimeout != 0 }

// AbortReason returns why the request was aborted, or ReasonNone.
func (s *State) AbortReason() Reason {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.reason
}

// IgnoreUserAbort sets whether a client abort ends the request and returns
// the previous setting, as PHP's ignore_user_abort(bool). While aborts are
// ignored, an abort is still recorded in Status and AbortReason, but the
// request context is not cancelled and writes go on (and may fail). Turning
// it off after an abort was recorded cancels the context at once. A timeout
// ends the request either way.
func (s *State) IgnoreUserAbort(ignore bool) bool {
	s.mu.Lock()
	prev := s.ignore
	s.ignore = ignore
	cancelNow := !ignore && s.status&StatusAborted != 0
	reason := s.reason
	s.mu.Unlock()
	if cancelNow {
		s.cancel(&AbortError{Reason: reason})
	}
	return prev
}

// SetTimeLimit restarts the request's time limit: the request times out d
// from now; 0 removes the limit, as PHP's set_time_limit. Unlike PHP on
// Unix, which counts the CPU time of the script, the limit is wall-clock
// time: time spent waiting counts.
//
// On expiry the TIMEOUT bit is added to Status (an abort before or after
// keeps its bit), the request context is cancelled even when aborts are
// ignored, the next output ends the handler, a request that wrote nothing
// is answered 503 Service Unavailable, and the client is released at the
// latest Options.TimeoutGrace later, even if the handler never returns;
// the shutdown functions then run without waiting for it.
func (s *State) SetTimeLimit(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ended || s.status&StatusTimeout != 0 {
		return
	}
	if s.limit != nil {
		s.limit.Stop()
		s.limit = nil
	}
	s.limitGen++
	if d > 0 {
		gen := s.limitGen
		s.limit = time.AfterFunc(d, func() { s.expire(gen) })
	}
}

func (s *State) expire(gen uint64) {
	s.mu.Lock()
	if gen != s.limitGen || s.ended || s.status&StatusTimeout != 0 {
		s.mu.Unlock()
		return
	}
	s.status |= StatusTimeout
	// Shutdown waits for the grace's work.
	s.m.work.add()
	s.grace = time.AfterFunc(s.m.grace, s.graceExpired)
	s.mu.Unlock()
	s.cancel(ErrTimeLimit)
}

// graceExpired gives up on a timed-out handler: the client is released (by
// ServeHTTP, which is waiting for it) and the shutdown functions run.
func (s *State) graceExpired() {
	defer s.m.work.done()
	s.finishOne.Do(func() { close(s.finishCh) })
	s.end()
}

// RegisterShutdown registers fn to run when the request ends, as PHP's
// register_shutdown_function: functions run in registration order, exactly
// once, after the handler returns normally, is aborted, panics, or (after a
// timeout) when the grace expires. A function may register more; they run
// in the same pass. A panic in one is logged and does not skip the others.
// A function registered after the pass ran is called at once.
func (s *State) RegisterShutdown(fn func()) {
	s.mu.Lock()
	if !s.shutdownRan {
		s.shutdownFns = append(s.shutdownFns, fn)
		s.mu.Unlock()
		return
	}
	s.mu.Unlock()
	s.call(fn)
}

func (s *State) runShutdown() {
	for i := 0; ; i++ {
		s.mu.Lock()
		if i >= len(s.shutdownFns) {
			s.shutdownRan = true
			s.shutdownFns = nil
			s.mu.Unlock()
			return
		}
		fn := s.shutdownFns[i]
		s.mu.Unlock()
		s.call(fn)
	}
}

func (s *State) call(fn func()) {
	defer func() {
		if p := recover(); p != nil && p != http.ErrAbortHandler {
			s.m.log.Error("shutdown function panicked", "err", panicErr(p), "stack", string(debug.Stack()))
		}
	}()
	fn()
}

// Finish completes the response now and lets the handler go on, as PHP's
// fastcgi_finish_request: net/http receives the response back as if the
// handler had returned, so every middleware around the Monitor's Handler
// (a compressing one, say) completes its part, and net/http frames it with
// Content-Length when it can, flushes it, and keeps or closes the
// connection as it would have. Finish returns once net/http has the
// response back. Later writes return ErrFinished; the request body and the
// ResponseWriter's headers must not be used any more. The request is no
// longer marked aborted by what happens to the connection, but it still
// can time out.
//
// Server shutdown: http.Server.Shutdown does not wait for a finished
// handler; Monitor.Shutdown does.
func (s *State) Finish() {
	s.finishOne.Do(func() { close(s.finishCh) })
	<-s.servedCh
}

// Go runs fn in a new goroutine, a continuation that outlives the response.
// Its context carries the request's values but is cancelled only when the
// Monitor gives up waiting for background work (see Monitor.Shutdown) or is
// closed. Monitor.Shutdown waits for it. A panic in fn is logged.
func (s *State) Go(fn func(ctx context.Context)) {
	s.m.goBackground(context.WithoutCancel(s.ctx), fn)
}

// abort marks the request aborted. Only the first reason is kept. at is
// when the kernel saw the event, for the detection latency histogram; the
// zero time means unknown, and so do ReasonCanceled and ReasonWriteError,
// whose time says nothing about how fast a source detected anything.
//
// The detection goroutines (epoll loop, probe and agent readers) call it:
// it must never wait for a lock the handler may hold while blocked, such
// as the writer's.
func (s *State) abort(reason Reason, at time.Time) {
	s.mu.Lock()
	if s.status&StatusAborted != 0 || s.detached {
		s.mu.Unlock()
		return
	}
	s.status |= StatusAborted
	s.reason = reason
	cancel := !s.ignore
	s.mu.Unlock()
	if at.IsZero() || reason == ReasonCanceled || reason == ReasonWriteError {
		s.m.metrics.aborts[reason].Add(1)
	} else {
		s.m.metrics.aborted(reason, time.Since(at))
	}
	if cancel {
		s.cancel(&AbortError{Reason: reason})
	}
	if reason != ReasonPeerFIN && reason != ReasonCanceled && s.w != nil && s.w.bodyWritten() {
		s.countUndelivered()
	}
}

// mustStop reports whether the next output ends the handler.
func (s *State) mustStop() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.status&StatusTimeout != 0 || (s.status&StatusAborted != 0 && !s.ignore)
}

func (s *State) countUndelivered() {
	s.mu.Lock()
	first := !s.undelivered
	s.undelivered = true
	s.mu.Unlock()
	if first {
		s.m.metrics.undelivered.Add(1)
	}
}

// end runs once, when the handler returned or gave up: shutdown functions,
// the outcome metric, and the end of the request context.
func (s *State) end() {
	s.endOnce.Do(func() {
		s.mu.Lock()
		if s.limit != nil {
			s.limit.Stop()
		}
		s.limitGen++
		s.mu.Unlock()
		s.runShutdown()
		s.mu.Lock()
		s.ended = true
		status := s.status
		if s.grace != nil && s.grace.Stop() {
			s.m.work.done() // the grace's work will not run
		}
		s.mu.Unlock()
		s.m.metrics.request(status)
		s.detach()
		s.cancel(context.Canceled)
		if s.stopDeadline != nil {
			s.stopDeadline()
		}
	})
}

// detach stops marking the request by what happens to its connection.
func (s *State) detach() {
	s.mu.Lock()
	was := s.detached
	s.detached = true
	s.mu.Unlock()
	if !was && s.c != nil {
		s.c.detach(s)
	}
}

// sourceWait is how long a request cancelled by net/http waits for the
// detection source to say why; deadWait is how long it waits when the
// socket shows the connection is dead, so the source surely has an event
// on its way.
const (
	sourceWait = 50 * time.Millisecond
	deadWait   = time.Second
)

// parentCanceled handles the cancellation of the request context net/http
// (and any middleware around Handler) gave: the connection closed or the
// client half-closed it, (HTTP/2) the client reset the stream, or an outer
// deadline expired.
//
// An outer deadline is no client abort: the handler's context ends at the
// same deadline and the status stays as it is. A half-close under
// Options.IgnoreHalfClose is none either, on HTTP/1.x, where the response
// can still go out: the request stays NORMAL and its context live. Otherwise
// a detection source usually says why at the same moment; it gets a short
// while to do so, then the socket itself is asked.
func (s *State) parentCanceled(parent context.Context) {
	if errors.Is(parent.Err(), context.DeadlineExceeded) {
		// The handler's context has the same deadline (see handlerContext)
		// and ends by itself, with DeadlineExceeded as its error.
		if s.stopDeadline == nil {
			s.cancel(context.Cause(parent))
		}
		return
	}
	c := s.c
	if c == nil {
		s.abort(ReasonCanceled, time.Time{})
		return
	}
	const hungUp = unix.POLLERR | unix.POLLHUP
	if s.m.src.name() != SourceNone {
		wait := sourceWait
		if revents, ok := pollPeer(c); ok && revents&hungUp != 0 {
			wait = deadWait
		}
		t := time.NewTimer(wait)
		select {
		case <-c.deadCh:
		case <-s.servedCh:
		case <-t.C:
		}
		t.Stop()
	}
	c.mu.Lock()
	dead, fin := c.dead, c.fin
	c.mu.Unlock()
	if dead == ReasonNone && !fin {
		// No source said anything (or there is none): ask the socket.
		if revents, ok := pollPeer(c); ok {
			switch {
			case revents&hungUp != 0:
				_ = c.raw.Control(func(fd uintptr) { dead = classify(int(fd), uint32(revents)) })
				if dead == ReasonPeerFIN {
					// An orderly hang-up is a half-close as far as the
					// request goes: IgnoreHalfClose applies to it.
					dead, fin = ReasonNone, true
				}
			case revents&unix.POLLRDHUP != 0:
				fin = true
			}
		}
	}
	switch {
	case dead != ReasonNone:
		s.abort(dead, time.Time{})
	case fin && s.m.opts.IgnoreHalfClose && s.proto == 1:
		// The client may still be reading: the request goes on.
	case fin:
		s.abort(ReasonPeerFIN, time.Time{})
	default:
		s.abort(ReasonCanceled, time.Time{})
	}
}

// pollPeer asks c's socket, without waiting, whether the client
// half-closed it (POLLRDHUP) or it died (POLLERR, POLLHUP). ok is false
// when the socket cannot be asked (net/http closed it).
func pollPeer(c *conn) (revents int16, ok bool) {
	err := c.raw.Control(func(fd uintptr) {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
		if n, err := unix.Poll(fds, 0); err == nil && n == 1 {
			revents, ok = fds[0].Revents, true
		}
	})
	return revents, ok && err == nil
}
