package httpx

import (
	"sync"
	"time"
)

// watchdog looks after the connections whose drop-detecting options are
// set (requests in flight, delivery waits, responses not yet acknowledged),
// one goroutine per Monitor that runs only while there is at least one.
// Every tick it asks each connection's socket (TCP_INFO, SIOCOUTQ) and:
//
//   - keeps a live client that holds a zero receive window from being
//     killed by TCP_USER_TIMEOUT (see conn.zeroWindow);
//   - ends the drain of a finished response once every byte is
//     acknowledged, or counts it undelivered when the connection died
//     first (see conn.settleLocked).
//
// Lock order: conn.mu before watchdog.mu; the loop holds neither while it
// calls into a connection.
type watchdog struct {
	m    *Monitor
	tick time.Duration

	mu      sync.Mutex
	conns   map[*conn]struct{}
	running bool
	stopped bool // the Monitor closed: no new work
}

// Zero-window timing, in ticks of userTimeout/8 (see conn.zeroWindow):
// while a live client holds a zero window, the user timeout is moved to
// zwExtend ticks past now at every tick on which the client answered a
// window probe within the last zwAnswered ticks.
const (
	zwTicksPerUT = 8
	zwExtend     = 4
	zwAnswered   = 7
	minTick      = 50 * time.Millisecond
)

func newWatchdog(userTimeout time.Duration) *watchdog {
	return &watchdog{tick: max(userTimeout/zwTicksPerUT, minTick), conns: make(map[*conn]struct{})}
}

// add starts looking after c. It reports false when the Monitor is closed.
// Called with c.mu held.
func (w *watchdog) add(c *conn) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.m == nil {
		w.m = c.m // dropSettings are made before their Monitor
	}
	if w.stopped || w.m.bgCtx.Err() != nil {
		return false
	}
	w.conns[c] = struct{}{}
	if !w.running {
		w.running = true
		go w.run()
	}
	return true
}

// remove stops looking after c. Called with c.mu held.
func (w *watchdog) remove(c *conn) {
	w.mu.Lock()
	delete(w.conns, c)
	w.mu.Unlock()
}

// active reports whether add would succeed for a connection of m.
// Called with c.mu held.
func (w *watchdog) active(m *Monitor) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return !w.stopped && m.bgCtx.Err() == nil
}

func (w *watchdog) run() {
	t := time.NewTicker(w.tick)
	defer t.Stop()
	for {
		select {
		case <-w.m.bgCtx.Done():
			w.mu.Lock()
			w.stopped, w.running = true, false
			conns := w.conns
			w.conns = make(map[*conn]struct{})
			w.mu.Unlock()
			for c := range conns {
				c.abandon()
			}
			return
		case <-t.C:
		}
		w.mu.Lock()
		if len(w.conns) == 0 {
			w.running = false
			w.mu.Unlock()
			return
		}
		conns := make([]*conn, 0, len(w.conns))
		for c := range w.conns {
			conns = append(conns, c)
		}
		w.mu.Unlock()
		for _, c := range conns {
			c.check(w)
		}
	}
}
