package httpx

import (
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Silent drops. A client whose network vanished sends nothing: no FIN, no
// RST. The kernel notices only when it gives up retransmitting (about 15
// minutes by default) or through keepalive (Go: after 15 s idle, 9 probes
// 15 s apart). While a request runs longer than a tick, the watchdog gives
// its connection options derived from Options.DropTimeout D, which make the
// kernel fail the connection within D of the client's last sign of life:
//
//   - TCP_USER_TIMEOUT u: unacknowledged data (or unanswered zero-window
//     probes) fail the connection u after it was sent;
//   - keepalive idle and interval (whole seconds): an idle connection is
//     probed idle after the client's last segment and fails at the next
//     keepalive timer that finds nothing received for u with a probe out.
//
// idle + interval is chosen to leave a margin below D (timer slack: the
// kernel's timer wheel rounds 2-16 s timers up by up to 256 ms at HZ=250).
// For D under 3 s whole seconds do not fit; there the watchdog "kicks" the
// keepalive timer (setting TCP_KEEPIDLE re-arms it) once a probe has gone
// unanswered for u, and the kernel fails the connection then.
//
// Requests that end within a tick (most) never pay for any of this. The
// connection gets its own options back once every response byte is
// acknowledged; a connection that dies first counts its response
// undelivered.
type dropSettings struct {
	enabled     bool
	timeout     time.Duration // D
	idle, intvl int           // keepalive, seconds
	userTimeout int           // ms
	kick        bool
	tick        time.Duration
}

func newDropSettings(d time.Duration) dropSettings {
	if d < 0 {
		return dropSettings{}
	}
	if d == 0 {
		d = defaultDropTimeout
	}
	d = max(d, 2*time.Second)
	margin := max(d/10, 250*time.Millisecond)
	budget := d - margin
	intvl := max(int(budget/4/time.Second), 1)
	idle := max(int(budget/time.Second)-intvl, 1)
	user := time.Duration(idle+intvl) * time.Second
	kick := false
	tick := max(user/zwTicksPerUT, minTick)
	if user > budget {
		kick = true
		tick = max(budget/zwTicksPerUT, minTick)
		user = budget - tick
	}
	return dropSettings{
		enabled: true, timeout: d, idle: idle, intvl: intvl,
		userTimeout: int(user / time.Millisecond), kick: kick, tick: tick,
	}
}

// sockopts are the socket options that detect a silent drop.
type sockopts struct {
	keepalive, idle, intvl, cnt, userTimeout int
}

// tuning is a connection's drop-detecting state, under conn.mu.
type tuning struct {
	saved     sockopts
	haveSaved bool
	uto       int  // TCP_USER_TIMEOUT in effect while tuned (ms)
	holds     int  // delivery waits
	drainKeep bool // a kept descriptor lets the drain outlive net/http's close
}

// Zero-window timing, in ticks of userTimeout/8 (see zeroWindowLocked):
// while a live client holds a zero window, the user timeout is moved to
// zwExtend ticks past now at every tick on which the client answered a
// window probe within the last zwAnswered ticks.
const (
	zwTicksPerUT = 8
	zwExtend     = 4
	zwAnswered   = 7
	minTick      = 50 * time.Millisecond
	// closeCheck is how soon after a Connection: close response the
	// watchdog asks whether it was delivered: before net/http closes the
	// socket (500 ms after its FIN).
	closeCheck = 150 * time.Millisecond
)

// watchdog is one goroutine per Monitor, running while there are
// connections, that ticks every userTimeout/8 and looks at each connection
// with two atomic loads; only those that need it are touched:
//
//   - a request seen in flight at two ticks running: tune its connection;
//   - a tuned connection: keep a live zero-window client alive, kick the
//     keepalive timer (D < 3s), notice a death no source reported, and
//     restore its options once idle and delivered;
//   - responses not yet confirmed delivered: one SIOCOUTQ, and a drain if
//     bytes are outstanding.
type watchdog struct {
	m   *Monitor
	set dropSettings

	running atomic.Bool
	mu      sync.Mutex
	stopped bool
	kept    map[*conn]struct{} // closed by net/http, still drained through a kept descriptor
	closing []*conn            // Connection: close responses to check soon
	timer   *time.Timer        // closeCheck for closing
	ticks   uint64
}

func newWatchdog(m *Monitor, set dropSettings) *watchdog {
	return &watchdog{m: m, set: set, kept: make(map[*conn]struct{})}
}

// wake starts the loop if it is not running.
func (w *watchdog) wake() {
	if !w.set.enabled || w.running.Load() {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.stopped || w.running.Load() {
		return
	}
	w.running.Store(true)
	go w.run()
}

func (w *watchdog) stop() {
	w.mu.Lock()
	w.stopped = true
	kept := w.kept
	w.kept = make(map[*conn]struct{})
	if w.timer != nil {
		w.timer.Stop()
	}
	w.closing = nil
	w.mu.Unlock()
	for c := range kept {
		c.mu.Lock()
		c.endDrainLocked()
		c.mu.Unlock()
	}
}

func (w *watchdog) run() {
	t := time.NewTicker(w.set.tick)
	defer t.Stop()
	for {
		select {
		case <-w.m.bgCtx.Done():
			w.running.Store(false)
			return
		case <-t.C:
		}
		conns := w.m.conns()
		w.mu.Lock()
		w.ticks++
		for c := range w.kept {
			conns = append(conns, c)
		}
		w.mu.Unlock()
		if len(conns) == 0 {
			w.running.Store(false)
			if len(w.m.conns()) > 0 {
				w.wake()
			}
			return
		}
		for _, c := range conns {
			w.check(c)
		}
	}
}

// check is the watchdog's look at one connection, once per tick.
func (w *watchdog) check(c *conn) {
	a, q := c.active.Load(), c.seq.Load()
	longBusy := a > 0 && c.seenBusy && c.lastSeq == q
	c.seenBusy, c.lastSeq = a > 0, q
	p := c.pending.Load()
	if !c.tuned.Load() && !longBusy && p == nil {
		return
	}
	if c.dead() != ReasonNone {
		w.settle(c)
		return
	}
	var hung Reason
	c.mu.Lock()
	switch {
	case !c.tuned.Load() && (longBusy || c.tune.holds > 0):
		c.tuneLocked()
	case !c.tuned.Load():
		// Finished responses: delivered by now, or a drain.
		si, ok := c.inspectLocked()
		switch {
		case !ok || si.delivered():
			c.pending.CompareAndSwap(p, nil)
		default:
			c.startDrainLocked()
		}
	default:
		si, ok := c.inspectLocked()
		if !ok {
			// Nothing more to learn (closed, no descriptor kept).
			c.pending.CompareAndSwap(p, nil)
			c.endDrainLocked()
			break
		}
		if c.controlLocked(func(fd int) {
			if revents, ok := pollHangup(fd); ok && revents&hungUp != 0 {
				hung = classify(fd, uint32(revents))
			}
		}); hung != ReasonNone {
			break
		}
		if a > 0 || c.tune.holds > 0 {
			c.zeroWindowLocked(si.info, w.set.tick)
			w.kickLocked(c, &si)
			break
		}
		if si.delivered() {
			c.pending.CompareAndSwap(p, nil)
			c.endDrainLocked()
		}
	}
	c.mu.Unlock()
	if hung != ReasonNone {
		c.report(hung, time.Now()) // a death the source did not report
	}
	w.forgetIfDone(c)
}

// kickLocked makes the kernel fail an idle connection whose keepalive probe
// has gone unanswered for the user timeout, where whole-second keepalive
// timers would be too late (D < 3s): re-arming the keepalive timer runs it
// at once, and it finds the probe out and nothing received for u.
func (w *watchdog) kickLocked(c *conn, si *sockInfo) {
	if !w.set.kick || si.outq != 0 || si.info.Probes == 0 {
		return
	}
	if quiet := min(si.info.Last_data_recv, si.info.Last_ack_recv); int(quiet) >= c.tune.uto {
		c.controlLocked(func(fd int) { _ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, w.set.idle) })
	}
}

// closingSoon asks for a delivery check of a response after which net/http
// closes the connection, before it does.
func (w *watchdog) closingSoon(c *conn) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.stopped {
		return
	}
	w.closing = append(w.closing, c)
	if len(w.closing) == 1 {
		if w.timer == nil {
			w.timer = time.AfterFunc(closeCheck, w.checkClosing)
		} else {
			w.timer.Reset(closeCheck)
		}
	}
}

