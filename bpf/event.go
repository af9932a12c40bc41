package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"syscall"
	"time"
)

// Kind is what happened to a tracked server socket.
type Kind uint8

// Event kinds, in the order a connection can meet them.
const (
	KindOpened     Kind = 1 // handshake completed on a listener (SYN_RECV -> ESTABLISHED)
	KindPeerFIN    Kind = 2 // the client half-closed (ESTABLISHED -> CLOSE_WAIT)
	KindPeerReset  Kind = 3 // the client sent RST
	KindLocalReset Kind = 4 // this host sent RST (abortive close, keepalive timeout, ...)
	KindError      Kind = 5 // sk_err was set; Event.Err says which
	KindRetransmit Kind = 6 // a segment was retransmitted
	KindClosed     Kind = 7 // the connection reached TCP_CLOSE; Event.Cause says why
	// KindListenerClosed: a listening socket closed. Cookie is the
	// listener's; it is not a connection event and no counter counts it.
	KindListenerClosed Kind = 8
)

var kindNames = [...]string{
	KindOpened:         "opened",
	KindPeerFIN:        "peer_fin",
	KindPeerReset:      "peer_reset",
	KindLocalReset:     "local_reset",
	KindError:          "error",
	KindRetransmit:     "retransmit",
	KindClosed:         "closed",
	KindListenerClosed: "listener_closed",
}

