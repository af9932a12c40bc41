// Package agent is the host daemon's logic: it reads the kernel probe's
// events, keeps a table of server connections, streams each subscriber the
// events of the listeners it registered over a unix socket, and exports the
// probe's exact per-port counts as Prometheus metrics.
//
// One event's path: Source.ReadInto (the probe's ring buffer) → Agent.process
// → table.observe (connection table) → routes.deliver (listeners matched by
// network namespace, port and address) → subscriber.enqueue (a queue that
// grows up to a bound; full means a counted drop) → subscriber.flush, on the
// same goroutine, for an event that says a client is gone: a non-blocking
// write of every queued event as one packet of wire.Event frames. Routine
// events wait up to flushDelay for company; the writer goroutine
// (subscriber.writeLoop) takes over only when the socket is full.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/netip"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/wire"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Config configures an Agent. Only Source is required; every other zero
// value picks the default named on the field.
type Config struct {
	// Source gives events and counts: a loaded *bpf.Probe. Run closes it.
	Source Source
	// Logger receives the agent's logs. Nil discards them.
	Logger *slog.Logger
	// SocketPath is the subscriber socket. Empty means
	// wire.DefaultSocketPath. Its directory is created if missing.
	SocketPath string
	// SocketGroup, a group name or numeric id, owns the socket, which is
	// created with mode 0660 so that members of the group may subscribe.
	// Empty leaves the group of the agent process.
	SocketGroup string
	// MaxSubscribers bounds concurrent subscriber sessions. Zero means 256.
	MaxSubscribers int
	// MaxSubscribersPerUser bounds the concurrent sessions of one user
	// (SO_PEERCRED uid), so that one user cannot lock the others out.
	// Zero means 32.
	MaxSubscribersPerUser int
	// MaxListeners bounds the listeners one subscriber may register. Zero
	// means 64.
	MaxListeners int
	// MaxListenersPerUser bounds the listeners registered by all of one
	// user's sessions together. Zero means 256.
	MaxListenersPerUser int
	// SeedBurst and SeedRate bound the sock_diag scans that registrations
	// cost, per user: SeedBurst at once, then SeedRate per second. A
	// registration beyond them waits for its turn, up to 2s, or is refused
	// with CodeLimit. Zero means 16 and 2.
	SeedBurst int
	SeedRate  float64
	// QueueLen bounds each subscriber's event queue, which grows with use
	// up to it; events beyond it are dropped and counted. Zero means 4096.
	QueueLen int
	// MaxNamespaces caps the netns label values of per-port metrics; the
	// other namespaces are summed under netns="other" (and port="other").
	// Zero means 250.
	MaxNamespaces int
	// MaxPorts caps the port label values of per-port metrics, per
	// namespace; the other ports are summed under port="other". Zero means
	// 100.
	MaxPorts int
	// HelloTimeout is how long a new session may take to say Hello. Zero
	// means 5s.
	HelloTimeout time.Duration
	// StallTimeout disconnects a subscriber whose socket has accepted
	// nothing for this long while the agent had frames for it: a peer that
	// stopped reading. Its queue overflowing is counted as drops first.
	// Zero means 30s.
	StallTimeout time.Duration
	// NoSeed disables the sock_diag scan for server connections that
	// existed before the agent started. The zero value scans.
	NoSeed bool
	// ProgramStats exports each probe program's run count and run time
	// (hangup_probe_program_*), read from a Source that implements
	// ProgramStatsSource. The kernel counts them only while its BPF
	// statistics are on (bpf.EnableStats, or the kernel.bpf_stats_enabled
	// sysctl). The zero value exports none.
	ProgramStats bool
}

// Agent is the running host agent. Create it with New, then call Run.
type Agent struct {
	cfg    Config
	log    *slog.Logger
	src    Source
	table  *table
	routes *routes
	start  time.Time

	ln   *net.UnixListener
	path string
	sock os.FileInfo // the socket file we created

	events  atomic.Uint64 // events read from the source
	dropped atomic.Uint64 // events dropped for slow subscribers, all sessions
	seeded  atomic.Uint64 // connections found through sock_diag

	startupDone chan struct{} // closed when Run finished the start-up scan

	dirty []*subscriber // pipeline goroutine only: subscribers to flush

	nsInfo nsInfoCache

	mu      sync.Mutex
	subs    map[*subscriber]struct{}
	users   map[uint32]*account
	nextSub uint32
	closing bool

	wg sync.WaitGroup
}

