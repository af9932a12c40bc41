package wire

import (
	"fmt"
	"unicode/utf8"
)

// Append encodes f and appends it to b, in f.Version (MaxVersion if zero).
// It fails only for values the protocol cannot carry (a name or message too
// long, an unknown type). Frames appended one after another form a batch
// that can travel as one packet.
func Append(b []byte, f *Frame) ([]byte, error) {
	var flags uint8
	if fdTypes[f.Type] {
		flags |= FlagFD
	}
	size, known := payloadSizes[f.Type]
	if !known {
		return b, fmt.Errorf("%w: %s", ErrUnknownType, f.Type)
	}
	if f.Type == TypeError {
		if len(f.Error.Message) > MaxErrorMessage {
			return b, fmt.Errorf("wire: error message of %d bytes exceeds %d", len(f.Error.Message), MaxErrorMessage)
		}
		size += len(f.Error.Message)
	}
	if f.Type == TypeHello && len(f.Hello.Name) > MaxNameLen {
		return b, fmt.Errorf("wire: name of %d bytes exceeds %d", len(f.Hello.Name), MaxNameLen)
	}
	start := len(b)
	b = append(b, make([]byte, HeaderSize+size)...)
	h := b[start:]
	putHeader(h, f.Version, f.Type, flags, size)
	p := h[HeaderSize:]
	switch f.Type {
	case TypeHello:
		hl := &f.Hello
		le.PutUint32(p[0:], hl.PID)
		putName(p[4:], hl.Name)
		o := 4 + MaxNameLen
		p[o], p[o+1] = hl.MinVersion, hl.MaxVersion
		le.PutUint16(p[o+2:], hl.MaxPacket)
		le.PutUint32(p[o+4:], hl.Kinds)
	case TypeWelcome:
		w := &f.Welcome
		le.PutUint32(p[0:], w.AgentPID)
		le.PutUint32(p[4:], w.SubscriberID)
		le.PutUint16(p[8:], w.MaxListeners)
		le.PutUint32(p[10:], w.QueueLen)
	case TypeRegister:
		le.PutUint32(p[0:], f.Register.Request)
	case TypeRegistered:
		r := &f.Registered
		le.PutUint32(p[0:], r.Request)
		le.PutUint32(p[4:], r.Listener)
		le.PutUint64(p[8:], r.NetNS)
		putAddr(p[16:], r.Addr)
	case TypeEvent:
		putEvent(p, &f.Event)
	case TypeDropped:
		le.PutUint64(p[0:], f.Dropped.Count)
		le.PutUint64(p[8:], f.Dropped.Total)
	case TypeError:
		e := &f.Error
		le.PutUint16(p[0:], e.Code)
		le.PutUint32(p[2:], e.Request)
		if e.Fatal {
			p[6] = 1
		}
		p[7] = 0
		le.PutUint16(p[8:], uint16(len(e.Message)))
		copy(p[errorMinSize:], e.Message)
	case TypeStatusRequest:
	case TypeStatusListener:
		s := &f.StatusListener
		le.PutUint32(p[0:], s.Subscriber)
		le.PutUint32(p[4:], s.PID)
		le.PutUint32(p[8:], s.UID)
		putName(p[12:], s.Name)
		o := 12 + MaxNameLen
		le.PutUint16(p[o:], s.Listeners)
		le.PutUint64(p[o+2:], s.Delivered)
		le.PutUint64(p[o+10:], s.Dropped)
		le.PutUint32(p[o+18:], s.Queued)
		le.PutUint32(p[o+22:], s.Listener)
		le.PutUint64(p[o+26:], s.NetNS)
		putAddr(p[o+34:], s.Addr)
	case TypeStatusEnd:
		s := &f.StatusEnd
		le.PutUint32(p[0:], s.Subscribers)
		le.PutUint64(p[4:], s.Tracked)
		le.PutUint64(p[12:], s.Events)
		le.PutUint64(p[20:], s.Lost)
		le.PutUint64(p[28:], s.Dropped)
		le.PutUint64(p[36:], s.UptimeSec)
	case TypeWatch:
		le.PutUint32(p[0:], f.Watch.Request)
	case TypeWatching:
		le.PutUint32(p[0:], f.Watching.Request)
		if f.Watching.All {
			p[4] = 1
		}
	}
	return b, nil
}

func putHeader(h []byte, version uint8, t Type, flags uint8, size int) {
	if version == 0 {
		version = MaxVersion
	}
	h[0], h[1], h[2], h[3] = magic[0], magic[1], version, uint8(t)
	h[4], h[5] = flags, 0
	le.PutUint16(h[6:], uint16(size))
}

// EventFrameSize is the size of an Event frame as this version writes it.
const EventFrameSize = HeaderSize + eventSize

// AppendEvent is Append for an Event frame in version v (MaxVersion if
// zero), without the checks it does not need and without allocating when b
// has room.
func AppendEvent(b []byte, v uint8, e *Event) []byte {
	start := len(b)
	b = append(b, make([]byte, EventFrameSize)...)
	h := b[start:]
	putHeader(h, v, TypeEvent, 0, eventSize)
	putEvent(h[HeaderSize:], e)
	return b
}

