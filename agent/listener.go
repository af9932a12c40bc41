package agent

import (
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"
)

// errNotListener is what inspectListener wraps when the descriptor is not a
// listening TCP socket.
var errNotListener = errors.New("not a listening TCP socket")

// listenerInfo is what the agent learns from a subscriber's listening fd.
type listenerInfo struct {
	cookie uint64 // SO_COOKIE: the probe reports it when the listener closes
	netns  uint64
	addr   netip.AddrPort // unmapped
	v6only bool           // an IPv6 wildcard that does not accept IPv4
	// mptcp: an MPTCP socket, whose listening TCP subflow (what sock_diag
	// and the probe see) has a cookie of its own.
	mptcp bool
}

// inspectListener checks that fd is a listening TCP socket and returns its
// address, port and network namespace.
func inspectListener(fd int) (listenerInfo, error) {
	var li listenerInfo
	domain, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	if errors.Is(err, unix.ENOTSOCK) {
		return li, fmt.Errorf("%w: the descriptor is not a socket", errNotListener)
	}
	if err != nil {
		return li, fmt.Errorf("%w: SO_DOMAIN: %w", errNotListener, err)
	}
	if domain != unix.AF_INET && domain != unix.AF_INET6 {
		return li, fmt.Errorf("%w: address family %d, want AF_INET or AF_INET6", errNotListener, domain)
	}
	proto, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	if err != nil {
		return li, fmt.Errorf("%w: SO_PROTOCOL: %w", errNotListener, err)
	}
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return li, fmt.Errorf("%w: SO_TYPE: %w", errNotListener, err)
	}
	// Go (1.24 on) listens with MPTCP where the kernel has it; clients
	// without MPTCP are accepted as plain TCP connections, which the probe
	// sees like any other.
	if (proto != unix.IPPROTO_TCP && proto != unix.IPPROTO_MPTCP) || typ != unix.SOCK_STREAM {
		return li, fmt.Errorf("%w: protocol %d type %d, want a TCP (or MPTCP) stream", errNotListener, proto, typ)
	}
	li.mptcp = proto == unix.IPPROTO_MPTCP
	acc, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
	if err != nil {
		return li, fmt.Errorf("%w: SO_ACCEPTCONN: %w", errNotListener, err)
	}
	if acc != 1 {
		return li, fmt.Errorf("%w: the TCP socket is not listening (listen was not called, or it is a connection)", errNotListener)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return li, fmt.Errorf("getsockname: %w", err)
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		li.addr = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		li.addr = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(sa.Port))
		v6only, err := unix.GetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY)
		if err != nil {
			return li, fmt.Errorf("IPV6_V6ONLY: %w", err)
		}
		li.v6only = v6only == 1
	default:
		return li, fmt.Errorf("%w: unexpected socket address %T", errNotListener, sa)
	}
	li.netns, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return li, fmt.Errorf("SO_NETNS_COOKIE: %w", err)
	}
	li.cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		return li, fmt.Errorf("SO_COOKIE: %w", err)
	}
	return li, nil
}

// matches reports whether a connection with local address a was accepted
// on a listener bound to li.addr.
func (li *listenerInfo) matches(a netip.Addr) bool {
	la := li.addr.Addr()
	if !la.IsUnspecified() {
		return la == a
	}
	if la.Is4() {
		return a.Is4()
	}
	return !li.v6only || a.Is6()
}

// stillListening reports whether the socket is (still) listening: a
// shutdown or close since inspectListener turns it false.
func stillListening(fd int) bool {
	acc, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
	return err == nil && acc == 1
}
