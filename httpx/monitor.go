package httpx

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hangup-io/hangup/httpx/internal/detect"
	"github.com/hangup-io/hangup/internal/wire"
)

// Options configures a Monitor. The zero value is a valid configuration.
type Options struct {
	// Source picks the detection source. The zero value, SourceAuto, tries
	// SourceAgent if a socket exists at AgentSocket, then SourceBPF (when
	// linked in, see package httpx/bpfsource), then SourceEpoll. A source
	// that fails to start falls back to the next one (agent, bpf, epoll,
	// none) with a warning, except an explicit SourceAgent: when the agent
	// cannot be reached at start, it starts watching with epoll and keeps
	// trying to connect (see SourceAgent).
	Source Source

	// AgentSocket is the agent's unix socket, for SourceAgent. Empty means
	// /run/hangup/hangup.sock, the agent's default.
	AgentSocket string

	// DropTimeout bounds how long a client can be silently gone (link down,
	// no FIN or RST) before its request is marked aborted, while the
	// request runs or WaitDelivered waits. A request that runs longer than
	// about an eighth of it has its connection given TCP_USER_TIMEOUT and
	// keepalive settings derived from it (requests that end sooner pay
	// nothing), until every response byte has been acknowledged; then the
	// connection gets its own settings back (a connection that dies first
	// counts its response undelivered). A client that is alive but stops
	// reading (zero window) is not cut off: while it answers the kernel's
	// window probes the deadline moves on, and once it stops answering it
	// is marked aborted within 11/8 of the derived user timeout (see
	// droptune.go). Zero means 10s; the effective minimum is 2s. Negative
	// leaves socket options alone.
	DropTimeout time.Duration

	// TimeLimit is every request's initial time limit (see
	// State.SetTimeLimit). Zero means none.
	TimeLimit time.Duration

	// TimeoutGrace is how long a handler may run on after its time limit
	// expired before the client is released without it. Zero means 1s.
	TimeoutGrace time.Duration

	// IgnoreHalfClose makes a client's half-close (FIN) not count as an
	// abort: the client may still be reading. The request stays NORMAL and
	// its context live, although net/http cancels its own request context
	// on the FIN once the body was read. HTTP/2 is the exception: net/http
	// closes the whole connection on a FIN, so its requests are aborted
	// anyway. By default a half-close counts, as nginx answers it with
	// 499. A reset or timeout always counts.
	IgnoreHalfClose bool

	// Detach runs every handler in a goroutine of its own, as HTTP/2
	// handlers always are, instead of on net/http's goroutine. That costs
	// a goroutine and a few channel operations per request, and lets
	// State.Finish on HTTP/1.x hand the response back through any
	// middleware around Handler (a compressing one, say) as if the handler
	// had returned. Without it, an HTTP/1.x Finish completes the response
	// at once only where Handler sits directly on net/http's
	// ResponseWriter (see State.Finish).
	Detach bool

	// BPF configures the in-process probe of SourceBPF.
	BPF BPFOptions

	// Logger receives the source selection (once, at New), fallbacks and
	// panics in shutdown functions and continuations. Nil means
	// slog.Default().
	Logger *slog.Logger
}

// BPFOptions configures the in-process kernel probe (SourceBPF); see
// bpf.Options for the meaning of each field. The zero value takes the
// probe's defaults.
type BPFOptions struct {
	RingBufferSize int
	MaxConnections int
	FlushInterval  time.Duration
}

const (
	defaultDropTimeout = 10 * time.Second
	defaultGrace       = time.Second
	recentEvents       = 4096
)

// Monitor detects departed clients and gives requests their State. Create
// it with New, wire it into each server with Configure and wrap handlers
// with Handler. It is a prometheus.Collector (not registered anywhere).
type Monitor struct {
	opts  Options
	log   *slog.Logger
	drop  *watchdog
	grace time.Duration
	src   source

	metrics *metrics

	mu       sync.Mutex
	byNC     map[net.Conn]*conn // every tracked connection, for ConnState and the watchdog
	byCookie map[uint64]*conn   // connections of sources that report by cookie
	recent   map[uint64]event   // events of cookies not (yet) tracked
	ring     []uint64           // recent's keys, oldest first, to bound it
	ringNext int
	servers  []*http.Server
	closed   bool

	// closeMu is held shared while a connection is handed to the source
	// and exclusively by Close, so no watch runs on a closed source.
	closeMu sync.RWMutex

	idleWaiters    atomic.Int32 // delivery waits that need ConnState's StateIdle
	warnFinishOnce sync.Once
	// finishFlushed, set only by tests, runs in an inline Finish after
	// the response went out and before Finish returns.
	finishFlushed func()

	work     workCount // handlers, continuations, timers' work
	bgCtx    context.Context
	bgCancel context.CancelFunc
}

