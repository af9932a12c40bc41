package agent

import (
	"slices"
	"sync"
	"time"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/wire"
)

// listener is a listening socket a subscriber registered.
type listener struct {
	id   uint32
	sub  *subscriber
	info listenerInfo
}

// routes maps (netns, port) to the registered listeners that can have
// accepted a connection there. Several listeners can share a key: an IPv4
// and an IPv6 socket, specific addresses, or SO_REUSEPORT groups (which the
// kernel only allows within one user, so delivering to each of them reveals
// nothing across users).
type routes struct {
	// watchers are the sessions that sent Watch: they get the events they
	// may see besides those of their own listeners.
	watchers []*subscriber

	mu     sync.RWMutex
	byKey  map[connKey][]*listener
	nextID uint32
	closed recentlyClosed // listener closes, for registrations under way
	// watch, if set, is told when a (netns, port) gets its first listener
	// (on) and loses its last: the probe then wakes the agent at once for
	// those connections' client-gone events only.
	watch func(k connKey, on bool)
}

func newRoutes() *routes {
	return &routes{byKey: make(map[connKey][]*listener), closed: newRecentlyClosed(recentCloses)}
}

// recentCloses is how many listener closes the agent remembers, for the
// registrations that were under way when they happened.
const recentCloses = 4096

// recentlyClosed remembers the last listener closes: cookie and kernel time
// (CLOCK_MONOTONIC), the oldest forgotten first.
type recentlyClosed struct {
	at    map[uint64]time.Duration
	order []uint64 // a ring, next is the slot to overwrite
	next  int
}

func newRecentlyClosed(n int) recentlyClosed {
	return recentlyClosed{at: make(map[uint64]time.Duration, n), order: make([]uint64, 0, n)}
}

func (c *recentlyClosed) add(cookie uint64, at time.Duration) {
	if _, ok := c.at[cookie]; !ok {
		if len(c.order) < cap(c.order) {
			c.order = append(c.order, cookie)
		} else {
			delete(c.at, c.order[c.next])
			c.order[c.next] = cookie
			c.next = (c.next + 1) % len(c.order)
		}
	}
	c.at[cookie] = at
}

// since reports whether the listener closed at or after t.
func (c *recentlyClosed) since(cookie uint64, t time.Duration) bool {
	at, ok := c.at[cookie]
	return ok && at >= t
}

// addLive routes a registered listener's events to sub, unless the
// listener closed since start (CLOCK_MONOTONIC, taken before the agent
// first looked at the socket) or listening no longer holds: then it adds
// nothing and returns nil. Both checks run under the lock that the close
// event's removal takes, so whatever the timing, a close either finds the
// route or is found by the checks: a route never outlives its listener.
func (r *routes) addLive(sub *subscriber, info listenerInfo, start time.Duration, listening func() bool) *listener {
	r.mu.Lock()
	defer r.mu.Unlock()
	l := r.addLocked(sub, info)
	if r.closed.since(info.cookie, start) || !listening() {
		r.removeLocked(l)
		return nil
	}
	// In the session's list before a close can look for it there.
	sub.mu.Lock()
	sub.listeners = append(sub.listeners, l)
	sub.mu.Unlock()
	return l
}

func (r *routes) add(sub *subscriber, info listenerInfo) *listener {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.addLocked(sub, info)
}

func (r *routes) addLocked(sub *subscriber, info listenerInfo) *listener {
	r.nextID++
	if r.nextID == 0 {
		r.nextID++
	}
	l := &listener{id: r.nextID, sub: sub, info: info}
	k := connKey{netns: info.netns, port: info.addr.Port()}
	if len(r.byKey[k]) == 0 && r.watch != nil {
		r.watch(k, true)
	}
	r.byKey[k] = append(r.byKey[k], l)
	return l
}

// addWatcher makes sub a watcher; all says it sees every connection.
func (r *routes) addWatcher(sub *subscriber, all bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	sub.watchAll = all
	if !sub.watching {
		sub.watching = true
		r.watchers = append(r.watchers, sub)
	}
}

