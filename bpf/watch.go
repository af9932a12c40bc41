//go:build linux

package bpf

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
)

// ErrNotWatchedOnly is returned by Watch and Unwatch on a probe loaded
// without Options.WatchedOnly or Options.WakeWatchedOnly, where watching
// would change nothing.
var ErrNotWatchedOnly = errors.New("probe was loaded without Options.WatchedOnly or Options.WakeWatchedOnly")

// Watch makes a WatchedOnly probe write the client-gone events of
// connections on a local port in one network namespace (a WakeWatchedOnly
// probe: wake the reader at once for them), the namespace identified by its
// cookie (getsockopt SO_NETNS_COOKIE on any socket of the namespace, the
// value events carry in Event.NetNS). Watching a watched port is not an
// error. At most 4096 ports can be watched at once.
func (p *Probe) Watch(netnsCookie uint64, port uint16) error {
	if err := p.checkWatch(port); err != nil {
		return fmt.Errorf("watching port %d in netns %d: %w", port, netnsCookie, err)
	}
	k := probeWatchKey{NetnsCookie: netnsCookie, Port: port}
	if err := p.maps.Watched.Update(&k, uint8(1), ebpf.UpdateAny); err != nil {
		return fmt.Errorf("watching port %d in netns %d (at most %d ports): %w",
			port, netnsCookie, p.maps.Watched.MaxEntries(), err)
	}
	return nil
}

// Unwatch undoes Watch. Unwatching a port that is not watched is not an
// error.
func (p *Probe) Unwatch(netnsCookie uint64, port uint16) error {
	if err := p.checkWatch(port); err != nil {
		return fmt.Errorf("unwatching port %d in netns %d: %w", port, netnsCookie, err)
	}
	k := probeWatchKey{NetnsCookie: netnsCookie, Port: port}
	if err := p.maps.Watched.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("unwatching port %d in netns %d: %w", port, netnsCookie, err)
	}
	return nil
}

func (p *Probe) checkWatch(port uint16) error {
	if !p.watching {
		return ErrNotWatchedOnly
	}
	if port == 0 {
		return errors.New("port 0 is no local port")
	}
	return nil
}