// New starts a Monitor with its detection source. It fails only for an
// unknown Options.Source; a source that cannot start falls back (see
// Options.Source).
func New(opts Options) (*Monitor, error) {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	log = log.With("component", "httpx")
	m := &Monitor{
		opts:     opts,
		log:      log,
		grace:    cmpOr(opts.TimeoutGrace, defaultGrace),
		byNC:     make(map[net.Conn]*conn),
		byCookie: make(map[uint64]*conn),
		recent:   make(map[uint64]event),
		ring:     make([]uint64, recentEvents),
	}
	m.bgCtx, m.bgCancel = context.WithCancel(context.Background())
	m.drop = newWatchdog(m, newDropSettings(opts.DropTimeout))
	m.metrics = newMetrics()
	var order []Source
	switch opts.Source {
	case SourceAuto:
		order = []Source{SourceEpoll, SourceNone}
		if detect.BPF() != nil {
			order = append([]Source{SourceBPF}, order...)
		}
		if agentSocketExists(m.agentSocket()) {
			order = append([]Source{SourceAgent}, order...)
		}
	case SourceAgent:
		order = []Source{SourceAgent, SourceEpoll, SourceNone}
	case SourceBPF:
		order = []Source{SourceBPF, SourceEpoll, SourceNone}
	case SourceEpoll:
		order = []Source{SourceEpoll, SourceNone}
	case SourceNone:
		order = []Source{SourceNone}
	default:
		return nil, fmt.Errorf("httpx: unknown source %q", opts.Source)
	}
	for i, name := range order {
		src, err := m.start(name)
		if err == nil {
			m.src = src
			break
		}
		log.Warn("detection source failed to start, falling back", "source", name, "fallback", order[i+1], "err", err)
	}
	log.Info("detecting client aborts", "source", m.src.name(), "drop_timeout", m.drop.set.timeout)
	return m, nil
}

// ErrBPFNotLinked is why SourceBPF does not start in a program that does
// not import package httpx/bpfsource.
var ErrBPFNotLinked = errors.New("the in-process probe is not linked in: import _ \"github.com/hangup-io/hangup/httpx/bpfsource\"")

func (m *Monitor) start(name Source) (source, error) {
	switch name {
	case SourceBPF:
		startBPF := detect.BPF()
		if startBPF == nil {
			return nil, ErrBPFNotLinked
		}
		o := m.opts.BPF
		s, err := startBPF(detect.BPFOptions{RingBufferSize: o.RingBufferSize, MaxConnections: o.MaxConnections, FlushInterval: o.FlushInterval}, m, m.log)
		if err != nil {
			return nil, fmt.Errorf("loading the probe: %w", err)
		}
		return newCookieSource(SourceBPF, s), nil
	case SourceEpoll:
		return startEpoll(nil, true, m.log)
	case SourceAgent:
		// An explicit agent source outlives an agent that is not
		// there yet; the automatic choice falls back instead.
		s, err := startAgent(m.agentSocket(), m.opts.Source == SourceAgent, m, m.log)
		if err != nil {
			return nil, fmt.Errorf("connecting to the agent: %w", err)
		}
		return s, nil
	}
	return noSource{}, nil
}

func (m *Monitor) agentSocket() string {
	if m.opts.AgentSocket != "" {
		return m.opts.AgentSocket
	}
	return wire.DefaultSocketPath
}

// Listener returns ln so that connections accepted on it are watched by
// the host agent: with SourceAgent, the listening socket is passed to the
// agent once (and again whenever the agent restarts), and the agent then
// streams the events of its connections. Serve the returned listener:
//
//	ln, err := net.Listen("tcp", ":8080")
//	...
//	err = srv.Serve(m.Listener(ln))
//
// ln must be a TCP listener with a file descriptor (*net.TCPListener, or
// anything implementing syscall.Conn): for TLS, pass the TCP listener and
// use ServeTLS, or wrap the result with tls.NewListener. Registration
// happens in the background: connections accepted before it completes, on
// listeners not passed through Listener, or on a listener the agent
// refused are watched with epoll instead, so none goes unwatched. Closing
// the returned listener closes ln and stops registering it. With any other
// source, Listener returns ln itself.
func (m *Monitor) Listener(ln net.Listener) net.Listener {
	if s, ok := m.src.(*agentSource); ok {
		return s.addListener(ln)
	}
	return ln
}

