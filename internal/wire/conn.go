package wire

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"

	"golang.org/x/sys/unix"
)

// maxFDs is how many descriptors a read makes room for; a frame never takes
// more than one, so more than this is reported as ErrUnexpectedFD (the
// kernel discards the ones that did not fit).
const maxFDs = 4

// Conn reads and writes frames on a SOCK_SEQPACKET unix connection, one
// frame per packet. One goroutine may read while others write; writes are
// serialized.
type Conn struct {
	uc   *net.UnixConn
	rbuf []byte
	oob  []byte

	wmu  sync.Mutex
	wbuf []byte
}

// NewConn wraps uc, which must be a "unixpacket" connection.
func NewConn(uc *net.UnixConn) *Conn {
	return &Conn{
		uc:   uc,
		rbuf: make([]byte, MaxFrameSize+1),
		oob:  make([]byte, unix.CmsgSpace(maxFDs*4)),
		wbuf: make([]byte, 0, MaxFrameSize),
	}
}

// UnixConn returns the underlying connection.
func (c *Conn) UnixConn() *net.UnixConn { return c.uc }

// ReadFrame reads and decodes the next frame into f. If the frame carries a
// file descriptor, it is returned and the caller owns it; otherwise fd is
// -1. Descriptors that arrive with an invalid frame are closed. At the end
// of the stream it returns io.EOF; decoding errors wrap the package's
// sentinels, and the connection stays usable after them.
func (c *Conn) ReadFrame(f *Frame) (fd int, err error) {
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
	case flags&unix.MSG_TRUNC != 0 || n > MaxFrameSize:
		closeAll()
		return -1, fmt.Errorf("%w: more than %d bytes", ErrTooLarge, MaxFrameSize)
	case flags&unix.MSG_CTRUNC != 0:
		closeAll()
		return -1, fmt.Errorf("%w: more than %d descriptors", ErrUnexpectedFD, maxFDs)
	}
	if err := Decode(c.rbuf[:n], len(fds), f); err != nil {
		closeAll()
		return -1, err
	}
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

// WriteFrame encodes f and sends it, with fd attached when fd >= 0.
func (c *Conn) WriteFrame(f *Frame, fd int) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	b, err := Append(c.wbuf[:0], f)
	if err != nil {
		return err
	}
	c.wbuf = b[:0]
	return c.write(b, fd)
}

// WriteEvent sends one Event frame without allocating.
func (c *Conn) WriteEvent(e *Event) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	b := AppendEvent(c.wbuf[:0], e)
	return c.write(b, -1)
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
