package wire

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// ErrClientClosed is what a Client's methods return after Close.
var ErrClientClosed = errors.New("wire: client closed")

// ErrSessionEnded wraps the reason a session with the agent ended (the agent
// went away, or sent a fatal Error).
var ErrSessionEnded = errors.New("wire: agent session ended")

// ClientConfig configures Dial. The zero value is valid.
type ClientConfig struct {
	// Name identifies the client in the agent's logs, metrics and status,
	// at most MaxNameLen printable ASCII bytes. Empty means the program's
	// base name (truncated).
	Name string
	// OnEvent is called for every event, in order, on the client's reader
	// goroutine: it must not block for long, or the agent's queue for this
	// client fills and events are dropped (and reported to OnDropped). Nil
	// discards events.
	OnEvent func(Event)
	// OnDropped is called, on the reader goroutine, when the agent reports
	// that it dropped events for this client. Nil ignores the notices.
	OnDropped func(Dropped)
	// Kinds limits the events the agent sends to these kinds (KindMask);
	// zero means every kind. A server that only needs to know that clients
	// are gone asks for KindPeerFIN, KindPeerReset, KindError and
	// KindClosed, and the agent does not spend a write on the others.
	Kinds uint32
}

// Client is a session with the agent. Its methods are safe for concurrent
// use; Close may be called from any goroutine and unblocks all of them.
type Client struct {
	conn    *Conn
	cfg     ClientConfig
	welcome Welcome
	version uint8 // picked by the agent

	nextReq atomic.Uint32

	mu      sync.Mutex
	pending map[uint32]chan regResult
	status  chan Frame // non-nil while a Status call waits
	err     error      // why the session ended, once done is closed
	closed  bool

	statusMu sync.Mutex
	done     chan struct{}
}

// regResult answers a request: Register or Watch.
type regResult struct {
	reg      Registered
	watching Watching
	err      error
}

// ErrWatchUnsupported is returned by Watch when the agent speaks a protocol
// version older than WatchVersion.
var ErrWatchUnsupported = errors.New("wire: the agent is too old to stream all events (protocol version < 3)")

// Dial connects to the agent's socket at path (DefaultSocketPath if empty),
// says Hello and waits for Welcome. ctx bounds the whole handshake. The
// returned client reads in a background goroutine until Close or the end of
// the session (see Done and Err).
func Dial(ctx context.Context, path string, cfg ClientConfig) (*Client, error) {
	if path == "" {
		path = DefaultSocketPath
	}
	if cfg.Name == "" {
		cfg.Name = filepath.Base(os.Args[0])
	}
	if len(cfg.Name) > MaxNameLen {
		cfg.Name = cfg.Name[:MaxNameLen]
	}
	cfg.Name = sanitizeName(cfg.Name)
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unixpacket", path)
	if err != nil {
		return nil, fmt.Errorf("connecting to hangupd at %s: %w", path, err)
	}
	c := &Client{
		conn:    NewConn(nc.(*net.UnixConn)),
		cfg:     cfg,
		pending: make(map[uint32]chan regResult),
		done:    make(chan struct{}),
	}
	if err := c.handshake(ctx); err != nil {
		nc.Close()
		return nil, err
	}
	go c.readLoop()
	return c, nil
}

func sanitizeName(s string) string {
	b := []byte(s)
	for i, ch := range b {
		if ch < 0x20 || ch > 0x7e {
			b[i] = '_'
		}
	}
	return string(b)
}

func (c *Client) handshake(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { c.conn.uc.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	hello := Frame{Type: TypeHello, Version: MinVersion, Hello: Hello{
		PID: uint32(os.Getpid()), Name: c.cfg.Name,
		MinVersion: MinVersion, MaxVersion: MaxVersion, MaxPacket: MaxPacketSize,
		Kinds: c.cfg.Kinds,
	}}
	if err := c.conn.WriteFrame(&hello, -1); err != nil {
		return ctxErr(ctx, fmt.Errorf("sending hello: %w", err))
	}
	var f Frame
	fd, err := c.conn.ReadFrame(&f)
	if fd >= 0 {
		syscall.Close(fd)
	}
	if err != nil {
		return ctxErr(ctx, fmt.Errorf("reading welcome: %w", err))
	}
	switch f.Type {
	case TypeWelcome:
		if f.Version < MinVersion || f.Version > MaxVersion {
			return fmt.Errorf("%w: the agent picked version %d, this side speaks %d to %d", ErrVersion, f.Version, MinVersion, MaxVersion)
		}
		c.welcome = f.Welcome
		c.version = f.Version
		c.conn.SetVersion(f.Version)
		return nil
	case TypeError:
		e := f.Error
		return &e
	}
	return fmt.Errorf("%w: expected welcome, got %s", ErrMalformed, f.Type)
}

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w (%w)", ctx.Err(), err)
	}
	return err
}

