// Package pollfd puts a descriptor into Go's network poller, so that a
// goroutine can wait for it to become readable without holding a thread
// (and, on a GOMAXPROCS=1 program, the only P) in a blocking system call.
package pollfd

import (
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// Open makes fd non-blocking and returns it as a file in Go's poller, which
// now owns it, with the RawConn to wait and run system calls on it. On
// error fd is closed.
func Open(fd int, name string) (*os.File, syscall.RawConn, error) {
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, nil, fmt.Errorf("%s: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), name)
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("%s: %w", name, err)
	}
	return f, rc, nil
}
