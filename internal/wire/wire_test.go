package wire

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"os"
	"reflect"
	"testing"

	"golang.org/x/sys/unix"
)

func sampleFrames() []Frame {
	fs := []Frame{
		{Type: TypeHello, Version: 2, Hello: Hello{PID: 42, Name: "api-server", MinVersion: 2, MaxVersion: 2, MaxPacket: MaxPacketSize, Kinds: KindMask(KindPeerFIN, KindClosed)}},
		{Type: TypeWelcome, Welcome: Welcome{AgentPID: 7, SubscriberID: 3, MaxListeners: 64, QueueLen: 4096}},
		{Type: TypeRegister, FD: true, Register: Register{Request: 9}},
		{Type: TypeRegistered, Registered: Registered{Request: 9, Listener: 12, NetNS: 4096,
			Addr: netip.MustParseAddrPort("10.77.0.1:8080")}},
		{Type: TypeRegistered, Registered: Registered{Request: 1, Listener: 2, NetNS: 1,
			Addr: netip.MustParseAddrPort("[::]:443")}},
		{Type: TypeEvent, Event: Event{Listener: 12, Cookie: 1 << 40, NetNS: 4096, Kind: 7, Cause: 4,
			State: 7, OldState: 1, Errno: 110, Retransmits: 15, TimeNs: 1_700_000_000_000_000_000,
			MonoNs: 123456789, Local: netip.MustParseAddrPort("10.77.0.1:8080"),
			Remote: netip.MustParseAddrPort("[fd77::2]:51000")}},
		{Type: TypeEvent},
		{Type: TypeDropped, Dropped: Dropped{Count: 5, Total: 17}},
		{Type: TypeError, Error: Error{Code: CodeNotListener, Request: 9, Message: "fd 5 is not a listening TCP socket"}},
		{Type: TypeError, Error: Error{Code: CodeVersion, Fatal: true}},
		{Type: TypeStatusRequest},
		{Type: TypeStatusListener, StatusListener: StatusListener{Subscriber: 3, PID: 42, UID: 1000, Name: "api",
			Listeners: 2, Delivered: 100, Dropped: 1, Queued: 4, Listener: 12, NetNS: 4096,
			Addr: netip.MustParseAddrPort("0.0.0.0:80")}},
		{Type: TypeStatusEnd, StatusEnd: StatusEnd{Subscribers: 1, Tracked: 2, Events: 3, Lost: 4, Dropped: 5, UptimeSec: 6}},
		{Type: TypeWatch, Watch: Watch{Request: 77}},
		{Type: TypeWatching, Watching: Watching{Request: 77, All: true}},
		{Type: TypeWatching, Watching: Watching{Request: 78}},
	}
	for i := range fs {
		if fs[i].Version == 0 {
			fs[i].Version = Version
		}
	}
	return fs
}

func fdsFor(f *Frame) int {
	if f.Type == TypeRegister {
		return 1
	}
	return 0
}