func (w *watchdog) checkClosing() {
	w.mu.Lock()
	list := w.closing
	w.closing = nil
	w.mu.Unlock()
	for _, c := range list {
		p := c.pending.Load()
		if p == nil || c.dead() != ReasonNone {
			continue
		}
		c.mu.Lock()
		if si, ok := c.inspectLocked(); !ok || si.delivered() {
			c.pending.CompareAndSwap(p, nil)
		} else if !c.tune.drainKeep {
			c.startDrainLocked()
		}
		c.mu.Unlock()
	}
	w.wake()
}

// closed notes that net/http closed the connection: a drain or a delivery
// wait that keeps a descriptor goes on through it, and the socket gets the
// FIN net/http's close would have sent.
func (w *watchdog) closed(c *conn) {
	c.mu.Lock()
	keep := c.keepFD >= 0
	if keep && c.raw.Control(func(uintptr) {}) != nil {
		_ = unix.Shutdown(c.keepFD, unix.SHUT_WR)
	}
	c.mu.Unlock()
	if !keep {
		return
	}
	w.mu.Lock()
	if !w.stopped {
		w.kept[c] = struct{}{}
	}
	w.mu.Unlock()
}

func (w *watchdog) forgetIfDone(c *conn) {
	c.mu.Lock()
	done := c.keepFD < 0
	c.mu.Unlock()
	if done {
		w.mu.Lock()
		delete(w.kept, c)
		w.mu.Unlock()
	}
}

