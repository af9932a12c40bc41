package agent

import (
	"sync"

	"github.com/hangup-io/hangup/bpf"
)

// connKey says which listeners a connection can belong to: the network
// namespace and the local port.
type connKey struct {
	netns uint64
	port  uint16
}

// table is the agent's connection table: every server connection the probe
// tracks, by socket cookie. Entries come from opened events and sock_diag
// seeding and leave with closed events.
type table struct {
	mu    sync.Mutex
	conns map[uint64]connKey
}

func newTable() *table {
	return &table{conns: make(map[uint64]connKey)}
}

// observe updates the table for e and reports whether the connection was
// known before it.
func (t *table) observe(e *bpf.Event) bool {
	k := connKey{netns: e.NetNS, port: e.Local.Port()}
	t.mu.Lock()
	_, known := t.conns[e.Cookie]
	switch {
	case e.Kind == bpf.KindClosed:
		delete(t.conns, e.Cookie)
	case !known:
		// Opened, or the first event of a connection tracked before
		// the agent's table knew it.
		t.conns[e.Cookie] = k
	}
	t.mu.Unlock()
	return known
}

// add records a seeded connection; it reports false if it was known.
func (t *table) add(cookie uint64, k connKey) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.conns[cookie]; ok {
		return false
	}
	t.conns[cookie] = k
	return true
}

func (t *table) remove(cookie uint64) {
	t.mu.Lock()
	delete(t.conns, cookie)
	t.mu.Unlock()
}

func (t *table) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.conns)
}

// keepOnly removes the entries whose cookie alive rejects and returns how
// many it removed: connections whose closed event was lost when the ring
// buffer was full.
func (t *table) keepOnly(alive func(cookie uint64) bool) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for c := range t.conns {
		if !alive(c) {
			delete(t.conns, c)
			n++
		}
	}
	return n
}
