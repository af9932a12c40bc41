package agent

import (
	"errors"
	"os"
	"time"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/internal/wire"
)

// flushDelay bounds how long a routine event (opened, retransmission,
// normal close) may wait in a subscriber's queue for more to share its
// packet. Events that say a client is gone are written at once.
const flushDelay = 2 * time.Millisecond

// maxCtrl bounds the replies waiting for a subscriber's socket; a session
// whose peer does not read them stops reading its requests.
const maxCtrl = 16

// urgent reports whether e says a client is gone, or may be: such events
// are written to subscribers at once, the others may wait for a batch.
func urgent(e *bpf.Event) bool {
	switch e.Kind {
	case bpf.KindOpened, bpf.KindRetransmit:
		return false
	case bpf.KindClosed:
		return e.Cause != bpf.CauseNormal
	}
	return true
}

// eventQueue is a FIFO of events that grows with use, up to a limit, and
// gives its memory back when it drains after a burst.
type eventQueue struct {
	buf  []wire.Event
	head int
	n    int
}

// keepCap is the capacity an empty queue keeps; a larger one is freed.
const keepCap = 256

func (q *eventQueue) len() int { return q.n }

// push appends e and reports false, appending nothing, at the limit.
func (q *eventQueue) push(e *wire.Event, limit int) bool {
	if q.n >= limit {
		return false
	}
	if q.n == len(q.buf) {
		size := min(max(2*len(q.buf), 16), limit)
		buf := make([]wire.Event, size)
		for i := range q.n {
			buf[i] = q.buf[(q.head+i)%len(q.buf)]
		}
		q.buf, q.head = buf, 0
	}
	q.buf[(q.head+q.n)%len(q.buf)] = *e
	q.n++
	return true
}

func (q *eventQueue) at(i int) *wire.Event { return &q.buf[(q.head+i)%len(q.buf)] }

// pop removes the first k events.
func (q *eventQueue) pop(k int) {
	q.head = (q.head + k) % max(len(q.buf), 1)
	q.n -= k
	if q.n == 0 {
		q.head = 0
		if len(q.buf) > keepCap {
			q.buf = nil
		}
	}
}

// outbox is what waits for a subscriber's socket: replies, then the drop
// notice, then events, written in packets of several frames. Whoever holds
// mu may write without waiting (the pipeline, for urgent events, so that
// they reach the subscriber with no goroutine in between); only the writer
// goroutine waits for a full socket, and it sets busy meanwhile so that the
// pipeline never waits for it.
type outbox struct {
	events   eventQueue
	ctrl     []ctrlMsg
	urgent   bool   // events holds one that must not wait for a batch
	armed    bool   // the flush timer runs for the routine events queued
	busy     bool   // the writer goroutine owns the socket
	reported uint64 // drops the peer has been told of
	pkt      []byte // the packet being built, by whoever writes
	version  uint8  // the session's protocol version
	maxPkt   int    // the largest packet the peer reads

	wake  chan struct{} // cap 1: work for the writer
	space chan struct{} // cap 1: ctrl has room again
	timer *time.Timer   // fires flushDelay after a routine event was queued
}

// ctrlMsg is a reply for the writer; after a fatal one it stops.
type ctrlMsg struct {
	f     wire.Frame
	fatal bool
}

func newOutbox() outbox {
	t := time.NewTimer(time.Hour)
	t.Stop()
	return outbox{wake: make(chan struct{}, 1), space: make(chan struct{}, 1), timer: t, maxPkt: wire.EventFrameSize}
}

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// setPeer records what Hello said: the version picked and the largest
// packet the peer reads.
func (s *subscriber) setPeer(version uint8, maxPacket int) {
	s.omu.Lock()
	s.out.version = version
	s.out.maxPkt = min(max(maxPacket, wire.EventFrameSize), wire.MaxPacketSize)
	s.omu.Unlock()
}

// flushWant is what enqueue asks of the pipeline.
type flushWant uint8

const (
	flushLater flushWant = iota // nothing: the writer or the timer will
	flushSoon                   // an urgent event: once the source's backlog is read
	flushNow                    // a packet's worth: before reading on
)

// enqueue queues an event without ever blocking; it counts a drop when the
// queue is full. It says when the pipeline must call flush. Called by the
// pipeline goroutine.
func (s *subscriber) enqueue(e *wire.Event, now bool) flushWant {
	o := &s.out
	s.omu.Lock()
	defer s.omu.Unlock()
	if !o.events.push(e, s.a.cfg.QueueLen) {
		s.dropped.Add(1)
		s.a.dropped.Add(1)
		return flushLater
	}
	if now {
		o.urgent = true
	}
	// A full packet, or half the queue, does not wait: waiting would
	// only risk drops.
	full := o.events.len() >= min(o.maxPkt/wire.EventFrameSize, max(s.a.cfg.QueueLen/2, 1))
	switch {
	case o.busy:
		return flushLater // the writer takes it with what it writes
	case full:
		return flushNow
	case o.urgent:
		return flushSoon
	case !o.armed:
		o.armed = true
		o.timer.Reset(flushDelay)
	}
	return flushLater
}

