//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"regexp"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/cilium/ebpf/rlimit"
	"github.com/hangup-io/hangup/internal/pollfd"
	"golang.org/x/sys/unix"
)

// Options configures Load. The zero value is a valid configuration.
type Options struct {
	// RingBufferSize is the event ring buffer's size in bytes. The kernel
	// needs a power of two that is a multiple of the page size; other values
	// are rounded up. Zero means 1 MiB. Counters stay exact when it fills.
	RingBufferSize int
	// MaxConnections bounds how many server connections are tracked at once.
	// Zero means 262144. Connections beyond it are not tracked and are
	// counted in Stats.TrackFull.
	MaxConnections int
	// FlushInterval bounds how long a routine event (opened, retransmit,
	// normal close) may wait in the ring buffer before Read returns it.
	// Events that say a client is gone (FIN, RST, errors, abnormal closes)
	// are returned at once regardless. Zero means 10ms. The interval is a
	// busy ring's: once one brought nothing, the reader waits with no
	// timer, and the next record of any kind wakes it (an idle probe
	// costs no wakeups).
	FlushInterval time.Duration
	// WatchedOnly narrows the events to what a server that loads its own
	// probe needs: only connections whose (network namespace cookie, local
	// port) was added with Watch, and only the kinds that say a client is
	// gone (KindPeerFIN, KindPeerReset, KindError, and KindClosed with a
	// cause other than CauseNormal). Counters still count every connection.
	WatchedOnly bool
	// WakeWatchedOnly keeps every record but wakes the reader at once only
	// for the client-gone events of connections on ports added with Watch;
	// every other event waits for the next poll (FlushInterval). A wakeup
	// is a self-IPI, which costs microseconds of kernel time on virtual
	// machines: an agent that serves a few subscribers watches their
	// listeners and pays for no other wakeup.
	WakeWatchedOnly bool
	// WakeBusyOnly wakes the reader at once for a client-gone event only
	// while the connection has a request in flight, as the loading process
	// counts through BusyWord; every other event waits for the next poll
	// (FlushInterval), unless the reader is idle. A server that loads its
	// own probe then pays no wakeup for clients that close idle
	// connections, or close right after their last response.
	WakeBusyOnly bool
}

// BusyPending is the bit of a busy word (BusyWord) that the probe sets when
// it wrote a client-gone event without waking the reader, the count of
// requests in flight being zero; the other bits hold that count.
const BusyPending = 1 << 63

// busySlots is the number of busy words (probe.c, BUSY_SLOTS).
const busySlots = 16384

const (
	defaultRingBufferSize = 1 << 20
	defaultMaxConnections = 262144
	defaultFlushInterval  = 10 * time.Millisecond
	kernelBTFPath         = "/sys/kernel/btf/vmlinux"
)

// hook ties a tracepoint to the program that handles it.
type hook struct {
	tracepoint string
	program    string
}

// Probe is the loaded and attached kernel probe. Read and ReadInto must be
// called from one goroutine at a time; the other methods are safe for
// concurrent use.
type Probe struct {
	maps  probeMaps
	progs []*ebpf.Program
	hooks []hook // what progs[i] is attached to
	links []link.Link
	rd    *ringbuf.Reader
	rec   ringbuf.Record
	// wake is the ring buffer's descriptor (a dup) in Go's network
	// poller: a reader waits there for the kernel's wakeup without holding
	// a thread in epoll_wait (see waitData).
	wake    *os.File
	wakeRC  syscall.RawConn
	closing atomic.Bool // Close began
	clock   wallClock

	// parked is the reader map's word, memory-mapped (parkMem): set while
	// the reader waits with no deadline, so that routine records wake it
	// (probe.c, reader_parked). idle says the reader's last wait ended at
	// its deadline and found nothing since: the ring is idle, and the next
	// wait parks. Only the reading goroutine touches idle.
	waitMu        sync.RWMutex // held shared by waitData; Close frees what it uses under it
	parked        *uint32
	parkMem       []byte
	idle          bool
	parkWhenEmpty bool   // tests: park whenever the ring is empty
	beforeWait    func() // tests: runs just before the poller's read

	busy []uint64 // the busy map, memory-mapped (WakeBusyOnly)

	flush    time.Duration
	watching bool         // Watch is meaningful: WatchedOnly or WakeWatchedOnly
	deadline atomic.Int64 // SetDeadline's time in Unix ns; 0 = none

	closeOnce sync.Once
	closeErr  error
}

