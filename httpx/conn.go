package httpx

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// conn is one tracked TCP connection: the requests in flight on it (one for
// HTTP/1.x, any number for HTTP/2), what the detection source said about
// it, and its socket options.
type conn struct {
	m       *Monitor
	raw     syscall.RawConn
	cookie  uint64
	epollID int32 // set by the epoll source
	dupFD   int   // the epoll source's duplicate descriptor

	mu        sync.Mutex
	reqs      map[*State]struct{}
	busy      int // requests in flight, delivery waits, and a drain (below)
	saved     sockopts
	haveSaved bool
	tunedNow  bool          // the drop-detecting options are set
	uto       int           // TCP_USER_TIMEOUT set while tunedNow (ms)
	fin       bool          // the client half-closed
	dead      Reason        // why the connection died (ReasonNone: alive)
	deadCh    chan struct{} // closed when dead is set
	closed    bool          // net/http closed or hijacked it
	lingering bool          // closed, but still routed events while busy
	closedCh  chan struct{}
	idleSeq   uint64        // HTTP/1.x responses completed (transitions to StateIdle)
	idleCh    chan struct{} // closed and replaced at every transition to StateIdle

	// A drain keeps the options (one hold in busy) after requests ended,
	// until every byte written is acknowledged or the connection dies;
	// then the responses in unconfirmed are counted undelivered.
	draining    bool
	drainSeq    uint64 // idleSeq when the last drained request ended
	drainProto  int    // its ProtoMajor
	drainTicks  int    // watchdog ticks since then
	unconfirmed map[*State]struct{}
	// The last drain's verdict on its responses, for a delivery wait that
	// starts after net/http closed the connection.
	drained        map[*State]struct{}
	drainedVerdict error // nil: delivered

	// keepFD is a duplicate of the descriptor, held while a drain or a
	// delivery wait (keepers) may need to ask the socket after net/http
	// closed its own; -1 when none.
	keepFD  int
	keepers int
}

// tcpConn finds the TCP socket under a connection net/http accepted:
// through TLS (tls.Conn.NetConn) and through any wrapper that has a
// NetConn method, as tls.Conn does.
func tcpConn(nc net.Conn) (syscall.RawConn, error) {
	for range 16 {
		switch c := nc.(type) {
		case *tls.Conn:
			nc = c.NetConn()
			continue
		case syscall.Conn:
			return c.SyscallConn()
		case interface{ NetConn() net.Conn }:
			nc = c.NetConn()
			continue
		}
		break
	}
	return nil, fmt.Errorf("%T has no socket", nc)
}

func newConn(m *Monitor, nc net.Conn) (*conn, error) {
	raw, err := tcpConn(nc)
	if err != nil {
		return nil, err
	}
	var (
		cookie uint64
		proto  int
		serr   error
	)
	if err := raw.Control(func(fd uintptr) {
		proto, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PROTOCOL)
		if serr == nil {
			cookie, serr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE)
		}
	}); err != nil {
		return nil, err
	}
	if serr != nil {
		return nil, fmt.Errorf("getsockopt: %w", serr)
	}
	if proto != unix.IPPROTO_TCP {
		return nil, errors.New("not a TCP socket")
	}
	return &conn{
		m: m, raw: raw, cookie: cookie,
		reqs:     make(map[*State]struct{}, 1),
		deadCh:   make(chan struct{}),
		closedCh: make(chan struct{}),
		idleCh:   make(chan struct{}),
		keepFD:   -1,
	}, nil
}

