package wire

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// maxFDs is how many descriptors a read makes room for; a frame never takes
// more than one, so more than this is reported as ErrUnexpectedFD (the
// kernel discards the ones that did not fit).
const maxFDs = 4

// ErrWouldBlock is what TryWritePacket returns when the socket's buffer is
// full.
var ErrWouldBlock = errors.New("wire: the socket's send buffer is full")

// Conn reads and writes frames on a SOCK_SEQPACKET unix connection. A packet
// holds one frame or a batch of frames (see WritePacket); ReadFrame returns
// them one at a time. One goroutine may read while others write; writes are
// serialized.
type Conn struct {
	uc   *net.UnixConn
	rc   syscall.RawConn
	rbuf []byte
	oob  []byte
	rest []byte // frames of the last packet not yet returned
	one  bool   // a packet must hold one frame (see OneFramePerPacket)

	wmu     sync.Mutex
	wbuf    []byte
	version uint8 // what WriteFrame writes frames without a Version in
	// TryWritePacket's argument and result, so that its callback is made
	// once, not per call.
	try    []byte
	tryErr error
	tryFn  func(fd uintptr) bool
}

// NewConn wraps uc, which must be a "unixpacket" connection.
func NewConn(uc *net.UnixConn) *Conn {
	rc, _ := uc.SyscallConn() // fails only for a nil conn, which then fails every call
	c := &Conn{
		uc:   uc,
		rc:   rc,
		oob:  make([]byte, unix.CmsgSpace(maxFDs*4)),
		wbuf: make([]byte, 0, MaxFrameSize),
	}
	c.tryFn = c.trySend
	return c
}

func (c *Conn) trySend(fd uintptr) bool {
	for {
		c.tryErr = unix.Sendmsg(int(fd), c.try, nil, nil, unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL)
		if c.tryErr != unix.EINTR {
			return true
		}
	}
}

// OneFramePerPacket makes ReadFrame refuse packets of more than one frame
// (ErrGarbage) or of more than MaxFrameSize bytes (ErrTooLarge): what the
// agent expects of clients, which never batch. Call it before reading.
func (c *Conn) OneFramePerPacket() { c.one = true }

// UnixConn returns the underlying connection.
func (c *Conn) UnixConn() *net.UnixConn { return c.uc }

// ReadFrame reads and decodes the next frame into f: the next of the last
// packet's batch, or the first of a new packet. If the frame carries a file
// descriptor, it is returned and the caller owns it; otherwise fd is -1.
// Descriptors that arrive with an invalid frame are closed. At the end of
// the stream it returns io.EOF; decoding errors wrap the package's
// sentinels, and the connection stays usable after them (the rest of a
// packet with a bad frame is discarded).
func (c *Conn) ReadFrame(f *Frame) (fd int, err error) {
	if len(c.rest) > 0 {
		b := c.rest
		c.rest = nil
		n, err := FrameLen(b)
		if err != nil {
			return -1, err
		}
		if err := Decode(b[:n], 0, f); err != nil {
			return -1, err
		}
		c.rest = b[n:]
		return -1, nil
	}
	if c.rbuf == nil {
		// One byte more than the largest packet, to tell one too large.
		size := MaxPacketSize
		if c.one {
			size = MaxFrameSize
		}
		c.rbuf = make([]byte, size+1)
	}
	n, oobn, flags, _, err := c.uc.ReadMsgUnix(c.rbuf, c.oob)
	if err != nil {
		return -1, err
	}
	fds, perr := parseRights(c.oob[:oobn])
	closeAll := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	switch {
	case n == 0 && oobn == 0:
		return -1, io.EOF
	case perr != nil:
		closeAll()
		return -1, fmt.Errorf("%w: control message: %w", ErrMalformed, perr)
	case flags&unix.MSG_TRUNC != 0 || n >= len(c.rbuf):
		closeAll()
		return -1, fmt.Errorf("%w: a packet of more than %d bytes", ErrTooLarge, len(c.rbuf)-1)
	case flags&unix.MSG_CTRUNC != 0:
		closeAll()
		return -1, fmt.Errorf("%w: more than %d descriptors", ErrUnexpectedFD, maxFDs)
	}
	b := c.rbuf[:n]
	size, err := FrameLen(b)
	switch {
	case c.one && n > MaxFrameSize:
		err = fmt.Errorf("%w: a packet of %d bytes, limit %d", ErrTooLarge, n, MaxFrameSize)
	case err != nil:
	case c.one && size < n:
		err = fmt.Errorf("%w: %d bytes after the packet's frame", ErrGarbage, n-size)
	case size < n && len(fds) > 0:
		err = fmt.Errorf("%w: descriptors with a batch of frames", ErrUnexpectedFD)
	}
	if err == nil {
		err = Decode(b[:size], len(fds), f)
	} else if len(b) >= HeaderSize && b[0] == magic[0] && b[1] == magic[1] {
		f.Version = b[2] // for an answer to an unsupported version
	}
	if err != nil {
		closeAll()
		return -1, err
	}
	c.rest = b[size:]
	if len(fds) == 1 {
		return fds[0], nil
	}
	return -1, nil
}