// Load loads the probe into the kernel, attaches every hook, and opens the
// event reader. On error nothing stays loaded. Errors wrap ErrNotSupported
// (kernel too old, no BTF), ErrPermission (missing capabilities), a
// *HookError naming the hook, and *ebpf.VerifierError for verifier
// rejections.
func Load(opts Options) (*Probe, error) {
	return load(opts, kernelBTFPath, selectHooks)
}

func load(opts Options, btfPath string, pick func(*btf.Spec) ([]hook, error)) (_ *Probe, err error) {
	kernel, err := kernelTypes(btfPath)
	if err != nil {
		return nil, err
	}
	hooks, err := pick(kernel)
	if err != nil {
		return nil, err
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, permissionError(fmt.Errorf("raising RLIMIT_MEMLOCK: %w", err))
	}

	spec, err := loadProbe()
	if err != nil {
		return nil, fmt.Errorf("reading embedded BPF object: %w", err)
	}
	spec.Maps[probeMapEvents].MaxEntries = ringSize(opts.RingBufferSize)
	if opts.MaxConnections < 0 {
		return nil, fmt.Errorf("MaxConnections must not be negative, got %d", opts.MaxConnections)
	}
	spec.Maps[probeMapConns].MaxEntries = uint32(cmpOr(opts.MaxConnections, defaultMaxConnections))
	ring := spec.Maps[probeMapEvents].MaxEntries
	if err := spec.Variables[probeVarWakeupBytes].Set(uint64(ring / 4)); err != nil {
		return nil, fmt.Errorf("setting wakeup threshold: %w", err)
	}
	if opts.WatchedOnly {
		if err := spec.Variables[probeVarWatchedOnly].Set(uint8(1)); err != nil {
			return nil, fmt.Errorf("setting watched-only mode: %w", err)
		}
	}
	if opts.WakeWatchedOnly {
		if err := spec.Variables[probeVarWakeWatchedOnly].Set(uint8(1)); err != nil {
			return nil, fmt.Errorf("setting wake-watched-only mode: %w", err)
		}
	}
	if opts.WakeBusyOnly {
		if err := spec.Variables[probeVarWakeBusyOnly].Set(uint8(1)); err != nil {
			return nil, fmt.Errorf("setting wake-busy-only mode: %w", err)
		}
	}
	if opts.FlushInterval < 0 {
		return nil, fmt.Errorf("FlushInterval must not be negative, got %s", opts.FlushInterval)
	}

	p := &Probe{flush: opts.FlushInterval, watching: opts.WatchedOnly || opts.WakeWatchedOnly}
	if p.flush == 0 {
		p.flush = defaultFlushInterval
	}
	defer func() {
		if err != nil {
			p.Close()
		}
	}()

	// Maps first, then each program on its own, so that a failure names
	// its hook.
	mapsOnly := spec.Copy()
	mapsOnly.Programs = nil
	coll, err := ebpf.NewCollectionWithOptions(mapsOnly, ebpf.CollectionOptions{})
	if err != nil {
		return nil, classify(fmt.Errorf("creating maps: %w", err))
	}
	// Keep every map for the programs before Assign takes ownership of ours;
	// what stays in coll (the object's .bss) is referenced by the programs,
	// which keep it alive after coll.Close.
	replacements := maps.Clone(coll.Maps)
	defer coll.Close()
	if err := coll.Assign(&p.maps); err != nil {
		return nil, fmt.Errorf("assigning maps: %w", err)
	}

	for _, h := range hooks {
		one := spec.Copy()
		one.Programs = map[string]*ebpf.ProgramSpec{h.program: spec.Programs[h.program]}
		pc, err := ebpf.NewCollectionWithOptions(one, ebpf.CollectionOptions{
			MapReplacements: replacements,
			Programs:        ebpf.ProgramOptions{KernelTypes: kernel},
		})
		if err != nil {
			return nil, hookError("loading", h.tracepoint, err)
		}
		prog := pc.DetachProgram(h.program)
		pc.Close()
		p.progs = append(p.progs, prog)
		p.hooks = append(p.hooks, h)

		l, err := link.AttachTracing(link.TracingOptions{Program: prog, AttachType: ebpf.AttachTraceRawTp})
		if err != nil {
			return nil, hookError("attaching", h.tracepoint, err)
		}
		p.links = append(p.links, l)
	}

	p.rd, err = ringbuf.NewReader(p.maps.Events)
	if err != nil {
		return nil, fmt.Errorf("opening ring buffer reader: %w", err)
	}
	// A ring buffer map's descriptor polls readable when the kernel
	// wakes its readers; the poller gets a duplicate.
	wfd, err := unix.FcntlInt(uintptr(p.maps.Events.FD()), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening ring buffer reader: dup: %w", err)
	}
	if p.wake, p.wakeRC, err = pollfd.Open(wfd, "ringbuf"); err != nil {
		return nil, fmt.Errorf("opening ring buffer reader: %w", err)
	}
	if p.parkMem, err = unix.Mmap(p.maps.Reader.FD(), 0, os.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err != nil {
		return nil, fmt.Errorf("mapping the reader map: %w", err)
	}
	p.parked = (*uint32)(unsafe.Pointer(&p.parkMem[0]))
	if opts.WakeBusyOnly {
		// Never unmapped: callers keep words past Close (a request that
		// ends after the Monitor closed), and the mapping is small.
		mem, err := unix.Mmap(p.maps.Busy.FD(), 0, busySlots*8, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			return nil, fmt.Errorf("mapping the busy map: %w", err)
		}
		p.busy = unsafe.Slice((*uint64)(unsafe.Pointer(&mem[0])), busySlots)
	}
	p.clock.refresh()
	return p, nil
}

func cmpOr(v, def int) int {
	if v == 0 {
		return def
	}
	return v
}

// ringSize rounds a requested ring buffer size to what the kernel accepts.
func ringSize(n int) uint32 {
	if n <= 0 {
		return defaultRingBufferSize
	}
	size := uint32(os.Getpagesize())
	for int(size) < n && size < 1<<30 {
		size <<= 1
	}
	return size
}

// kernelTypes loads the kernel's BTF, which CO-RE relocations and tp_btf
// attachment both need.
func kernelTypes(path string) (*btf.Spec, error) {
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("%w: kernel BTF not found at %s: the probe needs a kernel built with CONFIG_DEBUG_INFO_BTF=y (Linux 6.1 or newer)", ErrNotSupported, path)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening kernel BTF: %w", err)
	}
	defer f.Close()
	spec, err := btf.LoadSpecFromReader(f)
	if err != nil {
		return nil, fmt.Errorf("%w: parsing kernel BTF at %s: %w", ErrNotSupported, path, err)
	}
	return spec, nil
}