// report applies a source's event: a half-close or the connection's death
// marks every request in flight on it; a death also settles a drain.
func (c *conn) report(ev event) {
	var (
		lost   []*State
		forget bool
	)
	c.mu.Lock()
	if ev.reason == ReasonPeerFIN {
		if c.fin || c.dead != ReasonNone {
			c.mu.Unlock()
			return
		}
		c.fin = true
		if c.m.opts.IgnoreHalfClose {
			c.mu.Unlock()
			return
		}
	} else {
		if c.dead != ReasonNone {
			c.mu.Unlock()
			return
		}
		c.dead = ev.reason
		close(c.deadCh)
		if c.draining {
			si, ok := c.inspectLocked()
			lost, forget = c.endDrainLocked(!ok || !si.delivered() || !c.finishedLocked())
		}
	}
	reqs := make([]*State, 0, len(c.reqs))
	for s := range c.reqs {
		reqs = append(reqs, s)
	}
	c.mu.Unlock()
	countLost(lost)
	if forget {
		c.m.forget(c)
	}
	if ev.at.IsZero() {
		ev.at = time.Now()
	}
	for _, s := range reqs {
		s.abort(ev.reason, ev.at)
	}
}

// gone returns the reason the connection is unusable for a new request
// (ReasonNone if it is fine).
func (c *conn) gone() Reason {
	if c.dead != ReasonNone {
		return c.dead
	}
	if c.fin && !c.m.opts.IgnoreHalfClose {
		return ReasonPeerFIN
	}
	return ReasonNone
}

func (c *conn) isDead() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.dead != ReasonNone
}

// attach adds a request; it is marked at once if the client is already gone.
func (c *conn) attach(s *State) {
	c.mu.Lock()
	c.reqs[s] = struct{}{}
	gone := c.gone()
	c.mu.Unlock()
	c.hold()
	if gone != ReasonNone {
		s.abort(gone, time.Now())
	}
}

// detach removes a request; it is no longer marked by what happens to the
// connection. Its response is drained: the drop-detecting options stay
// until the client acknowledged every byte written on the connection (the
// part net/http writes after the handler returned included), and the
// response is counted undelivered if the connection dies first.
func (c *conn) detach(s *State) {
	c.mu.Lock()
	_, ok := c.reqs[s]
	delete(c.reqs, s)
	if ok && c.tunedNow && c.dead == ReasonNone && !c.closed && c.m.drop.wd.active(c.m) {
		if c.unconfirmed == nil {
			c.unconfirmed = make(map[*State]struct{}, 1)
		}
		c.unconfirmed[s] = struct{}{}
		c.drainSeq, c.drainProto, c.drainTicks = c.idleSeq, s.proto, 0
		if !c.draining {
			c.draining = true
			c.busy++
			c.keepLocked()
		}
	}
	forget := false
	if ok {
		forget = c.releaseLocked()
	}
	c.mu.Unlock()
	if forget {
		c.m.forget(c)
	}
}

// hold and release count the reasons to keep the drop-detecting socket
// options: requests in flight, delivery waits and a drain. The options are
// set on the first hold and restored on the last release.
func (c *conn) hold() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.busy++
	if c.busy == 1 && c.m.drop.enabled && !c.closed && !c.tunedNow {
		c.tune()
	}
}

func (c *conn) release() {
	c.mu.Lock()
	forget := c.releaseLocked()
	c.mu.Unlock()
	if forget {
		c.m.forget(c)
	}
}

// releaseLocked drops a hold and reports whether the connection, closed
// and no longer busy, must be forgotten (by the caller, without c.mu).
func (c *conn) releaseLocked() (forget bool) {
	c.busy--
	idle := c.busy == 0
	if idle && c.tunedNow {
		c.restore()
		c.tunedNow = false
		c.m.drop.wd.remove(c)
	}
	forget = idle && c.lingering
	c.lingering = c.lingering && !forget
	return forget
}

// sockopts are the socket options that detect a silent drop.
type sockopts struct {
	keepalive, idle, intvl, cnt, userTimeout int
}

// dropSettings derives the options from the drop timeout d. With
// TCP_USER_TIMEOUT set, the kernel fails the connection when data stays
// unacknowledged for that long, and its keepalive timer fails it at the
// first probe that finds nothing received for that long (cnt no longer
// matters). Keepalive works in whole seconds. wd looks after the
// connections that have them (see watchdog).
type dropSettings struct {
	enabled bool
	opts    sockopts
	wd      *watchdog
}

