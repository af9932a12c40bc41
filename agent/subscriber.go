package agent

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hangup-io/hangup/internal/wire"
	"golang.org/x/sys/unix"
)

// subscriber is one session on the agent's socket: a server that registers
// listening sockets and receives the events of their connections.
type subscriber struct {
	a    *Agent
	id   uint32
	conn *wire.Conn
	cred unix.Ucred
	log  *slog.Logger

	omu sync.Mutex // guards out
	out outbox     // replies and events waiting for the socket

	delivered atomic.Uint64
	dropped   atomic.Uint64

	mu        sync.Mutex
	name      string
	listeners []*listener

	dirty bool // pipeline goroutine only: in Agent.dirty
	// watching and watchAll say that the session sent Watch, and whether
	// it sees every connection; guarded by the agent's routes.mu.
	watching, watchAll bool
	kinds              atomic.Uint32 // the event kinds the peer wants (Hello.Kinds); 0: all

	done      chan struct{}
	closeOnce sync.Once
	writerEnd chan struct{}
}

func newSubscriber(a *Agent, id uint32, conn *wire.Conn, cred unix.Ucred) *subscriber {
	return &subscriber{
		a:         a,
		id:        id,
		conn:      conn,
		cred:      cred,
		log:       a.log.With("subscriber", id, "pid", cred.Pid, "uid", cred.Uid, "gid", cred.Gid),
		out:       newOutbox(),
		done:      make(chan struct{}),
		writerEnd: make(chan struct{}),
	}
}

// shutdown ends the session from outside (agent shutdown).
func (s *subscriber) shutdown() {
	s.closeOnce.Do(func() {
		close(s.done)
		s.conn.Close()
	})
}

// run serves the session until the peer leaves, breaks the protocol, or the
// agent shuts down.
func (s *subscriber) run() {
	s.log.Info("subscriber connected")
	reason := s.serve()
	s.shutdown()
	<-s.writerEnd
	s.a.routes.removeAll(s)
	s.mu.Lock()
	n := len(s.listeners)
	s.listeners = nil
	s.mu.Unlock()
	s.a.releaseListeners(s.cred.Uid, n)
	s.log.Info("subscriber disconnected", "reason", reason, "name", s.name, "listeners", n,
		"delivered", s.delivered.Load(), "dropped", s.dropped.Load())
}

// serve reads frames and returns why the session ended.
func (s *subscriber) serve() string {
	uc := s.conn.UnixConn()
	var f wire.Frame

	// The session starts with Hello, within HelloTimeout.
	uc.SetReadDeadline(time.Now().Add(s.a.cfg.HelloTimeout))
	fd, err := s.conn.ReadFrame(&f)
	closeFD(fd)
	uc.SetReadDeadline(time.Time{})
	if errors.Is(err, wire.ErrVersion) {
		// Answer in the peer's own version, which an older peer can read:
		// the Error frame's layout has not changed.
		s.omu.Lock()
		s.out.version = f.Version
		s.omu.Unlock()
	}
	go s.writeLoop()
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return s.fatal(wire.CodeUnexpected, "no hello within "+s.a.cfg.HelloTimeout.String())
	case err != nil:
		return s.readFailed(err)
	case f.Type != wire.TypeHello:
		return s.fatal(wire.CodeUnexpected, fmt.Sprintf("expected hello, got %s", f.Type))
	}
	h := f.Hello
	v := min(h.MaxVersion, wire.MaxVersion)
	if v < max(h.MinVersion, wire.MinVersion) {
		return s.fatal(wire.CodeVersion, fmt.Sprintf("the subscriber speaks protocol versions %d to %d, the agent %d to %d",
			h.MinVersion, h.MaxVersion, wire.MinVersion, wire.MaxVersion))
	}
	s.setPeer(v, int(h.MaxPacket))
	s.kinds.Store(h.Kinds)
	s.mu.Lock()
	s.name = f.Hello.Name
	s.mu.Unlock()
	s.log.Info("subscriber said hello", "name", f.Hello.Name, "claimed_pid", f.Hello.PID)
	s.reply(wire.Frame{Type: wire.TypeWelcome, Welcome: wire.Welcome{
		AgentPID:     uint32(os.Getpid()),
		SubscriberID: s.id,
		MaxListeners: uint16(s.a.cfg.MaxListeners),
		QueueLen:     uint32(s.a.cfg.QueueLen),
	}})

	for {
		fd, err := s.conn.ReadFrame(&f)
		if err != nil {
			if errors.Is(err, wire.ErrMissingFD) || errors.Is(err, wire.ErrUnexpectedFD) {
				// A request-level mistake: answer it and go on.
				code := wire.CodeMissingFD
				if errors.Is(err, wire.ErrUnexpectedFD) {
					code = wire.CodeUnexpectedFD
				}
				s.log.Warn("bad frame from subscriber", "err", err)
				s.replyError(code, f.Register.Request, err.Error())
				continue
			}
			if errors.Is(err, wire.ErrUnknownType) {
				s.log.Warn("bad frame from subscriber", "err", err)
				s.replyError(wire.CodeUnknownType, 0, err.Error())
				continue
			}
			return s.readFailed(err)
		}
		switch f.Type {
		case wire.TypeRegister:
			s.register(f.Register.Request, fd)
		case wire.TypeStatusRequest:
			s.status()
		case wire.TypeWatch:
			s.watch(f.Watch.Request)
		default:
			closeFD(fd)
			s.replyError(wire.CodeUnexpected, 0, fmt.Sprintf("a subscriber does not send %s frames", f.Type))
		}
		select {
		case <-s.done:
			return "closed"
		default:
		}
	}
}

