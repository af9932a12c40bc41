package httpx

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/hangup-io/hangup/httpx/internal/detect"
	"github.com/hangup-io/hangup/internal/wire"
	"golang.org/x/sys/unix"
)

// agentSource receives the events of the server's connections from the
// host agent (hangupd), which holds the kernel probe: the server needs no
// privileges. The agent streams the events of connections accepted on the
// listening sockets passed to it (Monitor.Listener), keyed by socket
// cookie, and the source hands them to the sink with the probe's reason
// mapping (probeReason).
//
// A connection is covered by the agent when a listener registered in the
// current session matches it (same network namespace, port and address:
// the agent's own routing rule). Every other connection, and every
// connection while the agent is away, is watched by an epoll source the
// agent source keeps for that purpose (fb). One goroutine (run) owns the
// session: it connects, registers the listeners, moves connections between
// the agent and epoll, and reconnects with capped exponential backoff and
// jitter when the session ends.
type agentSource struct {
	path string
	m    *Monitor
	log  *slog.Logger
	fb   *epollSource

	ctx     context.Context
	cancel  context.CancelFunc
	done    chan struct{} // closed when run returns
	kick    chan struct{} // a listener waits for registration
	dropped chan struct{} // the agent dropped events for this session

	mu        sync.Mutex
	client    *wire.Client            // the current session; nil while the agent is away
	regs      []agentReg              // listeners registered in the current session
	listeners map[*agentListener]bool // live listeners: handled (registered or refused) in the current session
	conns     map[*conn]struct{}      // every tracked connection (its state in conn.agent)
	warned    bool                    // logged that connections arrive on no Listener
}

// agentReg is a listener the agent accepted in the current session.
type agentReg struct {
	netns  uint64
	addr   netip.AddrPort // unmapped, as the agent reports it
	v6only bool
}

// agentConn is what the agent source knows of a tracked connection.
type agentConn struct {
	netns uint64
	local netip.AddrPort // unmapped; invalid if unknown
	epoll bool           // watched by the epoll fallback
}

// Reconnection and timeouts. Variables so that tests can shorten them.
var (
	agentRetryMin   = 100 * time.Millisecond
	agentRetryMax   = 5 * time.Second
	agentDialWait   = 3 * time.Second
	agentRegistWait = 10 * time.Second
)

func agentSocketExists(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().Type() == os.ModeSocket
}

// startAgent starts the epoll fallback and connects to the agent at path.
// If the agent cannot be reached, it fails, unless persistent is set: the
// source then starts with every connection on epoll and keeps trying.
func startAgent(path string, persistent bool, m *Monitor, log *slog.Logger) (*agentSource, error) {
	fb, err := startEpoll(nil, false, log)
	if err != nil {
		return nil, fmt.Errorf("starting the epoll fallback: %w", err)
	}
	s := &agentSource{
		path: path, m: m, log: log, fb: fb,
		done:      make(chan struct{}),
		kick:      make(chan struct{}, 1),
		dropped:   make(chan struct{}, 1),
		listeners: make(map[*agentListener]bool),
		conns:     make(map[*conn]struct{}),
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	c, err := s.dial()
	if err != nil {
		if !persistent {
			s.cancel()
			return nil, errors.Join(err, fb.close())
		}
		log.Warn("agent unreachable; watching connections with epoll until it comes", "source", SourceEpoll, "socket", path, "err", err)
	} else {
		s.client = c
	}
	go s.run(c)
	return s, nil
}

func (s *agentSource) dial() (*wire.Client, error) {
	ctx, cancel := context.WithTimeout(s.ctx, agentDialWait)
	defer cancel()
	return wire.Dial(ctx, s.path, wire.ClientConfig{
		Name: "httpx:" + filepath.Base(os.Args[0]),
		// Only what can say a client went away: the agent spends nothing
		// on the rest (opened, retransmit, local reset).
		Kinds:     wire.KindMask(detect.ProbeKindPeerFIN, detect.ProbeKindPeerReset, detect.ProbeKindError, detect.ProbeKindClosed),
		OnEvent:   s.onEvent,
		OnDropped: s.onDropped,
	})
}

// onEvent runs on the client's reader goroutine.
func (s *agentSource) onEvent(e wire.Event) {
	k, ok := detect.FromProbe(e.Kind, e.Cause, syscall.Errno(e.Errno))
	if !ok {
		return
	}
	var at time.Time
	if e.TimeNs != 0 {
		at = time.Unix(0, e.TimeNs)
	}
	s.m.Deliver(e.Cookie, k, at)
}

// onDropped runs on the client's reader goroutine: the agent's queue for
// this session overflowed, so events were lost. The run loop then asks
// every connection's socket directly (sweep).
func (s *agentSource) onDropped(d wire.Dropped) {
	s.log.Warn("the agent dropped events for this server; checking every connection", "dropped", d.Count, "dropped_total", d.Total)
	select {
	case s.dropped <- struct{}{}:
	default:
	}
}

// run owns the session: c is the one opened at start, or nil.
func (s *agentSource) run(c *wire.Client) {
	defer close(s.done)
	back := false // c is a reconnection
	for {
		if c == nil {
			if c = s.redial(); c == nil {
				return
			}
			s.mu.Lock()
			s.client = c
			s.mu.Unlock()
			back = true
		}
		s.serve(c, back)
		c.Close()
		if s.ctx.Err() != nil {
			return
		}
		s.away(c.Err())
		c = nil
	}
}

// redial connects again, waiting between attempts with capped exponential
// backoff and jitter. It returns nil when the source closes.
func (s *agentSource) redial() *wire.Client {
	delay := agentRetryMin
	for {
		// Full delay halved, plus up to the other half at random: servers
		// that lost the same agent do not return in lockstep.
		wait := delay/2 + rand.N(delay/2+1)
		t := time.NewTimer(wait)
		select {
		case <-s.ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		c, err := s.dial()
		if err == nil {
			return c
		}
		if s.ctx.Err() != nil {
			return nil
		}
		delay = min(2*delay, agentRetryMax)
		s.log.Debug("agent still unreachable", "socket", s.path, "backoff", delay, "err", err)
	}
}

// serve registers the listeners, hands covered connections to the agent and
// waits for new listeners, drop notices or the end of the session.
func (s *agentSource) serve(c *wire.Client, back bool) {
	s.registerAll(c)
	if back && c.Err() == nil {
		s.log.Info("agent is back; switching from epoll", "source", SourceAgent, "socket", s.path)
	}
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-c.Done():
			return
		case <-s.kick:
			s.registerAll(c)
		case <-s.dropped:
			s.sweep()
		}
	}
}

