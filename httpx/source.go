package httpx

import (
	"net"
	"sync"
	"time"

	"github.com/hangup-io/hangup/httpx/internal/detect"
	"golang.org/x/sys/unix"
)

// Source names a detection source: where httpx learns that a client went
// away.
type Source string

// Sources. Options.Source picks one; the zero value picks the best that
// starts.
const (
	// SourceAuto tries SourceAgent if the agent's socket exists, then
	// SourceBPF if linked in, then SourceEpoll.
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
	// needs CAP_BPF and CAP_PERFMON (or root), and the program must import
	// package httpx/bpfsource, which links cilium/ebpf in; without it,
	// SourceBPF fails with ErrBPFNotLinked (and falls back).
	SourceBPF Source = "bpf"
	// SourceEpoll registers connections in a private epoll set for
	// EPOLLRDHUP|EPOLLERR|EPOLLHUP. It needs no privileges and sees FIN,
	// RST and kernel timeouts, but not retransmissions. A connection is
	// registered (one epoll_ctl, no extra descriptor) only once a request
	// needs it: one with a body, HTTP/2, Options.IgnoreHalfClose, a
	// delivery wait, or a request that outlives the watchdog's tick. For
	// the rest, net/http's own background read sees the client leave and
	// httpx asks the socket why.
	SourceEpoll Source = "epoll"
	// SourceNone detects nothing from the kernel: only write errors and
	// net/http's own cancellation mark requests aborted.
	SourceNone Source = "none"
)

// sources lists the sources the core knows, best first, for the metric.
var sources = []Source{SourceAgent, SourceBPF, SourceEpoll, SourceNone}

// event is what a source reports about one connection.
type event struct {
	reason Reason    // ReasonPeerFIN for a half-close; otherwise the connection is dead
	at     time.Time // when the kernel saw it (zero: unknown)
}

// kindReason maps a detect.Kind to the abort reason.
func kindReason(k detect.Kind) Reason {
	switch k {
	case detect.PeerFIN:
		return ReasonPeerFIN
	case detect.PeerReset:
		return ReasonPeerReset
	case detect.Timeout:
		return ReasonTimeout
	case detect.KeepaliveTimeout:
		return ReasonKeepaliveTimeout
	}
	return ReasonError
}

// source is a detection source. A new one needs only to implement it and
// be added to Monitor.start.
//
// watch and unwatch are called for every tracked connection, from the
// goroutines of net/http's hooks; watch sets conn.cookie if the source
// reports by cookie. name may change while the source runs (the agent
// source). close stops the source; no event is delivered after it returns.
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

// cookieSource adapts a detect.Source that reports by socket cookie (the
// in-process probe): each connection's cookie is read once, and the source
// is asked once for each local port and network namespace.
type cookieSource struct {
	n   Source
	src detect.Source

	mu    sync.Mutex
	ports map[nsPort]bool
}

type nsPort struct {
	netns uint64
	port  uint16
}

func newCookieSource(n Source, src detect.Source) *cookieSource {
	return &cookieSource{n: n, src: src, ports: make(map[nsPort]bool)}
}

func (s *cookieSource) name() Source { return s.n }

func (s *cookieSource) watch(c *conn) error {
	var (
		key nsPort
		err error
	)
	if cerr := c.raw.Control(func(fd uintptr) {
		if c.cookie, err = socketCookie(int(fd)); err == nil {
			key.netns, err = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		}
	}); cerr != nil {
		return cerr
	}
	if err != nil {
		c.cookie = 0
		return err
	}
	if b, ok := s.src.(detect.Busier); ok {
		c.busy = b.BusyWord(c.cookie)
	}
	if a, ok := c.nc.LocalAddr().(*net.TCPAddr); ok {
		key.port = uint16(a.Port)
	}
	s.mu.Lock()
	known := s.ports[key]
	s.ports[key] = true
	s.mu.Unlock()
	if known {
		return nil
	}
	if err := s.src.WatchPort(key.netns, key.port); err != nil {
		return err
	}
	// The first connection on the port may have been gone before the
	// source watched it.
	if r := c.askSocket(); r != ReasonNone {
		c.report(r, time.Now())
	}
	return nil
}

func (s *cookieSource) unwatch(*conn) {}

// longLived makes sure the source tracks c, whose request outlived the
// drop-tuning threshold: a silent drop is what a lost open would hide.
func (s *cookieSource) longLived(c *conn) {
	t, ok := s.src.(detect.Tracker)
	if !ok || c.cookie == 0 {
		return
	}
	a, ok := c.nc.LocalAddr().(*net.TCPAddr)
	if !ok {
		return
	}
	if err := t.Track(c.cookie, uint16(a.Port)); err != nil {
		c.m.log.Debug("tracking a long-lived connection", "err", err)
	}
}

// longLivedWatcher is a source that wants to hear of each connection whose
// request outlived the drop-tuning threshold, once.
type longLivedWatcher interface {
	longLived(c *conn)
}

func (s *cookieSource) close() error { return s.src.Close() }
