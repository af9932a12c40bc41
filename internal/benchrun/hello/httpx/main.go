// Command httpx is hello/prom with httpx in front of its handler (default
// source: the agent if its socket exists, else epoll; the in-process BPF
// source is not imported), for `make bench`'s binary-size row.
package main

import (
	"io"
	"log"
	"net"
	"net/http"

	"github.com/hangup-io/hangup/httpx"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

func main() {
	m, err := httpx.New(httpx.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()
	reg := prometheus.NewRegistry()
	reg.MustRegister(m)
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello\n") })
	srv := &http.Server{Handler: m.Handler(mux)}
	m.Configure(srv)
	ln, err := net.Listen("tcp", ":8080")
	if err != nil {
		log.Fatal(err)
	}
	log.Fatal(srv.Serve(m.Listener(ln)))
}