// registerAll passes every listener not yet handled in this session to the
// agent, then moves the connections it now covers off epoll.
func (s *agentSource) registerAll(c *wire.Client) {
	s.mu.Lock()
	var todo []*agentListener
	for l, handled := range s.listeners {
		if !handled {
			todo = append(todo, l)
		}
	}
	s.mu.Unlock()
	for _, l := range todo {
		reg, err := s.register(c, l)
		if c.Err() != nil {
			return // the session ended: away() watches everything with epoll
		}
		s.mu.Lock()
		_, live := s.listeners[l]
		if live {
			s.listeners[l] = true
		}
		if err == nil {
			// Even if l closed meanwhile: the agent routes its
			// connections for the whole session.
			s.regs = append(s.regs, reg)
		}
		s.mu.Unlock()
		if err != nil && live {
			s.log.Warn("the agent did not take a listener; watching its connections with epoll", "addr", l.Addr(), "err", err)
		}
	}
	s.handoff()
}

func (s *agentSource) register(c *wire.Client, l *agentListener) (agentReg, error) {
	var (
		reg  agentReg
		serr error
	)
	rc, err := l.sc.SyscallConn()
	if err != nil {
		return reg, err
	}
	if err := rc.Control(func(fd uintptr) {
		var dom int
		if dom, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN); serr == nil && dom == unix.AF_INET6 {
			var v int
			v, serr = unix.GetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_V6ONLY)
			reg.v6only = v == 1
		}
	}); err != nil {
		return reg, err
	}
	if serr != nil {
		return reg, fmt.Errorf("getsockopt: %w", serr)
	}
	ctx, cancel := context.WithTimeout(s.ctx, agentRegistWait)
	defer cancel()
	r, err := c.Register(ctx, l.sc)
	if err != nil {
		return reg, err
	}
	reg.netns, reg.addr = r.NetNS, r.Addr
	return reg, nil
}

// handoff stops watching with epoll the connections the agent now covers.
// The epoll source's unwatch reports what the socket says at that moment,
// so an abort that happened before the agent covered the connection is not
// lost; later ones come from the agent.
func (s *agentSource) handoff() {
	s.mu.Lock()
	var moved []*conn
	for c := range s.conns {
		if ac := &c.agent; ac.epoll && s.coveredLocked(ac) {
			ac.epoll = false
			moved = append(moved, c)
		}
	}
	s.mu.Unlock()
	for _, c := range moved {
		s.fb.unwatch(c)
	}
}

