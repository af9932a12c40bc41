package httpx

import (
	"context"
	"errors"
	"net"
	"net/http"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// State is one request's connection state: PHP's connection handling
// functions, per request. Get it with FromContext. Its methods are safe for
// concurrent use, from the handler, its goroutines and its shutdown
// functions, and on a nil State (a context that did not come through
// Handler), where they report a request that is NORMAL and already ended.
//
// The State is also the request's context (Handler passes it as
// r.Context()): it carries the values and deadline of the context net/http
// made, and is cancelled when the client goes away (unless aborts are
// ignored), when the time limit expires, when net/http cancels its own
// context for a client that left, and when the request ends.
type State struct {
	parent context.Context // the request context net/http made
	m      *Monitor
	c      *conn // nil when the connection is not tracked
	proto  int   // the request's ProtoMajor
	w      responseWriter

	reqMinor uint8 // the request's ProtoMinor
	reqClose bool  // net/http closes the connection after the response (Connection: close, HTTP/1.0)
	reqHead  bool
	left     bool // no longer in flight on the connection (under mu)
	settled  bool // the response goes out ahead of the handler (Finish, or the timeout grace expired): the connection no longer marks it (under mu)

	stop     atomic.Bool // the next output ends the handler (aborted and not ignored, or timed out)
	timedOut atomic.Bool // the time limit expired

	mu       sync.Mutex
	status   Status
	reason   Reason
	how      learned   // how reason was learned
	counted  bool      // the abort is in the aborts metric
	markedAt time.Time // when the request was first marked aborted
	observed bool      // its detection latency is in the histogram
	ignore   bool
	ended    bool // shutdown functions ran or run: the request is over

	// The context's cancellation. Until someone asks for Done (or derives
	// a context), it is only err and cause; then cc carries it.
	err, cause error
	cc         context.Context
	ccCancel   context.CancelCauseFunc
	ccStop     func() bool // stops following parent
	ccDeadline context.CancelFunc

	x *extras // what only some requests use
}

// extras holds the state of the features a request may use: allocated on
// first use.
type extras struct {
	limit       *time.Timer
	limitGen    uint64
	grace       *time.Timer
	shutdownFns []func()
	shutdownRan bool
	undelivered bool
	finished    bool     // Finish was called
	hijacked    net.Conn // an inline Finish took the connection over
	run         *detached
}

// learned says how an abort's reason was learned; a better account
// replaces a worse one.
type learned uint8

const (
	weak       learned = iota // a write error or net/http's cancellation alone
	fromSocket                // the socket, asked when net/http cancelled or a write failed
	fromSource                // the detection source: the kernel's account
)

type stateKey struct{}

// FromContext returns the State of the request whose context (or a context
// derived from it) is ctx, or nil when the request did not go through a
// Monitor's Handler. Every State method is safe on nil.
func FromContext(ctx context.Context) *State {
	s, _ := ctx.Value(stateKey{}).(*State)
	return s
}

func (s *State) xLocked() *extras {
	if s.x == nil {
		s.x = &extras{}
	}
	return s.x
}

// Status returns the connection status, PHP's connection_status(). It can
// be read at any time, also from shutdown functions and after the handler
// returned.
func (s *State) Status() Status {
	if s == nil {
		return StatusNormal
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.status
}

// Aborted reports whether the client went away, PHP's connection_aborted().
func (s *State) Aborted() bool { return s.Status()&StatusAborted != 0 }

// TimedOut reports whether the time limit expired.
func (s *State) TimedOut() bool { return s.Status()&StatusTimeout != 0 }

// AbortReason returns why the request was aborted, or ReasonNone. A reason
// learned from a failed write or from net/http alone (ReasonWriteError,
// ReasonCanceled) is replaced by the kernel's account of what happened to
// the connection when the detection source reports it.
//
// Right after net/http alone cancelled the request (the socket already
// closed, as HTTP/2 does on a reset), the kernel's account is usually
// microseconds away: AbortReason then waits for it, up to sourceWait after
// the abort. The request's context was cancelled at once all the same.
func (s *State) AbortReason() Reason {
	if s == nil {
		return ReasonNone
	}
	for {
		s.mu.Lock()
		r, how, at := s.reason, s.how, s.markedAt
		s.mu.Unlock()
		if r == ReasonNone || how != weak || s.c == nil || s.m.src.name() == SourceNone || time.Since(at) >= sourceWait {
			return r
		}
		time.Sleep(time.Millisecond)
	}
}

// sourceWait bounds how long AbortReason waits for the source's account
// of an abort that net/http noticed first.
const sourceWait = 50 * time.Millisecond

// IgnoreUserAbort sets whether a client abort ends the request and returns
// the previous setting, as PHP's ignore_user_abort(bool). While aborts are
// ignored, an abort is still recorded in Status and AbortReason, but the
// request context is not cancelled and writes go on (and may fail). Turning
// it off after an abort was recorded cancels the context at once. A timeout
// ends the request either way.
func (s *State) IgnoreUserAbort(ignore bool) bool {
	if s == nil {
		return false
	}
	s.mu.Lock()
	prev := s.ignore
	s.ignore = ignore
	cancelNow := !ignore && s.status&StatusAborted != 0
	reason := s.reason
	s.updateStopLocked()
	s.mu.Unlock()
	if cancelNow {
		s.cancel(context.Canceled, &AbortError{Reason: reason})
	}
	return prev
}

func (s *State) updateStopLocked() {
	s.stop.Store(s.status&StatusTimeout != 0 || (s.status&StatusAborted != 0 && !s.ignore))
}

// abort marks the request aborted. at is when the kernel saw the event, for
// the detection latency histogram (zero: unknown). A reason learned a
// better way replaces the first one (see learned).
//
// The detection goroutines (epoll loop, probe and agent readers, net/http's
// background reader) call it: it must never wait for a lock the handler
// may hold while blocked, such as the writer's.
func (s *State) abort(r Reason, at time.Time, how learned) {
	s.mu.Lock()
	if s.ended || s.left || s.settled {
		s.mu.Unlock()
		return
	}
	now := time.Now()
	var latency time.Duration = -1
	if !at.IsZero() && !s.observed && how == fromSource {
		s.observed = true
		if s.status&StatusAborted != 0 {
			latency = s.markedAt.Sub(at) // noticed first by net/http or the socket
		} else {
			latency = now.Sub(at)
		}
	}
	if s.status&StatusAborted != 0 {
		var count Reason
		if how > s.how && s.how == weak {
			s.reason, s.how = r, how
			if !s.counted {
				s.counted, count = true, r
			}
		}
		s.mu.Unlock()
		if count != ReasonNone {
			s.m.metrics.aborts[count].Add(1)
		}
		if latency >= 0 {
			s.m.metrics.latency.Observe(latency.Seconds())
		}
		return
	}
	s.status |= StatusAborted
	s.reason, s.how, s.markedAt = r, how, now
	s.counted = how != weak // a weak reason is counted when the request ends, unless replaced
	counted := s.counted
	cancel := !s.ignore
	s.updateStopLocked()
	s.mu.Unlock()
	if counted {
		s.m.metrics.aborts[r].Add(1)
	}
	if latency >= 0 {
		s.m.metrics.latency.Observe(latency.Seconds())
	}
	if cancel {
		s.cancel(context.Canceled, &AbortError{Reason: r})
	}
	if r != ReasonPeerFIN && r != ReasonCanceled && s.w.bodyWritten() {
		s.countUndelivered()
	}
}

// writeFailed marks the request aborted after a failed write: with what
// the source already said, or the socket says now, or the kernel's error
// says (net/http may have closed the socket already), else
// ReasonWriteError.
func (s *State) writeFailed(err error) {
	if s.c != nil {
		if r := s.c.gone(); r != ReasonNone {
			s.abort(r, time.Time{}, fromSource)
			return
		}
		if r := s.c.askSocket(); r != ReasonNone {
			s.abort(r, time.Time{}, fromSocket)
			return
		}
		s.c.arm() // for the source's account, which may follow
	}
	switch {
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		// The client reset the connection (a reset shuts the socket down
		// both ways, hence EPIPE).
		s.abort(ReasonPeerReset, time.Time{}, fromSocket)
	case errors.Is(err, syscall.ETIMEDOUT):
		s.abort(ReasonTimeout, time.Time{}, weak) // the source tells which timeout
	default:
		s.abort(ReasonWriteError, time.Time{}, weak)
	}
}

func (s *State) countUndelivered() {
	s.mu.Lock()
	x := s.xLocked()
	first := !x.undelivered
	x.undelivered = true
	s.mu.Unlock()
	if first {
		s.m.metrics.undelivered.Add(1)
	}
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
// latest Options.TimeoutGrace later, even if the handler never returns
// (blocked writing or reading the request body included); the shutdown
// functions then run without waiting for it. A limit costs a timer.
func (s *State) SetTimeLimit(d time.Duration) {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ended || s.status&StatusTimeout != 0 {
		return
	}
	x := s.xLocked()
	if x.limit != nil {
		x.limit.Stop()
		x.limit = nil
	}
	x.limitGen++
	if d > 0 {
		gen := x.limitGen
		x.limit = time.AfterFunc(d, func() { s.expire(gen) })
	}
}

func (s *State) expire(gen uint64) {
	s.mu.Lock()
	if gen != s.x.limitGen || s.ended || s.status&StatusTimeout != 0 {
		s.mu.Unlock()
		return
	}
	s.status |= StatusTimeout
	s.timedOut.Store(true)
	s.updateStopLocked()
	s.m.work.add() // Shutdown waits for the grace's work
	s.x.grace = time.AfterFunc(s.m.grace, s.graceExpired)
	s.mu.Unlock()
	s.cancel(context.Canceled, ErrTimeLimit)
}

// graceExpired gives up on a timed-out handler: the client gets its
// response (503, or the end of what was sent) and the shutdown functions
// run, while the handler may go on.
func (s *State) graceExpired() {
	defer s.m.work.done()
	if run := s.detachedRun(); run != nil {
		run.release() // ServeHTTP returns and hands the response back
	} else {
		s.releaseStuck()
	}
	s.end()
}

func (s *State) detachedRun() *detached {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.x == nil {
		return nil
	}
	return s.x.run
}

// RegisterShutdown registers fn to run when the request ends, as PHP's
// register_shutdown_function: functions run in registration order, exactly
// once, after the handler returns normally, is aborted, panics, or (after a
// timeout) when the grace expires. A function may register more; they run
// in the same pass. A panic in one is logged and does not skip the others.
// A function registered after the pass ran (or on a nil State) is called at
// once.
func (s *State) RegisterShutdown(fn func()) {
	if s == nil {
		fn()
		return
	}
	s.mu.Lock()
	x := s.xLocked()
	if !x.shutdownRan {
		x.shutdownFns = append(x.shutdownFns, fn)
		s.mu.Unlock()
		return
	}
	s.mu.Unlock()
	s.call(fn)
}

func (s *State) runShutdown() {
	for i := 0; ; i++ {
		s.mu.Lock()
		x := s.x
		if x == nil || i >= len(x.shutdownFns) {
			if x != nil {
				x.shutdownRan = true
				x.shutdownFns = nil
			}
			s.mu.Unlock()
			return
		}
		fn := x.shutdownFns[i]
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

// Go runs fn in a new goroutine, a continuation that outlives the response.
// Its context carries the request's values but is cancelled only when the
// Monitor gives up waiting for background work (see Monitor.Shutdown) or is
// closed. Monitor.Shutdown waits for it. A panic in fn is logged. On a nil
// State fn runs in a plain goroutine with a background context.
func (s *State) Go(fn func(ctx context.Context)) {
	if s == nil {
		go fn(context.Background())
		return
	}
	s.m.goBackground(context.WithoutCancel(s), fn)
}

// end runs once, when the handler returned or gave up: the shutdown
// functions, the outcome metric, and the end of the request context. A
// request that used no feature takes one lock here.
func (s *State) end() {
	s.mu.Lock()
	if s.ended {
		s.mu.Unlock()
		return
	}
	if x := s.x; x != nil {
		if x.limit != nil {
			x.limit.Stop()
		}
		x.limitGen++
		if !x.shutdownRan {
			s.mu.Unlock()
			s.runShutdown()
			s.mu.Lock()
		}
		if x.grace != nil && x.grace.Stop() {
			s.m.work.done() // the grace's work will not run
		}
	}
	s.ended = true
	status, reason := s.status, s.reason
	count := !s.counted && status&StatusAborted != 0
	s.counted = true
	left := s.left
	s.left = true
	ccCancel := s.ccCancel
	if s.err == nil {
		s.err, s.cause = context.Canceled, context.Canceled
	} else {
		ccCancel = nil
	}
	stop, stopDeadline := s.ccStop, s.ccDeadline
	s.mu.Unlock()
	if count {
		s.m.metrics.aborts[reason].Add(1)
	}
	s.m.metrics.request(status)
	if !left && s.c != nil {
		s.c.end(s, s.w.bodyWritten(), s.reqClose, status&StatusAborted != 0)
	}
	if ccCancel != nil {
		ccCancel(context.Canceled)
	}
	if stop != nil {
		stop()
	}
	if stopDeadline != nil {
		stopDeadline()
	}
}

// settle stops the connection from marking the request before its final
// response goes out ahead of the handler (the timeout grace expired; Finish
// sets it itself): a client that reads the 503 and closes has not aborted.
func (s *State) settle() {
	s.mu.Lock()
	s.settled = true
	s.mu.Unlock()
}

// leave takes the request off its connection, once: what happens to the
// connection no longer marks it.
func (s *State) leave() {
	s.mu.Lock()
	was := s.left
	s.left = true
	aborted := s.status&StatusAborted != 0
	s.mu.Unlock()
	if !was && s.c != nil {
		s.c.end(s, s.w.bodyWritten(), s.reqClose, aborted)
	}
}

// Context implementation.

// Deadline implements context.Context: the deadline of net/http's context.
func (s *State) Deadline() (time.Time, bool) { return s.parent.Deadline() }

// Done implements context.Context.
func (s *State) Done() <-chan struct{} { return s.ctx().Done() }

// Err implements context.Context.
func (s *State) Err() error {
	s.mu.Lock()
	cc, err := s.cc, s.err
	s.mu.Unlock()
	if cc != nil {
		return cc.Err()
	}
	if err == nil && s.parent.Err() != nil {
		// Nobody listens for Done yet, so nobody heard net/http's
		// cancellation: decide on it now.
		s.parentCanceled()
		s.mu.Lock()
		err = s.err
		s.mu.Unlock()
	}
	return err
}

// Value implements context.Context: the State itself, else the values of
// net/http's context. The context package asks for its own cancellation
// (context.Cause, deriving contexts) with a key of type *int: that is
// answered by the State's own cancellation, not net/http's.
func (s *State) Value(key any) any {
	switch key.(type) {
	case stateKey:
		return s
	case *int:
		if v := s.ctx().Value(key); v != nil {
			return v
		}
	}
	return s.parent.Value(key)
}

// ctx returns the context that carries the State's cancellation, made on
// first use: a request whose handler never looks at its context's Done
// pays nothing for it. From then on it also follows net/http's context, so
// that net/http's own cancellation reaches the handler at once.
func (s *State) ctx() context.Context {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cc != nil {
		return s.cc
	}
	base := context.Background()
	if d, ok := s.parent.Deadline(); ok {
		base, s.ccDeadline = context.WithDeadline(base, d)
	}
	s.cc, s.ccCancel = context.WithCancelCause(base)
	if s.err != nil {
		s.ccCancel(s.cause)
	} else if !s.ended {
		s.ccStop = context.AfterFunc(s.parent, s.parentCanceled)
	}
	return s.cc
}

// cancel ends the context with err (context.Canceled or
// context.DeadlineExceeded) and cause.
func (s *State) cancel(err, cause error) {
	s.mu.Lock()
	if s.err != nil {
		s.mu.Unlock()
		return
	}
	s.err, s.cause = err, cause
	cc := s.ccCancel
	s.mu.Unlock()
	if cc != nil && err != context.DeadlineExceeded {
		// (cc has the same deadline and ends by itself, with
		// DeadlineExceeded as its error.)
		cc(cause)
	}
}

// parentCanceled handles the cancellation of the context net/http (and any
// middleware around Handler) gave: the client half-closed or closed the
// connection (which net/http saw on its own), HTTP/2 reset the stream, the
// server is closing, or an outer deadline expired. It never waits for the
// detection source: what the source already said, or else the socket,
// gives the reason at once.
//
// An outer deadline is no client abort: the context ends with
// DeadlineExceeded and the status stays. A half-close under
// Options.IgnoreHalfClose is none either, on HTTP/1.x, where the response
// can still go out: the request stays NORMAL and its context live.
func (s *State) parentCanceled() {
	if errors.Is(s.parent.Err(), context.DeadlineExceeded) {
		s.cancel(context.DeadlineExceeded, context.Cause(s.parent))
		return
	}
	s.mu.Lock()
	over := s.ended || s.left
	s.mu.Unlock()
	if over {
		return // net/http cancels its context after the request
	}
	c := s.c
	if c == nil {
		s.abort(ReasonCanceled, time.Time{}, weak)
		return
	}
	r, how := c.gone(), fromSource
	if r == ReasonNone {
		r, how = c.askSocket(), fromSocket
	}
	switch {
	case r == ReasonNone:
		// The socket has not seen the end yet (a TLS client's close_notify
		// comes before its FIN): a lazy epoll source must listen now to
		// give the reason AbortReason waits for.
		c.arm()
		s.abort(ReasonCanceled, time.Time{}, weak)
	case r == ReasonPeerFIN && s.m.opts.IgnoreHalfClose && s.proto == 1:
		// The client may still be reading: the request goes on.
	default:
		s.abort(r, time.Time{}, how)
	}
}

// String implements fmt.Stringer for context printing.
func (s *State) String() string { return "httpx.State" }
