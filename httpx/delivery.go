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
// handler returns). While it waits, the connection keeps the socket
// options that turn a silent drop into an error within Options.DropTimeout.
// On HTTP/2 the wait covers every byte written on the connection up to the
// call, other streams' included.
//
// When the connection is dead, that wins over ctx being done: a request
// context cancelled by the abort still gets ErrNotDelivered. Pass a context
// that outlives the request (context.WithoutCancel) to wait longer than it.
//
// It polls the socket (TCP_INFO and SIOCOUTQ), every millisecond at first
// and every 50 ms at most. When net/http closes the connection after the
// response (Connection: close, HTTP/1.0), a duplicate descriptor held for
// the wait keeps the socket, and its acknowledgement state, until the wait
// ends (the client gets the FIN at once all the same). Without a wait, a
// response is drained the same way (see Options.DropTimeout): it is
// counted undelivered if the connection dies before the client
// acknowledged it.
func (s *State) WaitDelivered(ctx context.Context) error {
	c := s.c
	if c == nil {
		return fmt.Errorf("%w: connection not tracked", ErrDeliveryUnknown)
	}
	c.hold()
	defer c.release()
	// A duplicate descriptor keeps the socket askable after net/http
	// closes its own (Connection: close, HTTP/1.0): the socket lingers
	// with its acknowledgement state until the wait ends.
	c.keep()
	defer c.unkeep()

	s.mu.Lock()
	released, seq := s.released, s.releaseSeq
	s.mu.Unlock()
	if !released {
		s.w.flushForDelivery()
	} else if s.proto == 1 {
		// Wait until net/http has written the end of the response: the
		// connection goes idle, or net/http closes it after the response.
	wait:
		for {
			c.mu.Lock()
			cur, next := c.idleSeq, c.idleCh
			c.mu.Unlock()
			if cur > seq {
				break
			}
			select {
			case <-next:
			case <-c.closedCh:
				break wait
			case <-c.deadCh:
				return s.lost(ctx)
			case <-ctx.Done():
				return s.ctxDone(ctx)
			}
		}
	}

	if c.isDead() {
		return s.lost(ctx)
	}
	si, ok := c.inspect()
	if !ok {
		// net/http closed the socket before the wait could keep it; the
		// drain that kept it after the response may have seen the end.
		if err, known := c.verdict(s); known {
			if err != nil {
				s.countUndelivered()
			}
			return err
		}
		return s.lost(ctx)
	}
	target := si.info.Bytes_acked + uint64(si.outq)
	wait := time.Millisecond
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		switch {
		case si.info.Bytes_acked >= target, si.hungUp && si.delivered():
			return nil
		case si.hungUp:
			// Only the kept duplicate is left, and the connection is over
			// with bytes unacknowledged.
			c.report(event{reason: si.reason, at: time.Now()})
			return s.lost(ctx)
		}
		t.Reset(wait)
		select {
		case <-ctx.Done():
			return s.ctxDone(ctx)
		case <-c.deadCh:
			// Bytes acknowledged just before the end still count.
			if si, ok = c.inspect(); ok && si.info.Bytes_acked >= target {
				return nil
			}
			return s.lost(ctx)
		case <-t.C:
		}
		wait = min(wait*2, 50*time.Millisecond)
		if si, ok = c.inspect(); !ok {
			return s.lost(ctx)
		}
	}
}

// ctxDone returns ctx's error, unless the connection is dead.
func (s *State) ctxDone(ctx context.Context) error {
	if s.c.isDead() {
		return s.lost(context.Background())
	}
	return ctx.Err()
}

// lost decides between ErrNotDelivered and ErrDeliveryUnknown once the
// socket can no longer be asked: a dead connection (now, or reported by the
// source shortly after net/http closed it) lost the bytes.
func (s *State) lost(ctx context.Context) error {
	c := s.c
	t := time.NewTimer(200 * time.Millisecond)
	defer t.Stop()
	select {
	case <-c.deadCh:
	case <-t.C:
	case <-ctx.Done():
		return ctx.Err()
	}
	c.mu.Lock()
	dead := c.dead
	c.mu.Unlock()
	if dead == ReasonNone {
		return fmt.Errorf("%w: connection closed by the server", ErrDeliveryUnknown)
	}
	s.countUndelivered()
	return fmt.Errorf("%w: %s", ErrNotDelivered, dead)
}