// away hands every connection to epoll after the session ended. Adding a
// socket to an epoll set reports a hang-up that already happened, so what
// happened since the agent went away is not lost.
func (s *agentSource) away(cause error) {
	s.mu.Lock()
	s.client = nil
	s.regs = nil
	for l := range s.listeners {
		s.listeners[l] = false
	}
	for c := range s.conns {
		ac := &c.agent
		if ac.epoll {
			continue
		}
		if err := s.fb.watch(c); err != nil {
			s.log.Debug("connection not watched", "err", err) // closed by net/http meanwhile
			continue
		}
		ac.epoll = true
	}
	s.mu.Unlock()
	s.log.Warn("lost the agent; watching connections with epoll until it returns", "source", SourceEpoll, "socket", s.path, "err", cause)
}

// sweep asks the socket of every connection the agent covers whether its
// client has gone, after the agent dropped events.
func (s *agentSource) sweep() {
	s.mu.Lock()
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		if !c.agent.epoll {
			conns = append(conns, c)
		}
	}
	s.mu.Unlock()
	for _, c := range conns {
		if r := c.askSocket(); r != ReasonNone {
			c.report(r, time.Now())
		}
	}
}

// coveredLocked reports whether the agent streams the events of ac: a
// listener registered in the current session matches it as the agent
// routes (network namespace, port, then address). Called with s.mu held.
func (s *agentSource) coveredLocked(ac *agentConn) bool {
	if s.client == nil || !ac.local.IsValid() {
		return false
	}
	for _, r := range s.regs {
		if r.netns == ac.netns && r.addr.Port() == ac.local.Port() && r.accepts(ac.local.Addr()) {
			return true
		}
	}
	return false
}

// accepts reports whether a connection with local address a can have been
// accepted on the listener.
func (r *agentReg) accepts(a netip.Addr) bool {
	la := r.addr.Addr()
	if !la.IsUnspecified() {
		return la == a
	}
	if la.Is4() {
		return a.Is4()
	}
	return !r.v6only || a.Is6()
}

func (s *agentSource) name() Source {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.client != nil {
		return SourceAgent
	}
	return SourceEpoll
}

func (s *agentSource) watch(c *conn) error {
	ac := &c.agent
	_ = c.raw.Control(func(fd uintptr) {
		cookie, err := socketCookie(int(fd))
		if err != nil {
			return // not TCP: epoll only
		}
		ns, err := unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		if err != nil {
			return
		}
		c.cookie, ac.netns = cookie, ns
	})
	if a, ok := c.nc.LocalAddr().(*net.TCPAddr); ok && c.cookie != 0 {
		ac.local = a.AddrPort()
		ac.local = netip.AddrPortFrom(ac.local.Addr().Unmap(), ac.local.Port())
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.conns[c] = struct{}{}
	if s.coveredLocked(ac) {
		return nil
	}
	if s.client != nil && len(s.listeners) == 0 && !s.warned {
		s.warned = true
		s.log.Warn("connections arrive on a listener the agent does not know; watching them with epoll (serve through Monitor.Listener)", "local", ac.local)
	}
	if err := s.fb.watch(c); err != nil {
		return err
	}
	ac.epoll = true
	return nil
}

func (s *agentSource) unwatch(c *conn) {
	s.mu.Lock()
	_, ok := s.conns[c]
	delete(s.conns, c)
	epoll := c.agent.epoll
	s.mu.Unlock()
	if ok && epoll {
		s.fb.unwatch(c)
	}
}

// close ends the session and the fallback; no event is delivered after it
// returns (wire.Client.Close waits for the reader that calls onEvent).
func (s *agentSource) close() error {
	s.cancel()
	<-s.done
	return s.fb.close()
}

// addListener wraps ln for Monitor.Listener and asks run to register it.
func (s *agentSource) addListener(ln net.Listener) net.Listener {
	if l, ok := ln.(*agentListener); ok && l.src == s {
		return l // already registered
	}
	sc, ok := ln.(syscall.Conn)
	if !ok {
		s.log.Warn("a listener without a file descriptor cannot be passed to the agent; watching its connections with epoll", "addr", ln.Addr(), "type", fmt.Sprintf("%T", ln))
		return ln
	}
	l := &agentListener{Listener: ln, sc: sc, src: s}
	s.mu.Lock()
	s.listeners[l] = false
	s.mu.Unlock()
	select {
	case s.kick <- struct{}{}:
	default:
	}
	return l
}

func (s *agentSource) removeListener(l *agentListener) {
	s.mu.Lock()
	delete(s.listeners, l)
	s.mu.Unlock()
}

// agentListener is a listener returned by Monitor.Listener.
type agentListener struct {
	net.Listener
	sc   syscall.Conn
	src  *agentSource
	once sync.Once
}

// SyscallConn returns the listening socket's raw connection.
func (l *agentListener) SyscallConn() (syscall.RawConn, error) { return l.sc.SyscallConn() }

// Close stops registering the listener with the agent and closes it.
func (l *agentListener) Close() error {
	l.once.Do(func() { l.src.removeListener(l) })
	return l.Listener.Close()
}
