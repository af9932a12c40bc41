package httpx

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// epollSource watches each connection in a private epoll set, through a
// duplicate of its file descriptor. The duplicate keeps the socket
// inspectable after net/http closes its own descriptor (which net/http
// does at once on a reset, often before the event could be read), so the
// reason is never lost; it is closed right after, when net/http reports the
// connection closed or hijacked (ConnState), so it delays the socket's
// close by no more than that. Events carry a registration id, not a
// descriptor number.
type epollSource struct {
	epfd, wakefd int
	sink         sink
	log          *slog.Logger
	done         chan struct{}

	// mu guards conns and every use of the duplicates, so that a
	// duplicate is never used after it was closed.
	mu     sync.Mutex
	conns  map[int32]*conn
	nextID int32
	closed bool // close began: epfd may be closed (and its number reused)
}

// wakeID is the registration id of the eventfd that stops the loop.
const wakeID = 0

const epollEvents = unix.EPOLLRDHUP | unix.EPOLLERR | unix.EPOLLHUP | unix.EPOLLET

func startEpoll(s sink, log *slog.Logger) (_ *epollSource, err error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	wakefd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("eventfd: %w", err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: wakeID}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wakefd, &ev); err != nil {
		unix.Close(epfd)
		unix.Close(wakefd)
		return nil, fmt.Errorf("epoll_ctl: %w", err)
	}
	src := &epollSource{
		epfd: epfd, wakefd: wakefd, sink: s, log: log,
		done:  make(chan struct{}),
		conns: make(map[int32]*conn),
	}
	go src.loop()
	return src, nil
}

func (s *epollSource) name() Source { return SourceEpoll }

func (s *epollSource) watch(c *conn) error {
	dup := -1
	var derr error
	if err := c.raw.Control(func(fd uintptr) {
		dup, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return err
	}
	if derr != nil {
		return fmt.Errorf("dup: %w", derr)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		unix.Close(dup)
		return errors.New("epoll source closed")
	}
	s.nextID++
	if s.nextID <= wakeID {
		s.nextID = wakeID + 1
	}
	id := s.nextID
	ev := unix.EpollEvent{Events: epollEvents, Fd: id}
	if err := unix.EpollCtl(s.epfd, unix.EPOLL_CTL_ADD, dup, &ev); err != nil {
		unix.Close(dup)
		return fmt.Errorf("epoll_ctl: %w", err)
	}
	c.epollID, c.dupFD = id, dup
	s.conns[id] = c
	return nil
}

// unwatch is called once net/http closed (or handed over) the connection.
// What the socket says at that moment is reported first: it is the last
// chance to learn why it ended.
func (s *epollSource) unwatch(c *conn) {
	s.mu.Lock()
	if s.conns[c.epollID] != c {
		s.mu.Unlock()
		return
	}
	delete(s.conns, c.epollID)
	fds := []unix.PollFd{{Fd: int32(c.dupFD), Events: unix.POLLRDHUP}}
	var (
		reason Reason
		ok     bool
	)
	if n, err := unix.Poll(fds, 0); err == nil && n == 1 {
		reason, ok = classify(c.dupFD, uint32(fds[0].Revents)), true
	}
	_ = unix.EpollCtl(s.epfd, unix.EPOLL_CTL_DEL, c.dupFD, nil)
	unix.Close(c.dupFD)
	c.dupFD = -1
	s.mu.Unlock()
	if ok {
		s.sink.deliver(c.cookie, event{reason: reason, at: time.Now()})
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
		for _, ev := range events[:n] {
			if ev.Fd == wakeID {
				return
			}
			s.mu.Lock()
			c := s.conns[ev.Fd]
			var reason Reason
			if c != nil {
				reason = classify(c.dupFD, ev.Events)
			}
			s.mu.Unlock()
			if c != nil {
				s.sink.deliver(c.cookie, event{reason: reason, at: time.Now()})
			}
		}
	}
}

// classify tells why a socket is readable-hung-up: a half-close (only
// EPOLLRDHUP) or its death (EPOLLERR or EPOLLHUP). The pending socket error
// says which death exactly, but a reader (net/http's) may have consumed it
// first; then the kernel's retransmission and probe counters decide, and
// without those the TCP state: a hang-up without error after both sides
// sent FIN (ours acknowledged: the socket is CLOSE with every byte, FIN
// included, acknowledged; or still in FIN_WAIT2, CLOSING, LAST_ACK or
// TIME_WAIT) is an orderly close, reported as the client's FIN, not a
// reset. Unanswered zero-window probes are a (retransmission) timeout, as
// with the kernel probe, not a keepalive timeout. EPOLL* and POLL* flags
// have the same values.
func classify(fd int, events uint32) Reason {
	if events&(unix.EPOLLERR|unix.EPOLLHUP) == 0 {
		return ReasonPeerFIN
	}
	soErr, _ := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR)
	info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return deadReason(syscall.Errno(soErr), 0, 0)
	}
	if soErr == 0 && info.Retransmits == 0 && info.Probes == 0 && orderlyClose(info) {
		return ReasonPeerFIN
	}
	if info.Retransmits == 0 && info.Probes > 0 && (soErr == 0 || soErr == int(syscall.ETIMEDOUT)) {
		// Probes with data still queued are zero-window probes, not
		// keepalive probes (which the kernel sends only when nothing is):
		// a timeout of the data, as the kernel probe reports it.
		if outq, err := unix.IoctlGetInt(fd, unix.SIOCOUTQ); err == nil && outq > 0 {
			return ReasonTimeout
		}
	}
	return deadReason(syscall.Errno(soErr), info.Retransmits, info.Probes)
}

// TCP states (include/net/tcp_states.h).
const (
	tcpFinWait2 = 5
	tcpTimeWait = 6
	tcpClose    = 7
	tcpLastAck  = 9
	tcpClosing  = 11
)

// orderlyClose reports whether a socket that hung up without an error
// ended with a FIN exchange rather than a reset: it is in a closing state
// that only FINs lead to, or it is closed and the client acknowledged our
// FIN (bytes_acked counts it, bytes_sent does not), so everything we sent
// arrived.
func orderlyClose(info *unix.TCPInfo) bool {
	switch info.State {
	case tcpFinWait2, tcpTimeWait, tcpLastAck, tcpClosing:
		return true
	case tcpClose:
		return info.Bytes_acked > info.Bytes_sent-info.Bytes_retrans
	}
	return false
}

// deadReason is the pure part of classify.
func deadReason(soErr syscall.Errno, retransmits, probes uint8) Reason {
	switch soErr {
	case syscall.ECONNRESET, syscall.EPIPE:
		return ReasonPeerReset
	case syscall.ETIMEDOUT:
		if probes > 0 && retransmits == 0 {
			return ReasonKeepaliveTimeout
		}
		return ReasonTimeout
	case 0:
		switch {
		case retransmits > 0:
			return ReasonTimeout
		case probes > 0:
			return ReasonKeepaliveTimeout
		}
		return ReasonPeerReset
	}
	return ReasonError
}

// close stops the loop and closes every duplicate. A watch that comes
// after it began registers nothing (and closes its duplicate).
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
	for id, c := range s.conns {
		unix.Close(c.dupFD)
		c.dupFD = -1
		delete(s.conns, id)
	}
	s.mu.Unlock()
	return errors.Join(unix.Close(s.epfd), unix.Close(s.wakefd))
}
