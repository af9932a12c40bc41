package agent

import (
	"slices"
	"sync"

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
	mu     sync.RWMutex
	byKey  map[connKey][]*listener
	nextID uint32
}

func newRoutes() *routes {
	return &routes{byKey: make(map[connKey][]*listener)}
}

func (r *routes) add(sub *subscriber, info listenerInfo) *listener {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.nextID++
	if r.nextID == 0 {
		r.nextID++
	}
	l := &listener{id: r.nextID, sub: sub, info: info}
	k := connKey{netns: info.netns, port: info.addr.Port()}
	r.byKey[k] = append(r.byKey[k], l)
	return l
}

// removeAll drops every listener of sub.
func (r *routes) removeAll(sub *subscriber) {
	sub.mu.Lock()
	ls := slices.Clone(sub.listeners)
	sub.mu.Unlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, l := range ls {
		r.removeLocked(l)
	}
}

// removeClosed drops the listeners whose socket closed (the probe's
// KindListenerClosed): their port may next belong to someone else. It
// returns them.
func (r *routes) removeClosed(cookie uint64) []*listener {
	r.mu.Lock()
	defer r.mu.Unlock()
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
	} else {
		r.byKey[k] = out
	}
}

// deliver queues e for every subscriber whose listener accepted the
// connection. It never blocks: a full queue counts a drop.
func (r *routes) deliver(e *bpf.Event) {
	k := connKey{netns: e.NetNS, port: e.Local.Port()}
	r.mu.RLock()
	ls := r.byKey[k]
	if len(ls) == 0 {
		r.mu.RUnlock()
		return
	}
	var we wire.Event
	toWire(e, &we)
	for _, l := range ls {
		if l.info.matches(e.Local.Addr()) {
			we.Listener = l.id
			l.sub.enqueue(&we)
		}
	}
	r.mu.RUnlock()
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