// tracepoints are the probe's hooks: the first Linux release that has each
// as a BTF tracepoint, and the program variants by the number of arguments
// the kernel passes (most first). Load picks the first variant the kernel's
// BTF offers, so that nothing assumes the host's kernel version.
var tracepoints = []struct {
	name     string
	since    string
	variants []variant
}{
	// Two programs: passive opens apart from the rest (see on_open).
	{"inet_sock_set_state", "4.16", []variant{{3, probeProgOnOpen}}},
	{"inet_sock_set_state", "4.16", []variant{{3, probeProgOnSetState}}},
	{"tcp_receive_reset", "4.15", []variant{{1, probeProgOnReceiveReset}}},
	// Linux 6.10 added the reset reason (enum sk_rst_reason).
	{"tcp_send_reset", "4.15", []variant{{3, probeProgOnSendReset}, {2, probeProgOnSendResetLegacy}}},
	{"inet_sk_error_report", "5.13", []variant{{1, probeProgOnErrorReport}}},
	// Linux 6.17 added err and fires for failed attempts too.
	{"tcp_retransmit_skb", "4.15", []variant{{3, probeProgOnRetransmit}, {2, probeProgOnRetransmitLegacy}}},
	{"tcp_destroy_sock", "4.16", []variant{{1, probeProgOnDestroy}}},
}

