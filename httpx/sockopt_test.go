package httpx

import (
	"io"
	"net/http"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func readSockopts(t *testing.T, c *conn) sockopts {
	t.Helper()
	var o sockopts
	err := c.raw.Control(func(fd uintptr) {
		f := int(fd)
		o.keepalive, _ = unix.GetsockoptInt(f, unix.SOL_SOCKET, unix.SO_KEEPALIVE)
		o.idle, _ = unix.GetsockoptInt(f, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE)
		o.intvl, _ = unix.GetsockoptInt(f, unix.IPPROTO_TCP, unix.TCP_KEEPINTVL)
		o.cnt, _ = unix.GetsockoptInt(f, unix.IPPROTO_TCP, unix.TCP_KEEPCNT)
		o.userTimeout, _ = unix.GetsockoptInt(f, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT)
	})
	if err != nil {
		t.Fatal(err)
	}
	return o
}

// TestSocketOptionsOnlyWhileInFlight: the drop-detecting options are set
// while a request runs and the connection's own come back when it is idle.
func TestSocketOptionsOnlyWhileInFlight(t *testing.T) {
	const drop = 4 * time.Second
	conns := make(chan *conn, 1)
	during := make(chan sockopts, 1)
	ts := abortServer(t, Options{DropTimeout: drop}, func(w http.ResponseWriter, r *http.Request) {
		st := FromContext(r.Context())
		during <- readSockopts(t, st.c)
		conns <- st.c
		io.WriteString(w, "ok")
	})
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get("http://" + ts.addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()

	want := newDropSettings(drop).opts
	want.cnt = 9 // left alone: the user timeout replaces it
	if got := <-during; got != want {
		t.Errorf("in flight: %+v, want %+v", got, want)
	}
	c := <-conns
	eventually(t, "the connection is idle", func() bool { c.mu.Lock(); defer c.mu.Unlock(); return c.busy == 0 })
	after := readSockopts(t, c)
	// Go's defaults for accepted connections: keepalive on, 15s idle and
	// interval, 9 probes; no user timeout.
	if want := (sockopts{keepalive: 1, idle: 15, intvl: 15, cnt: 9}); after != want {
		t.Errorf("idle: %+v, want %+v", after, want)
	}
}
