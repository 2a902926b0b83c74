// A Go HTTP server that takes its listening socket by systemd's socket
// activation (sd_listen_fds(3)), standard library only: under herd's
// `shared` or `reuseport` mode (README, Recipes) it serves the socket herd
// hands it as fd 3, and without LISTEN_FDS it binds HERD_GO_ADDR itself.
// SIGTERM (what herd sends a worker it drains) stops it gracefully:
// it stops accepting, finishes the requests in flight, and exits 0.
//
//	(cd workers/go && go build)    # -> workers/go/herd-go-hello
//	herd run --mode reuseport --ready delay:300ms --listen 127.0.0.1:3000 -- workers/go/herd-go-hello
package main

import (
	"context"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

// listenFDsStart is the first fd systemd (and herd) passes: SD_LISTEN_FDS_START.
const listenFDsStart = 3

// inheritedListener returns the socket passed as fd 3 when LISTEN_FDS says
// there is one and LISTEN_PID names this process, as sd_listen_fds does.
func inheritedListener() (net.Listener, error) {
	pid, err := strconv.Atoi(os.Getenv("LISTEN_PID"))
	if err != nil || pid != os.Getpid() {
		return nil, nil
	}
	count, err := strconv.Atoi(os.Getenv("LISTEN_FDS"))
	if err != nil || count < 1 {
		return nil, nil
	}
	// The socket is not meant for our children.
	os.Unsetenv("LISTEN_PID")
	os.Unsetenv("LISTEN_FDS")
	os.Unsetenv("LISTEN_FDNAMES")
	file := os.NewFile(uintptr(listenFDsStart), "LISTEN_FD_3")
	listener, err := net.FileListener(file)
	if err != nil {
		return nil, fmt.Errorf("fd 3 is not a listening socket: %w", err)
	}
	// FileListener made a copy of the fd; close ours.
	file.Close()
	return listener, nil
}

func main() {
	listener, err := inheritedListener()
	if err != nil {
		log.Fatal(err)
	}
	if listener == nil {
		addr := os.Getenv("HERD_GO_ADDR")
		if addr == "" {
			addr = "127.0.0.1:3000"
		}
		if listener, err = net.Listen("tcp", addr); err != nil {
			log.Fatal(err)
		}
	}
	body := fmt.Sprintf("Handled by worker %d\n", os.Getpid())
	server := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprint(w, body)
	})}
	stopped := make(chan struct{})
	go func() {
		signals := make(chan os.Signal, 1)
		signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
		<-signals
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := server.Shutdown(ctx); err != nil {
			log.Printf("shutdown: %v", err)
		}
		close(stopped)
	}()
	log.Printf("pid %d serving %s", os.Getpid(), listener.Addr())
	if err := server.Serve(listener); err != http.ErrServerClosed {
		log.Fatal(err)
	}
	<-stopped
}