// Welcome returns what the agent said when the session opened.
func (c *Client) Welcome() Welcome { return c.welcome }

// Version returns the protocol version the agent picked for the session.
func (c *Client) Version() uint8 { return c.version }

func (c *Client) readLoop() {
	var f Frame
	var err error
	for {
		var fd int
		fd, err = c.conn.ReadFrame(&f)
		if fd >= 0 {
			syscall.Close(fd) // the agent never sends descriptors
		}
		if err != nil {
			break
		}
		if f.Type == TypeEvent {
			if c.cfg.OnEvent != nil {
				c.cfg.OnEvent(f.Event)
			}
			continue
		}
		if err = c.dispatch(&f); err != nil {
			break
		}
	}
	c.conn.Close()
	c.finish(err)
}

func (c *Client) dispatch(f *Frame) error {
	switch f.Type {
	case TypeDropped:
		if c.cfg.OnDropped != nil {
			c.cfg.OnDropped(f.Dropped)
		}
	case TypeRegistered:
		c.answer(f.Registered.Request, regResult{reg: f.Registered})
	case TypeWatching:
		c.answer(f.Watching.Request, regResult{watching: f.Watching})
	case TypeError:
		e := f.Error
		if e.Request != 0 && c.answer(e.Request, regResult{err: &e}) && !e.Fatal {
			return nil
		}
		if e.Fatal {
			return &e
		}
		c.mu.Lock()
		st := c.status
		c.mu.Unlock()
		if st != nil {
			st <- *f
		}
	case TypeStatusListener, TypeStatusEnd:
		c.mu.Lock()
		st := c.status
		c.mu.Unlock()
		if st != nil {
			st <- *f
		}
	default:
		return fmt.Errorf("%w: unexpected %s frame from the agent", ErrMalformed, f.Type)
	}
	return nil
}

func (c *Client) answer(req uint32, r regResult) bool {
	c.mu.Lock()
	ch, ok := c.pending[req]
	delete(c.pending, req)
	c.mu.Unlock()
	if ok {
		ch <- r
	}
	return ok
}

func (c *Client) finish(err error) {
	c.mu.Lock()
	if c.closed {
		err = ErrClientClosed
	} else {
		err = fmt.Errorf("%w: %w", ErrSessionEnded, err)
	}
	c.err = err
	for req, ch := range c.pending {
		ch <- regResult{err: err}
		delete(c.pending, req)
	}
	c.mu.Unlock()
	close(c.done)
}

// Done is closed when the session ends, by Close or because the agent went
// away; Err then says why.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err returns nil while the session is open, ErrClientClosed after Close,
// and otherwise an error wrapping ErrSessionEnded and the cause (for a fatal
// agent error, a *Error).
func (c *Client) Err() error {
	select {
	case <-c.done:
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.err
	default:
		return nil
	}
}

// Register passes a listening socket to the agent and waits for its answer.
// ln is typically a *net.TCPListener; its descriptor is duplicated by the
// kernel in transit and ln stays the caller's. From the answer on, events
// of connections accepted on ln reach OnEvent with Event.Listener equal to
// the returned Registered.Listener. An agent refusal is a *Error (e.g. code
// CodeNotListener or CodeLimit).
func (c *Client) Register(ctx context.Context, ln syscall.Conn) (Registered, error) {
	rc, err := ln.SyscallConn()
	if err != nil {
		return Registered{}, fmt.Errorf("registering listener: %w", err)
	}
	var (
		req  uint32
		ch   chan regResult
		serr error
	)
	if cerr := rc.Control(func(fd uintptr) { req, ch, serr = c.sendRegister(int(fd)) }); cerr != nil {
		return Registered{}, fmt.Errorf("registering listener: %w", cerr)
	}
	if serr != nil {
		return Registered{}, serr
	}
	return c.awaitRegistered(ctx, req, ch)
}

// RegisterFD is Register for a raw file descriptor, which stays the
// caller's.
func (c *Client) RegisterFD(ctx context.Context, fd int) (Registered, error) {
	req, ch, err := c.sendRegister(fd)
	if err != nil {
		return Registered{}, err
	}
	return c.awaitRegistered(ctx, req, ch)
}