// removeAll drops every listener of sub, and sub as a watcher.
func (r *routes) removeAll(sub *subscriber) {
	sub.mu.Lock()
	ls := slices.Clone(sub.listeners)
	sub.mu.Unlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, l := range ls {
		r.removeLocked(l)
	}
	if sub.watching {
		sub.watching = false
		r.watchers = slices.DeleteFunc(r.watchers, func(w *subscriber) bool { return w == sub })
	}
}

// removeClosed drops the listeners whose socket closed at time at (the
// probe's KindListenerClosed): their port may next belong to someone else.
// It returns them, and remembers the close for registrations under way.
func (r *routes) removeClosed(cookie uint64, at time.Duration) []*listener {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed.add(cookie, at)
	var gone []*listener
	for _, ls := range r.byKey {
		for _, l := range ls {
			if l.info.cookie == cookie {
				gone = append(gone, l)
			}
		}
	}
	for _, l := range gone {
		r.removeLocked(l)
	}
	return gone
}

func (r *routes) removeLocked(l *listener) {
	k := connKey{netns: l.info.netns, port: l.info.addr.Port()}
	ls := r.byKey[k]
	out := ls[:0]
	for _, x := range ls {
		if x != l {
			out = append(out, x)
		}
	}
	clear(ls[len(out):])
	if len(out) == 0 {
		delete(r.byKey, k)
		if r.watch != nil {
			r.watch(k, false)
		}
	} else {
		r.byKey[k] = out
	}
}

// deliver queues e for every subscriber whose listener accepted the
// connection, and for every watcher that may see it, and appends to dirty
// the subscribers that want a flush (see subscriber.enqueue) and are not in
// it yet; now reports whether one of them wants it before the pipeline
// reads on. It never blocks: a full queue counts a drop. Only the pipeline
// goroutine calls it.
func (r *routes) deliver(e *bpf.Event, dirty []*subscriber) (_ []*subscriber, now bool) {
	k := connKey{netns: e.NetNS, port: e.Local.Port()}
	r.mu.RLock()
	defer r.mu.RUnlock()
	ls := r.byKey[k]
	if len(ls) == 0 && len(r.watchers) == 0 {
		return dirty, false
	}
	var we wire.Event
	toWire(e, &we)
	u := urgent(e)
	queue := func(s *subscriber, listener uint32) {
		if k := s.kinds.Load(); k != 0 && k&(1<<e.Kind) == 0 {
			return // the subscriber does not want this kind
		}
		we.Listener = listener
		want := s.enqueue(&we, u)
		now = now || want == flushNow
		if want != flushLater && !s.dirty {
			s.dirty = true
			dirty = append(dirty, s)
		}
	}
	for _, l := range ls {
		if l.info.matches(e.Local.Addr()) && !l.sub.watching {
			queue(l.sub, l.id)
		}
	}
	// A watcher gets each event once, with the first listener it may see
	// (its own included: sees, without a syscall per event), or 0 when it
	// sees all and no listener matches.
	for _, w := range r.watchers {
		var id uint32
		for _, l := range ls {
			if l.info.matches(e.Local.Addr()) && (w.watchAll || l.sub.cred.Uid == w.cred.Uid) {
				id = l.id
				break
			}
		}
		if id != 0 || w.watchAll {
			queue(w, id)
		}
	}
	return dirty, now
}

func toWire(e *bpf.Event, w *wire.Event) {
	*w = wire.Event{
		Cookie:      e.Cookie,
		NetNS:       e.NetNS,
		Kind:        uint8(e.Kind),
		Cause:       uint8(e.Cause),
		State:       uint8(e.State),
		OldState:    uint8(e.OldState),
		Errno:       int32(e.Err),
		Retransmits: e.Retransmits,
		MonoNs:      uint64(e.Mono),
		Local:       e.Local,
		Remote:      e.Remote,
	}
	if !e.Time.IsZero() {
		w.TimeNs = e.Time.UnixNano()
	}
}
