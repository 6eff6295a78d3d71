package scale_e2e

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	_ "net/http/pprof" // the speaker's profiles, on envPprof's address
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"sync"
	"syscall"

	"k8s.io/component-base/logs"

	"github.com/keeplb/keeplb/pkg/cmd"
)

// Environment of the keeplb process that runKeeplb runs.
const (
	// envPprof is the address of its /debug/pprof/.
	envPprof = "KEEPLB_SCALE_PPROF"
	// envProfileDir and envProfilePhases ask for CPU profiles of its
	// phases: DIR/NAME.pprof for each NAME of the comma-separated phases,
	// the first from the start, each ended by SIGUSR1, which starts the
	// next.
	envProfileDir    = "KEEPLB_SCALE_PROFILE_DIR"
	envProfilePhases = "KEEPLB_SCALE_PROFILE_PHASES"
)

// runKeeplb runs the keeplb command with the process's arguments, as
// cmd/keeplb's main does, next to a pprof server and a CPU profile of its
// start (see envPprof, envProfileDir), and returns its exit code.
func runKeeplb() int {
	defer logs.FlushLogs()
	if addr := os.Getenv(envPprof); addr != "" {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, "Error: pprof:", err)
			return 1
		}
		go func() { _ = http.Serve(l, nil) }()
	}
	if dir, phases := os.Getenv(envProfileDir), os.Getenv(envProfilePhases); dir != "" && phases != "" {
		stop, err := profilePhases(dir, strings.Split(phases, ","))
		if err != nil {
			fmt.Fprintln(os.Stderr, "Error: CPU profile:", err)
			return 1
		}
		defer stop()
	}
	root := cmd.NewRootCommand()
	root.SetArgs(os.Args[1:])
	if err := root.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "Error:", err)
		return 1
	}
	return 0
}

// profilePhases writes a CPU profile of each phase to DIR/NAME.pprof:
// the first from now, each until a SIGUSR1, which starts the next; the
// last ends with stop.
func profilePhases(dir string, phases []string) (stop func(), err error) {
	begin := func(name string) (*os.File, error) {
		f, err := os.Create(filepath.Join(dir, name+".pprof"))
		if err != nil {
			return nil, err
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			return nil, errors.Join(err, f.Close())
		}
		return f, nil
	}
	f, err := begin(phases[0])
	if err != nil {
		return nil, err
	}
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	done, finished := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(finished)
		defer signal.Stop(usr1)
		for _, next := range append(phases[1:], "") {
			select {
			case <-usr1:
			case <-done:
				next = ""
			}
			pprof.StopCPUProfile()
			_ = f.Close()
			if next == "" {
				return
			}
			if f, err = begin(next); err != nil {
				fmt.Fprintln(os.Stderr, "Error: CPU profile:", err)
				return
			}
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { close(done) }); <-finished }, nil
}
