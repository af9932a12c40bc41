package httpx

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// epollSource watches each connection in a private epoll set. It registers
// net/http's own descriptor (inside RawConn.Control, so it cannot be closed
// meanwhile) under a registration id that is never reused, and never
// removes it: the kernel drops the registration when the socket's file is
// closed, and an event whose id is no longer known is ignored. So a
// connection costs one epoll_ctl and no extra descriptor.
type epollSource struct {
	epfd, wakefd int
	report       func(c *conn, r Reason, at time.Time)
	log          *slog.Logger
	done         chan struct{}

	mu     sync.Mutex
	conns  map[uint64]*conn
	nextID uint64
	closed bool // close began: epfd may be closed (and its number reused)
}

// wakeID is the registration id of the eventfd that stops the loop.
const wakeID = 0

const epollEvents = unix.EPOLLRDHUP | unix.EPOLLERR | unix.EPOLLHUP | unix.EPOLLET

// startEpoll starts the loop; report receives what it sees (nil:
// conn.report).
func startEpoll(report func(c *conn, r Reason, at time.Time), log *slog.Logger) (_ *epollSource, err error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	wakefd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN}
	setEpollID(&ev, wakeID)
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wakefd, &ev); err != nil {
		unix.Close(epfd)
		unix.Close(wakefd)
		return nil, fmt.Errorf("epoll_ctl: %w", err)
	}
	if report == nil {
		report = func(c *conn, r Reason, at time.Time) { c.report(r, at) }
	}
	src := &epollSource{
		epfd: epfd, wakefd: wakefd, report: report, log: log,
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
	s.mu.Lock()
	if s.closed {
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
		cerr = unix.EpollCtl(s.epfd, unix.EPOLL_CTL_ADD, int(fd), &ev)
	})
	if err == nil {
		err = cerr
	}
	if err != nil {
		s.mu.Lock()
		delete(s.conns, id)
		c.epollID = 0
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
		_ = c.raw.Control(func(fd uintptr) { _ = unix.EpollCtl(s.epfd, unix.EPOLL_CTL_DEL, int(fd), nil) })
	}
}

func (s *epollSource) loop() {
	defer close(s.done)
	events := make([]unix.EpollEvent, 64)
	for {
		n, err := unix.EpollWait(s.epfd, events, -1)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			s.log.Error("epoll_wait", "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		now := time.Now()
		for i := range events[:n] {
			id := epollID(&events[i])
			if id == wakeID {
				return
			}
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
	var one = [8]byte{1}
	if _, err := unix.Write(s.wakefd, one[:]); err != nil {
		return fmt.Errorf("waking epoll loop: %w", err)
	}
	<-s.done
	s.mu.Lock()
	clear(s.conns)
	s.mu.Unlock()
	return errors.Join(unix.Close(s.epfd), unix.Close(s.wakefd))
}