func putEvent(p []byte, e *Event) {
	le.PutUint32(p[0:], e.Listener)
	le.PutUint64(p[4:], e.Cookie)
	le.PutUint64(p[12:], e.NetNS)
	p[20], p[21], p[22], p[23] = e.Kind, e.Cause, e.State, e.OldState
	le.PutUint32(p[24:], uint32(e.Errno))
	le.PutUint32(p[28:], e.Retransmits)
	le.PutUint64(p[32:], uint64(e.TimeNs))
	le.PutUint64(p[40:], e.MonoNs)
	putAddr(p[48:], e.Local)
	putAddr(p[48+addrSize:], e.Remote)
}

// FrameLen checks the header at the start of b (a packet of one or more
// frames) and returns the size of its first frame, header included. Errors
// wrap ErrTruncated, ErrGarbage, ErrVersion or ErrTooLarge.
func FrameLen(b []byte) (int, error) {
	if len(b) < HeaderSize {
		return 0, fmt.Errorf("%w: %d bytes, header needs %d", ErrTruncated, len(b), HeaderSize)
	}
	if b[0] != magic[0] || b[1] != magic[1] {
		return 0, fmt.Errorf("%w: bad magic %#02x%02x", ErrGarbage, b[0], b[1])
	}
	if b[2] < MinVersion {
		return 0, fmt.Errorf("%w: frame of version %d, this side speaks %d to %d", ErrVersion, b[2], MinVersion, MaxVersion)
	}
	n := HeaderSize + int(le.Uint16(b[6:]))
	if n > MaxFrameSize {
		return 0, fmt.Errorf("%w: frame of %d bytes, limit %d", ErrTooLarge, n, MaxFrameSize)
	}
	if len(b) < n {
		return 0, fmt.Errorf("%w: %s frame says %d payload bytes, has %d", ErrTruncated, Type(b[3]), n-HeaderSize, len(b)-HeaderSize)
	}
	return n, nil
}