// String returns the kind's snake_case name, as used in metrics and the CLI.
func (k Kind) String() string {
	if int(k) < len(kindNames) && kindNames[k] != "" {
		return kindNames[k]
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// ParseKind is the inverse of Kind.String.
func ParseKind(s string) (Kind, error) {
	for k, name := range kindNames {
		if name != "" && name == s {
			return Kind(k), nil
		}
	}
	return 0, fmt.Errorf("unknown event kind %q", s)
}

// Cause is why a connection closed (Event.Cause of a KindClosed event).
type Cause uint8

// Close causes. The timeouts are told apart as far as the kernel lets us.
const (
	CauseNone             Cause = 0
	CauseNormal           Cause = 1 // orderly close, no error
	CausePeerReset        Cause = 2 // the client sent RST
	CauseLocalReset       Cause = 3 // this host aborted the connection with RST
	CauseTimeout          Cause = 4 // retransmission limit (tcp_retries2) or TCP_USER_TIMEOUT
	CauseKeepaliveTimeout Cause = 5 // keepalive probes went unanswered
	CauseProbeTimeout     Cause = 6 // zero-window probes went unanswered
	CauseError            Cause = 7 // another socket error; Event.Err says which
)

// NumCauses bounds Cause values; per-cause counter arrays have this length.
const NumCauses = 8

var causeNames = [NumCauses]string{
	CauseNone:             "none",
	CauseNormal:           "normal",
	CausePeerReset:        "peer_reset",
	CauseLocalReset:       "local_reset",
	CauseTimeout:          "timeout",
	CauseKeepaliveTimeout: "keepalive_timeout",
	CauseProbeTimeout:     "probe_timeout",
	CauseError:            "error",
}

// String returns the cause's snake_case name, as used in metric labels.
func (c Cause) String() string {
	if int(c) < len(causeNames) {
		return causeNames[c]
	}
	return fmt.Sprintf("cause(%d)", uint8(c))
}

// Causes lists the causes a closed connection can have, for metric labels.
func Causes() []Cause {
	return []Cause{CauseNormal, CausePeerReset, CauseLocalReset, CauseTimeout,
		CauseKeepaliveTimeout, CauseProbeTimeout, CauseError}
}

// TCPState is a kernel TCP state (include/net/tcp_states.h).
type TCPState uint8

var stateNames = [...]string{
	1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
	6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
	11: "CLOSING", 12: "NEW_SYN_RECV",
}

// TCP states that events report.
const (
	StateEstablished TCPState = 1
	StateClose       TCPState = 7
	StateCloseWait   TCPState = 8
)

func (s TCPState) String() string {
	if int(s) < len(stateNames) && stateNames[s] != "" {
		return stateNames[s]
	}
	return fmt.Sprintf("state(%d)", uint8(s))
}

// Event is one decoded probe event.
type Event struct {
	Kind Kind
	// Cookie is the socket cookie: equal to getsockopt(SO_COOKIE) on the
	// accepted file descriptor, and the key that joins events to connections.
	Cookie uint64
	// NetNS is the network namespace cookie: equal to getsockopt(SO_NETNS_COOKIE)
	// on any socket of that namespace.
	NetNS  uint64
	Local  netip.AddrPort // the server side; IPv4-mapped addresses are unmapped
	Remote netip.AddrPort // the client side
	State  TCPState       // TCP state at the event
	// OldState is the state before the transition, for state-change events.
	OldState TCPState
	// Err is the socket error for KindError and KindClosed (0 if none).
	Err syscall.Errno
	// Cause is set on KindClosed events.
	Cause Cause
	// Retransmits is the kernel's total retransmission count for the connection.
	Retransmits uint32
	// ResetReason is the kernel's enum sk_rst_reason for KindLocalReset.
	ResetReason uint16
	// Mono is the kernel timestamp (CLOCK_MONOTONIC) of the event.
	Mono time.Duration
	// Time is Mono converted to wall-clock time.
	Time time.Time
}

// String formats the event on one line, for logs and the CLI.
func (e *Event) String() string {
	s := fmt.Sprintf("%s cookie=%d %s <- %s state=%s", e.Kind, e.Cookie, e.Local, e.Remote, e.State)
	if e.Kind == KindClosed {
		s += " cause=" + e.Cause.String()
	}
	if e.Err != 0 {
		s += fmt.Sprintf(" err=%s", errnoName(e.Err))
	}
	if e.Retransmits > 0 {
		s += fmt.Sprintf(" retrans=%d", e.Retransmits)
	}
	return s
}

func errnoName(e syscall.Errno) string {
	switch e {
	case syscall.ETIMEDOUT:
		return "ETIMEDOUT"
	case syscall.ECONNRESET:
		return "ECONNRESET"
	case syscall.EPIPE:
		return "EPIPE"
	case syscall.ECONNREFUSED:
		return "ECONNREFUSED"
	case syscall.EHOSTUNREACH:
		return "EHOSTUNREACH"
	}
	return fmt.Sprintf("errno %d", int(e))
}

// EventSize is the size in bytes of one raw event record (struct event in probe.c).
const EventSize = 80

// Offsets of struct event's fields; a test checks them against the generated type.
const (
	offTs       = 0
	offCookie   = 8
	offNetns    = 16
	offSaddr    = 24
	offDaddr    = 40
	offSport    = 56
	offDport    = 58
	offFamily   = 60
	offKind     = 62
	offState    = 63
	offErr      = 64
	offRetrans  = 68
	offCause    = 72
	offOldState = 73
	offReason   = 74
)

// ErrShortRecord is returned when a raw record is smaller than EventSize.
var ErrShortRecord = errors.New("bpf: event record too short")

const (
	afInet  = 2
	afInet6 = 10
)

// DecodeEvent decodes one raw record into e. It does not allocate. Time is
// left zero; the probe's reader fills it in.
func DecodeEvent(raw []byte, e *Event) error {
	if len(raw) < EventSize {
		return fmt.Errorf("%w: %d bytes, want %d", ErrShortRecord, len(raw), EventSize)
	}
	ne := binary.NativeEndian
	family := ne.Uint16(raw[offFamily:])
	var local, remote netip.Addr
	switch family {
	case afInet:
		local = netip.AddrFrom4([4]byte(raw[offSaddr : offSaddr+4]))
		remote = netip.AddrFrom4([4]byte(raw[offDaddr : offDaddr+4]))
	case afInet6:
		local = netip.AddrFrom16([16]byte(raw[offSaddr : offSaddr+16])).Unmap()
		remote = netip.AddrFrom16([16]byte(raw[offDaddr : offDaddr+16])).Unmap()
	default:
		return fmt.Errorf("bpf: event with unknown address family %d", family)
	}
	*e = Event{
		Kind:        Kind(raw[offKind]),
		Cookie:      ne.Uint64(raw[offCookie:]),
		NetNS:       ne.Uint64(raw[offNetns:]),
		Local:       netip.AddrPortFrom(local, ne.Uint16(raw[offSport:])),
		Remote:      netip.AddrPortFrom(remote, ne.Uint16(raw[offDport:])),
		State:       TCPState(raw[offState]),
		OldState:    TCPState(raw[offOldState]),
		Err:         syscall.Errno(int32(ne.Uint32(raw[offErr:]))),
		Cause:       Cause(raw[offCause]),
		Retransmits: ne.Uint32(raw[offRetrans:]),
		ResetReason: ne.Uint16(raw[offReason:]),
		Mono:        time.Duration(ne.Uint64(raw[offTs:])),
	}
	return nil
}