type variant struct {
	args    int // arguments the program reads
	program string
}

// CheckKernel reports whether the running kernel has what the probe needs
// that can be told without loading it: BTF and every tracepoint with a
// signature the probe has a program for. Its error wraps ErrNotSupported and
// names the missing feature. Load also needs BPF helpers that only loading
// can check (see Load).
func CheckKernel() error {
	kernel, err := kernelTypes(kernelBTFPath)
	if err != nil {
		return err
	}
	_, err = selectHooks(kernel)
	return err
}

// selectHooks checks that every tracepoint exists with the arguments one of
// its programs reads, and picks that program.
func selectHooks(kernel *btf.Spec) ([]hook, error) {
	hooks := make([]hook, 0, len(tracepoints))
	for _, tp := range tracepoints {
		args, err := tracepointArgs(kernel, tp.name)
		if err != nil {
			return nil, &HookError{Op: "loading", Hook: tp.name,
				Err: fmt.Errorf("%w (the tracepoint came in Linux %s)", err, tp.since)}
		}
		i := slices.IndexFunc(tp.variants, func(v variant) bool { return args >= v.args })
		if i < 0 {
			return nil, &HookError{Op: "loading", Hook: tp.name,
				Err: fmt.Errorf("%w: tracepoint has %d arguments, the probe needs at least %d",
					ErrNotSupported, args, tp.variants[len(tp.variants)-1].args)}
		}
		hooks = append(hooks, hook{tracepoint: tp.name, program: tp.variants[i].program})
	}
	return hooks, nil
}

// tracepointArgs returns how many arguments a BTF tracepoint passes to a
// tp_btf program, from the kernel's btf_trace_<name> typedef.
func tracepointArgs(kernel *btf.Spec, name string) (int, error) {
	var td *btf.Typedef
	if err := kernel.TypeByName("btf_trace_"+name, &td); err != nil {
		return 0, fmt.Errorf("%w: kernel has no BTF tracepoint %s: %w", ErrNotSupported, name, err)
	}
	ptr, ok := td.Type.(*btf.Pointer)
	if !ok {
		return 0, fmt.Errorf("unexpected BTF for btf_trace_%s: %s", name, td.Type)
	}
	proto, ok := ptr.Target.(*btf.FuncProto)
	if !ok {
		return 0, fmt.Errorf("unexpected BTF for btf_trace_%s: %s", name, ptr.Target)
	}
	// The first parameter is the tracepoint's private data pointer.
	return len(proto.Params) - 1, nil
}

func hookError(op, tracepoint string, err error) error {
	if missing := missingHelper(err); missing != nil {
		err = missing
	}
	return classify(&HookError{Op: op, Hook: tracepoint, Err: err})
}

// helpers are the BPF helpers the programs call that older kernels do not
// offer to tracing programs, with the release that added them there.
var helpers = map[string]string{
	"bpf_ringbuf_reserve":   "5.8",
	"bpf_ringbuf_submit":    "5.8",
	"bpf_ringbuf_query":     "5.8",
	"bpf_skc_to_tcp_sock":   "5.9",
	"bpf_get_socket_cookie": "5.12",
	"bpf_probe_read_kernel": "5.5",
	"bpf_ktime_get_ns":      "4.1",
	"bpf_map_lookup_elem":   "4.1",
	"bpf_map_update_elem":   "4.1",
	"bpf_map_delete_elem":   "4.1",
}

var unknownHelper = regexp.MustCompile(`(?:unknown func|cannot call|cannot use helper) (bpf_[a-z0-9_]+)#`)

// missingHelper turns the verifier's rejection of a helper call into an
// ErrNotSupported that names the helper and the release that has it, or
// returns nil for any other error.
func missingHelper(err error) error {
	var ve *ebpf.VerifierError
	if !errors.As(err, &ve) {
		return nil
	}
	for _, line := range ve.Log {
		m := unknownHelper.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		since := "a newer kernel"
		if v, ok := helpers[m[1]]; ok {
			since = "Linux " + v
		}
		return fmt.Errorf("%w: the kernel does not let tracing programs call %s (%s): %w",
			ErrNotSupported, m[1], since, err)
	}
	return nil
}