func cmpOr(v, def time.Duration) time.Duration {
	if v > 0 {
		return v
	}
	return def
}

// Source returns the detection source in use. With SourceAgent it is
// SourceEpoll while the agent is away.
func (m *Monitor) Source() Source { return m.src.name() }

// Configure wires the Monitor into srv: it sets srv.ConnContext and
// srv.ConnState, calling any functions already there, so that every
// connection srv accepts is tracked (any listener, TLS, Serve or ServeTLS,
// HTTP/1.x and HTTP/2 over TLS or cleartext). Call it before the server
// starts, and do not replace those two fields afterwards. net/http does not
// show srv's listeners here: with SourceAgent, also serve through
// Monitor.Listener.
func (m *Monitor) Configure(srv *http.Server) {
	prevCtx, prevState := srv.ConnContext, srv.ConnState
	srv.ConnContext = func(ctx context.Context, c net.Conn) context.Context {
		if prevCtx != nil {
			ctx = prevCtx(ctx, c)
		}
		return m.connContext(ctx, c)
	}
	srv.ConnState = func(c net.Conn, st http.ConnState) {
		m.connState(c, st)
		if prevState != nil {
			prevState(c, st)
		}
	}
	m.mu.Lock()
	m.servers = append(m.servers, srv)
	m.mu.Unlock()
}

// connContext starts tracking a connection: the returned context is the
// connection itself (see conn).
func (m *Monitor) connContext(ctx context.Context, nc net.Conn) context.Context {
	c, err := newConn(ctx, m, nc)
	if err != nil {
		m.log.Debug("connection not tracked", "remote", nc.RemoteAddr(), "err", err)
		return ctx
	}
	m.closeMu.RLock()
	defer m.closeMu.RUnlock()
	m.mu.Lock()
	closed := m.closed
	m.mu.Unlock()
	if closed {
		return ctx
	}
	if err := m.src.watch(c); err != nil {
		m.log.Debug("connection not watched", "remote", nc.RemoteAddr(), "err", err)
	}
	m.mu.Lock()
	m.byNC[nc] = c
	first := len(m.byNC) == 1
	var (
		ev   event
		seen bool
	)
	if c.cookie != 0 {
		m.byCookie[c.cookie] = c
		c.mapped = true
		ev, seen = m.recent[c.cookie]
		delete(m.recent, c.cookie)
	}
	m.mu.Unlock()
	if first {
		m.drop.wake()
	}
	if seen {
		c.report(ev.reason, ev.at)
	}
	return c
}

func (m *Monitor) connState(nc net.Conn, st http.ConnState) {
	switch st {
	case http.StateIdle:
		if m.idleWaiters.Load() == 0 {
			return
		}
		m.mu.Lock()
		c := m.byNC[nc]
		m.mu.Unlock()
		if c != nil {
			c.mu.Lock()
			c.wakeIdleLocked()
			c.mu.Unlock()
		}
	case http.StateClosed, http.StateHijacked:
		m.mu.Lock()
		c := m.byNC[nc]
		delete(m.byNC, nc)
		m.mu.Unlock()
		if c == nil {
			return
		}
		m.src.unwatch(c)
		c.mu.Lock()
		c.closed = true
		c.closedFlag.Store(true)
		c.wakeIdleLocked()
		busy := c.active.Load() > 0
		c.mu.Unlock()
		m.drop.closed(c)
		if !busy {
			c.released()
		}
	}
}

// unmap stops routing a closed connection's events: once net/http closed
// it and no request is left on it.
func (m *Monitor) unmap(c *conn) {
	m.mu.Lock()
	if c.mapped && m.byCookie[c.cookie] == c {
		delete(m.byCookie, c.cookie)
	}
	c.mapped = false
	m.mu.Unlock()
}