func parseRights(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var fds []int
	var errs []error
	for i := range msgs {
		if msgs[i].Header.Level != unix.SOL_SOCKET || msgs[i].Header.Type != unix.SCM_RIGHTS {
			errs = append(errs, fmt.Errorf("unexpected control message level %d type %d", msgs[i].Header.Level, msgs[i].Header.Type))
			continue
		}
		got, err := unix.ParseUnixRights(&msgs[i])
		if err != nil {
			errs = append(errs, err)
			continue
		}
		fds = append(fds, got...)
	}
	if len(errs) > 0 {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return nil, errors.Join(errs...)
	}
	return fds, nil
}

// SetVersion sets the protocol version WriteFrame writes a frame in when
// the frame names none (the session's, once Welcome picked it). Zero means
// MaxVersion.
func (c *Conn) SetVersion(v uint8) {
	c.wmu.Lock()
	c.version = v
	c.wmu.Unlock()
}

// WriteFrame encodes f and sends it, with fd attached when fd >= 0.
func (c *Conn) WriteFrame(f *Frame, fd int) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if f.Version == 0 && c.version != 0 {
		g := *f
		g.Version = c.version
		f = &g
	}
	b, err := Append(c.wbuf[:0], f)
	if err != nil {
		return err
	}
	c.wbuf = b[:0]
	return c.write(b, fd)
}

// WritePacket sends b, one or more encoded frames (see Append), as one
// packet, waiting while the socket's buffer is full (until the write
// deadline, if one is set). b must not be longer than the peer reads
// (Hello.MaxPacket); the frames must carry no descriptor.
func (c *Conn) WritePacket(b []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.write(b, -1)
}

// TryWritePacket is WritePacket without waiting: when the socket's buffer
// is full it sends nothing and returns ErrWouldBlock. It takes no deadline
// and no timer, only the send itself.
func (c *Conn) TryWritePacket(b []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.try = b
	err := c.rc.Write(c.tryFn)
	serr := c.tryErr
	c.try, c.tryErr = nil, nil
	if err != nil {
		return err
	}
	if serr == unix.EAGAIN {
		return ErrWouldBlock
	}
	if serr != nil {
		return &net.OpError{Op: "write", Net: "unixpacket", Err: os.NewSyscallError("sendmsg", serr)}
	}
	return nil
}

// WriteRaw sends b as one packet, as it is. It exists for tests of the
// receiving side's handling of bad input.
func (c *Conn) WriteRaw(b []byte, fds ...int) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	_, _, err := c.uc.WriteMsgUnix(b, oob, nil)
	return err
}

func (c *Conn) write(b []byte, fd int) error {
	var oob []byte
	if fd >= 0 {
		oob = unix.UnixRights(fd)
	}
	_, _, err := c.uc.WriteMsgUnix(b, oob, nil)
	return err
}

// Close closes the connection; a blocked ReadFrame returns an error.
func (c *Conn) Close() error { return c.uc.Close() }
