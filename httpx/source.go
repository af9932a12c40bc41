package httpx

import "time"

// Source names a detection source: where httpx learns that a client went
// away.
type Source string

// Sources. Options.Source picks one; the zero value picks the best that
// starts.
const (
	// SourceAuto tries SourceBPF, then SourceEpoll.
	SourceAuto Source = ""
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
var sources = []Source{SourceBPF, SourceEpoll, SourceNone}

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

// source is a detection source. A new one (the host agent, which streams
// events keyed by socket cookie for registered listeners) needs only to
// implement it and be added to startSource.
//
// watch and unwatch are called for every tracked connection, from the
// goroutines of net/http's hooks; sources that observe the whole host
// (bpf, agent) can ignore them. close stops the source; no event is
// delivered after it returns.
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
