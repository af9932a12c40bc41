package httpx

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hangup-io/hangup/httpx/internal/detect"
	"golang.org/x/sys/unix"
)

// conn is one tracked TCP connection. It is the context that ConnContext
// returns, so every request context net/http makes for the connection
// descends from it and Handler finds it with one Value lookup; it holds
// the requests in flight (one for HTTP/1.x, in cur; any number for HTTP/2,
// in streams) and what the detection source said about the connection.
//
// While the client is alive nothing here happens per request but two
// atomic adds and an atomic store: the source's report marks the requests
// in flight, the watchdog (droptune.go) looks after socket options.
type conn struct {
	context.Context // ConnContext's parent: values and (no) cancellation

	m      *Monitor
	nc     net.Conn
	raw    syscall.RawConn
	cookie uint64  // SO_COOKIE, for sources that report by cookie; 0 if unknown
	busy   *uint64 // the in-process probe's count of requests in flight (detect.Busier); nil if none

	state   atomic.Uint32         // connFIN | dead reason << 8
	cur     atomic.Pointer[State] // the HTTP/1.x request in flight
	active  atomic.Int32          // requests in flight
	seq     atomic.Uint32         // requests started
	pending atomic.Pointer[State] // the last finished response with a body, delivery not yet confirmed

	// The watchdog's own view (only its goroutine touches these).
	lastSeq  uint32
	seenBusy bool

	tuned      atomic.Bool // the drop-detecting options are set (changed under mu)
	closedFlag atomic.Bool // closed, for the lock-free path

	mu      sync.Mutex
	streams map[*State]struct{} // HTTP/2 requests in flight
	closed  bool                // net/http closed or hijacked the connection
	mapped  bool                // in the Monitor's cookie table
	deadCh  chan struct{}       // made by a waiter, closed at death
	idleCh  chan struct{}       // made by a waiter, closed when net/http next goes idle
	tune    tuning              // the drop-detecting options (droptune.go)
	keepFD  int                 // duplicate descriptor kept for a drain or a delivery wait; -1 if none
	keepers int
	h2Keep  bool // an HTTP/2 connection keeps keepFD while it has streams

	// Source-private state, under the source's own lock.
	epollID   uint64
	epollDone bool // unwatched: a lazy source's arm registers nothing
	agent     agentConn

	epollLazy  bool        // a lazy epoll source watches it (set before any request)
	epollArmed atomic.Bool // arm ran
}

const connFIN = 1

type connKey struct{}

// Value implements context.Context: the connection for Handler, else the
// parent's values.
func (c *conn) Value(key any) any {
	if key == (connKey{}) {
		return c
	}
	return c.Context.Value(key)
}

func newConn(ctx context.Context, m *Monitor, nc net.Conn) (*conn, error) {
	raw, err := tcpConn(nc)
	if err != nil {
		return nil, err
	}
	return &conn{Context: ctx, m: m, nc: nc, raw: raw, keepFD: -1}, nil
}

// control runs fn on the socket while net/http's descriptor is open, else
// on the kept duplicate; it reports false when neither is there.
func (c *conn) control(fn func(fd int)) bool {
	if c.raw.Control(func(fd uintptr) { fn(int(fd)) }) == nil {
		return true
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.controlKeptLocked(fn)
}

// controlLocked is control with c.mu held.
func (c *conn) controlLocked(fn func(fd int)) bool {
	if c.raw.Control(func(fd uintptr) { fn(int(fd)) }) == nil {
		return true
	}
	return c.controlKeptLocked(fn)
}

func (c *conn) controlKeptLocked(fn func(fd int)) bool {
	if c.keepFD < 0 {
		return false
	}
	fn(c.keepFD)
	return true
}

// dead returns why the connection died, or ReasonNone.
func (c *conn) dead() Reason { return Reason(c.state.Load() >> 8) }

// gone returns the reason a request starting now is aborted at once
// (ReasonNone if the client is there).
func (c *conn) gone() Reason {
	st := c.state.Load()
	if r := Reason(st >> 8); r != ReasonNone {
		return r
	}
	if st&connFIN != 0 && !c.m.opts.IgnoreHalfClose {
		return ReasonPeerFIN
	}
	return ReasonNone
}

// report applies a source's event: a half-close, or the connection's death
// (any other reason), marks every request in flight; the first death wins.
// at is when the kernel saw it (zero: unknown).
func (c *conn) report(r Reason, at time.Time) {
	for {
		st := c.state.Load()
		next := st
		if r == ReasonPeerFIN {
			next |= connFIN
		} else if st>>8 == 0 {
			next = st&0xff | uint32(r)<<8
		}
		if next == st {
			return // nothing new
		}
		if c.state.CompareAndSwap(st, next) {
			break
		}
	}
	if r != ReasonPeerFIN {
		c.died()
	} else if c.m.opts.IgnoreHalfClose {
		return
	}
	c.eachRequest(func(s *State) { s.abort(r, at, fromSource) })
}

// died settles what waited on the connection: delivery waits, and the
// responses whose delivery was not confirmed yet.
func (c *conn) died() {
	c.mu.Lock()
	if c.deadCh != nil {
		close(c.deadCh)
	}
	c.mu.Unlock()
	c.m.drop.settle(c)
}

// deadChan returns a channel closed when the connection dies.
func (c *conn) deadChan() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.deadCh == nil {
		c.deadCh = make(chan struct{})
		if c.dead() != ReasonNone {
			close(c.deadCh)
		}
	}
	return c.deadCh
}

