package httpx

import (
	"crypto/tls"
	"fmt"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// Stateless helpers that ask a TCP socket about itself. None of them reads
// SO_ERROR: that would consume the socket's pending error, and the handler's
// next read would see EOF instead of the reset.

// tcpConn finds the TCP socket under a connection net/http accepted:
// through TLS (tls.Conn.NetConn) and through any wrapper that has a NetConn
// method, as tls.Conn does.
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

// socketCookie returns the socket's cookie (SO_COOKIE), the key the kernel
// probe and the agent report connections by. It fails for a socket that is
// not TCP (an MPTCP connection, whose events carry its subflows' cookies).
func socketCookie(fd int) (uint64, error) {
	proto, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	if err != nil {
		return 0, fmt.Errorf("getsockopt SO_PROTOCOL: %w", err)
	}
	if proto != unix.IPPROTO_TCP {
		return 0, fmt.Errorf("not a TCP socket (protocol %d)", proto)
	}
	cookie, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("getsockopt SO_COOKIE: %w", err)
	}
	return cookie, nil
}

// pollHangup asks the socket, without waiting, whether the client
// half-closed it (POLLRDHUP) or it died (POLLERR, POLLHUP).
func pollHangup(fd int) (revents int16, ok bool) {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
	n, err := unix.Poll(fds, 0)
	if err != nil {
		return 0, false
	}
	if n == 1 {
		return fds[0].Revents, true
	}
	return 0, true
}

const hungUp = unix.POLLERR | unix.POLLHUP

// classify tells why a socket hung up, from poll's (or epoll's, the flags
// have the same values) revents: a half-close (only RDHUP) or its death
// (ERR or HUP). The kernel's TCP_INFO decides which death: retransmissions
// mean the data timed out, keepalive probes with nothing queued a keepalive
// timeout, zero-window probes (probes with data queued) a timeout of the
// data, as the kernel probe reports it; a hang-up after both sides sent FIN
// is an orderly close, reported as the client's FIN; anything else is a
// reset. It returns ReasonNone when the socket did not hang up.
func classify(fd int, revents uint32) Reason {
	switch {
	case revents&hungUp != 0:
	case revents&unix.POLLRDHUP != 0:
		return ReasonPeerFIN
	default:
		return ReasonNone
	}
	info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return ReasonPeerReset
	}
	switch {
	case info.Retransmits > 0:
		return ReasonTimeout
	case info.Probes > 0:
		if outq, err := unix.IoctlGetInt(fd, unix.SIOCOUTQ); err == nil && outq > 0 {
			return ReasonTimeout
		}
		return ReasonKeepaliveTimeout
	case orderlyClose(info):
		return ReasonPeerFIN
	}
	return ReasonPeerReset
}

// TCP states (include/net/tcp_states.h).
const (
	tcpFinWait2 = 5
	tcpTimeWait = 6
	tcpClose    = 7
	tcpLastAck  = 9
	tcpClosing  = 11
)

// orderlyClose reports whether a socket that hung up ended with a FIN
// exchange rather than a reset: it is in a closing state that only FINs
// lead to, or it is closed and the client acknowledged our FIN (bytes_acked
// counts it, bytes_sent does not), so everything we sent arrived.
func orderlyClose(info *unix.TCPInfo) bool {
	switch info.State {
	case tcpFinWait2, tcpTimeWait, tcpLastAck, tcpClosing:
		return true
	case tcpClose:
		return info.Bytes_acked > info.Bytes_sent-info.Bytes_retrans
	}
	return false
}

// sockInfo is what a socket says about delivery.
type sockInfo struct {
	info *unix.TCPInfo
	outq int // SIOCOUTQ: bytes written and not acknowledged (a FIN counts 1)
}

// inspect reads TCP_INFO and SIOCOUTQ.
func inspect(fd int) (si sockInfo, ok bool) {
	info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return si, false
	}
	outq, err := unix.IoctlGetInt(fd, unix.SIOCOUTQ)
	if err != nil {
		return si, false
	}
	return sockInfo{info: info, outq: outq}, true
}

// delivered reports whether the client acknowledged every data byte written
// (a FIN may still be unacknowledged).
func (si *sockInfo) delivered() bool {
	if si.outq == 0 {
		return true
	}
	i := si.info
	return si.outq == 1 && i.Notsent_bytes == 0 && i.Bytes_acked >= i.Bytes_sent-i.Bytes_retrans
}