const (
	defaultMaxSubscribers = 256
	defaultMaxPerUser     = 32
	defaultMaxListeners   = 64
	defaultMaxUserListen  = 256
	defaultSeedBurst      = 16
	defaultSeedRate       = 2
	defaultQueueLen       = 4096
	defaultMaxPorts       = 100
	defaultMaxNamespaces  = 250
	defaultHelloTimeout   = 5 * time.Second
	defaultStallTimeout   = 30 * time.Second
)

// New checks cfg and opens the subscriber socket, replacing a stale socket
// file left by an agent that did not shut down cleanly. It fails if another
// agent answers on the path. Call Run to serve, or Close to give up.
func New(cfg Config) (*Agent, error) {
	if cfg.Source == nil {
		return nil, errors.New("agent: Config.Source is nil")
	}
	for name, v := range map[string]float64{
		"MaxSubscribers": float64(cfg.MaxSubscribers), "MaxSubscribersPerUser": float64(cfg.MaxSubscribersPerUser),
		"MaxListeners": float64(cfg.MaxListeners), "MaxListenersPerUser": float64(cfg.MaxListenersPerUser),
		"SeedBurst": float64(cfg.SeedBurst), "SeedRate": cfg.SeedRate, "QueueLen": float64(cfg.QueueLen),
		"MaxPorts": float64(cfg.MaxPorts), "MaxNamespaces": float64(cfg.MaxNamespaces),
		"HelloTimeout": float64(cfg.HelloTimeout), "StallTimeout": float64(cfg.StallTimeout),
	} {
		if v < 0 || math.IsNaN(v) || math.IsInf(v, 0) {
			return nil, fmt.Errorf("agent: Config.%s is %v; want zero (the default) or more", name, v)
		}
	}
	cfg.SocketPath = cmpOr(cfg.SocketPath, wire.DefaultSocketPath)
	cfg.MaxSubscribers = cmpOr(cfg.MaxSubscribers, defaultMaxSubscribers)
	cfg.MaxSubscribersPerUser = cmpOr(cfg.MaxSubscribersPerUser, defaultMaxPerUser)
	cfg.MaxListeners = min(cmpOr(cfg.MaxListeners, defaultMaxListeners), 65535)
	cfg.MaxListenersPerUser = cmpOr(cfg.MaxListenersPerUser, defaultMaxUserListen)
	cfg.SeedBurst = cmpOr(cfg.SeedBurst, defaultSeedBurst)
	cfg.SeedRate = cmpOr(cfg.SeedRate, defaultSeedRate)
	cfg.QueueLen = cmpOr(cfg.QueueLen, defaultQueueLen)
	cfg.MaxPorts = cmpOr(cfg.MaxPorts, defaultMaxPorts)
	cfg.MaxNamespaces = cmpOr(cfg.MaxNamespaces, defaultMaxNamespaces)
	cfg.HelloTimeout = cmpOr(cfg.HelloTimeout, defaultHelloTimeout)
	cfg.StallTimeout = cmpOr(cfg.StallTimeout, defaultStallTimeout)
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	a := &Agent{
		cfg:    cfg,
		log:    log.With("component", "agent"),
		src:    cfg.Source,
		table:  newTable(),
		routes: newRoutes(),
		start:  time.Now(),
		path:   cfg.SocketPath,
		subs:   make(map[*subscriber]struct{}),
		users:  make(map[uint32]*account),

		startupDone: make(chan struct{}),
	}
	if w, ok := cfg.Source.(watcher); ok {
		a.routes.watch = func(k connKey, on bool) {
			var err error
			if on {
				err = w.Watch(k.netns, k.port)
			} else {
				err = w.Unwatch(k.netns, k.port)
			}
			if err != nil && !errors.Is(err, bpf.ErrNotWatchedOnly) {
				a.log.Warn("the probe does not wake the agent at once for a registered port", "netns_cookie", k.netns, "port", k.port, "err", err)
			}
		}
	}
	ln, err := listenSocket(cfg.SocketPath, cfg.SocketGroup)
	if err != nil {
		return nil, err
	}
	a.ln = ln
	a.sock, err = os.Lstat(cfg.SocketPath)
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("checking the socket file: %w", err)
	}
	return a, nil
}

func cmpOr[T comparable](v, def T) T {
	var zero T
	if v == zero {
		return def
	}
	return v
}

