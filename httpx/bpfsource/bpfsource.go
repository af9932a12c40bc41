// Package bpfsource links the in-process kernel probe into httpx: a server
// that imports it can use httpx.SourceBPF, which loads the probe (package
// bpf, and with it cilium/ebpf) into the server itself and needs CAP_BPF and
// CAP_PERFMON. Import it for its side effect:
//
//	import _ "github.com/hangup-io/hangup/httpx/bpfsource"
//
// Servers that get their events from the host agent (hangupd) or from epoll
// need not import it, and then do not link cilium/ebpf.
package bpfsource

import (
	"errors"
	"log/slog"
	"time"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/httpx/internal/detect"
)

func init() { detect.RegisterBPF(start) }

// loadProbe is bpf.Load; tests replace it.
var loadProbe = bpf.Load

type source struct {
	probe *bpf.Probe
	sink  detect.Sink
	log   *slog.Logger
	done  chan struct{}
}

func start(opts detect.BPFOptions, sink detect.Sink, log *slog.Logger) (detect.Source, error) {
	p, err := loadProbe(bpf.Options{
		RingBufferSize: opts.RingBufferSize,
		MaxConnections: opts.MaxConnections,
		FlushInterval:  opts.FlushInterval,
		// Only this server's connections, and only what says a client
		// went away: the rest of the host's TCP traffic never reaches it.
		WatchedOnly: true,
		// And a wakeup only while the connection has a request in flight
		// (httpx counts them in the probe's busy words).
		WakeBusyOnly: true,
	})
	if err != nil {
		return nil, err
	}
	s := &source{probe: p, sink: sink, log: log, done: make(chan struct{})}
	go s.read()
	return s, nil
}

// read hands the events of the watched ports to the sink; they all say a
// client went away, and wake the reader at once.
func (s *source) read() {
	defer close(s.done)
	var e bpf.Event
	for {
		err := s.probe.ReadInto(&e)
		if errors.Is(err, bpf.ErrClosed) {
			return
		}
		if err != nil {
			s.log.Error("reading probe events", "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if k, ok := detect.FromProbe(uint8(e.Kind), uint8(e.Cause), e.Err); ok {
			s.sink.Deliver(e.Cookie, k, e.Time)
		}
	}
}

// WatchPort implements detect.Source.
func (s *source) WatchPort(netnsCookie uint64, port uint16) error {
	return s.probe.Watch(netnsCookie, port)
}

// BusyWord implements detect.Busier.
func (s *source) BusyWord(cookie uint64) *uint64 { return s.probe.BusyWord(cookie) }

// Track implements detect.Tracker.
func (s *source) Track(cookie uint64, port uint16) error {
	return s.probe.Track(cookie, port)
}

func (s *source) Close() error {
	err := s.probe.Close()
	<-s.done
	return err
}