func (c *conn) eachRequest(fn func(*State)) {
	if s := c.cur.Load(); s != nil {
		fn(s)
	}
	c.mu.Lock()
	if len(c.streams) == 0 {
		c.mu.Unlock()
		return
	}
	streams := make([]*State, 0, len(c.streams))
	for s := range c.streams {
		streams = append(streams, s)
	}
	c.mu.Unlock()
	for _, s := range streams {
		fn(s)
	}
}

// begin adds a request in flight; it is marked at once if the client is
// already gone.
func (c *conn) begin(s *State) {
	if s.proto >= 2 {
		c.mu.Lock()
		if c.streams == nil {
			c.streams = make(map[*State]struct{})
			// net/http closes an HTTP/2 connection as soon as it fails,
			// before its streams' handlers see it: one duplicate
			// descriptor per connection keeps the socket, and the epoll
			// source's view of it, until the last stream ends.
			c.keepLocked()
			c.h2Keep = true
		}
		c.streams[s] = struct{}{}
		c.mu.Unlock()
	} else {
		c.cur.Store(s)
	}
	c.seq.Add(1)
	c.active.Add(1)
	c.busyAdd()
	if r := c.gone(); r != ReasonNone {
		s.abort(r, time.Time{}, fromSource)
	}
}

// arm makes a lazy epoll source register the connection (see epollSource).
func (c *conn) arm() {
	if !c.epollLazy || c.epollArmed.Load() {
		return
	}
	if s, ok := c.m.src.(*epollSource); ok {
		s.arm(c)
	}
}

// end removes a request: it is no longer marked by what happens to the
// connection. A response with a body waits for the watchdog to confirm
// its delivery; closing says net/http closes the connection after it.
func (c *conn) end(s *State, body, closing, aborted bool) {
	if s.proto >= 2 {
		c.mu.Lock()
		delete(c.streams, s)
		c.mu.Unlock()
	} else {
		c.cur.CompareAndSwap(s, nil)
	}
	if body && c.m.drop.set.enabled && c.dead() == ReasonNone && !aborted {
		c.pending.Store(s)
		if closing {
			c.m.drop.closingSoon(c)
		}
	}
	c.busyDone()
	if c.active.Add(-1) == 0 && c.closedFlag.Load() {
		c.released()
	}
}

// busyAdd counts a request (or a delivery wait) in flight in the probe's
// busy word, so that the probe wakes its reader at once for the
// connection's client-gone events. An event written meanwhile without a
// wakeup left detect.BusyPending: the socket says what it was.
func (c *conn) busyAdd() {
	if c.busy == nil {
		return
	}
	if (atomic.AddUint64(c.busy, 1)-1)&detect.BusyPending == 0 {
		return
	}
	atomic.AndUint64(c.busy, ^uint64(detect.BusyPending))
	if r := c.askSocket(); r != ReasonNone {
		c.report(r, time.Now())
	}
}

// busyDone ends what busyAdd counted.
func (c *conn) busyDone() {
	if c.busy != nil {
		atomic.AddUint64(c.busy, ^uint64(0))
	}
}

// released runs once net/http closed the connection and no request is left
// on it: its events are no longer routed, and an HTTP/2 connection's
// descriptor goes.
func (c *conn) released() {
	c.m.unmap(c)
	c.mu.Lock()
	if c.h2Keep {
		c.h2Keep = false
		c.unkeepLocked()
	}
	c.mu.Unlock()
}

// idleChan returns a channel closed the next time net/http finishes an
// HTTP/1.x response on the connection (it goes idle) or closes it.
func (c *conn) idleChan() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.idleCh == nil {
		c.idleCh = make(chan struct{})
		c.m.idleWaiters.Add(1)
		if c.closed {
			c.wakeIdleLocked()
		}
	}
	return c.idleCh
}

func (c *conn) wakeIdleLocked() {
	if c.idleCh != nil {
		close(c.idleCh)
		c.idleCh = nil
		c.m.idleWaiters.Add(-1)
	}
}

// keep and unkeep bracket a use of the socket that must outlive net/http's
// descriptor (a delivery wait, a drain): a duplicate descriptor keeps the
// socket and its acknowledgement state until the last unkeep.
func (c *conn) keepLocked() {
	if c.keepFD < 0 {
		_ = c.raw.Control(func(fd uintptr) {
			if d, err := unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0); err == nil {
				c.keepFD = d
			}
		})
	}
	c.keepers++
}

func (c *conn) unkeepLocked() {
	c.keepers--
	if c.keepers == 0 && c.keepFD >= 0 {
		unix.Close(c.keepFD)
		c.keepFD = -1
	}
}

// askSocket classifies what the socket says now (ReasonNone: the client is
// there, or the socket cannot be asked).
func (c *conn) askSocket() Reason {
	r := ReasonNone
	c.control(func(fd int) {
		if revents, ok := pollHangup(fd); ok {
			r = classify(fd, uint32(revents))
		}
	})
	return r
}