func listenSocket(path, group string) (*net.UnixListener, error) {
	gid := -1
	if group != "" {
		g, err := lookupGroup(group)
		if err != nil {
			return nil, err
		}
		gid = g
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("creating socket directory: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("%s exists and is not a socket; refusing to replace it", path)
		}
		// Another agent, or a stale file from one that crashed?
		c, err := net.DialTimeout("unixpacket", path, time.Second)
		if err == nil {
			c.Close()
			return nil, fmt.Errorf("another agent is listening on %s", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("removing stale socket: %w", err)
		}
	}
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	// Close removes the file only if we leave unlinking to it; we do it
	// ourselves at shutdown, after the last session ends.
	ln.SetUnlinkOnClose(false)
	if err := os.Chown(path, -1, gid); err != nil {
		ln.Close()
		os.Remove(path)
		return nil, fmt.Errorf("setting the socket's group: %w", err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		ln.Close()
		os.Remove(path)
		return nil, fmt.Errorf("setting the socket's mode: %w", err)
	}
	return ln, nil
}

func lookupGroup(name string) (int, error) {
	if id, err := strconv.Atoi(name); err == nil {
		return id, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, fmt.Errorf("socket group: %w", err)
	}
	return strconv.Atoi(g.Gid)
}

// StartupDone is closed once Run has finished its start-up work, the
// sock_diag scan of every namespace (at once with NoSeed): from then on the
// agent enters other namespaces only for listeners that subscribers
// register, so a caller may drop the privileges only that scan needed.
func (a *Agent) StartupDone() <-chan struct{} { return a.startupDone }

// SocketPath returns the subscriber socket's path.
func (a *Agent) SocketPath() string { return a.path }

// Run seeds the connection table from sock_diag in every network namespace
// of the host (see listNamespaces), serves subscribers and
// reads events until ctx ends or the source fails. On return every session
// has ended, the socket file is removed and the source is closed; stop
// scraping Collector before Run returns. It returns
// nil after ctx ends, and the source's error otherwise.
func (a *Agent) Run(ctx context.Context) error {
	// Read first: on a busy host the dump takes a while, and the ring
	// buffer must not fill meanwhile.
	readErr := make(chan error, 1)
	go func() { readErr <- a.readLoop() }()
	if !a.cfg.NoSeed {
		n, err := a.seedAll()
		if err != nil {
			a.log.Warn("seeding connections that existed before start", "err", err)
		} else {
			a.log.Info("seeded connections that existed before start", "connections", n)
		}
	}
	close(a.startupDone)
	a.wg.Add(2)
	go func() {
		defer a.wg.Done()
		a.acceptLoop()
	}()
	stopReconcile := make(chan struct{})
	go func() {
		defer a.wg.Done()
		a.reconcileLoop(stopReconcile)
	}()

	// Sessions end before the source closes: they read its counters.
	var err error
	select {
	case <-ctx.Done():
		close(stopReconcile)
		a.Close()
		a.src.Close()
		<-readErr
	case err = <-readErr:
		close(stopReconcile)
		a.Close()
		a.src.Close()
	}
	return err
}

// reconcileInterval is how often the agent checks for lost events.
const reconcileInterval = 30 * time.Second

// reconcileLoop drops table entries of connections the probe no longer
// tracks, whenever the probe reports lost events: their closed event may be
// among them. The probe's own map is exact (entries leave at destroy).
func (a *Agent) reconcileLoop(stop <-chan struct{}) {
	t := time.NewTicker(reconcileInterval)
	defer t.Stop()
	var lost uint64
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		st, err := a.src.Stats()
		if err != nil || st.Lost == lost {
			continue
		}
		lost = st.Lost
		if n, err := a.reconcile(); err != nil {
			a.log.Warn("reconciling the connection table after lost events", "err", err)
		} else if n > 0 {
			a.log.Info("removed connections whose close event was lost", "connections", n)
		}
		if n, err := a.reconcileRoutes(); err != nil {
			a.log.Warn("checking registered listeners after lost events", "err", err)
		} else if n > 0 {
			a.log.Info("removed routes of listeners whose close event was lost", "listeners", n)
		}
	}
}

// reconcileRoutes removes the routes of registered listeners that no
// longer listen, whose close event may have been lost: it looks at the
// listening sockets of every namespace that has routes. A route whose
// namespace it cannot find is kept. An MPTCP listener is known to sock_diag
// only by its TCP subflow, whose cookie the agent does not learn: it counts
// as listening while some socket listens on its address and port.
func (a *Agent) reconcileRoutes() (int, error) {
	a.routes.mu.RLock()
	byNS := make(map[uint64][]listenerInfo) // by netns cookie
	for k, ls := range a.routes.byKey {
		for _, l := range ls {
			byNS[k.netns] = append(byNS[k.netns], l.info)
		}
	}
	a.routes.mu.RUnlock()
	if len(byNS) == 0 {
		return 0, nil
	}
	spaces, err := listNamespaces(procRoot, runNetns)
	if err != nil {
		return 0, err
	}
	removed := 0
	for _, r := range spaces {
		var (
			infos []listenerInfo
			socks []diagSocket
		)
		err := inNetNS(r.path, func() error {
			ns, err := currentNetNSCookie()
			if err != nil || len(byNS[ns]) == 0 {
				return err
			}
			infos = byNS[ns]
			delete(byNS, ns)
			h, err := netlink.NewHandle(unix.NETLINK_INET_DIAG)
			if err != nil {
				return err
			}
			defer h.Close()
			socks, err = dumpTCP(h)
			return err
		})
		if err != nil || infos == nil {
			continue
		}
		cookies, addrs := make(map[uint64]bool), make(map[netip.AddrPort]bool)
		for _, s := range socks {
			if s.state == tcpListen {
				cookies[s.cookie], addrs[s.local] = true, true
			}
		}
		for _, li := range infos {
			if cookies[li.cookie] || li.mptcp && addrs[li.addr] {
				continue
			}
			for _, l := range a.routes.removeClosed(li.cookie, monoNow()) {
				l.sub.forget(l)
				removed++
			}
		}
		if len(byNS) == 0 {
			break
		}
	}
	return removed, nil
}

// reconcile keeps only the table entries the probe still tracks.
func (a *Agent) reconcile() (int, error) {
	tracked := make(map[uint64]struct{}, a.table.len())
	if err := a.src.TrackedCookies(func(c uint64) bool {
		tracked[c] = struct{}{}
		return true
	}); err != nil {
		return 0, err
	}
	return a.table.keepOnly(func(c uint64) bool { _, ok := tracked[c]; return ok }), nil
}

// backlogSource is a Source that can tell whether more events wait to be
// read at once (for *bpf.Probe: the ring buffer's unread bytes). The
// pipeline then writes to subscribers once the backlog is read, in fewer and
// larger packets, instead of after every urgent event.
type backlogSource interface {
	Buffered() int
}

func (a *Agent) readLoop() error {
	var e bpf.Event
	backlog := func() bool { return false }
	if b, ok := a.src.(backlogSource); ok {
		backlog = func() bool { return b.Buffered() > 0 }
	}
	for {
		if err := a.src.ReadInto(&e); err != nil {
			if errors.Is(err, bpf.ErrClosed) {
				return nil
			}
			if errors.Is(err, bpf.ErrShortRecord) {
				a.log.Warn("skipping undecodable event", "err", err)
				continue
			}
			return fmt.Errorf("reading events: %w", err)
		}
		if now := a.process(&e); len(a.dirty) > 0 && (now || !backlog()) {
			a.flushDirty()
		}
	}
}

// handle is the pipeline for one event, flushed at once.
func (a *Agent) handle(e *bpf.Event) {
	a.process(e)
	a.flushDirty()
}

// process is the pipeline for one event: the connection table, then the
// subscribers' queues. It reports whether a subscriber wants its queue
// written before the next event (see flushNow). It must never wait for a
// subscriber.
func (a *Agent) process(e *bpf.Event) bool {
	a.events.Add(1)
	if e.Kind == bpf.KindListenerClosed {
		at := e.Mono
		if at == 0 {
			at = monoNow()
		}
		for _, l := range a.routes.removeClosed(e.Cookie, at) {
			l.sub.forget(l)
		}
		return false
	}
	a.table.observe(e)
	var now bool
	a.dirty, now = a.routes.deliver(e, a.dirty)
	return now
}

// flushDirty writes what the subscribers that asked for it have queued.
func (a *Agent) flushDirty() {
	for i, s := range a.dirty {
		s.dirty = false
		s.flush()
		a.dirty[i] = nil
	}
	a.dirty = a.dirty[:0]
}

// monoNow is CLOCK_MONOTONIC, the kernel's clock for event times.
func monoNow() time.Duration {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts) // cannot fail for this clock
	return time.Duration(ts.Nano())
}