func TestRoundTrip(t *testing.T) {
	for _, want := range sampleFrames() {
		t.Run(want.Type.String(), func(t *testing.T) {
			b, err := Append(nil, &want)
			if err != nil {
				t.Fatal(err)
			}
			if len(b) > MaxFrameSize {
				t.Fatalf("%s frame is %d bytes, limit %d", want.Type, len(b), MaxFrameSize)
			}
			var got Frame
			if err := Decode(b, fdsFor(&want), &got); err != nil {
				t.Fatalf("decoding %x: %v", b, err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("round trip:\n got %+v\nwant %+v", got, want)
			}
			// Re-encoding gives the same bytes: the layout is canonical.
			b2, err := Append(nil, &got)
			if err != nil || !bytes.Equal(b, b2) {
				t.Fatalf("re-encoding differs: %v\n%x\n%x", err, b, b2)
			}
		})
	}
}

func TestAppendEventMatchesAppend(t *testing.T) {
	f := sampleFrames()[5]
	a, _ := Append(nil, &f)
	b := AppendEvent(nil, 0, &f.Event)
	if !bytes.Equal(a, b) {
		t.Fatalf("AppendEvent differs:\n%x\n%x", a, b)
	}
	if n := testing.AllocsPerRun(100, func() { b = AppendEvent(b[:0], 0, &f.Event) }); n != 0 {
		t.Errorf("AppendEvent allocates %v times", n)
	}
	var g Frame
	if n := testing.AllocsPerRun(100, func() { _ = Decode(b, 0, &g) }); n != 0 {
		t.Errorf("Decode of an event allocates %v times", n)
	}
}

func encode(t *testing.T, f Frame) []byte {
	t.Helper()
	b, err := Append(nil, &f)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestDecodeErrors(t *testing.T) {
	reg := encode(t, Frame{Type: TypeRegister, Register: Register{Request: 1}})
	hello := encode(t, Frame{Type: TypeHello, Hello: Hello{Name: "x", MinVersion: 2, MaxVersion: 2}})
	errf := encode(t, Frame{Type: TypeError, Error: Error{Code: 1, Message: "hello"}})
	watching := encode(t, Frame{Type: TypeWatching, Watching: Watching{Request: 1, All: true}})
	mod := func(b []byte, fn func([]byte)) []byte {
		c := bytes.Clone(b)
		fn(c)
		return c
	}
	cases := []struct {
		name string
		b    []byte
		nfds int
		want error
	}{
		{"empty", nil, 0, ErrTruncated},
		{"short header", hello[:5], 0, ErrTruncated},
		{"garbage", []byte("GET / HTTP/1.1\r\n\r\n"), 0, ErrGarbage},
		{"version 1", mod(hello, func(b []byte) { b[2] = 1 }), 0, ErrVersion},
		{"version 0", mod(hello, func(b []byte) { b[2] = 0 }), 0, ErrVersion},
		{"hello range upside down", mod(hello, func(b []byte) { b[HeaderSize+4+MaxNameLen] = 3 }), 0, ErrMalformed},
		{"hello range from 0", mod(hello, func(b []byte) { b[HeaderSize+4+MaxNameLen] = 0 }), 0, ErrMalformed},
		{"unknown type", mod(hello, func(b []byte) { b[3] = 200 }), 0, ErrUnknownType},
		{"unknown flag", mod(hello, func(b []byte) { b[4] = 0x80 }), 0, ErrGarbage},
		{"truncated payload", hello[:len(hello)-1], 0, ErrTruncated},
		{"trailing bytes", append(bytes.Clone(hello), 0), 0, ErrGarbage},
		{"length lies short", mod(hello, func(b []byte) { b[6]-- }), 0, ErrGarbage},
		{"payload too short for type", mod(reg, func(b []byte) { b[3] = byte(TypeEvent); b[4] = 0 }), 0, ErrTruncated},
		{"too large", make([]byte, MaxFrameSize+1), 0, ErrTooLarge},
		{"length beyond the frame limit", mod(hello, func(b []byte) { b[6], b[7] = 0xff, 0xff }), 0, ErrTooLarge},
		{"register claims fd, carries none", reg, 0, ErrMissingFD},
		{"register without fd flag", mod(reg, func(b []byte) { b[4] = 0 }), 1, ErrMissingFD},
		{"register with two fds", reg, 2, ErrUnexpectedFD},
		{"hello with fd", hello, 1, ErrUnexpectedFD},
		{"hello claiming fd", mod(hello, func(b []byte) { b[4] = FlagFD }), 1, ErrUnexpectedFD},
		{"name not padded", mod(hello, func(b []byte) { b[HeaderSize+4+10] = 'x' }), 0, ErrMalformed},
		{"name not printable", mod(hello, func(b []byte) { b[HeaderSize+4] = 0x01 }), 0, ErrMalformed},
		{"error message length lies", mod(errf, func(b []byte) { b[HeaderSize+8] = 9 }), 0, ErrTruncated},
		{"watching all flag", mod(watching, func(b []byte) { b[HeaderSize+4] = 2 }), 0, ErrMalformed},
		{"watch with fd", encode(t, Frame{Type: TypeWatch}), 1, ErrUnexpectedFD},
		{"error fatal flag", mod(errf, func(b []byte) { b[HeaderSize+6] = 3 }), 0, ErrMalformed},
		{"error message too short for header", mod(errf[:HeaderSize+4], func(b []byte) { b[6] = 4 }), 0, ErrTruncated},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var f Frame
			err := Decode(c.b, c.nfds, &f)
			if !errors.Is(err, c.want) {
				t.Fatalf("Decode = %v, want %v", err, c.want)
			}
		})
	}
}

func TestBadAddress(t *testing.T) {
	b := encode(t, Frame{Type: TypeRegistered, Registered: Registered{Addr: netip.MustParseAddrPort("1.2.3.4:5")}})
	off := HeaderSize + 16
	for name, fn := range map[string]func([]byte){
		"family":         func(b []byte) { b[off+18] = 5 },
		"v4 not mapped":  func(b []byte) { b[off+10] = 0 },
		"zero with port": func(b []byte) { clear(b[off : off+16]); b[off+18] = 0 },
		"zero with pad":  func(b []byte) { clear(b[off : off+20]); b[off+19] = 1 },
	} {
		c := bytes.Clone(b)
		fn(c)
		var f Frame
		if err := Decode(c, 0, &f); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: Decode = %v, want ErrMalformed", name, err)
		}
	}
}

func TestAppendRejects(t *testing.T) {
	long := string(make([]byte, MaxErrorMessage+1))
	for _, f := range []Frame{
		{Type: 99},
		{Type: TypeHello, Hello: Hello{Name: "this name is far too long for the protocol"}},
		{Type: TypeError, Error: Error{Message: long}},
	} {
		if _, err := Append(nil, &f); err == nil {
			t.Errorf("Append(%+v) succeeded", f.Type)
		}
	}
}

