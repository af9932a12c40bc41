package wire

import (
	"fmt"
	"unicode/utf8"
)

// Append encodes f and appends it to b. It fails only for values the
// protocol cannot carry (a name or message too long, an unknown type).
func Append(b []byte, f *Frame) ([]byte, error) {
	var flags uint8
	if fdTypes[f.Type] {
		flags |= FlagFD
	}
	size, fixed := payloadSizes[f.Type]
	if f.Type == TypeError {
		if len(f.Error.Message) > MaxErrorMessage {
			return b, fmt.Errorf("wire: error message of %d bytes exceeds %d", len(f.Error.Message), MaxErrorMessage)
		}
		size, fixed = errorMinSize+len(f.Error.Message), true
	}
	if !fixed {
		return b, fmt.Errorf("%w: %s", ErrUnknownType, f.Type)
	}
	if f.Type == TypeHello && len(f.Hello.Name) > MaxNameLen {
		return b, fmt.Errorf("wire: name of %d bytes exceeds %d", len(f.Hello.Name), MaxNameLen)
	}
	start := len(b)
	b = append(b, make([]byte, HeaderSize+size)...)
	h := b[start:]
	h[0], h[1] = magic[0], magic[1]
	h[2] = Version
	h[3] = uint8(f.Type)
	h[4] = flags
	h[5] = 0
	le.PutUint16(h[6:], uint16(size))
	p := h[HeaderSize:]
	switch f.Type {
	case TypeHello:
		le.PutUint32(p[0:], f.Hello.PID)
		putName(p[4:], f.Hello.Name)
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
	}
	return b, nil
}

// AppendEvent is Append for an Event frame, without the checks it does not
// need and without allocating when b has room.
func AppendEvent(b []byte, e *Event) []byte {
	start := len(b)
	b = append(b, make([]byte, HeaderSize+eventSize)...)
	h := b[start:]
	h[0], h[1], h[2], h[3] = magic[0], magic[1], Version, uint8(TypeEvent)
	h[4], h[5] = 0, 0
	le.PutUint16(h[6:], eventSize)
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

// Decode decodes one frame. nfds is the number of file descriptors that
// arrived with it; a frame whose type needs one (Register) must carry
// exactly one, and others none. Errors wrap ErrTruncated, ErrGarbage,
// ErrVersion, ErrUnknownType, ErrTooLarge, ErrMissingFD, ErrUnexpectedFD or
// ErrMalformed. On ErrMissingFD and ErrUnexpectedFD, f holds the otherwise
// valid frame. Decode does not allocate except for names and messages.
func Decode(b []byte, nfds int, f *Frame) error {
	if len(b) > MaxFrameSize {
		return fmt.Errorf("%w: %d bytes, limit %d", ErrTooLarge, len(b), MaxFrameSize)
	}
	if len(b) < HeaderSize {
		return fmt.Errorf("%w: %d bytes, header needs %d", ErrTruncated, len(b), HeaderSize)
	}
	if b[0] != magic[0] || b[1] != magic[1] {
		return fmt.Errorf("%w: bad magic %#02x%02x", ErrGarbage, b[0], b[1])
	}
	if b[2] != Version {
		return fmt.Errorf("%w: peer speaks version %d, this side %d", ErrVersion, b[2], Version)
	}
	t := Type(b[3])
	flags := b[4]
	if flags&^FlagFD != 0 || b[5] != 0 {
		return fmt.Errorf("%w: unknown flags %#x/%#x", ErrGarbage, flags, b[5])
	}
	size := int(le.Uint16(b[6:]))
	p := b[HeaderSize:]
	if len(p) < size {
		return fmt.Errorf("%w: %s frame says %d payload bytes, has %d", ErrTruncated, t, size, len(p))
	}
	if len(p) > size {
		return fmt.Errorf("%w: %d trailing bytes after %s frame", ErrGarbage, len(p)-size, t)
	}
	want, known := payloadSizes[t]
	if t == TypeError {
		known = true
		want = -1
	}
	if !known {
		return fmt.Errorf("%w: %d", ErrUnknownType, uint8(t))
	}
	if want >= 0 && size != want {
		if size < want {
			return fmt.Errorf("%w: %s payload is %d bytes, want %d", ErrTruncated, t, size, want)
		}
		return fmt.Errorf("%w: %s payload is %d bytes, want %d", ErrMalformed, t, size, want)
	}
	claims := flags&FlagFD != 0
	f.Type = t
	f.FD = claims
	var err error
	switch t {
	case TypeHello:
		f.Hello.PID = le.Uint32(p[0:])
		f.Hello.Name, err = getName(p[4:])
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
	if p[7] != 0 {
		return fmt.Errorf("%w: reserved byte %#x", ErrMalformed, p[7])
	}
	n := int(le.Uint16(p[8:]))
	msg := p[errorMinSize:]
	if n > MaxErrorMessage {
		return fmt.Errorf("%w: error message of %d bytes exceeds %d", ErrMalformed, n, MaxErrorMessage)
	}
	if len(msg) != n {
		if len(msg) < n {
			return fmt.Errorf("%w: error message says %d bytes, has %d", ErrTruncated, n, len(msg))
		}
		return fmt.Errorf("%w: error message says %d bytes, has %d", ErrMalformed, n, len(msg))
	}
	if !utf8.Valid(msg) {
		return fmt.Errorf("%w: error message is not UTF-8", ErrMalformed)
	}
	e.Message = string(msg)
	return nil
}