// Close stops accepting, ends every session and removes the socket file.
// Run calls it; call it yourself only if Run was never called. It is
// idempotent.
func (a *Agent) Close() error {
	a.mu.Lock()
	already := a.closing
	a.closing = true
	subs := make([]*subscriber, 0, len(a.subs))
	for s := range a.subs {
		subs = append(subs, s)
	}
	a.mu.Unlock()
	if already {
		a.wg.Wait()
		return nil
	}
	err := a.ln.Close()
	for _, s := range subs {
		s.shutdown()
	}
	a.wg.Wait()
	// Remove the file only if it is still ours: a new agent may already
	// have replaced it (a rolling restart).
	if fi, serr := os.Lstat(a.path); serr == nil && a.sock != nil && os.SameFile(fi, a.sock) {
		if rerr := os.Remove(a.path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			err = errors.Join(err, rerr)
		}
	}
	return err
}

func (a *Agent) acceptLoop() {
	for {
		uc, err := a.ln.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			a.log.Error("accepting subscriber", "err", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		a.admit(uc)
	}
}

// admit starts a session for uc, or refuses it when the agent is full or
// closing.
func (a *Agent) admit(uc *net.UnixConn) {
	conn := wire.NewConn(uc)
	conn.OneFramePerPacket()
	cred, credErr := peerCred(uc)
	a.mu.Lock()
	refuse := ""
	var code uint16
	switch {
	case a.closing:
		refuse, code = "the agent is shutting down", wire.CodeShuttingDown
	case len(a.subs) >= a.cfg.MaxSubscribers:
		refuse, code = fmt.Sprintf("too many subscribers (limit %d)", a.cfg.MaxSubscribers), wire.CodeLimit
	case a.userLocked(cred.Uid).sessions >= a.cfg.MaxSubscribersPerUser:
		refuse, code = fmt.Sprintf("too many subscribers for uid %d (limit %d)", cred.Uid, a.cfg.MaxSubscribersPerUser), wire.CodeLimit
	}
	if refuse != "" {
		a.mu.Unlock()
		a.log.Warn("refusing subscriber", "reason", refuse, "pid", cred.Pid, "uid", cred.Uid)
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			uc.SetWriteDeadline(time.Now().Add(time.Second))
			conn.WriteFrame(&wire.Frame{Type: wire.TypeError, Error: wire.Error{Code: code, Fatal: true, Message: refuse}}, -1)
			drain(conn)
			uc.Close()
		}()
		return
	}
	a.nextSub++
	s := newSubscriber(a, a.nextSub, conn, cred)
	a.subs[s] = struct{}{}
	a.userLocked(cred.Uid).sessions++
	a.wg.Add(1)
	a.mu.Unlock()
	if credErr != nil {
		s.log.Warn("reading peer credentials", "err", credErr)
	}
	go func() {
		defer a.wg.Done()
		s.run()
		a.mu.Lock()
		delete(a.subs, s)
		a.userLocked(cred.Uid).sessions--
		a.pruneUserLocked(cred.Uid)
		a.mu.Unlock()
	}()
}

