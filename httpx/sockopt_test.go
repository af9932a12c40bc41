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

// goDefaults are Go's options for accepted connections: keepalive on, 15s
// idle and interval, 9 probes; no user timeout.
var goDefaults = sockopts{keepalive: 1, idle: 15, intvl: 15, cnt: 9}

// TestSocketOptionsOnlyForLongRequests: a short request leaves the socket
// alone; a request that runs on gets the drop-detecting options within two
// watchdog ticks, and the connection's own come back when it is idle.
func TestSocketOptionsOnlyForLongRequests(t *testing.T) {
	const drop = 4 * time.Second
	conns := make(chan *conn, 1)
	during := make(chan sockopts, 2)
	ts := abortServer(t, Options{DropTimeout: drop}, func(w http.ResponseWriter, r *http.Request) {
		st := FromContext(r.Context())
		if r.URL.Path == "/long" {
			eventually(t, "the connection is tuned", st.c.tuned.Load)
		}
		during <- readSockopts(t, st.c)
		conns <- st.c
		io.WriteString(w, "ok")
	})
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	get := func(path string) {
		resp, err := (&http.Client{Transport: tr}).Get("http://" + ts.addr + path)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	get("/short")
	if got := <-during; got != goDefaults {
		t.Errorf("short request: %+v, want %+v", got, goDefaults)
	}
	<-conns
	get("/long")
	set := newDropSettings(drop)
	want := sockopts{keepalive: 1, idle: set.idle, intvl: set.intvl, cnt: 9, userTimeout: set.userTimeout}
	if got := <-during; got != want {
		t.Errorf("long request: %+v, want %+v", got, want)
	}
	c := <-conns
	eventually(t, "the connection is restored", func() bool { return !c.tuned.Load() })
	if after := readSockopts(t, c); after != goDefaults {
		t.Errorf("idle: %+v, want %+v", after, goDefaults)
	}
}
