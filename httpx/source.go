package httpx

import "time"

// Source names a detection source: where httpx learns that a client went
// away.
type Source string

// Sources. Options.Source picks one; the zero value picks the best that
// starts.
const (
	// SourceAuto tries SourceAgent if the agent's socket exists, then
	// SourceBPF, then SourceEpoll.
	SourceAuto Source = ""
	// SourceAgent receives the events of the server's connections from
	// the host agent (hangupd) over its unix socket (Options.AgentSocket).
	// It needs no privileges, only access to the socket, and sees what
	// SourceBPF sees, for connections accepted on listeners passed through
	// Monitor.Listener. While the agent is away (restarting, or not yet
	// started) it watches every connection with SourceEpoll, reconnects
	// with capped exponential backoff, and switches back when the agent
	// returns; Monitor.Source reports the source in effect.
	SourceAgent Source = "agent"
	// SourceBPF loads the kernel probe (package bpf) into this process. It
	// needs CAP_BPF and CAP_PERFMON (or root) and sees every abort, including
	// the ones that happen between accept and the first request.
	SourceBPF Source = "bpf"
	// SourceEpoll registers every connection in a private epoll set for
	// EPOLLRDHUP|EPOLLERR|EPOLLHUP. It needs no privileges and sees FIN,
	// RST and kernel timeouts, but not retransmissions. It holds a
	// duplicate of each connection's descriptor (one more open file per
	// connection) until net/http reports the connection closed.
	SourceEpoll Source = "epoll"
	// SourceNone detects nothing from the kernel: only write errors and
	// net/http's own cancellation mark requests aborted.
	SourceNone Source = "none"
)

// sources lists the sources the core knows, best first, for the metric.
var sources = []Source{SourceAgent, SourceBPF, SourceEpoll, SourceNone}

// event is what a source reports about one connection, keyed by socket
// cookie (getsockopt SO_COOKIE), the key every source can produce: the
// in-process probe and the host agent see only cookies, the epoll source
// knows the connection it registered.
type event struct {
	reason Reason    // ReasonPeerFIN for a half-close; otherwise the connection is dead
	at     time.Time // when the kernel saw it (zero: now)
}

// sink receives a source's events. The Monitor implements it: it looks the
// cookie up among the tracked connections and remembers events of cookies it
// does not know yet for a while, so an event that lands between accept and
// registration is not lost.
type sink interface {
	deliver(cookie uint64, ev event)
}

// source is a detection source. A new one needs only to implement it and
// be added to Monitor.start.
//
// watch and unwatch are called for every tracked connection, from the
// goroutines of net/http's hooks; a source that observes the whole host
// (bpf) can ignore them, the agent source uses them to hand connections to
// epoll while the agent is away. name may change while the source runs
// (the agent source). close stops the source; no event is delivered after
// it returns.
type source interface {
	name() Source
	watch(c *conn) error
	unwatch(c *conn)
	close() error
}

// noSource is SourceNone.
type noSource struct{}

func (noSource) name() Source      { return SourceNone }
func (noSource) watch(*conn) error { return nil }
func (noSource) unwatch(*conn)     {}
func (noSource) close() error      { return nil }
