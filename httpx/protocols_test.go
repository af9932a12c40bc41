package httpx

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/hangup-io/hangup/internal/testnet"
)

// selfSigned returns a certificate for the test server address.
func selfSigned(t testing.TB) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "hangup test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{testnet.ServerAddr4.AsSlice()},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// TestProtocolsConnectionDeath runs two concurrent requests over TLS
// HTTP/1.1, HTTP/2 over TLS and HTTP/2 cleartext (h2c), then resets the
// client's connections: every request on them is marked.
func TestProtocolsConnectionDeath(t *testing.T) {
	modes := []struct {
		name  string
		tls   bool
		proto int
	}{
		{"tls-http1", true, 1},
		{"tls-h2", true, 2},
		{"h2c", false, 2},
	}
	forSources(t, func(t *testing.T, src Source) {
		for _, mode := range modes {
			t.Run(mode.name, func(t *testing.T) {
				const n = 2
				pair := testnet.NewPair(t)
				m := newMonitor(t, Options{Source: src})
				ln, err := pair.Server.Listen("tcp", net.JoinHostPort(testnet.ServerAddr4.String(), "0"))
				if err != nil {
					t.Fatal(err)
				}
				started, results := make(chan struct{}, n), make(chan result, n)
				protos := make(chan int, n)
				h := waitingHandler(started, results)
				ts := serveWith(t, m, ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					protos <- r.ProtoMajor
					h(w, r)
				}), nil, func(srv *http.Server) {
					srv.Protocols = new(http.Protocols)
					if mode.tls {
						srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}}
						srv.Protocols.SetHTTP1(mode.proto == 1)
						srv.Protocols.SetHTTP2(mode.proto == 2)
					} else {
						srv.Protocols.SetHTTP1(true)
						srv.Protocols.SetUnencryptedHTTP2(true)
					}
				})

				var (
					mu    sync.Mutex
					conns []net.Conn
				)
				dial := pair.Client.Dialer()
				tr := &http.Transport{
					DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
						c, err := dial(ctx, network, addr)
						if err == nil {
							mu.Lock()
							conns = append(conns, c)
							mu.Unlock()
						}
						return c, err
					},
					TLSClientConfig: &tls.Config{InsecureSkipVerify: true},
					Protocols:       new(http.Protocols),
				}
				defer tr.CloseIdleConnections()
				scheme := "https"
				switch {
				case !mode.tls:
					scheme = "http"
					tr.Protocols.SetUnencryptedHTTP2(true)
				case mode.proto == 2:
					tr.Protocols.SetHTTP2(true)
				default:
					tr.Protocols.SetHTTP1(true)
				}
				client := &http.Client{Transport: tr}
				var clients sync.WaitGroup
				defer clients.Wait()
				for range n {
					// One after the other, so HTTP/2 shares one connection.
					clients.Go(func() {
						resp, err := client.Get(scheme + "://" + ts.addr + "/")
						if err == nil {
							resp.Body.Close()
						}
					})
					waitFor(t, started, "handler")
					if p := waitFor(t, protos, "protocol"); p != mode.proto {
						t.Errorf("request over HTTP/%d, want HTTP/%d", p, mode.proto)
					}
				}
				mu.Lock()
				if want := map[int]int{1: n, 2: 1}[mode.proto]; len(conns) != want {
					t.Errorf("%d connections, want %d", len(conns), want)
				}
				for _, c := range conns {
					reset(t, c)
				}
				mu.Unlock()
				for range n {
					res := waitFor(t, results, "handler result")
					if res.woke != "ctx" || res.status != StatusAborted || res.reason != ReasonPeerReset {
						t.Errorf("got %+v, want ABORTED peer_reset", res)
					}
				}
			})
		}
	})
}

// TestTLSCloseNotifyThenFIN: a TLS client that leaves sends close_notify,
// then its FIN. net/http's background read ends at the close_notify, before
// the socket has seen the FIN; the reason still comes out as the client's
// FIN, not a bare cancellation, from every source (the epoll source, which
// had not registered the bodiless request's connection, registers it then).
func TestTLSCloseNotifyThenFIN(t *testing.T) {
	forSources(t, func(t *testing.T, src Source) {
		m := newMonitor(t, Options{Source: src})
		started, results := make(chan struct{}, 1), make(chan result, 1)
		ts := serveWith(t, m, loopback(t), waitingHandler(started, results), nil, func(srv *http.Server) {
			srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}}
			srv.Protocols = new(http.Protocols)
			srv.Protocols.SetHTTP1(true)
		})
		c, err := tls.Dial("tcp", ts.addr, &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		rawGet(t, c, "/")
		waitFor(t, started, "handler")
		if err := c.Close(); err != nil { // close_notify, then FIN
			t.Fatal(err)
		}
		res := waitFor(t, results, "handler result")
		if res.woke != "ctx" || res.status != StatusAborted || res.reason != ReasonPeerFIN {
			t.Errorf("got %+v, want ABORTED %s before the handler's wait ended", res, ReasonPeerFIN)
		}
	})
}