func newDropSettings(d time.Duration) dropSettings {
	if d < 0 {
		return dropSettings{}
	}
	if d == 0 {
		d = defaultDropTimeout
	}
	secs := max(int(d/time.Second), 2)
	intvl := max(secs/5, 1)
	idle := max(secs/2, 1)
	user := d - time.Duration(intvl)*time.Second
	if user < 500*time.Millisecond {
		user = 500 * time.Millisecond
	}
	return dropSettings{enabled: true, wd: newWatchdog(user), opts: sockopts{
		keepalive:   1,
		idle:        idle,
		intvl:       intvl,
		cnt:         max(secs/intvl+1, 2),
		userTimeout: int(user / time.Millisecond),
	}}
}

// tune saves the current options (once) and sets the drop-detecting ones.
// Only options that differ are written: with Go's defaults (keepalive on)
// that is the user timeout, idle and interval; the probe count is left
// alone, the user timeout replaces it. Called with c.mu held.
func (c *conn) tune() {
	_ = c.raw.Control(func(fd uintptr) {
		f := int(fd)
		if !c.haveSaved {
			var err error
			s := &c.saved
			s.keepalive, err = unix.GetsockoptInt(f, unix.SOL_SOCKET, unix.SO_KEEPALIVE)
			if err != nil {
				return
			}
			s.idle, _ = unix.GetsockoptInt(f, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE)
			s.intvl, _ = unix.GetsockoptInt(f, unix.IPPROTO_TCP, unix.TCP_KEEPINTVL)
			s.cnt, _ = unix.GetsockoptInt(f, unix.IPPROTO_TCP, unix.TCP_KEEPCNT)
			s.userTimeout, _ = unix.GetsockoptInt(f, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT)
			c.haveSaved = true
		}
		setSockopts(f, c.saved, c.tuned())
		c.tunedNow = true
		c.uto = c.m.drop.opts.userTimeout
	})
	if c.tunedNow {
		c.m.drop.wd.add(c)
	}
}

// tuned is the drop-detecting set for this connection.
func (c *conn) tuned() sockopts {
	o := c.m.drop.opts
	o.cnt = c.saved.cnt
	return o
}

// restore puts the saved options back (on a hijacked connection too).
// Called with c.mu held.
func (c *conn) restore() {
	cur := c.tuned()
	cur.userTimeout = c.uto
	_ = c.raw.Control(func(fd uintptr) { setSockopts(int(fd), cur, c.saved) })
}

// setSockopts changes the options from cur to want, writing only those
// that differ.
func setSockopts(fd int, cur, want sockopts) {
	set := func(level, opt, cur, want int) {
		if cur != want {
			_ = unix.SetsockoptInt(fd, level, opt, want)
		}
	}
	set(unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, cur.userTimeout, want.userTimeout)
	set(unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, cur.idle, want.idle)
	set(unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, cur.intvl, want.intvl)
	set(unix.IPPROTO_TCP, unix.TCP_KEEPCNT, cur.cnt, want.cnt)
	set(unix.SOL_SOCKET, unix.SO_KEEPALIVE, cur.keepalive, want.keepalive)
}

// responded notes that net/http finished an HTTP/1.x response on the
// connection (it went idle).
func (c *conn) responded() {
	c.mu.Lock()
	c.idleSeq++
	close(c.idleCh)
	c.idleCh = make(chan struct{})
	c.mu.Unlock()
}

// markClosed notes that net/http closed or hijacked the connection. If a
// drain or a delivery wait keeps a duplicate descriptor, the socket stays
// open through it after net/http's close: it gets the FIN that close would
// have sent, and a drain that is already complete ends at once.
func (c *conn) markClosed() {
	c.mu.Lock()
	if !c.closed {
		c.closed = true
		close(c.closedCh)
	}
	var (
		lost   []*State
		forget bool
	)
	if c.keepFD >= 0 && c.raw.Control(func(uintptr) {}) != nil {
		_ = unix.Shutdown(c.keepFD, unix.SHUT_WR)
		if c.draining {
			if si, ok := c.inspectLocked(); ok && (si.hungUp || si.delivered()) {
				lost, forget = c.endDrainLocked(!si.delivered())
			}
		}
	}
	c.mu.Unlock()
	countLost(lost)
	if forget {
		c.m.forget(c)
	}
}

