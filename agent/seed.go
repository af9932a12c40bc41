package agent

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// TCP states as sock_diag reports them (include/net/tcp_states.h).
const (
	tcpEstablished = 1
	tcpSynSent     = 2
	tcpSynRecv     = 3
	tcpTimeWait    = 6
	tcpClose       = 7
	tcpListen      = 10
	tcpNewSynRecv  = 12
)

// diagSocket is the part of a sock_diag answer seeding needs; the split
// from the netlink call keeps the selection testable without privileges.
type diagSocket struct {
	state  uint8
	local  netip.AddrPort
	cookie uint64
}

// serverConns picks, from one namespace's TCP sockets, the established
// server-side connections: those whose local address and port belong to a
// listening socket. If port is not zero, only that port's.
func serverConns(socks []diagSocket, port uint16) []diagSocket {
	type lkey struct {
		addr netip.Addr
		port uint16
	}
	listening := make(map[lkey]bool)
	for _, s := range socks {
		if s.state == tcpListen {
			listening[lkey{s.local.Addr(), s.local.Port()}] = true
		}
	}
	var out []diagSocket
	for _, s := range socks {
		switch s.state {
		case tcpListen, tcpSynSent, tcpSynRecv, tcpNewSynRecv, tcpTimeWait, tcpClose:
			continue
		}
		p := s.local.Port()
		if port != 0 && p != port {
			continue
		}
		a := s.local.Addr()
		wild := netip.IPv4Unspecified()
		if a.Is6() {
			wild = netip.IPv6Unspecified()
		}
		if listening[lkey{a, p}] || listening[lkey{wild, p}] ||
			(a.Is4() && listening[lkey{netip.IPv6Unspecified(), p}]) {
			out = append(out, s)
		}
	}
	return out
}

// dumpTCP lists the TCP sockets of the namespace h lives in.
func dumpTCP(h *netlink.Handle) ([]diagSocket, error) {
	var out []diagSocket
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		socks, err := h.SocketDiagTCP(fam)
		if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
			return nil, fmt.Errorf("sock_diag dump (family %d): %w", fam, err)
		}
		for _, s := range socks {
			ip, ok := netip.AddrFromSlice(s.ID.Source)
			if !ok {
				continue
			}
			out = append(out, diagSocket{
				state:  s.State,
				local:  netip.AddrPortFrom(ip.Unmap(), s.ID.SourcePort),
				cookie: uint64(s.ID.Cookie[0]) | uint64(s.ID.Cookie[1])<<32,
			})
		}
	}
	return out, nil
}

// seed tracks the server connections of one namespace (all ports, or one)
// in the probe and the table, and returns how many it added. A second dump
// afterwards untracks those that closed in between, which the probe cannot
// notice for a connection it did not see open.
func (a *Agent) seed(h *netlink.Handle, netnsCookie uint64, port uint16) (int, error) {
	socks, err := dumpTCP(h)
	if err != nil {
		return 0, err
	}
	var added []uint64
	for _, s := range serverConns(socks, port) {
		k := connKey{netns: netnsCookie, port: s.local.Port()}
		if !a.table.add(s.cookie, k) {
			continue // already tracked: the probe saw it open
		}
		if err := a.src.Track(s.cookie, s.local.Port()); err != nil {
			a.table.remove(s.cookie)
			return len(added), err
		}
		added = append(added, s.cookie)
	}
	if len(added) == 0 {
		return 0, nil
	}
	after, err := dumpTCP(h)
	if err != nil {
		return len(added), nil // keep them; at worst a stale entry each
	}
	alive := make(map[uint64]bool, len(after))
	for _, s := range after {
		alive[s.cookie] = true
	}
	n := 0
	for _, c := range added {
		if alive[c] {
			n++
			continue
		}
		a.src.Untrack(c)
		a.table.remove(c)
	}
	a.seeded.Add(uint64(n))
	return n, nil
}

// seedListener seeds the connections of a registered listener's port in the
// listener's namespace, which may not be the agent's (containers, test
// namespaces). Reaching another namespace needs CAP_NET_ADMIN there
// (SIOCGSKNS) and CAP_SYS_ADMIN (setns).
func (a *Agent) seedListener(fd int, info listenerInfo) (int, error) {
	own, err := currentNetNSCookie()
	if err != nil {
		return 0, err
	}
	var h *netlink.Handle
	if own == info.netns {
		h, err = netlink.NewHandle(unix.NETLINK_INET_DIAG)
	} else {
		nsfd, ierr := unix.IoctlRetInt(fd, unix.SIOCGSKNS)
		if ierr != nil {
			return 0, fmt.Errorf("finding the listener's network namespace (SIOCGSKNS needs CAP_NET_ADMIN): %w", ierr)
		}
		defer unix.Close(nsfd)
		h, err = netlink.NewHandleAt(netns.NsHandle(nsfd), unix.NETLINK_INET_DIAG)
		if err != nil {
			err = fmt.Errorf("entering the listener's network namespace (setns needs CAP_SYS_ADMIN): %w", err)
		}
	}
	if err != nil {
		return 0, fmt.Errorf("opening sock_diag: %w", err)
	}
	defer h.Close()
	return a.seed(h, info.netns, info.addr.Port())
}

func currentNetNSCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("network namespace cookie: %w", err)
	}
	defer unix.Close(fd)
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("network namespace cookie: %w", err)
	}
	return c, nil
}
