//go:build linux

package bpf

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"syscall"
	"testing"
	"unsafe"
)

// The decoder's offsets must match struct event as compiled into the object.
func TestEventLayout(t *testing.T) {
	var e probeEvent
	if got := unsafe.Sizeof(e); got != EventSize {
		t.Fatalf("struct event is %d bytes, EventSize is %d", got, EventSize)
	}
	for _, f := range []struct {
		name      string
		got, want uintptr
	}{
		{"ts_ns", unsafe.Offsetof(e.TsNs), offTs},
		{"cookie", unsafe.Offsetof(e.Cookie), offCookie},
		{"netns_cookie", unsafe.Offsetof(e.NetnsCookie), offNetns},
		{"saddr", unsafe.Offsetof(e.Saddr), offSaddr},
		{"daddr", unsafe.Offsetof(e.Daddr), offDaddr},
		{"sport", unsafe.Offsetof(e.Sport), offSport},
		{"dport", unsafe.Offsetof(e.Dport), offDport},
		{"family", unsafe.Offsetof(e.Family), offFamily},
		{"kind", unsafe.Offsetof(e.Kind), offKind},
		{"state", unsafe.Offsetof(e.State), offState},
		{"err", unsafe.Offsetof(e.Err), offErr},
		{"retrans", unsafe.Offsetof(e.Retrans), offRetrans},
		{"cause", unsafe.Offsetof(e.Cause), offCause},
		{"old_state", unsafe.Offsetof(e.OldState), offOldState},
		{"reason", unsafe.Offsetof(e.Reason), offReason},
	} {
		if f.got != f.want {
			t.Errorf("field %s at offset %d, decoder reads %d", f.name, f.got, f.want)
		}
	}
}

// The Go constants must equal the C enums (bpf2go generates the C values).
func TestEnumsMatchC(t *testing.T) {
	kinds := map[Kind]probeKind{
		KindOpened: probeKindKIND_OPENED, KindPeerFIN: probeKindKIND_PEER_FIN,
		KindPeerReset: probeKindKIND_PEER_RESET, KindLocalReset: probeKindKIND_LOCAL_RESET,
		KindError: probeKindKIND_ERROR, KindRetransmit: probeKindKIND_RETRANSMIT,
		KindClosed: probeKindKIND_CLOSED, KindListenerClosed: probeKindKIND_LISTENER_CLOSED,
	}
	for g, c := range kinds {
		if uint32(g) != uint32(c) {
			t.Errorf("Kind %s = %d, C has %d", g, g, c)
		}
	}
	causes := map[Cause]probeCause{
		CauseNone: probeCauseCAUSE_NONE, CauseNormal: probeCauseCAUSE_NORMAL,
		CausePeerReset: probeCauseCAUSE_PEER_RESET, CauseLocalReset: probeCauseCAUSE_LOCAL_RESET,
		CauseTimeout: probeCauseCAUSE_TIMEOUT, CauseKeepaliveTimeout: probeCauseCAUSE_KEEPALIVE_TIMEOUT,
		CauseProbeTimeout: probeCauseCAUSE_PROBE_TIMEOUT, CauseError: probeCauseCAUSE_ERROR,
	}
	for g, c := range causes {
		if uint32(g) != uint32(c) {
			t.Errorf("Cause %s = %d, C has %d", g, g, c)
		}
	}
	if NumCauses != int(probeCauseCAUSE_MAX) {
		t.Errorf("NumCauses %d, C CAUSE_MAX %d", NumCauses, probeCauseCAUSE_MAX)
	}
	if len(Causes()) != NumCauses-1 {
		t.Errorf("Causes() lists %d causes, want %d", len(Causes()), NumCauses-1)
	}
	for k := range kinds {
		if back, err := ParseKind(k.String()); err != nil || back != k {
			t.Errorf("ParseKind(%q) = %v, %v", k.String(), back, err)
		}
	}
	if _, err := ParseKind("bogus"); err == nil {
		t.Error("ParseKind accepted an unknown kind")
	}
}

