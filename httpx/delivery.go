package httpx

import (
	"context"
	"fmt"
	"time"
)

// WaitDelivered waits until the client has acknowledged, at the TCP level,
// every byte of the response written so far, and returns nil; or returns
// an error wrapping ErrNotDelivered as soon as the connection dies first
// (reset, retransmission or keepalive timeout: the bytes will never
// arrive), and counts the response as undelivered; or ErrDeliveryUnknown
// when it cannot tell; or ctx's error.
//
// Called after Finish, it covers the whole response. Called before, it
// flushes and covers what was written so far (on HTTP/1.x without the
// chunked encoding's last few bytes, which net/http writes when the
// handler returns). While it waits, the connection has the socket options
// that turn a silent drop into an error within Options.DropTimeout, and a
// duplicate descriptor keeps the socket, and its acknowledgement state,
// should net/http close its own (Connection: close, HTTP/1.0; the client
// gets the FIN at once all the same). On HTTP/2 the wait covers every byte
// written on the connection up to the call, other streams' included.
//
// When the connection is dead, that wins over ctx being done: a request
// context cancelled by the abort still gets ErrNotDelivered. Pass a context
// that outlives the request (context.WithoutCancel) to wait longer than it.
//
// It polls the socket (TCP_INFO and SIOCOUTQ), every millisecond at first
// and every 10 ms at most (a client that only reads acknowledges with
// TCP's delayed ACK, some 40 ms late).
func (s *State) WaitDelivered(ctx context.Context) error {
	if s == nil || s.c == nil {
		return fmt.Errorf("%w: connection not tracked", ErrDeliveryUnknown)
	}
	c := s.c
	c.arm() // a death must end the wait at once
	c.busyAdd()
	defer c.busyDone()
	c.mu.Lock()
	c.tune.holds++
	c.keepLocked()
	if c.dead() == ReasonNone {
		c.tuneLocked()
	}
	c.mu.Unlock()
	c.m.drop.wake()
	defer func() {
		c.mu.Lock()
		c.tune.holds--
		c.unkeepLocked()
		c.mu.Unlock()
	}()
	dead := c.deadChan()

	if !s.w.released.Load() {
		s.w.flushForDelivery()
	} else if s.proto == 1 {
		s.waitWritten(ctx, dead)
	}

	if c.dead() != ReasonNone {
		return s.lost()
	}
	si, ok := s.inspect()
	if !ok {
		return s.lost()
	}
	target := si.info.Bytes_acked + uint64(si.outq)
	wait := time.Millisecond
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		if si.info.Bytes_acked >= target || si.delivered() {
			return nil
		}
		t.Reset(wait)
		select {
		case <-ctx.Done():
			if c.dead() != ReasonNone {
				return s.lost()
			}
			return ctx.Err()
		case <-dead:
			// Bytes acknowledged just before the end still count.
			if si, ok = s.inspect(); ok && (si.info.Bytes_acked >= target || si.delivered()) {
				return nil
			}
			return s.lost()
		case <-t.C:
		}
		wait = min(wait*2, 10*time.Millisecond)
		if si, ok = s.inspect(); !ok {
			return s.lost()
		}
		if si.info.State == tcpClose && !si.delivered() {
			// Over with bytes unacknowledged, and no source said so.
			r := ReasonTimeout
			c.control(func(fd int) { r = classify(fd, hungUp) })
			c.report(r, time.Now())
			return s.lost()
		}
	}
}

// waitWritten waits, after the response was handed back to net/http, until
// net/http has written its end: the connection goes idle or closes, or
// (briefly) nothing is left unsent.
func (s *State) waitWritten(ctx context.Context, dead <-chan struct{}) {
	s.mu.Lock()
	hijacked := s.x != nil && s.x.hijacked != nil
	s.mu.Unlock()
	if hijacked {
		return // the inline Finish wrote the end itself
	}
	idle := s.c.idleChan()
	t := time.NewTimer(50 * time.Millisecond)
	defer t.Stop()
	select {
	case <-idle:
	case <-dead:
	case <-ctx.Done():
	case <-t.C:
	}
}

func (s *State) inspect() (sockInfo, bool) {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.c.inspectLocked()
}

// lost returns ErrNotDelivered once the connection is dead (now, or
// reported by the source shortly after the socket could no longer be
// asked), else ErrDeliveryUnknown.
func (s *State) lost() error {
	c := s.c
	if c.dead() == ReasonNone {
		t := time.NewTimer(200 * time.Millisecond)
		select {
		case <-c.deadChan():
		case <-t.C:
		}
		t.Stop()
	}
	r := c.dead()
	if r == ReasonNone {
		return fmt.Errorf("%w: connection closed by the server", ErrDeliveryUnknown)
	}
	s.countUndelivered()
	return fmt.Errorf("%w: %s", ErrNotDelivered, r)
}