// readFailed turns a read error into the session's end, telling the peer
// why when the fault is its own.
func (s *subscriber) readFailed(err error) string {
	switch {
	case errors.Is(err, io.EOF):
		return "peer closed the connection"
	case errors.Is(err, net.ErrClosed):
		return "agent closed the connection"
	case errors.Is(err, wire.ErrVersion):
		return s.fatal(wire.CodeVersion, err.Error())
	case errors.Is(err, wire.ErrTruncated), errors.Is(err, wire.ErrGarbage),
		errors.Is(err, wire.ErrTooLarge), errors.Is(err, wire.ErrMalformed):
		return s.fatal(wire.CodeMalformed, err.Error())
	// In a session these are answered and survived; before Hello they end it.
	case errors.Is(err, wire.ErrUnknownType):
		return s.fatal(wire.CodeUnknownType, err.Error())
	case errors.Is(err, wire.ErrMissingFD):
		return s.fatal(wire.CodeMissingFD, err.Error())
	case errors.Is(err, wire.ErrUnexpectedFD):
		return s.fatal(wire.CodeUnexpectedFD, err.Error())
	}
	s.log.Warn("reading from subscriber", "err", err)
	return "read error: " + err.Error()
}

// fatal sends an Error frame, gives the writer a moment to flush it, and
// returns the reason for the log.
func (s *subscriber) fatal(code uint16, msg string) string {
	s.log.Warn("disconnecting subscriber", "err", msg)
	if s.sendCtrl(ctrlMsg{f: errorFrame(code, 0, true, msg), fatal: true}) {
		select {
		case <-s.writerEnd:
			drain(s.conn)
		case <-time.After(time.Second):
		}
	}
	return msg
}

func errorFrame(code uint16, req uint32, fatal bool, msg string) wire.Frame {
	if len(msg) > wire.MaxErrorMessage {
		msg = msg[:wire.MaxErrorMessage]
	}
	return wire.Frame{Type: wire.TypeError, Error: wire.Error{Code: code, Request: req, Fatal: fatal, Message: msg}}
}

func (s *subscriber) replyError(code uint16, req uint32, msg string) {
	s.reply(errorFrame(code, req, false, msg))
}

// register handles a Register request for the listening socket fd. The
// agent needs the descriptor only to learn what it is, and closes it before
// it answers: a client that has its answer may close its own copy and count
// on the socket being gone from the host.
func (s *subscriber) register(req uint32, fd int) {
	l, code, err := s.addListener(fd)
	closeFD(fd)
	switch {
	case l != nil:
		s.replyRegistered(req, l)
	case code != 0:
		s.log.Warn("refusing listener", "err", err)
		s.replyError(code, req, err.Error())
	}
}

// addListener routes the listening socket fd to s. It returns the route,
// or the code and error to refuse it with, or neither when the session
// ended while it waited.
func (s *subscriber) addListener(fd int) (*listener, uint16, error) {
	start := monoNow() // before anything looks at the socket
	s.mu.Lock()
	n := len(s.listeners)
	s.mu.Unlock()
	if n >= s.a.cfg.MaxListeners {
		return nil, wire.CodeLimit, fmt.Errorf("too many listeners (limit %d)", s.a.cfg.MaxListeners)
	}
	info, err := inspectListener(fd)
	if err != nil {
		if errors.Is(err, errNotListener) {
			return nil, wire.CodeNotListener, err
		}
		return nil, wire.CodeInternal, err
	}
	// The same listener again (a retry, or a second Register of one
	// socket): answer with the route it already has, so that no event is
	// queued twice.
	s.mu.Lock()
	for _, l := range s.listeners {
		if l.info.cookie == info.cookie {
			s.mu.Unlock()
			return l, 0, nil
		}
	}
	s.mu.Unlock()
	if err := s.a.reserveListener(s.cred.Uid); err != nil {
		return nil, wire.CodeLimit, err
	}
	// Connections accepted before this agent started (an agent restart)
	// must be tracked before the answer, so that a client that has its
	// answer can count on their events. Each scan costs the user a token.
	if !s.a.cfg.NoSeed {
		if err := s.a.takeSeed(s.cred.Uid, s.done); err != nil {
			s.a.releaseListeners(s.cred.Uid, 1)
			if errors.Is(err, errSeedBudget) {
				return nil, wire.CodeLimit, err
			}
			return nil, 0, err
		}
		if n, err := s.a.seedListener(fd, info); err != nil {
			s.log.Warn("seeding the listener's existing connections", "err", err, "addr", info.addr)
		} else if n > 0 {
			s.log.Info("seeded the listener's existing connections", "addr", info.addr, "connections", n)
		}
	}
	l := s.a.routes.addLive(s, info, start, func() bool { return stillListening(fd) })
	if l == nil {
		s.a.releaseListeners(s.cred.Uid, 1)
		return nil, wire.CodeNotListener, errors.New("the listener closed while it was being registered")
	}
	s.log.Info("listener registered", "listener", l.id, "addr", info.addr, "netns", info.netns)
	return l, 0, nil
}