func (c *Client) sendRegister(fd int) (uint32, chan regResult, error) {
	return c.sendRequest(fd, func(req uint32) Frame {
		return Frame{Type: TypeRegister, Register: Register{Request: req}}
	})
}

// sendRequest sends the frame that frame builds for a new request id, with
// fd (-1 for none), and returns the id and where its answer arrives.
func (c *Client) sendRequest(fd int, frame func(req uint32) Frame) (uint32, chan regResult, error) {
	req := c.nextReq.Add(1)
	if req == 0 {
		req = c.nextReq.Add(1)
	}
	ch := make(chan regResult, 1)
	c.mu.Lock()
	if err := c.errLocked(); err != nil {
		c.mu.Unlock()
		return 0, nil, err
	}
	c.pending[req] = ch
	c.mu.Unlock()
	f := frame(req)
	if err := c.conn.WriteFrame(&f, fd); err != nil {
		c.answer(req, regResult{})
		if e := c.Err(); e != nil {
			return 0, nil, e
		}
		return 0, nil, fmt.Errorf("sending %s: %w", f.Type, err)
	}
	return req, ch, nil
}

func (c *Client) awaitRegistered(ctx context.Context, req uint32, ch chan regResult) (Registered, error) {
	r := c.await(ctx, req, ch)
	return r.reg, r.err
}

func (c *Client) await(ctx context.Context, req uint32, ch chan regResult) regResult {
	select {
	case r := <-ch:
		return r
	case <-ctx.Done():
		c.answer(req, regResult{})
		return regResult{err: ctx.Err()}
	}
}

// Watch asks the agent to stream, besides the events of this session's own
// listeners, those of every server connection on the host (when this
// process's user is root or the agent's user: Watching.All) or of the
// listeners that sessions of this user registered. They reach OnEvent;
// Event.Listener is 0 for a connection of no registered listener. It returns
// ErrWatchUnsupported, without asking, when the agent speaks an older
// protocol, and a *Error when it refuses.
func (c *Client) Watch(ctx context.Context) (Watching, error) {
	if c.version < WatchVersion {
		return Watching{}, ErrWatchUnsupported
	}
	req, ch, err := c.sendRequest(-1, func(req uint32) Frame {
		return Frame{Type: TypeWatch, Watch: Watch{Request: req}}
	})
	if err != nil {
		return Watching{}, err
	}
	r := c.await(ctx, req, ch)
	return r.watching, r.err
}

func (c *Client) errLocked() error {
	if c.closed {
		return ErrClientClosed
	}
	select {
	case <-c.done:
		return c.err
	default:
		return nil
	}
}

// Status asks the agent for its subscribers, their listeners and its
// counters: one row per listener (or per subscriber without listeners).
func (c *Client) Status(ctx context.Context) ([]StatusListener, StatusEnd, error) {
	c.statusMu.Lock()
	defer c.statusMu.Unlock()
	ch := make(chan Frame, 16)
	c.mu.Lock()
	if err := c.errLocked(); err != nil {
		c.mu.Unlock()
		return nil, StatusEnd{}, err
	}
	c.status = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.status = nil
		c.mu.Unlock()
		// Let a dispatch blocked on a full channel finish.
		for {
			select {
			case <-ch:
			default:
				return
			}
		}
	}()
	if err := c.conn.WriteFrame(&Frame{Type: TypeStatusRequest}, -1); err != nil {
		return nil, StatusEnd{}, fmt.Errorf("sending status request: %w", err)
	}
	var rows []StatusListener
	for {
		select {
		case f := <-ch:
			switch f.Type {
			case TypeStatusListener:
				rows = append(rows, f.StatusListener)
			case TypeStatusEnd:
				return rows, f.StatusEnd, nil
			case TypeError:
				e := f.Error
				return nil, StatusEnd{}, &e
			}
		case <-c.done:
			return nil, StatusEnd{}, c.Err()
		case <-ctx.Done():
			return nil, StatusEnd{}, ctx.Err()
		}
	}
}

// Close ends the session. It is safe to call from any goroutine, more than
// once; pending calls return ErrClientClosed.
func (c *Client) Close() error {
	c.mu.Lock()
	already := c.closed
	c.closed = true
	c.mu.Unlock()
	if already {
		return nil
	}
	err := c.conn.Close()
	<-c.done
	if errors.Is(err, net.ErrClosed) {
		err = nil // the reader closed it first, at the end of the session
	}
	return err
}
