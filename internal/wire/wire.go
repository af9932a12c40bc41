// Package wire is the protocol between the host agent (hangupd) and the
// servers that subscribe to it (httpx), spoken over a SOCK_SEQPACKET unix
// socket. A message is a frame: a fixed 8-byte header followed by a payload
// whose layout the frame type decides (only Error frames carry a bounded
// variable-length message). Integers are little-endian. A packet carries
// one frame or, from the agent, several back to back (a batch of events);
// a packet with a file descriptor carries exactly one frame.
//
// The protocol can grow without breaking deployed peers:
//
//   - Versions are a range. Hello carries the client's lowest and highest
//     version; the agent answers with a Welcome written in the version it
//     picked (the header's version byte), or refuses with CodeVersion.
//   - Payloads may grow. Each type has a fixed-layout prefix that never
//     changes; a later version may append fields. Decoders accept a payload
//     longer than the prefix they know and ignore the rest, so an old peer
//     reads a new peer's frames.
//
// A session goes:
//
//	client                          agent
//	Hello            ─────────────>
//	                 <─────────────  Welcome
//	Register + fd    ─────────────>            (the listening socket, SCM_RIGHTS)
//	                 <─────────────  Registered (or Error with the request id)
//	                 <─────────────  Event, Event, Dropped, Event ...
//
// From version 3 a client may instead (or also) send Watch: the agent
// answers Watching and streams the events of every server connection on the
// host to root and to its own user, and to any other user those of the
// listeners that sessions of that user registered (by SO_PEERCRED).
//
// Decode rejects garbage, truncated frames, versions older than MinVersion,
// unknown types and frames that claim a file descriptor without carrying one
// (or carry one they should not) with errors that wrap the sentinels below.
package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
)

// The protocol versions this package speaks. Version 1 (fixed payload
// sizes, one frame per packet, no version range) is not spoken any more: its
// peers are refused with CodeVersion.
const (
	MinVersion = 2
	MaxVersion = 3
)

// WatchVersion is the first protocol version with Watch and Watching.
const WatchVersion = 3

// Version is the newest protocol version this package speaks.
const Version = MaxVersion

// DefaultSocketPath is where hangupd listens unless told otherwise.
const DefaultSocketPath = "/run/hangup/hangup.sock"

// HeaderSize is the size of the frame header.
const HeaderSize = 8

// MaxFrameSize bounds every frame, header included; a frame claiming more
// is an error. It leaves room for payloads to grow.
const MaxFrameSize = 1024

// MaxPacketSize bounds every packet; a receiver reads at most this many
// bytes and treats anything longer as an error. The agent sends a client
// packets of at most the size its Hello asked for (Hello.MaxPacket).
const MaxPacketSize = 16384

// MaxErrorMessage bounds the message of an Error frame.
const MaxErrorMessage = 256

// MaxNameLen bounds the client name sent in Hello.
const MaxNameLen = 32

var magic = [2]byte{'H', 'U'}

// Type is a frame type.
type Type uint8

// Frame types. Client to agent: Hello, Register, StatusRequest, Watch.
// Agent to client: Welcome, Registered, Event, Dropped, Error,
// StatusListener, StatusEnd, Watching.
const (
	TypeHello          Type = 1
	TypeWelcome        Type = 2
	TypeRegister       Type = 3
	TypeRegistered     Type = 4
	TypeEvent          Type = 5
	TypeDropped        Type = 6
	TypeError          Type = 7
	TypeStatusRequest  Type = 8
	TypeStatusListener Type = 9
	TypeStatusEnd      Type = 10
	TypeWatch          Type = 11 // version 3 on
	TypeWatching       Type = 12 // version 3 on
)

var typeNames = map[Type]string{
	TypeHello: "hello", TypeWelcome: "welcome", TypeRegister: "register",
	TypeRegistered: "registered", TypeEvent: "event", TypeDropped: "dropped",
	TypeError: "error", TypeStatusRequest: "status_request",
	TypeStatusListener: "status_listener", TypeStatusEnd: "status_end",
	TypeWatch: "watch", TypeWatching: "watching",
}