// classify adds the sentinel that tells the caller what kind of failure err is.
func classify(err error) error {
	var ve *ebpf.VerifierError
	switch {
	case errors.As(err, &ve):
		// The verifier answers EACCES too; a rejection is not a permission problem.
		return err
	case errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES):
		return permissionError(err)
	case errors.Is(err, ebpf.ErrNotSupported):
		return fmt.Errorf("%w: %w", ErrNotSupported, err)
	}
	return err
}

func permissionError(err error) error {
	return fmt.Errorf("%w: %w (%s)", ErrPermission, err, permissionHint)
}

// BusyWord returns the word that counts the requests in flight on the
// connection with this socket cookie, for a probe loaded with
// WakeBusyOnly (else nil). Words are shared by connections whose cookies
// fall in the same slot. Add 1 with an atomic add when a request starts,
// and if the old value had BusyPending, clear it (atomic and) and ask the
// socket whether the client is still there: an event of the connection may
// wait in the ring for the next poll. Subtract 1 when the request ends.
// Words stay valid after Close.
func (p *Probe) BusyWord(cookie uint64) *uint64 {
	if p.busy == nil {
		return nil
	}
	return &p.busy[uint32(cookie)&(busySlots-1)]
}

// Read blocks until the next event and returns it. After Close it returns
// ErrClosed; after a deadline set with SetDeadline passes, an error that
// matches os.ErrDeadlineExceeded.
func (p *Probe) Read() (Event, error) {
	var e Event
	err := p.ReadInto(&e)
	return e, err
}

// ReadInto is Read without allocating: it decodes the next event into e.
func (p *Probe) ReadInto(e *Event) error {
	for {
		// Whatever the ring holds, without waiting: the reader's own
		// epoll_wait then has a zero timeout.
		p.rd.SetDeadline(pastDeadline)
		err := p.rd.ReadInto(&p.rec)
		switch {
		case err == nil:
			p.idle = false
			if err := DecodeEvent(p.rec.RawSample, e); err != nil {
				return err
			}
			e.Time = p.clock.wall(e.Mono)
			return nil
		case errors.Is(err, ringbuf.ErrClosed):
			return ErrClosed
		case !errors.Is(err, os.ErrDeadlineExceeded):
			return fmt.Errorf("reading ring buffer: %w", err)
		}
		if err := p.waitData(); err != nil {
			return err
		}
	}
}

// pastDeadline makes the ring buffer reader return at once when the ring
// is empty.
var pastDeadline = time.Unix(1, 0)

