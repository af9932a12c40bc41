package httpx

import (
	"compress/gzip"
	"net/http"
)

type gzipWriter struct {
	http.ResponseWriter
	gz *gzip.Writer
}

func newGzipWriter(w http.ResponseWriter) *gzipWriter {
	return &gzipWriter{ResponseWriter: w, gz: gzip.NewWriter(w)}
}

func (g *gzipWriter) Write(p []byte) (int, error) { return g.gz.Write(p) }
func (g *gzipWriter) Close() error                { return g.gz.Close() }
