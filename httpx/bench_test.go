package httpx

import (
	"io"
	"log/slog"
	"net"
	"net/http"
	"testing"
)

var okHandler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
	io.WriteString(w, "ok")
})

// BenchmarkOverhead compares a bare handler with the same handler behind a
// Monitor: called directly (the cost of State, goroutine and wrapper), and
// through a real loopback server with a keep-alive client (adding
// connection tracking and the per-request socket options).
func BenchmarkOverhead(b *testing.B) {
	m, err := New(Options{Source: SourceEpoll, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()

	req, _ := http.NewRequest("GET", "/", nil)
	direct := func(h http.Handler) func(b *testing.B) {
		return func(b *testing.B) {
			w := &recorder{h: make(http.Header)}
			b.ReportAllocs()
			for b.Loop() {
				h.ServeHTTP(w, req)
			}
		}
	}
	b.Run("direct/bare", direct(okHandler))
	b.Run("direct/httpx", direct(m.Handler(okHandler)))

	server := func(h http.Handler, monitored bool) func(b *testing.B) {
		return func(b *testing.B) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			srv := &http.Server{Handler: h}
			if monitored {
				srv.Handler = m.Handler(h)
				m.Configure(srv)
			}
			go srv.Serve(ln)
			defer srv.Close()
			tr := &http.Transport{}
			defer tr.CloseIdleConnections()
			client := &http.Client{Transport: tr}
			url := "http://" + ln.Addr().String() + "/"
			b.ReportAllocs()
			for b.Loop() {
				resp, err := client.Get(url)
				if err != nil {
					b.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		}
	}
	b.Run("server/bare", server(okHandler, false))
	b.Run("server/httpx", server(okHandler, true))
}