// Decode decodes the one frame that b holds. nfds is the number of file
// descriptors that arrived with it; a frame whose type needs one (Register)
// must carry exactly one, and others none. A payload longer than the
// layout this version knows is accepted and its tail ignored (a newer peer
// added fields). Errors wrap ErrTruncated, ErrGarbage, ErrVersion,
// ErrUnknownType, ErrTooLarge, ErrMissingFD, ErrUnexpectedFD or
// ErrMalformed. On ErrVersion, f.Version holds the frame's version; on
// ErrMissingFD and ErrUnexpectedFD, f holds the otherwise valid frame.
// Decode does not allocate except for names and messages.
func Decode(b []byte, nfds int, f *Frame) error {
	if len(b) > MaxFrameSize {
		return fmt.Errorf("%w: %d bytes, limit %d", ErrTooLarge, len(b), MaxFrameSize)
	}
	if len(b) >= HeaderSize && b[0] == magic[0] && b[1] == magic[1] {
		f.Version = b[2]
	}
	n, err := FrameLen(b)
	if err != nil {
		return err
	}
	if len(b) > n {
		return fmt.Errorf("%w: %d trailing bytes after %s frame", ErrGarbage, len(b)-n, Type(b[3]))
	}
	t := Type(b[3])
	flags := b[4]
	if flags&^FlagFD != 0 || b[5] != 0 {
		return fmt.Errorf("%w: unknown flags %#x/%#x", ErrGarbage, flags, b[5])
	}
	p := b[HeaderSize:n]
	want, known := payloadSizes[t]
	if !known {
		return fmt.Errorf("%w: %d", ErrUnknownType, uint8(t))
	}
	if len(p) < want {
		return fmt.Errorf("%w: %s payload is %d bytes, needs at least %d", ErrTruncated, t, len(p), want)
	}
	claims := flags&FlagFD != 0
	f.Type = t
	f.FD = claims
	switch t {
	case TypeHello:
		h := &f.Hello
		h.PID = le.Uint32(p[0:])
		h.Name, err = getName(p[4:])
		o := 4 + MaxNameLen
		h.MinVersion, h.MaxVersion = p[o], p[o+1]
		h.MaxPacket = le.Uint16(p[o+2:])
		h.Kinds = le.Uint32(p[o+4:])
		if err == nil && (h.MinVersion == 0 || h.MinVersion > h.MaxVersion) {
			err = fmt.Errorf("%w: version range %d to %d", ErrMalformed, h.MinVersion, h.MaxVersion)
		}
	case TypeWelcome:
		f.Welcome = Welcome{
			AgentPID:     le.Uint32(p[0:]),
			SubscriberID: le.Uint32(p[4:]),
			MaxListeners: le.Uint16(p[8:]),
			QueueLen:     le.Uint32(p[10:]),
		}
	case TypeRegister:
		f.Register.Request = le.Uint32(p[0:])
	case TypeRegistered:
		r := &f.Registered
		r.Request = le.Uint32(p[0:])
		r.Listener = le.Uint32(p[4:])
		r.NetNS = le.Uint64(p[8:])
		r.Addr, err = getAddr(p[16:])
	case TypeEvent:
		err = getEvent(p, &f.Event)
	case TypeDropped:
		f.Dropped.Count = le.Uint64(p[0:])
		f.Dropped.Total = le.Uint64(p[8:])
	case TypeError:
		err = decodeError(p, &f.Error)
	case TypeStatusRequest:
	case TypeStatusListener:
		s := &f.StatusListener
		s.Subscriber = le.Uint32(p[0:])
		s.PID = le.Uint32(p[4:])
		s.UID = le.Uint32(p[8:])
		if s.Name, err = getName(p[12:]); err != nil {
			break
		}
		o := 12 + MaxNameLen
		s.Listeners = le.Uint16(p[o:])
		s.Delivered = le.Uint64(p[o+2:])
		s.Dropped = le.Uint64(p[o+10:])
		s.Queued = le.Uint32(p[o+18:])
		s.Listener = le.Uint32(p[o+22:])
		s.NetNS = le.Uint64(p[o+26:])
		s.Addr, err = getAddr(p[o+34:])
	case TypeStatusEnd:
		f.StatusEnd = StatusEnd{
			Subscribers: le.Uint32(p[0:]),
			Tracked:     le.Uint64(p[4:]),
			Events:      le.Uint64(p[12:]),
			Lost:        le.Uint64(p[20:]),
			Dropped:     le.Uint64(p[28:]),
			UptimeSec:   le.Uint64(p[36:]),
		}
	case TypeWatch:
		f.Watch.Request = le.Uint32(p[0:])
	case TypeWatching:
		f.Watching.Request = le.Uint32(p[0:])
		// p[5:8] are reserved: written as zero, ignored when read.
		switch p[4] {
		case 0, 1:
			f.Watching.All = p[4] == 1
		default:
			err = fmt.Errorf("%w: all flag %d", ErrMalformed, p[4])
		}
	}
	if err != nil {
		return fmt.Errorf("decoding %s frame: %w", t, err)
	}
	// Descriptors last, so that f holds the frame (e.g. the Register's
	// request id, for the answer) when they do not match.
	switch {
	case fdTypes[t] && !claims:
		return fmt.Errorf("%w: %s frame without the fd flag", ErrMissingFD, t)
	case !fdTypes[t] && claims:
		return fmt.Errorf("%w: %s frame with the fd flag", ErrUnexpectedFD, t)
	case claims && nfds == 0:
		return fmt.Errorf("%w: %s", ErrMissingFD, t)
	case claims && nfds > 1:
		return fmt.Errorf("%w: %s carries %d descriptors, takes one", ErrUnexpectedFD, t, nfds)
	case !claims && nfds > 0:
		return fmt.Errorf("%w: %s carries %d descriptors", ErrUnexpectedFD, t, nfds)
	}
	return nil
}

func getEvent(p []byte, e *Event) error {
	e.Listener = le.Uint32(p[0:])
	e.Cookie = le.Uint64(p[4:])
	e.NetNS = le.Uint64(p[12:])
	e.Kind, e.Cause, e.State, e.OldState = p[20], p[21], p[22], p[23]
	e.Errno = int32(le.Uint32(p[24:]))
	e.Retransmits = le.Uint32(p[28:])
	e.TimeNs = int64(le.Uint64(p[32:]))
	e.MonoNs = le.Uint64(p[40:])
	var err error
	if e.Local, err = getAddr(p[48:]); err != nil {
		return err
	}
	e.Remote, err = getAddr(p[48+addrSize:])
	return err
}

func decodeError(p []byte, e *Error) error {
	if len(p) < errorMinSize {
		return fmt.Errorf("%w: error payload is %d bytes, needs at least %d", ErrTruncated, len(p), errorMinSize)
	}
	e.Code = le.Uint16(p[0:])
	e.Request = le.Uint32(p[2:])
	switch p[6] {
	case 0:
		e.Fatal = false
	case 1:
		e.Fatal = true
	default:
		return fmt.Errorf("%w: fatal flag %d", ErrMalformed, p[6])
	}
	// p[7] is reserved: written as zero, ignored when read.
	n := int(le.Uint16(p[8:]))
	msg := p[errorMinSize:]
	if n > MaxErrorMessage {
		return fmt.Errorf("%w: error message of %d bytes exceeds %d", ErrMalformed, n, MaxErrorMessage)
	}
	if len(msg) < n {
		return fmt.Errorf("%w: error message says %d bytes, has %d", ErrTruncated, n, len(msg))
	}
	// Bytes after the message are fields of a newer version.
	msg = msg[:n]
	if !utf8.Valid(msg) {
		return fmt.Errorf("%w: error message is not UTF-8", ErrMalformed)
	}
	e.Message = string(msg)
	return nil
}