// keep and unkeep bracket a use of the socket that must outlive net/http's
// descriptor (a delivery wait).
func (c *conn) keep() {
	c.mu.Lock()
	c.keepLocked()
	c.mu.Unlock()
}

func (c *conn) unkeep() {
	c.mu.Lock()
	c.unkeepLocked()
	c.mu.Unlock()
}

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

// withFDLocked runs fn on the socket: through net/http's descriptor while
// it is open (kept false), else through the kept duplicate. It reports
// false when neither is there.
func (c *conn) withFDLocked(fn func(fd int, kept bool)) bool {
	if c.raw.Control(func(fd uintptr) { fn(int(fd), false) }) == nil {
		return true
	}
	if c.keepFD >= 0 {
		fn(c.keepFD, true)
		return true
	}
	return false
}

// sockInfo is what the socket says about delivery.
type sockInfo struct {
	info   *unix.TCPInfo
	outq   int    // SIOCOUTQ: bytes written and not acknowledged (a FIN counts 1)
	hungUp bool   // the kept duplicate reports the connection over
	reason Reason // classify's answer when hungUp
}

// delivered reports whether the client acknowledged every data byte
// written (a FIN may still be unacknowledged).
func (si *sockInfo) delivered() bool {
	if si.outq == 0 {
		return true
	}
	i := si.info
	return si.outq == 1 && i.Notsent_bytes == 0 && i.Bytes_acked >= i.Bytes_sent-i.Bytes_retrans
}

// inspectLocked reads TCP_INFO and SIOCOUTQ. Through the kept duplicate
// (net/http closed its descriptor, so no detection source may watch the
// socket any more) it also polls it and classifies a hang-up.
func (c *conn) inspectLocked() (si sockInfo, ok bool) {
	c.withFDLocked(func(fd int, kept bool) {
		info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			return
		}
		outq, err := unix.IoctlGetInt(fd, unix.SIOCOUTQ)
		if err != nil {
			return
		}
		si.info, si.outq, ok = info, outq, true
		if kept {
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
			if n, err := unix.Poll(fds, 0); err == nil && n == 1 && fds[0].Revents&(unix.POLLERR|unix.POLLHUP) != 0 {
				si.hungUp = true
				si.reason = classify(fd, uint32(fds[0].Revents))
			}
		}
	})
	return si, ok
}

// verdict returns what the drain that covered s concluded, if one did.
func (c *conn) verdict(s *State) (err error, known bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.drained[s]; !ok {
		return nil, false
	}
	return c.drainedVerdict, true
}

// inspect is inspectLocked for callers without c.mu.
func (c *conn) inspect() (sockInfo, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.inspectLocked()
}

// finishedLocked reports whether net/http has written all of the drained
// response: on HTTP/1.x the connection went idle or closed; on HTTP/2 a
// watchdog tick passed since the stream ended.
func (c *conn) finishedLocked() bool {
	if c.drainProto == 2 {
		return c.drainTicks > 0
	}
	return c.idleSeq > c.drainSeq || c.closed
}

// endDrainLocked ends a drain with its verdict; with undelivered, its
// responses are returned to be counted undelivered (countLost, without
// c.mu).
func (c *conn) endDrainLocked(undelivered bool) (lost []*State, forget bool) {
	return c.endDrainVerdictLocked(undelivered, true)
}

// endDrainVerdictLocked is endDrainLocked; known false ends it without a
// verdict (the socket can no longer be asked, or the Monitor closed).
func (c *conn) endDrainVerdictLocked(undelivered, known bool) (lost []*State, forget bool) {
	if !c.draining {
		return nil, false
	}
	if undelivered {
		for s := range c.unconfirmed {
			lost = append(lost, s)
		}
	}
	c.drained, c.drainedVerdict = nil, nil
	if known {
		c.drained = c.unconfirmed
		if undelivered {
			c.drainedVerdict = ErrNotDelivered
			if c.dead != ReasonNone {
				c.drainedVerdict = fmt.Errorf("%w: %s", ErrNotDelivered, c.dead)
			}
		}
	}
	c.draining = false
	c.unconfirmed = nil
	c.unkeepLocked()
	return lost, c.releaseLocked()
}

