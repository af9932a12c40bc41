// Package testnet gives tests real network hosts: a server and a client in
// their own network namespaces, joined by a veth pair, with the means to cut
// the link the way a dead Wi-Fi or a pulled cable does.
//
// Every pair gets uniquely named namespaces and links and removes them when
// the test ends, so tests in parallel packages never see each other's
// sockets: the probe sees every namespace, and tests pick out their own
// sockets by namespace cookie or socket cookie.
package testnet

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// RequireEnv is the environment variable that turns skips of privileged
// tests into failures. CI sets it to 1.
const RequireEnv = "HANGUP_REQUIRE_BPF"

// SkipOrFail skips the test with the reason, or fails it when RequireEnv=1.
func SkipOrFail(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv(RequireEnv) == "1" {
		t.Fatalf("%s=1 but: "+format, append([]any{RequireEnv}, args...)...)
	}
	t.Skipf(format, args...)
}

// RequireRoot skips (or fails, see SkipOrFail) unless the test runs as root
// with iproute2 available.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		SkipOrFail(t, "needs root for network namespaces (run as root or with sudo)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		SkipOrFail(t, "needs the ip command from iproute2: %v", err)
	}
}

// Addresses of the hosts inside every pair. Namespaces isolate pairs, so
// all pairs use the same ones.
var (
	ServerAddr4 = netip.MustParseAddr("10.77.0.1")
	ClientAddr4 = netip.MustParseAddr("10.77.0.2")
	ServerAddr6 = netip.MustParseAddr("fd77::1")
	ClientAddr6 = netip.MustParseAddr("fd77::2")
)

// Host is one network namespace with one end of the pair's veth link.
type Host struct {
	NS    string // namespace name, under /run/netns
	Link  string // veth device inside the namespace
	Addr4 netip.Addr
	Addr6 netip.Addr
}

// Pair is a server host and a client host joined by a veth link.
type Pair struct {
	Server *Host
	Client *Host
	t      testing.TB
}

var seq atomic.Uint32

// NewPair creates the two hosts. It skips or fails the test when it cannot
// (see RequireRoot), and removes everything when the test ends.
func NewPair(t testing.TB) *Pair {
	t.Helper()
	RequireRoot(t)
	id := fmt.Sprintf("%x%x", os.Getpid()&0xffff, seq.Add(1))
	p := &Pair{
		Server: &Host{NS: "hangup-s" + id, Link: "hs" + id, Addr4: ServerAddr4, Addr6: ServerAddr6},
		Client: &Host{NS: "hangup-c" + id, Link: "hc" + id, Addr4: ClientAddr4, Addr6: ClientAddr6},
		t:      t,
	}
	for _, h := range []*Host{p.Server, p.Client} {
		run(t, "ip", "netns", "add", h.NS)
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", h.NS).Run() })
	}
	run(t, "ip", "link", "add", p.Server.Link, "netns", p.Server.NS, "type", "veth",
		"peer", "name", p.Client.Link, "netns", p.Client.NS)
	for _, h := range []*Host{p.Server, p.Client} {
		run(t, "ip", "-n", h.NS, "link", "set", "lo", "up")
		run(t, "ip", "-n", h.NS, "addr", "add", h.Addr4.String()+"/24", "dev", h.Link)
		run(t, "ip", "-n", h.NS, "addr", "add", h.Addr6.String()+"/64", "dev", h.Link, "nodad")
		run(t, "ip", "-n", h.NS, "link", "set", h.Link, "up")
	}
	return p
}

func run(t testing.TB, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// Exec runs a command inside the host's namespace and returns its output.
func (h *Host) Exec(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", h.NS, name}, args...)...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	if err != nil {
		return out.Bytes(), fmt.Errorf("%s %s in %s: %w: %s", name, strings.Join(args, " "), h.NS, err, out.Bytes())
	}
	return out.Bytes(), nil
}