// settle runs when the connection died: responses whose delivery was not
// confirmed are counted undelivered if the socket shows bytes outstanding
// (the request in flight, if any, counts its own), and a drain ends.
func (w *watchdog) settle(c *conn) {
	c.mu.Lock()
	p := c.pending.Swap(nil)
	var lost bool
	if p != nil {
		si, ok := c.inspectLocked()
		lost = ok && !si.delivered()
	}
	c.tuned.Store(false) // a dead socket has no options to restore
	c.endDrainLocked()
	c.mu.Unlock()
	if lost {
		p.countUndelivered()
	}
	w.forgetIfDone(c)
}

// startDrainLocked tunes a connection whose responses are not delivered
// yet, and keeps its socket so that the drain can outlive net/http's close.
func (c *conn) startDrainLocked() {
	if !c.tune.drainKeep {
		c.tune.drainKeep = true
		c.keepLocked()
	}
	c.tuneLocked()
}

// endDrainLocked ends a drain: the options come back (if the socket is
// still there) and the kept descriptor goes.
func (c *conn) endDrainLocked() {
	if c.tuned.Load() && c.tune.holds == 0 && c.active.Load() == 0 {
		c.restoreLocked()
	}
	if c.tune.drainKeep {
		c.tune.drainKeep = false
		c.unkeepLocked()
	}
}

// inspectLocked is inspect on the connection's socket.
func (c *conn) inspectLocked() (si sockInfo, ok bool) {
	c.controlLocked(func(fd int) { si, ok = inspect(fd) })
	return si, ok
}

// tuneLocked saves the current options (once) and sets the drop-detecting
// ones. Only options that differ are written: with Go's defaults (keepalive
// on) that is the user timeout, idle and interval; the probe count is left
// alone, the user timeout replaces it.
func (c *conn) tuneLocked() {
	set := &c.m.drop.set
	if c.tuned.Load() || !set.enabled {
		return
	}
	first := !c.tune.haveSaved
	c.controlLocked(func(fd int) {
		if !c.tune.haveSaved {
			s := &c.tune.saved
			var err error
			if s.keepalive, err = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_KEEPALIVE); err != nil {
				return
			}
			s.idle, _ = unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE)
			s.intvl, _ = unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_KEEPINTVL)
			s.cnt, _ = unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_KEEPCNT)
			s.userTimeout, _ = unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT)
			c.tune.haveSaved = true
		}
		setSockopts(fd, c.tune.saved, c.tunedOpts())
		c.tune.uto = set.userTimeout
		c.tuned.Store(true)
	})
	if lw, ok := c.m.src.(longLivedWatcher); ok && first && c.tune.haveSaved {
		lw.longLived(c) // once per connection: the first tuning
	}
}

// tunedOpts is the drop-detecting set for this connection.
func (c *conn) tunedOpts() sockopts {
	set := &c.m.drop.set
	return sockopts{keepalive: 1, idle: set.idle, intvl: set.intvl, cnt: c.tune.saved.cnt, userTimeout: set.userTimeout}
}

// restoreLocked puts the saved options back (on a hijacked connection too).
func (c *conn) restoreLocked() {
	cur := c.tunedOpts()
	cur.userTimeout = c.tune.uto
	c.controlLocked(func(fd int) { setSockopts(fd, cur, c.tune.saved) })
	c.tuned.Store(false)
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
// (11/8 of the user timeout) after its last answer, plus about one
// retransmission timeout. The options come back as soon as the window
// opens.
func (c *conn) zeroWindowLocked(info *unix.TCPInfo, tick time.Duration) {
	ut := c.m.drop.set.userTimeout
	want := ut
	if info.Snd_wnd == 0 && info.Notsent_bytes > 0 && info.Unacked == 0 {
		t := int(tick / time.Millisecond)
		if int(info.Last_ack_recv) > zwAnswered*t {
			return // silent: the deadline stays and the kernel aborts
		}
		want = max(ut, int(info.Last_data_sent)+zwExtend*t)
	}
	if want == c.tune.uto {
		return
	}
	c.controlLocked(func(fd int) {
		if unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, want) == nil {
			c.tune.uto = want
		}
	})
}
