package agent

import (
	"context"
	"encoding/binary"
	"net"
	"testing"
	"time"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/wire"
)

// Peers of other protocol versions against this agent: a newer client
// (a wider range, a longer Hello, frames with fields this side does not
// know) is served in the version both speak; a client of version 1 (no
// range) and one that speaks only versions the agent does not are refused
// with CodeVersion, in a frame they can read.
func TestProtocolVersions(t *testing.T) {
	src := newFakeSource()
	a := startAgent(t, Config{Source: src, NoSeed: true})

	t.Run("newer client", func(t *testing.T) {
		r := dialRaw(t, a)
		h := rawHello("newer")
		h.MaxVersion = 9
		b, err := wire.Append(nil, &wire.Frame{Type: wire.TypeHello, Hello: h})
		if err != nil {
			t.Fatal(err)
		}
		b = growPayload(b, 9, 12) // fields of version 9, unknown here
		r.conn.WriteRaw(b)
		f := r.next()
		if f.Type != wire.TypeWelcome || f.Version != wire.MaxVersion {
			t.Fatalf("got %s in version %d, want welcome in version %d", f.Type, f.Version, wire.MaxVersion)
		}
		// A Register with extra payload, as a newer client sends it.
		ln := hostListener(t)
		reg, _ := wire.Append(nil, &wire.Frame{Type: wire.TypeRegister, Register: wire.Register{Request: 5}})
		r.conn.WriteRaw(growPayload(reg, wire.MaxVersion, 8), listenerFD(t, ln))
		if f := r.next(); f.Type != wire.TypeRegistered || f.Registered.Request != 5 {
			t.Fatalf("got %s %+v, want registered", f.Type, f)
		}
		src.ch <- hostEvent(t, ln, 77, bpf.KindPeerReset)
		if f := r.next(); f.Type != wire.TypeEvent || f.Event.Cookie != 77 {
			t.Fatalf("got %s %+v, want the event", f.Type, f)
		}
	})
	t.Run("version 1 client", func(t *testing.T) {
		r := dialRaw(t, a)
		// Version 1's Hello: a 36-byte payload, no range.
		b := make([]byte, wire.HeaderSize+4+wire.MaxNameLen)
		copy(b, "HU\x01\x01\x00\x00")
		binary.LittleEndian.PutUint16(b[6:], uint16(len(b)-wire.HeaderSize))
		copy(b[wire.HeaderSize+4:], "old")
		r.conn.WriteRaw(b)
		// Version 1 could read an Error frame of version 1 only.
		r.conn.UnixConn().SetReadDeadline(time.Now().Add(10 * time.Second))
		pkt := make([]byte, wire.MaxPacketSize)
		n, err := r.conn.UnixConn().Read(pkt)
		if err != nil {
			t.Fatal(err)
		}
		pkt = pkt[:n]
		if n < wire.HeaderSize+10 || pkt[2] != 1 || wire.Type(pkt[3]) != wire.TypeError ||
			binary.LittleEndian.Uint16(pkt[wire.HeaderSize:]) != wire.CodeVersion {
			t.Fatalf("answer to a version 1 hello: %x", pkt)
		}
		if size := int(binary.LittleEndian.Uint16(pkt[6:])); size != n-wire.HeaderSize ||
			size != 10+int(binary.LittleEndian.Uint16(pkt[wire.HeaderSize+8:])) {
			t.Fatalf("error frame not in version 1's exact layout: %x", pkt)
		}
	})
	t.Run("only newer versions", func(t *testing.T) {
		r := dialRaw(t, a)
		h := rawHello("future")
		h.MinVersion, h.MaxVersion = wire.MaxVersion+1, wire.MaxVersion+3
		r.send(wire.Frame{Type: wire.TypeHello, Version: wire.MaxVersion + 1, Hello: h}, -1)
		r.expectError(wire.CodeVersion, true)
	})
	t.Run("client of this version", func(t *testing.T) {
		c, _ := subscribe(t, a, "current")
		if c.Version() != wire.MaxVersion {
			t.Errorf("session version %d, want %d", c.Version(), wire.MaxVersion)
		}
		if _, err := c.Register(context.Background(), hostListener(t).(*net.TCPListener)); err != nil {
			t.Fatal(err)
		}
	})
}

// growPayload makes b, one frame, a frame of version v with extra payload
// bytes appended, as a newer peer would write it.
func growPayload(b []byte, v uint8, extra int) []byte {
	b = append(b, make([]byte, extra)...)
	for i := len(b) - extra; i < len(b); i++ {
		b[i] = 0xa5
	}
	b[2] = v
	binary.LittleEndian.PutUint16(b[6:], uint16(len(b)-wire.HeaderSize))
	return b
}

// A client that asks for some event kinds gets those only.
func TestKindFilter(t *testing.T) {
	src := newFakeSource()
	a := startAgent(t, Config{Source: src, NoSeed: true})
	ln := hostListener(t)
	log := newEventLog()
	ctx := context.Background()
	c, err := wire.Dial(ctx, a.SocketPath(), wire.ClientConfig{Name: "filtered", OnEvent: log.add,
		Kinds: wire.KindMask(wire.KindPeerReset, wire.KindClosed)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Register(ctx, ln.(*net.TCPListener)); err != nil {
		t.Fatal(err)
	}
	for _, k := range []bpf.Kind{bpf.KindOpened, bpf.KindRetransmit, bpf.KindPeerFIN, bpf.KindPeerReset, bpf.KindClosed} {
		src.ch <- hostEvent(t, ln, 1, k)
	}
	src.ch <- hostEvent(t, ln, 2, bpf.KindPeerReset) // a marker: the rest came before it
	log.wait(t, "marker", cookieKind(2, bpf.KindPeerReset))
	var got []bpf.Kind
	for _, e := range log.all() {
		if e.Cookie == 1 {
			got = append(got, bpf.Kind(e.Kind))
		}
	}
	if len(got) != 2 || got[0] != bpf.KindPeerReset || got[1] != bpf.KindClosed {
		t.Errorf("filtered subscriber got %v, want [peer_reset closed]", got)
	}
}
