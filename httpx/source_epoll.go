package httpx

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/hangup-io/hangup/internal/pollfd"
	"golang.org/x/sys/unix"
)

// epollSource watches connections in a private epoll set. It registers
// net/http's own descriptor (inside RawConn.Control, so it cannot be closed
// meanwhile) under a registration id that is never reused, and never
// removes it: the kernel drops the registration when the socket's file is
// closed, and an event whose id is no longer known is ignored. So a
// registered connection costs one epoll_ctl and no extra descriptor.
//
// As the detection source (lazy), it registers a connection only once a
// request needs it (arm): while an HTTP/1.x request has no body left to
// read, net/http's own background read sees the client's FIN or RST (or a
// kernel timeout) and cancels the request's context, and State asks the
// socket why, so the registration would only repeat it. A request with a
// body, HTTP/2, Options.IgnoreHalfClose (net/http stops reading after the
// FIN), a delivery wait, and a request that outlives the watchdog's tick
// (pipelined data stops net/http's background read) arm the connection for
// the rest of its life. Most connections of a busy server are never
// registered: no epoll_ctl, and nothing for the kernel to remove or wake
// on every segment. As the agent source's fallback it registers every
// connection at once (not lazy): what happened while the agent was away is
// only reported by the registration.
//
// The loop waits for the set in Go's network poller (the epoll descriptor
// polls readable when it holds events), never in a blocking epoll_wait: a
// thread blocked in a system call keeps its P until sysmon takes it back,
// 20 µs to 10 ms later, so on a GOMAXPROCS=1 server every event would
// stall every request for that long.
type epollSource struct {
	ep     *os.File // the epoll set, non-blocking, in Go's poller
	rc     syscall.RawConn
	report func(c *conn, r Reason, at time.Time)
	log    *slog.Logger
	done   chan struct{}

	lazy bool // watch registers nothing; arm does

	mu     sync.Mutex
	conns  map[uint64]*conn
	nextID uint64
	closed bool // close began: epfd may be closed (and its number reused)
}

const epollEvents = unix.EPOLLRDHUP | unix.EPOLLERR | unix.EPOLLHUP | unix.EPOLLET

// startEpoll starts the loop; report receives what it sees (nil:
// conn.report). A lazy source registers a connection only when arm is
// called for it.
func startEpoll(report func(c *conn, r Reason, at time.Time), lazy bool, log *slog.Logger) (_ *epollSource, err error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	ep, rc, err := pollfd.Open(epfd, "httpx-epoll")
	if err != nil {
		return nil, err
	}
	if report == nil {
		report = func(c *conn, r Reason, at time.Time) { c.report(r, at) }
	}
	src := &epollSource{
		ep: ep, rc: rc, report: report, log: log, lazy: lazy,
		done:  make(chan struct{}),
		conns: make(map[uint64]*conn),
	}
	go src.loop()
	return src, nil
}

// The 64-bit registration id lives in the event's Fd and Pad fields (the
// kernel's epoll_data union).
func setEpollID(ev *unix.EpollEvent, id uint64) {
	ev.Fd, ev.Pad = int32(uint32(id)), int32(uint32(id>>32))
}

func epollID(ev *unix.EpollEvent) uint64 {
	return uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
}

func (s *epollSource) name() Source { return SourceEpoll }

func (s *epollSource) watch(c *conn) error {
	if s.lazy {
		c.epollLazy = true
		return nil
	}
	return s.register(c)
}

// arm registers a lazily watched connection, once; it is safe from any
// goroutine, also after unwatch (then it does nothing).
func (s *epollSource) arm(c *conn) {
	if !c.epollLazy || c.epollArmed.Swap(true) {
		return
	}
	if err := s.register(c); err != nil {
		s.log.Debug("connection not watched", "remote", c.nc.RemoteAddr(), "err", err)
	}
}

// longLived arms a connection whose request outlived the watchdog's tick:
// net/http stops reading once a pipelined request arrives.
func (s *epollSource) longLived(c *conn) { s.arm(c) }

func (s *epollSource) register(c *conn) error {
	s.mu.Lock()
	if s.closed || c.epollDone {
		s.mu.Unlock()
		return errors.New("epoll source closed")
	}
	s.nextID++
	id := s.nextID
	s.conns[id] = c
	c.epollID = id
	s.mu.Unlock()
	var cerr error
	err := c.raw.Control(func(fd uintptr) {
		ev := unix.EpollEvent{Events: epollEvents}
		setEpollID(&ev, id)
		// (Through the set's RawConn: close cannot close it meanwhile.)
		if err := s.rc.Control(func(epfd uintptr) {
			cerr = unix.EpollCtl(int(epfd), unix.EPOLL_CTL_ADD, int(fd), &ev)
		}); err != nil {
			cerr = err
		}
	})
	if err == nil {
		err = cerr
	}
	if err != nil {
		s.mu.Lock()
		if s.conns[id] == c {
			delete(s.conns, id)
			c.epollID = 0
		}
		s.mu.Unlock()
		return fmt.Errorf("epoll_ctl: %w", err)
	}
	return nil
}

// unwatch forgets the connection; its registration goes when its file is
// closed, or now if the descriptor is still open (the agent source takes
// it over).
func (s *epollSource) unwatch(c *conn) {
	s.mu.Lock()
	if c.epollLazy {
		c.epollDone = true // a later arm registers nothing
	}
	id := c.epollID
	if s.conns[id] != c {
		s.mu.Unlock()
		return
	}
	delete(s.conns, id)
	c.epollID = 0
	closed := s.closed
	s.mu.Unlock()
	if !closed {
		_ = c.raw.Control(func(fd uintptr) {
			_ = s.rc.Control(func(epfd uintptr) { _ = unix.EpollCtl(int(epfd), unix.EPOLL_CTL_DEL, int(fd), nil) })
		})
	}
}

func (s *epollSource) loop() {
	defer close(s.done)
	events := make([]unix.EpollEvent, 64)
	for {
		var (
			n    int
			werr error
		)
		err := s.rc.Read(func(epfd uintptr) bool {
			n, werr = unix.EpollWait(int(epfd), events, 0)
			return n > 0 || werr != nil
		})
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return
			}
			s.log.Error("waiting for the epoll set", "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if werr == unix.EINTR {
			continue
		}
		if werr != nil {
			s.log.Error("epoll_wait", "err", werr)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		now := time.Now()
		for i := range events[:n] {
			id := epollID(&events[i])
			s.mu.Lock()
			c := s.conns[id]
			s.mu.Unlock()
			if c == nil {
				continue
			}
			r := ReasonNone
			c.control(func(fd int) { r = classify(fd, events[i].Events) })
			if r == ReasonNone && events[i].Events&hungUp != 0 {
				r = ReasonPeerReset // closed meanwhile: no more to learn
			}
			if r != ReasonNone {
				s.report(c, r, now)
			}
		}
	}
}

// close stops the loop. A watch that comes after it began registers
// nothing.
func (s *epollSource) close() error {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	err := s.ep.Close() // wakes the loop's wait
	<-s.done
	s.mu.Lock()
	clear(s.conns)
	s.mu.Unlock()
	return err
}