// Do runs fn on an OS thread that has entered the host's namespace. Sockets
// created inside fn belong to that namespace for their whole life and can be
// used from any goroutine afterwards.
func (h *Host) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		// The thread is never unlocked: if it cannot return to its own
		// namespace, the runtime throws it away when the goroutine ends.
		runtime.LockOSThread()
		errc <- h.enter(fn)
	}()
	return <-errc
}

func (h *Host) enter(fn func() error) error {
	target, err := unix.Open("/run/netns/"+h.NS, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening namespace %s: %w", h.NS, err)
	}
	defer unix.Close(target)
	if err := unix.Unshare(unix.CLONE_FS); err != nil {
		return fmt.Errorf("unsharing fs: %w", err)
	}
	if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("entering namespace %s: %w", h.NS, err)
	}
	return fn()
}

// Listen opens a listener inside the host's namespace.
func (h *Host) Listen(network, address string) (net.Listener, error) {
	var ln net.Listener
	err := h.Do(func() (err error) {
		ln, err = net.Listen(network, address)
		return err
	})
	return ln, err
}

// Dial connects from inside the host's namespace.
func (h *Host) Dial(network, address string) (net.Conn, error) {
	var c net.Conn
	err := h.Do(func() (err error) {
		c, err = net.DialTimeout(network, address, 5*time.Second)
		return err
	})
	return c, err
}

// Dialer returns a DialContext function that connects from inside the
// host's namespace, for http.Transport.
func (h *Host) Dialer() func(ctx context.Context, network, address string) (net.Conn, error) {
	return func(ctx context.Context, network, address string) (net.Conn, error) {
		var c net.Conn
		err := h.Do(func() (err error) {
			var d net.Dialer
			c, err = d.DialContext(ctx, network, address)
			return err
		})
		return c, err
	}
}

// NetNSCookie returns the namespace's cookie (SO_NETNS_COOKIE), the value
// probe events carry in Event.NetNS.
func (h *Host) NetNSCookie() (uint64, error) {
	var cookie uint64
	err := h.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		return err
	})
	return cookie, err
}

// Cut makes the client vanish: from then on every TCP segment the server
// sends is lost on the way, and the client sends nothing, with no FIN, RST
// or ICMP, as when a client's Wi-Fi drops or its cable is pulled. The
// server's own link stays up, so its kernel keeps transmitting (and
// retransmitting) as it would toward a real dead peer. ARP and neighbour
// discovery still work, as they would on the server's LAN.
func (p *Pair) Cut() {
	p.t.Helper()
	if _, err := exec.LookPath("nft"); err != nil {
		SkipOrFail(p.t, "cutting the link needs nft from the nftables package: %v", err)
	}
	rules := `table inet hangup_cut {
	chain in { type filter hook prerouting priority -300; policy accept; meta l4proto tcp drop; }
	chain out { type filter hook output priority -300; policy accept; meta l4proto tcp drop; }
}
`
	cmd := exec.Command("ip", "netns", "exec", p.Client.NS, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		p.t.Fatalf("cutting the link: %v\n%s", err, out)
	}
}

// Restore undoes Cut.
func (p *Pair) Restore() {
	p.t.Helper()
	run(p.t, "ip", "netns", "exec", p.Client.NS, "nft", "delete", "table", "inet", "hangup_cut")
}

// SocketCookie returns getsockopt(SO_COOKIE) of a TCP connection, the value
// probe events carry in Event.Cookie.
func SocketCookie(c net.Conn) (uint64, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return 0, fmt.Errorf("%T has no SyscallConn", c)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0, err
	}
	var (
		cookie uint64
		serr   error
	)
	if err := rc.Control(func(fd uintptr) {
		cookie, serr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE)
	}); err != nil {
		return 0, err
	}
	return cookie, serr
}

// SetUserTimeout sets TCP_USER_TIMEOUT on a TCP connection: the kernel
// gives up on unacknowledged data (and unanswered probes) after d.
func SetUserTimeout(t testing.TB, c net.Conn, d time.Duration) {
	t.Helper()
	rc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(d.Milliseconds()))
	}); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatalf("TCP_USER_TIMEOUT: %v", serr)
	}
}