func (t Type) String() string {
	if s, ok := typeNames[t]; ok {
		return s
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// Header flags.
const (
	// FlagFD says the frame carries exactly one file descriptor (SCM_RIGHTS).
	FlagFD uint8 = 1 << 0
)

// Sentinel errors that Decode wraps; the agent maps them to Error codes.
var (
	ErrTruncated    = errors.New("wire: truncated frame")
	ErrGarbage      = errors.New("wire: not a hangup frame")
	ErrVersion      = errors.New("wire: unsupported protocol version")
	ErrUnknownType  = errors.New("wire: unknown frame type")
	ErrMissingFD    = errors.New("wire: frame claims a file descriptor but carries none")
	ErrUnexpectedFD = errors.New("wire: frame carries a file descriptor it should not")
	ErrTooLarge     = errors.New("wire: frame too large")
	ErrMalformed    = errors.New("wire: malformed payload")
)

// payloadSizes is the size of each type's fixed-layout prefix, the payload
// this version writes; a longer payload is accepted and its tail ignored.
// Error's prefix is followed by its message (see decodeError).
var payloadSizes = map[Type]int{
	TypeHello:          helloSize,
	TypeWelcome:        welcomeSize,
	TypeRegister:       registerSize,
	TypeRegistered:     registeredSize,
	TypeEvent:          eventSize,
	TypeDropped:        droppedSize,
	TypeStatusRequest:  0,
	TypeError:          errorMinSize,
	TypeStatusListener: statusListenerSize,
	TypeStatusEnd:      statusEndSize,
	TypeWatch:          watchSize,
	TypeWatching:       watchingSize,
}

// fdTypes are the types that must carry a file descriptor.
var fdTypes = map[Type]bool{TypeRegister: true}

var le = binary.LittleEndian

// Frame is one decoded frame: Type says which of the payload fields is set.
type Frame struct {
	Type Type
	// Version is the protocol version the frame is written in (the
	// header's version byte). Append writes MaxVersion when it is zero.
	Version uint8
	// FD reports whether the frame carries a file descriptor (FlagFD).
	FD bool
	// The payload: only the field named by Type is meaningful (none for
	// TypeStatusRequest). Frames are values so that a reader can reuse one
	// without allocating.
	Hello          Hello
	Welcome        Welcome
	Register       Register
	Registered     Registered
	Event          Event
	Dropped        Dropped
	Error          Error
	StatusListener StatusListener
	StatusEnd      StatusEnd
	Watch          Watch
	Watching       Watching
}

// Hello opens a session (client to agent). It is written in the client's
// MinVersion, so that an agent that speaks only that version can read it.
type Hello struct {
	PID  uint32 // informational; the agent trusts SO_PEERCRED instead
	Name string // a short client name for logs and metrics, at most MaxNameLen bytes
	// MinVersion and MaxVersion are the range of protocol versions the
	// client speaks; the agent picks one, or refuses with CodeVersion.
	MinVersion, MaxVersion uint8
	// MaxPacket is the largest packet the client reads: the agent batches
	// events into packets of at most this size. Below HeaderSize+the event
	// payload (e.g. 0) it means one frame per packet.
	MaxPacket uint16
	// Kinds are the event kinds the client wants, bit 1<<kind each (see
	// KindMask); zero means every kind. The agent sends no other events
	// and spends nothing on them.
	Kinds uint32
}

const helloSize = 4 + MaxNameLen + 1 + 1 + 2 + 4

// KindMask is the Hello.Kinds value that asks for the given kinds.
func KindMask(kinds ...uint8) uint32 {
	var m uint32
	for _, k := range kinds {
		if k < 32 {
			m |= 1 << k
		}
	}
	return m
}

// Welcome answers Hello (agent to client) with the agent's limits. It is
// written in the protocol version the agent picked for the session (see
// Frame.Version); every later frame of the session is too.
type Welcome struct {
	AgentPID     uint32
	SubscriberID uint32 // the agent's id for this session, as in its logs and metrics
	MaxListeners uint16 // listeners this session may register
	QueueLen     uint32 // events the agent buffers for this session before dropping
}

const welcomeSize = 4 + 4 + 2 + 4

// Register asks the agent to stream the events of a listening socket whose
// file descriptor travels with the frame (client to agent).
type Register struct {
	Request uint32 // chosen by the client, echoed in Registered or Error
}

const registerSize = 4

// Registered confirms a Register (agent to client).
type Registered struct {
	Request  uint32
	Listener uint32 // the agent's id for the listener; events carry it
	NetNS    uint64 // network namespace cookie (SO_NETNS_COOKIE)
	Addr     netip.AddrPort
}

const registeredSize = 4 + 4 + 8 + addrSize

// Event is one connection event (agent to client). The fields mirror
// bpf.Event; Kind and Cause hold bpf.Kind and bpf.Cause values.
type Event struct {
	Listener    uint32 // the Registered.Listener the connection was accepted on
	Cookie      uint64 // socket cookie: SO_COOKIE of the accepted fd
	NetNS       uint64
	Kind        uint8
	Cause       uint8
	State       uint8
	OldState    uint8
	Errno       int32
	Retransmits uint32
	TimeNs      int64  // wall-clock time, Unix nanoseconds
	MonoNs      uint64 // CLOCK_MONOTONIC nanoseconds
	Local       netip.AddrPort
	Remote      netip.AddrPort
}

const eventSize = 4 + 8 + 8 + 4 + 4 + 4 + 8 + 8 + 2*addrSize

// Dropped tells a client that events were dropped because it read too
// slowly (agent to client). It precedes the next event delivered.
type Dropped struct {
	Count uint64 // dropped since the previous notice
	Total uint64 // dropped over the whole session
}

const droppedSize = 16

// Error codes.
const (
	CodeMalformed    uint16 = 1 // garbage, truncated or oversized frame
	CodeVersion      uint16 = 2 // unsupported protocol version
	CodeUnknownType  uint16 = 3
	CodeMissingFD    uint16 = 4 // Register without a file descriptor
	CodeNotListener  uint16 = 5 // the fd is not a listening TCP socket
	CodeLimit        uint16 = 6 // too many subscribers or listeners
	CodeUnexpected   uint16 = 7 // a frame out of order (e.g. before Hello)
	CodeInternal     uint16 = 8
	CodeUnexpectedFD uint16 = 9 // a file descriptor on a frame that takes none
	CodeShuttingDown uint16 = 10
)

var codeNames = map[uint16]string{
	CodeMalformed: "malformed", CodeVersion: "version", CodeUnknownType: "unknown_type",
	CodeMissingFD: "missing_fd", CodeNotListener: "not_listener", CodeLimit: "limit",
	CodeUnexpected: "unexpected", CodeInternal: "internal", CodeUnexpectedFD: "unexpected_fd",
	CodeShuttingDown: "shutting_down",
}

// Error is an Error frame (agent to client); it is also the error the client
// API returns for it.
type Error struct {
	Code    uint16
	Request uint32 // the Register it answers, 0 if none
	Fatal   bool   // the agent closes the session after sending it
	Message string
}

const errorMinSize = 2 + 4 + 1 + 1 + 2

func (e *Error) Error() string {
	name := codeNames[e.Code]
	if name == "" {
		name = fmt.Sprintf("code %d", e.Code)
	}
	return fmt.Sprintf("hangupd: %s: %s", name, e.Message)
}

// Is makes errors.Is(err, &Error{Code: c}) match by code.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == e.Code && (t.Message == "" || t.Message == e.Message)
}

// StatusListener is one row of a status answer (agent to client): a
// subscriber and one of its listeners (Listener 0 if it has none).
type StatusListener struct {
	Subscriber uint32
	PID        uint32
	UID        uint32
	Name       string
	Listeners  uint16
	Delivered  uint64
	Dropped    uint64
	Queued     uint32
	Listener   uint32
	NetNS      uint64
	Addr       netip.AddrPort
}

const statusListenerSize = 4*3 + MaxNameLen + 2 + 8 + 8 + 4 + 4 + 8 + addrSize

// StatusEnd ends a status answer with the agent's totals.
type StatusEnd struct {
	Subscribers uint32
	Tracked     uint64 // connections in the agent's table
	Events      uint64 // events read from the probe
	Lost        uint64 // events the kernel could not queue (ring buffer full)
	Dropped     uint64 // events dropped for slow subscribers, all sessions
	UptimeSec   uint64
}

const statusEndSize = 4 + 8*5

// Watch asks the agent for the events of connections beyond the session's
// own listeners (client to agent, version 3 on). The agent answers
// Watching, or Error with the request id.
type Watch struct {
	Request uint32 // chosen by the client, echoed in Watching or Error
}

const watchSize = 4

// Watching confirms a Watch (agent to client). From then on the session
// also receives the events it may see: Event.Listener is the listener
// that accepted the connection when one is registered, else 0.
type Watching struct {
	Request uint32
	// All is true when the session sees every server connection on the
	// host (its user is root or the agent's own); false when it sees only
	// the connections of listeners that sessions of its user registered.
	All bool
}

const watchingSize = 4 + 4 // request, all flag, 3 reserved bytes

// An address is 16 bytes (IPv4 as IPv4-mapped IPv6), a port, and a family
// byte plus a pad byte, so that the zero AddrPort survives a round trip.
const addrSize = 16 + 2 + 2

func putAddr(b []byte, ap netip.AddrPort) {
	var fam byte
	a := ap.Addr()
	switch {
	case a.Is4():
		fam = 4
	case a.Is6():
		fam = 6
	}
	a16 := a.As16()
	if !a.IsValid() {
		a16 = [16]byte{}
	}
	copy(b[:16], a16[:])
	le.PutUint16(b[16:], ap.Port())
	b[18] = fam
	b[19] = 0
}

func getAddr(b []byte) (netip.AddrPort, error) {
	port := le.Uint16(b[16:])
	if b[19] != 0 {
		return netip.AddrPort{}, fmt.Errorf("%w: address pad byte %#x", ErrMalformed, b[19])
	}
	switch b[18] {
	case 0:
		if port != 0 || [16]byte(b[:16]) != [16]byte{} {
			return netip.AddrPort{}, fmt.Errorf("%w: address without family", ErrMalformed)
		}
		return netip.AddrPort{}, nil
	case 4:
		a := netip.AddrFrom16([16]byte(b[:16]))
		if !a.Is4In6() {
			return netip.AddrPort{}, fmt.Errorf("%w: IPv4 address not IPv4-mapped", ErrMalformed)
		}
		return netip.AddrPortFrom(a.Unmap(), port), nil
	case 6:
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[:16])), port), nil
	}
	return netip.AddrPort{}, fmt.Errorf("%w: address family %d", ErrMalformed, b[18])
}

