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
	busy      int // requests in flight plus delivery waits
	saved     sockopts
	haveSaved bool
	fin       bool          // the client half-closed
	dead      Reason        // why the connection died (ReasonNone: alive)
	deadCh    chan struct{} // closed when dead is set
	closed    bool          // net/http closed or hijacked it
	lingering bool          // closed, but still routed events while busy
	closedCh  chan struct{}
	idleSeq   uint64        // HTTP/1.x responses completed (transitions to StateIdle)
	idleCh    chan struct{} // closed and replaced at every transition to StateIdle
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
	}, nil
}

// report applies a source's event: a half-close or the connection's death
// marks every request in flight on it.
func (c *conn) report(ev event) {
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
	}
	reqs := make([]*State, 0, len(c.reqs))
	for s := range c.reqs {
		reqs = append(reqs, s)
	}
	c.mu.Unlock()
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
// connection.
func (c *conn) detach(s *State) {
	c.mu.Lock()
	_, ok := c.reqs[s]
	delete(c.reqs, s)
	c.mu.Unlock()
	if ok {
		c.release()
	}
}

// hold and release count the reasons to keep the drop-detecting socket
// options: requests in flight and delivery waits. The options are set on
// the first hold and restored on the last release.
func (c *conn) hold() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.busy++
	if c.busy == 1 && c.m.drop.enabled && !c.closed {
		c.tune()
	}
}

func (c *conn) release() {
	c.mu.Lock()
	c.busy--
	idle := c.busy == 0
	if idle && c.m.drop.enabled && !c.closed && c.haveSaved {
		c.restore()
	}
	forget := idle && c.lingering
	c.lingering = c.lingering && !forget
	c.mu.Unlock()
	if forget {
		c.m.forget(c)
	}
}

// sockopts are the socket options that detect a silent drop.
type sockopts struct {
	keepalive, idle, intvl, cnt, userTimeout int
}

// dropSettings derives the options from the drop timeout d. With
// TCP_USER_TIMEOUT set, the kernel fails the connection when data stays
// unacknowledged for that long, and its keepalive timer fails it at the
// first probe that finds nothing received for that long (cnt no longer
// matters). Keepalive works in whole seconds.
type dropSettings struct {
	enabled bool
	opts    sockopts
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
	return dropSettings{enabled: true, opts: sockopts{
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
	})
}

// tuned is the drop-detecting set for this connection.
func (c *conn) tuned() sockopts {
	o := c.m.drop.opts
	o.cnt = c.saved.cnt
	return o
}

// restore puts the saved options back. Called with c.mu held.
func (c *conn) restore() {
	_ = c.raw.Control(func(fd uintptr) { setSockopts(int(fd), c.tuned(), c.saved) })
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

// markClosed notes that net/http closed or hijacked the connection.
func (c *conn) markClosed() {
	c.mu.Lock()
	if !c.closed {
		c.closed = true
		close(c.closedCh)
	}
	c.mu.Unlock()
}

// sendQueue returns the bytes the client acknowledged so far and the bytes
// written but not yet acknowledged (SIOCOUTQ).
func (c *conn) sendQueue() (acked uint64, outq int, err error) {
	var serr error
	err = c.raw.Control(func(fd uintptr) {
		var info *unix.TCPInfo
		info, serr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
		if serr != nil {
			return
		}
		acked = info.Bytes_acked
		outq, serr = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ)
	})
	return acked, outq, errors.Join(err, serr)
}
