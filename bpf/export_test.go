//go:build linux

package bpf

import (
	"sync/atomic"

	"github.com/cilium/ebpf/btf"
)

// LoadOldest loads the probe with the oldest variant of every hook (the
// programs for Linux 6.1's tracepoint signatures), so that this kernel can
// test how they classify.
func LoadOldest(opts Options) (*Probe, error) {
	return load(opts, kernelBTFPath, func(kernel *btf.Spec) ([]hook, error) {
		hooks, err := selectHooks(kernel)
		for i := range hooks { // in the order of tracepoints
			v := tracepoints[i].variants
			hooks[i].program = v[len(v)-1].program
		}
		return hooks, err
	})
}

// ParkWhenEmpty makes p's reader park (wait with no deadline, woken by
// every record) whenever it finds the ring empty, not only once a flush
// interval brought nothing. Call it before reading.
func ParkWhenEmpty(p *Probe) { p.parkWhenEmpty = true }

// Parked reports whether p's reader is parked.
func Parked(p *Probe) bool {
	p.waitMu.RLock()
	defer p.waitMu.RUnlock()
	return p.parked != nil && atomic.LoadUint32(p.parked) != 0
}

// BeforeWait makes p's reader call fn just before each wait in the poller,
// after it found the ring empty. Call it before reading.
func BeforeWait(p *Probe, fn func()) { p.beforeWait = fn }