func putName(b []byte, s string) {
	n := copy(b[:MaxNameLen], s)
	clear(b[n:MaxNameLen])
}

func getName(b []byte) (string, error) {
	b = b[:MaxNameLen]
	n := 0
	for n < len(b) && b[n] != 0 {
		n++
	}
	for _, c := range b[n:] {
		if c != 0 {
			return "", fmt.Errorf("%w: name not NUL-padded", ErrMalformed)
		}
	}
	for _, c := range b[:n] {
		if c < 0x20 || c > 0x7e {
			return "", fmt.Errorf("%w: name has non-printable byte %#x", ErrMalformed, c)
		}
	}
	return string(b[:n]), nil
}

// Event kinds and close causes, as carried in Event.Kind and Event.Cause.
// They are bpf.Kind and bpf.Cause values, repeated here so that clients
// need not import the probe's package.
const (
	KindOpened     uint8 = 1
	KindPeerFIN    uint8 = 2
	KindPeerReset  uint8 = 3
	KindLocalReset uint8 = 4
	KindError      uint8 = 5
	KindRetransmit uint8 = 6
	KindClosed     uint8 = 7

	CauseNormal           uint8 = 1
	CausePeerReset        uint8 = 2
	CauseLocalReset       uint8 = 3
	CauseTimeout          uint8 = 4
	CauseKeepaliveTimeout uint8 = 5
	CauseProbeTimeout     uint8 = 6
	CauseError            uint8 = 7
)
