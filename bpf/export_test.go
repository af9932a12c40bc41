//go:build linux

package bpf

import "github.com/cilium/ebpf/btf"

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