// countLost counts the responses that had a body as undelivered (once per
// request, whoever else counts it).
func countLost(lost []*State) {
	for _, s := range lost {
		if s.w != nil && s.w.bodyWritten() {
			s.countUndelivered()
		}
	}
}

// check is the watchdog's look at the connection, once per tick.
func (c *conn) check(w *watchdog) {
	var (
		lost   []*State
		forget bool
		hung   Reason
	)
	c.mu.Lock()
	if !c.tunedNow && !c.draining {
		w.remove(c)
		c.mu.Unlock()
		return
	}
	si, ok := c.inspectLocked()
	switch {
	case ok && si.hungUp:
		hung = si.reason
		lost, forget = c.endDrainLocked(!si.delivered())
	default:
		if ok && c.tunedNow {
			c.zeroWindowLocked(si.info, w.tick)
		}
		if c.draining {
			c.drainTicks++
			if !ok {
				// Nothing more to learn here (closed, no duplicate): a
				// death the source reports later is no longer counted.
				lost, forget = c.endDrainVerdictLocked(false, false)
			} else if si.delivered() && c.finishedLocked() {
				lost, forget = c.endDrainLocked(false)
			}
		}
	}
	c.mu.Unlock()
	countLost(lost)
	if forget {
		c.m.forget(c)
	}
	if hung != ReasonNone {
		c.report(event{reason: hung, at: time.Now()})
	}
}

// zeroWindowLocked keeps TCP_USER_TIMEOUT from killing a live client that
// holds a zero receive window. Linux measures a zero-window stall from the
// first window probe and aborts once it lasts longer than the user
// timeout, even when the client answers every probe (tcp_probe_timer: the
// probe timestamp is reset only when the window opens), and simply
// clearing the user timeout meanwhile does not work either: the kernel
// spaces its probes exponentially (up to two minutes), so it would no
// longer learn within the drop timeout that the client vanished, and
// setting the timeout again would abort at once.
//
// So while the client holds the window shut (nothing in flight, data
// waiting, peer window 0) and answered a probe within the last zwAnswered
// ticks, the user timeout is moved to zwExtend ticks past now (measured
// from the last data sent, which precedes the kernel's probe timestamp, so
// the deadline is never earlier than intended). The kernel's probe timer,
// clamped to the deadline it saw, then fires before the moved deadline and
// probes the client; a live client answers and the deadline moves again.
// When the client stops answering, the deadline stays and the kernel
// aborts the connection (ETIMEDOUT): at most zwAnswered+zwExtend ticks
// (11/8 of the user timeout, DropTimeout minus the keepalive interval)
// after its last answer, plus about one retransmission timeout. The
// options come back as soon as the window opens.
func (c *conn) zeroWindowLocked(info *unix.TCPInfo, tick time.Duration) {
	ut := c.m.drop.opts.userTimeout
	want := ut
	if info.Snd_wnd == 0 && info.Notsent_bytes > 0 && info.Unacked == 0 {
		t := int(tick / time.Millisecond)
		if int(info.Last_ack_recv) > zwAnswered*t {
			return // silent: the deadline stays and the kernel aborts
		}
		want = max(ut, int(info.Last_data_sent)+zwExtend*t)
	}
	if want == c.uto {
		return
	}
	c.withFDLocked(func(fd int, _ bool) {
		if unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, want) == nil {
			c.uto = want
		}
	})
}

// abandon ends a drain without a verdict (the Monitor closed).
func (c *conn) abandon() {
	c.mu.Lock()
	_, forget := c.endDrainVerdictLocked(false, false)
	c.mu.Unlock()
	if forget {
		c.m.forget(c)
	}
}
