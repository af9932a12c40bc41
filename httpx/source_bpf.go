package httpx

import (
	"errors"
	"log/slog"
	"syscall"
	"time"

	"github.com/hangup-io/hangup/bpf"
)

// bpfSource reads the in-process kernel probe. One goroutine reads the ring
// buffer and hands the events of the whole host to the sink, which keeps
// those of its own connections.
type bpfSource struct {
	probe *bpf.Probe
	sink  sink
	log   *slog.Logger
	done  chan struct{}
}

// loadProbe is bpf.Load; tests replace it to make the source fail.
var loadProbe = bpf.Load

func startBPF(opts bpf.Options, s sink, log *slog.Logger) (*bpfSource, error) {
	p, err := loadProbe(opts)
	if err != nil {
		return nil, err
	}
	src := &bpfSource{probe: p, sink: s, log: log, done: make(chan struct{})}
	go src.read()
	return src, nil
}

func (s *bpfSource) read() {
	defer close(s.done)
	var e bpf.Event
	for {
		// Events that end a connection reach ReadInto at once; routine
		// ones within the probe's flush interval.
		err := s.probe.ReadInto(&e)
		if errors.Is(err, bpf.ErrClosed) {
			return
		}
		if err != nil {
			s.log.Error("reading probe events", "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if r, ok := bpfReason(&e); ok {
			s.sink.deliver(e.Cookie, event{reason: r, at: e.Time})
		}
	}
}

// bpfReason maps a probe event to an abort reason.
func bpfReason(e *bpf.Event) (Reason, bool) {
	return probeReason(e.Kind, e.Cause, e.Err)
}

// probeReason maps what the kernel probe reports about a connection (its
// event kind, close cause and socket error) to an abort reason. The
// in-process probe and the agent (which relays the probe's events) share
// it. Timeouts are taken from the closed event, which follows the error
// event at once and tells the keepalive timeout from the retransmission
// timeout.
func probeReason(kind bpf.Kind, cause bpf.Cause, errno syscall.Errno) (Reason, bool) {
	switch kind {
	case bpf.KindPeerFIN:
		return ReasonPeerFIN, true
	case bpf.KindPeerReset:
		return ReasonPeerReset, true
	case bpf.KindClosed:
		switch cause {
		case bpf.CausePeerReset:
			return ReasonPeerReset, true
		case bpf.CauseTimeout, bpf.CauseProbeTimeout:
			return ReasonTimeout, true
		case bpf.CauseKeepaliveTimeout:
			return ReasonKeepaliveTimeout, true
		case bpf.CauseError:
			return ReasonError, true
		}
	case bpf.KindError:
		if errno == syscall.ECONNRESET {
			return ReasonPeerReset, true
		}
	}
	return ReasonNone, false
}

func (s *bpfSource) name() Source      { return SourceBPF }
func (s *bpfSource) watch(*conn) error { return nil }
func (s *bpfSource) unwatch(*conn)     {}

func (s *bpfSource) close() error {
	err := s.probe.Close()
	<-s.done
	return err
}