func (s *subscriber) replyRegistered(req uint32, l *listener) {
	s.reply(wire.Frame{Type: wire.TypeRegistered, Registered: wire.Registered{
		Request: req, Listener: l.id, NetNS: l.info.netns, Addr: l.info.addr,
	}})
}

// forget removes a listener whose socket closed from the session.
func (s *subscriber) forget(l *listener) {
	s.mu.Lock()
	n := len(s.listeners)
	s.listeners = slices.DeleteFunc(s.listeners, func(x *listener) bool { return x == l })
	gone := n - len(s.listeners)
	s.mu.Unlock()
	s.a.releaseListeners(s.cred.Uid, gone)
	s.log.Info("listener closed: no longer routed", "listener", l.id, "addr", l.info.addr, "netns", l.info.netns)
}

// sees reports whether this session may see o's rows in a status answer:
// its own user's sessions, or every session for root and the agent's user.
func (s *subscriber) sees(o *subscriber) bool {
	return s.seesAll() || s.cred.Uid == o.cred.Uid
}

// seesAll reports whether the session's user is root or the agent's own.
func (s *subscriber) seesAll() bool {
	return s.cred.Uid == 0 || int(s.cred.Uid) == os.Geteuid()
}

// watch answers a Watch: from now on the session also receives the events
// it may see (see sees), those of every server connection when seesAll.
func (s *subscriber) watch(req uint32) {
	s.omu.Lock()
	v := s.out.version
	s.omu.Unlock()
	if v < wire.WatchVersion {
		s.replyError(wire.CodeUnexpected, req, fmt.Sprintf("watch needs protocol version %d, the session speaks %d", wire.WatchVersion, v))
		return
	}
	all := s.seesAll()
	s.a.routes.addWatcher(s, all)
	s.log.Info("subscriber watches", "all", all)
	s.reply(wire.Frame{Type: wire.TypeWatching, Watching: wire.Watching{Request: req, All: all}})
}

// status answers a status request with one row per listener, for the
// sessions the caller may see (see sees).
func (s *subscriber) status() {
	subs := slices.DeleteFunc(s.a.subscribers(), func(o *subscriber) bool { return !s.sees(o) })
	slices.SortFunc(subs, func(x, y *subscriber) int { return int(x.id) - int(y.id) })
	for _, o := range subs {
		o.mu.Lock()
		row := wire.StatusListener{
			Subscriber: o.id, PID: uint32(o.cred.Pid), UID: o.cred.Uid, Name: o.name,
			Listeners: uint16(len(o.listeners)),
			Delivered: o.delivered.Load(), Dropped: o.dropped.Load(), Queued: uint32(o.queued()),
		}
		ls := slices.Clone(o.listeners)
		o.mu.Unlock()
		if len(ls) == 0 {
			s.reply(wire.Frame{Type: wire.TypeStatusListener, StatusListener: row})
		}
		for _, l := range ls {
			row.Listener, row.NetNS, row.Addr = l.id, l.info.netns, l.info.addr
			s.reply(wire.Frame{Type: wire.TypeStatusListener, StatusListener: row})
		}
	}
	var lost uint64
	if st, err := s.a.src.Stats(); err == nil {
		lost = st.Lost
	}
	s.reply(wire.Frame{Type: wire.TypeStatusEnd, StatusEnd: wire.StatusEnd{
		Subscribers: uint32(len(subs)),
		Tracked:     uint64(s.a.table.len()),
		Events:      s.a.events.Load(),
		Lost:        lost,
		Dropped:     s.a.dropped.Load(),
		UptimeSec:   uint64(time.Since(s.a.start).Seconds()),
	}})
}

func closeFD(fd int) {
	if fd >= 0 {
		unix.Close(fd)
	}
}