func TestErrorIs(t *testing.T) {
	var err error = &Error{Code: CodeNotListener, Message: "x"}
	if !errors.Is(err, &Error{Code: CodeNotListener}) {
		t.Error("errors.Is by code failed")
	}
	if errors.Is(err, &Error{Code: CodeLimit}) {
		t.Error("errors.Is matched another code")
	}
}

// A newer peer's frames: a higher version, fields appended to the payload
// (and after an error's message). This side reads what it knows and
// ignores the rest.
func TestNewerPeerFrames(t *testing.T) {
	for _, want := range sampleFrames() {
		t.Run(want.Type.String(), func(t *testing.T) {
			b := encode(t, want)
			extra := []byte{0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4}
			b = append(b, extra...)
			b[2] = 9 // a version this side does not know
			le.PutUint16(b[6:], le.Uint16(b[6:])+uint16(len(extra)))
			var got Frame
			if err := Decode(b, fdsFor(&want), &got); err != nil {
				t.Fatalf("decoding a newer peer's %s: %v", want.Type, err)
			}
			want.Version = 9
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("newer peer's frame:\n got %+v\nwant %+v", got, want)
			}
		})
	}
}

// Frames sent as one packet come out of ReadFrame one by one, in order.
func TestBatchPacket(t *testing.T) {
	a, b := socketPair(t)
	frames := sampleFrames()
	var pkt []byte
	var want []Frame
	for _, f := range frames {
		if f.Type == TypeRegister {
			continue // carries a descriptor: never batched
		}
		var err error
		if pkt, err = Append(pkt, &f); err != nil {
			t.Fatal(err)
		}
		want = append(want, f)
	}
	if err := a.TryWritePacket(pkt); err != nil {
		t.Fatal(err)
	}
	if err := a.WritePacket(AppendEvent(nil, 0, &frames[5].Event)); err != nil {
		t.Fatal(err)
	}
	want = append(want, frames[5])
	for i, w := range want {
		var f Frame
		fd, err := b.ReadFrame(&f)
		if err != nil || fd != -1 {
			t.Fatalf("frame %d: fd %d, %v", i, fd, err)
		}
		if !reflect.DeepEqual(f, w) {
			t.Fatalf("frame %d:\n got %+v\nwant %+v", i, f, w)
		}
	}
	// A bad frame inside a batch is an error; the rest of that packet is
	// dropped and the connection stays usable.
	bad := append(encode(t, frames[7]), "garbage!"...)
	bad = append(bad, encode(t, frames[7])...)
	if err := a.WritePacket(bad); err != nil {
		t.Fatal(err)
	}
	a.WritePacket(encode(t, frames[6]))
	var f Frame
	if _, err := b.ReadFrame(&f); err != nil || f.Type != TypeDropped {
		t.Fatalf("first frame of the bad batch: %s %v", f.Type, err)
	}
	if _, err := b.ReadFrame(&f); !errors.Is(err, ErrGarbage) {
		t.Fatalf("garbage in a batch: %v", err)
	}
	if _, err := b.ReadFrame(&f); err != nil || f.Type != TypeEvent {
		t.Fatalf("after the bad batch: %s %v", f.Type, err)
	}
}

func socketPair(t *testing.T) (*Conn, *Conn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *Conn {
		f := os.NewFile(uintptr(fd), "seqpacket")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return NewConn(c.(*net.UnixConn))
	}
	return conn(fds[0]), conn(fds[1])
}

// FuzzDecode checks that Decode never panics, and that whatever it accepts
// re-encodes to a frame that decodes to the same value (a longer payload
// loses only the tail this version does not know).
func FuzzDecode(f *testing.F) {
	for _, fr := range sampleFrames() {
		b, err := Append(nil, &fr)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, uint8(fdsFor(&fr)))
		f.Add(b[:len(b)/2], uint8(0))
		// As a newer peer would send it.
		longer := append(bytes.Clone(b), 0, 0, 0, 0)
		longer[2] = 7
		le.PutUint16(longer[6:], le.Uint16(longer[6:])+4)
		f.Add(longer, uint8(fdsFor(&fr)))
	}
	f.Add([]byte("HU\x02\x05\x00\x00\xff\xff"), uint8(0))
	f.Add([]byte("HU\x01\x01\x00\x00\x00\x00"), uint8(0))
	f.Add([]byte{}, uint8(1))
	f.Fuzz(func(t *testing.T, b []byte, nfds uint8) {
		var fr Frame
		if err := Decode(b, int(nfds%3), &fr); err != nil {
			return
		}
		out, err := Append(nil, &fr)
		if err != nil {
			t.Fatalf("decoded frame does not re-encode: %v (%+v)", err, fr)
		}
		var again Frame
		if err := Decode(out, int(nfds%3), &again); err != nil {
			t.Fatalf("re-encoded frame does not decode: %v\n in %x\nout %x", err, b, out)
		}
		if !reflect.DeepEqual(again, fr) {
			t.Fatalf("re-encoding changed the frame:\n%+v\n%+v", fr, again)
		}
		if len(out) > len(b) {
			t.Fatalf("re-encoding grew the frame: in %x out %x", b, out)
		}
	})
}