// Deliver implements detect.Sink for the sources that report by socket
// cookie (the in-process probe, the agent): the event goes to the
// connection, or is remembered for a while, so that an event that lands
// between accept and ConnContext is not lost.
func (m *Monitor) Deliver(cookie uint64, k detect.Kind, at time.Time) {
	m.deliver(cookie, event{reason: kindReason(k), at: at})
}

func (m *Monitor) deliver(cookie uint64, ev event) {
	m.mu.Lock()
	c := m.byCookie[cookie]
	if c == nil {
		if !m.closed {
			m.rememberLocked(cookie, ev)
		}
		m.mu.Unlock()
		return
	}
	m.mu.Unlock()
	c.report(ev.reason, ev.at)
}

// rememberLocked keeps the event of an unknown cookie, a death over a
// half-close, in a bounded ring.
func (m *Monitor) rememberLocked(cookie uint64, ev event) {
	old, ok := m.recent[cookie]
	if ok && old.reason != ReasonPeerFIN {
		return
	}
	if !ok {
		if evicted := m.ring[m.ringNext]; evicted != 0 {
			delete(m.recent, evicted)
		}
		m.ring[m.ringNext] = cookie
		m.ringNext = (m.ringNext + 1) % len(m.ring)
	}
	m.recent[cookie] = ev
}

// conns returns every tracked connection.
func (m *Monitor) conns() []*conn {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]*conn, 0, len(m.byNC))
	for _, c := range m.byNC {
		out = append(out, c)
	}
	return out
}

// goBackground runs fn as a tracked continuation.
func (m *Monitor) goBackground(ctx context.Context, fn func(context.Context)) {
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(m.bgCtx, cancel)
	m.work.add()
	go func() {
		defer m.work.done()
		defer stop()
		defer cancel()
		defer func() {
			if p := recover(); p != nil {
				m.log.Error("background continuation panicked", "err", panicErr(p), "stack", string(debug.Stack()))
			}
		}()
		fn(ctx)
	}()
}

func panicErr(p any) error {
	if err, ok := p.(error); ok {
		return err
	}
	return fmt.Errorf("%v", p)
}

// Wait waits until every handler (including finished and timed-out ones
// still running), shutdown function and continuation started with
// State.Go has returned, or until ctx is done; then it cancels the
// continuations' contexts and returns ctx's error.
func (m *Monitor) Wait(ctx context.Context) error {
	select {
	case <-m.work.idle():
		return nil
	case <-ctx.Done():
		m.bgCancel()
		return ctx.Err()
	}
}

// Shutdown shuts down gracefully every server passed to Configure
// (http.Server.Shutdown), then waits for the background work (see Wait).
// It returns the first error.
func (m *Monitor) Shutdown(ctx context.Context) error {
	m.mu.Lock()
	servers := append([]*http.Server(nil), m.servers...)
	m.mu.Unlock()
	var errs []error
	for _, srv := range servers {
		errs = append(errs, srv.Shutdown(ctx))
	}
	errs = append(errs, m.Wait(ctx))
	return errors.Join(errs...)
}

// Close stops the detection source and cancels the contexts of running
// continuations. It does not wait for handlers: use Shutdown first.
// Requests still running are no longer marked aborted by the kernel.
func (m *Monitor) Close() error {
	m.closeMu.Lock()
	m.mu.Lock()
	was := m.closed
	m.closed = true
	m.mu.Unlock()
	m.closeMu.Unlock()
	if was {
		return nil
	}
	m.bgCancel()
	m.drop.stop()
	return m.src.close()
}

// workCount counts the work Wait waits for. Unlike a sync.WaitGroup, work
// may start at any time, also from zero while Wait waits, and a waiter
// that gives up leaves nothing behind.
type workCount struct {
	mu     sync.Mutex
	n      int
	idleCh chan struct{} // closed when n drops to zero, replaced when work starts
}

func (w *workCount) add() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.n == 0 {
		w.idleCh = make(chan struct{})
	}
	w.n++
}

func (w *workCount) done() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.n--
	switch {
	case w.n < 0:
		panic("httpx: negative work count")
	case w.n == 0:
		close(w.idleCh)
	}
}

// idle returns a channel that is closed once no work is running.
func (w *workCount) idle() <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.n == 0 {
		return closedCh
	}
	return w.idleCh
}

var closedCh = func() chan struct{} { c := make(chan struct{}); close(c); return c }()