// drain reads and discards what the peer sent until it closes, for at most
// half a second. Closing a unix socket with unread data makes the peer's
// next read fail with ECONNRESET, which would hide the error frame just sent.
func drain(c *wire.Conn) {
	uc := c.UnixConn()
	uc.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	var f wire.Frame
	for {
		fd, err := c.ReadFrame(&f)
		closeFD(fd)
		if err != nil && !errors.Is(err, wire.ErrGarbage) && !errors.Is(err, wire.ErrTruncated) &&
			!errors.Is(err, wire.ErrMalformed) && !errors.Is(err, wire.ErrTooLarge) &&
			!errors.Is(err, wire.ErrVersion) && !errors.Is(err, wire.ErrUnknownType) &&
			!errors.Is(err, wire.ErrMissingFD) && !errors.Is(err, wire.ErrUnexpectedFD) {
			return
		}
	}
}

func peerCred(uc *net.UnixConn) (unix.Ucred, error) {
	rc, err := uc.SyscallConn()
	if err != nil {
		return unix.Ucred{}, err
	}
	var cred *unix.Ucred
	var gerr error
	if err := rc.Control(func(fd uintptr) {
		cred, gerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return unix.Ucred{}, err
	}
	if gerr != nil {
		return unix.Ucred{}, gerr
	}
	return *cred, nil
}

// subscribers returns a snapshot of the current sessions.
func (a *Agent) subscribers() []*subscriber {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]*subscriber, 0, len(a.subs))
	for s := range a.subs {
		out = append(out, s)
	}
	return out
}
