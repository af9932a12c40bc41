package httpx

import (
	"fmt"
	"log/slog"
	"testing"

	"github.com/hangup-io/hangup/bpf"
	_ "github.com/hangup-io/hangup/httpx/bpfsource" // SourceBPF in tests
	"github.com/hangup-io/hangup/httpx/internal/detect"
)

// failBPF makes SourceBPF fail to start, as without privileges, until the
// test ends; onLoad, if not nil, runs at each attempt.
func failBPF(t testing.TB, onLoad func()) {
	orig := detect.BPF()
	detect.RegisterBPF(func(detect.BPFOptions, detect.Sink, *slog.Logger) (detect.Source, error) {
		if onLoad != nil {
			onLoad()
		}
		return nil, fmt.Errorf("loading: %w", bpf.ErrPermission)
	})
	t.Cleanup(func() { detect.RegisterBPF(orig) })
}

// nopDetect is a detect.Source that reports nothing by itself.
type nopDetect struct{}

func (nopDetect) WatchPort(uint64, uint16) error { return nil }
func (nopDetect) Close() error                   { return nil }
