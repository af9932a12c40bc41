package bpfsource

import (
	"testing"

	"github.com/hangup-io/hangup/bpf"
	"github.com/hangup-io/hangup/httpx/internal/detect"
)

// TestProbeNumbers checks detect's copy of the probe's numbering.
func TestProbeNumbers(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uint8
	}{
		{"peer_fin", detect.ProbeKindPeerFIN, uint8(bpf.KindPeerFIN)},
		{"peer_reset", detect.ProbeKindPeerReset, uint8(bpf.KindPeerReset)},
		{"error", detect.ProbeKindError, uint8(bpf.KindError)},
		{"closed", detect.ProbeKindClosed, uint8(bpf.KindClosed)},
		{"cause peer_reset", detect.ProbeCausePeerReset, uint8(bpf.CausePeerReset)},
		{"cause timeout", detect.ProbeCauseTimeout, uint8(bpf.CauseTimeout)},
		{"cause keepalive_timeout", detect.ProbeCauseKeepaliveTimeout, uint8(bpf.CauseKeepaliveTimeout)},
		{"cause probe_timeout", detect.ProbeCauseProbeTimeout, uint8(bpf.CauseProbeTimeout)},
		{"cause error", detect.ProbeCauseError, uint8(bpf.CauseError)},
	} {
		if c.got != c.want {
			t.Errorf("%s: detect has %d, bpf %d", c.name, c.got, c.want)
		}
	}
	if detect.BusyPending != bpf.BusyPending {
		t.Errorf("busy pending bit: detect has %#x, bpf %#x", uint64(detect.BusyPending), uint64(bpf.BusyPending))
	}
	if detect.BPF() == nil {
		t.Error("importing bpfsource did not register the probe")
	}
}
