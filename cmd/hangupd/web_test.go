package main

import (
	"crypto/tls"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/hangup-io/hangup/internal/testutil"
)

func writeWebConfig(t *testing.T, dir, text string) string {
	t.Helper()
	p := filepath.Join(dir, "web.yml")
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func httpClient() *http.Client { return &http.Client{Timeout: 10 * time.Second} }

func scrape(t *testing.T, c *http.Client, url, user, pass string) (int, string) {
	t.Helper()
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if user != "" {
		req.SetBasicAuth(user, pass)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// TestWebConfig runs hangupd with a web configuration of TLS (a certificate
// made here) and basic auth: scrapes without the password or with a wrong
// one are refused, the right one gets the metrics, and plain HTTP gets no
// metrics at all.
func TestWebConfig(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile, pool := testutil.SelfSignedCert(t, dir)
	hash, err := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	cfg := writeWebConfig(t, dir, "tls_server_config:\n  cert_file: "+certFile+"\n  key_file: "+keyFile+
		"\nbasic_auth_users:\n  prometheus: "+string(hash)+"\n")
	d := startDaemon(t, "--web.config.file="+cfg)

	c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	url := "https://" + d.addr + "/metrics"
	if code, _ := scrape(t, c, url, "", ""); code != http.StatusUnauthorized {
		t.Errorf("no credentials: status %d, want 401", code)
	}
	if code, _ := scrape(t, c, url, "prometheus", "wrong"); code != http.StatusUnauthorized {
		t.Errorf("wrong password: status %d, want 401", code)
	}
	if code, body := scrape(t, c, url, "prometheus", "s3cret"); code != http.StatusOK || !strings.Contains(body, "hangup_build_info") {
		t.Errorf("right password: status %d\n%s", code, body)
	}
	if code, body := scrape(t, http.DefaultClient, "http://"+d.addr+"/metrics", "prometheus", "s3cret"); code == http.StatusOK || strings.Contains(body, "hangup_build_info") {
		t.Errorf("plain HTTP to the TLS endpoint: status %d\n%s", code, body)
	}
	// A client that does not trust the certificate fails the handshake.
	if _, err := http.Get(url); err == nil {
		t.Error("an untrusted certificate was accepted")
	}
	if err := d.stop(t); err != nil {
		t.Errorf("hangupd exit after SIGTERM: %v", err)
	}
}

// TestWebConfigInvalid: a web configuration that cannot be used stops the
// start with an error naming the flag, before the probe loads (so it needs
// no privileges).
func TestWebConfigInvalid(t *testing.T) {
	dir := t.TempDir()
	for name, text := range map[string]string{
		"missing key":  "tls_server_config:\n  cert_file: " + filepath.Join(dir, "none.pem") + "\n",
		"bad yaml":     "tls_server_config: [\n",
		"unknown key":  "tls_server_konfig: {}\n",
		"not a bcrypt": "basic_auth_users:\n  u: plain\n",
	} {
		cfg := writeWebConfig(t, dir, text)
		err := run([]string{"--web.config.file=" + cfg, "--web.listen-address=127.0.0.1:0"}, io.Discard)
		if err == nil || !strings.Contains(err.Error(), "--web.config.file") {
			t.Errorf("%s: run returned %v, want an error about --web.config.file", name, err)
		}
	}
	if err := run([]string{"--web.config.file=" + filepath.Join(dir, "absent.yml")}, io.Discard); err == nil {
		t.Error("a missing web configuration file was accepted")
	}
}