// flush writes the queued events now, without waiting: the pipeline calls
// it after enqueue asked for it, once it has no more events at hand. What
// the socket cannot take at once is left to the writer goroutine.
func (s *subscriber) flush() {
	s.omu.Lock()
	defer s.omu.Unlock()
	o := &s.out
	if o.busy || o.events.len() == 0 {
		return
	}
	if len(o.ctrl) > 0 {
		signal(o.wake) // replies go first, and they may have to wait
		return
	}
	for o.events.len() > 0 {
		k := s.packLocked()
		err := s.conn.TryWritePacket(o.pkt)
		if errors.Is(err, wire.ErrWouldBlock) {
			signal(o.wake)
			return
		}
		if err != nil {
			s.failed(err)
			return
		}
		s.sentLocked(k)
	}
}

// packLocked encodes the drop notice, if due, and as many queued events as
// fit into o.pkt; it returns how many events it took.
func (s *subscriber) packLocked() int {
	o := &s.out
	if o.pkt == nil {
		o.pkt = make([]byte, 0, o.maxPkt)
	}
	b := o.pkt[:0]
	if d := s.dropped.Load(); d != o.reported {
		f := wire.Frame{Type: wire.TypeDropped, Version: o.version,
			Dropped: wire.Dropped{Count: d - o.reported, Total: d}}
		b, _ = wire.Append(b, &f) // cannot fail: a known type
		o.reported = d
	}
	k := 0
	for k < o.events.len() && len(b)+wire.EventFrameSize <= o.maxPkt {
		b = wire.AppendEvent(b, o.version, o.events.at(k))
		k++
	}
	o.pkt = b
	return k
}

// sentLocked removes the k events just written.
func (s *subscriber) sentLocked(k int) {
	o := &s.out
	o.events.pop(k)
	s.delivered.Add(uint64(k))
	if o.events.len() == 0 {
		o.urgent = false
	}
}

// failed ends the session after a write error, unless it is ending anyway.
func (s *subscriber) failed(err error) {
	select {
	case <-s.done:
		return
	default:
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		s.log.Warn("disconnecting subscriber", "err", "it stopped reading", "stalled_for", s.a.cfg.StallTimeout,
			"dropped", s.dropped.Load())
	} else {
		s.log.Warn("writing to subscriber", "err", err)
	}
	s.shutdown() // takes no lock of the outbox: callable under omu
}

// reply hands a frame to the writer; it waits while the peer does not read
// its replies, but never past the session's end.
func (s *subscriber) reply(f wire.Frame) { s.sendCtrl(ctrlMsg{f: f}) }

func (s *subscriber) sendCtrl(m ctrlMsg) bool {
	for {
		s.omu.Lock()
		if len(s.out.ctrl) < maxCtrl {
			s.out.ctrl = append(s.out.ctrl, m)
			s.omu.Unlock()
			signal(s.out.wake)
			return true
		}
		s.omu.Unlock()
		select {
		case <-s.out.space:
		case <-s.done:
			return false
		}
	}
}

// writeLoop is the session's writer for what cannot be written at once:
// replies, routine events after flushDelay, and whatever found the socket
// full. A peer that does not read blocks it, and only it: the queue fills
// and enqueue counts drops. One deadline bounds each wait for the socket,
// not each event: a peer that accepts nothing for StallTimeout is cut off.
func (s *subscriber) writeLoop() {
	defer close(s.writerEnd)
	o := &s.out
	for {
		select {
		case <-s.done:
			return
		case <-o.wake:
		case <-o.timer.C:
		}
		fatal, err := s.writeAll()
		if err != nil {
			s.failed(err)
			return
		}
		if fatal {
			return
		}
	}
}

// writeAll writes everything the outbox holds, waiting for the socket as
// needed. It reports whether it wrote a fatal reply (the session's last).
func (s *subscriber) writeAll() (fatal bool, err error) {
	o := &s.out
	s.omu.Lock()
	o.busy = true
	o.armed = false
	defer func() {
		o.busy = false
		s.omu.Unlock()
	}()
	for {
		if len(o.ctrl) > 0 {
			m := o.ctrl[0]
			o.ctrl = o.ctrl[1:]
			signal(o.space)
			m.f.Version = o.version
			b, err := wire.Append(o.pkt[:0], &m.f)
			if err != nil {
				return false, err
			}
			o.pkt = b
			if err := s.writeUnlocked(b); err != nil {
				return false, err
			}
			if m.fatal {
				return true, nil
			}
			continue
		}
		if o.events.len() == 0 {
			if d := s.dropped.Load(); d != o.reported {
				// Drops with nothing after them: tell the peer now.
				s.packLocked()
				if err := s.writeUnlocked(o.pkt); err != nil {
					return false, err
				}
			}
			return false, nil
		}
		k := s.packLocked()
		if err := s.writeUnlocked(o.pkt); err != nil {
			return false, err
		}
		s.sentLocked(k)
	}
}

// writeUnlocked writes b, releasing omu while it waits for the socket so
// that the pipeline can queue (busy keeps it from writing meanwhile).
func (s *subscriber) writeUnlocked(b []byte) error {
	err := s.conn.TryWritePacket(b)
	if !errors.Is(err, wire.ErrWouldBlock) {
		return err
	}
	s.omu.Unlock()
	defer s.omu.Lock()
	s.conn.UnixConn().SetWriteDeadline(time.Now().Add(s.a.cfg.StallTimeout))
	return s.conn.WritePacket(b)
}

// queued is the number of events waiting for the socket.
func (s *subscriber) queued() int {
	s.omu.Lock()
	defer s.omu.Unlock()
	return s.out.events.len()
}