// waitData waits until the ring may hold data: the kernel woke its readers,
// a flush interval passed (routine events do not wake the reader, see
// probe.c), or the caller's deadline passed (then it returns an error
// matching os.ErrDeadlineExceeded).
//
// An idle ring needs no timer: once a whole flush interval brought nothing,
// the reader parks, waiting with no deadline of its own, and says so in the
// reader map, where every record then wakes it. A busy ring keeps batching
// routine records for up to a flush interval. Idle, a probe costs nothing
// (measured before: about 400 context switches and 13 ms of CPU a second).
//
// It waits in Go's network poller, not in a blocking epoll_wait: a thread
// blocked in a system call keeps its P until sysmon takes it back (20 µs to
// 10 ms later), so a reader that woke every flush interval would stall a
// GOMAXPROCS=1 server that often, and sysmon, reset each time, would never
// back off (measured: half the keep-alive throughput of an httpx server).
func (p *Probe) waitData() error {
	p.waitMu.RLock()
	defer p.waitMu.RUnlock()
	if p.parked == nil {
		return ErrClosed
	}
	park := p.idle || p.parkWhenEmpty
	var wait time.Time
	if !park {
		wait = time.Now().Add(p.flush)
	}
	if user := p.deadline.Load(); user != 0 {
		if time.Now().UnixNano() >= user {
			return fmt.Errorf("reading ring buffer: %w", os.ErrDeadlineExceeded)
		}
		if wait.IsZero() || user < wait.UnixNano() {
			wait = time.Unix(0, user)
		}
	}
	if park {
		// Say so before the look below: a record reserved meanwhile
		// either saw the word (and wakes the reader) or is seen there.
		atomic.StoreUint32(p.parked, 1)
		defer atomic.StoreUint32(p.parked, 0)
	}
	if err := p.wake.SetReadDeadline(wait); err != nil {
		return p.wakeError(err)
	}
	// Look at the ring inside the poller's read, then wait for the next
	// wakeup: one that comes after the look is latched by the poller and
	// ends the wait at once; one that came before it is seen by the look.
	// A look before the poller's read would lose that wakeup (the read
	// begins by clearing what the poller latched), and a parked reader,
	// with no deadline, would wait for the next record.
	if p.beforeWait != nil {
		p.beforeWait()
	}
	looked, found := false, false
	err := p.wakeRC.Read(func(uintptr) bool {
		if looked {
			return true
		}
		looked = true
		found = p.rd.AvailableBytes() > 0
		return found
	})
	if found {
		p.idle = false
		return nil
	}
	timedOut := errors.Is(err, os.ErrDeadlineExceeded)
	if err != nil && !timedOut {
		return p.wakeError(err)
	}
	p.idle = timedOut
	return nil
}

func (p *Probe) wakeError(err error) error {
	// A closed os.File's raw read says "use of closed file", which
	// matches no exported error.
	if p.closing.Load() || errors.Is(err, os.ErrClosed) {
		return ErrClosed
	}
	return fmt.Errorf("waiting for ring buffer data: %w", err)
}

// SetDeadline makes pending and future reads return an error matching
// os.ErrDeadlineExceeded once t has passed. The zero time means no deadline.
func (p *Probe) SetDeadline(t time.Time) {
	if t.IsZero() {
		p.deadline.Store(0)
		return
	}
	p.deadline.Store(t.UnixNano())
	if p.wake != nil {
		// Wake a blocked read, which then waits again until the
		// earlier of t and its flush interval.
		p.wake.SetReadDeadline(time.Now())
	}
}

// Close detaches every hook and frees the probe's kernel objects. A blocked
// Read returns ErrClosed. Close is idempotent.
func (p *Probe) Close() error {
	p.closeOnce.Do(func() {
		var errs []error
		p.closing.Store(true)
		if p.wake != nil {
			errs = append(errs, p.wake.Close()) // wakes a blocked read
		}
		// A reader in waitData, woken, lets go before its ring goes.
		p.waitMu.Lock()
		defer p.waitMu.Unlock()
		if p.rd != nil {
			errs = append(errs, p.rd.Close())
		}
		for _, l := range p.links {
			errs = append(errs, l.Close())
		}
		for _, prog := range p.progs {
			errs = append(errs, prog.Close())
		}
		if p.parkMem != nil {
			errs = append(errs, unix.Munmap(p.parkMem))
			p.parkMem, p.parked = nil, nil
		}
		errs = append(errs, p.maps.Close())
		p.closeErr = errors.Join(errs...)
	})
	return p.closeErr
}

// wallClock converts CLOCK_MONOTONIC timestamps to wall-clock time. The
// offset is refreshed at most once a second, so clock steps are followed.
type wallClock struct {
	mu       sync.Mutex
	offset   time.Duration // realtime - monotonic
	sampleAt time.Duration // monotonic time of the last refresh
}

func (c *wallClock) refresh() {
	var mono, real unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &mono)
	_ = unix.ClockGettime(unix.CLOCK_REALTIME, &real)
	c.sampleAt = time.Duration(mono.Nano())
	c.offset = time.Duration(real.Nano()) - c.sampleAt
}

func (c *wallClock) wall(mono time.Duration) time.Time {
	c.mu.Lock()
	if mono-c.sampleAt > time.Second {
		c.refresh()
	}
	off := c.offset
	c.mu.Unlock()
	return time.Unix(0, int64(mono+off))
}