func rawEvent(family uint16, local, remote netip.Addr) []byte {
	raw := make([]byte, EventSize)
	ne := binary.NativeEndian
	ne.PutUint64(raw[offTs:], 123456789)
	ne.PutUint64(raw[offCookie:], 42)
	ne.PutUint64(raw[offNetns:], 7)
	if family == afInet {
		l, r := local.As4(), remote.As4()
		copy(raw[offSaddr:], l[:])
		copy(raw[offDaddr:], r[:])
	} else {
		l, r := local.As16(), remote.As16()
		copy(raw[offSaddr:], l[:])
		copy(raw[offDaddr:], r[:])
	}
	ne.PutUint16(raw[offSport:], 8080)
	ne.PutUint16(raw[offDport:], 50000)
	ne.PutUint16(raw[offFamily:], family)
	raw[offKind] = byte(KindClosed)
	raw[offState] = byte(StateClose)
	ne.PutUint32(raw[offErr:], uint32(syscall.ETIMEDOUT))
	ne.PutUint32(raw[offRetrans:], 6)
	raw[offCause] = byte(CauseTimeout)
	raw[offOldState] = byte(StateEstablished)
	ne.PutUint16(raw[offReason:], 15)
	return raw
}

func TestDecodeEvent(t *testing.T) {
	for _, tc := range []struct {
		family        uint16
		local, remote string
		wantLocal     string
	}{
		{afInet, "10.0.0.1", "10.0.0.2", "10.0.0.1:8080"},
		{afInet6, "fd00::1", "fd00::2", "[fd00::1]:8080"},
		// A dual-stack listener's IPv4 client: the addresses are unmapped.
		{afInet6, "::ffff:10.0.0.1", "::ffff:10.0.0.2", "10.0.0.1:8080"},
	} {
		var e Event
		raw := rawEvent(tc.family, netip.MustParseAddr(tc.local), netip.MustParseAddr(tc.remote))
		if err := DecodeEvent(raw, &e); err != nil {
			t.Fatal(err)
		}
		if e.Local.String() != tc.wantLocal || e.Remote.Port() != 50000 {
			t.Errorf("%s: local %s remote %s", tc.local, e.Local, e.Remote)
		}
		if e.Kind != KindClosed || e.Cookie != 42 || e.NetNS != 7 || e.Cause != CauseTimeout ||
			e.Err != syscall.ETIMEDOUT || e.Retransmits != 6 || e.State != StateClose ||
			e.OldState != StateEstablished || e.ResetReason != 15 || e.Mono != 123456789 {
			t.Errorf("decoded %+v", e)
		}
	}
}

func TestDecodeEventRejectsGarbage(t *testing.T) {
	var e Event
	if err := DecodeEvent(make([]byte, EventSize-1), &e); !errors.Is(err, ErrShortRecord) {
		t.Errorf("short record: %v", err)
	}
	raw := rawEvent(afInet, netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2"))
	binary.NativeEndian.PutUint16(raw[offFamily:], 99)
	if err := DecodeEvent(raw, &e); err == nil {
		t.Error("unknown address family accepted")
	}
}

func TestStringsAreStable(t *testing.T) {
	if Kind(99).String() != "kind(99)" || Cause(99).String() != "cause(99)" || TCPState(99).String() != "state(99)" {
		t.Error("unknown values must format with their number")
	}
	e := Event{Kind: KindClosed, Cause: CauseKeepaliveTimeout, Err: syscall.ETIMEDOUT}
	if got := e.String(); got == "" {
		t.Error("empty String")
	}
}

func BenchmarkDecodeEvent(b *testing.B) {
	raws := map[string][]byte{
		"ipv4": rawEvent(afInet, netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")),
		"ipv6": rawEvent(afInet6, netip.MustParseAddr("fd00::1"), netip.MustParseAddr("fd00::2")),
	}
	for name, raw := range raws {
		b.Run(name, func(b *testing.B) {
			var e Event
			b.ReportAllocs()
			b.SetBytes(EventSize)
			for b.Loop() {
				if err := DecodeEvent(raw, &e); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	// Baseline in the same run: copying the record, the least any decoder does.
	b.Run("baseline-copy", func(b *testing.B) {
		raw := raws["ipv6"]
		var dst [EventSize]byte
		b.ReportAllocs()
		b.SetBytes(EventSize)
		for b.Loop() {
			copy(dst[:], raw)
		}
	})
}
