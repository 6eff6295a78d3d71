package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/keeplb/keeplb/pkg/testing/lab"
)

// labPrefix names the demo's network namespaces.
const labPrefix = "demo"

// nodeAgent is the node side: the lab's namespaces, a speaker process per
// node, and the mailbox loop. It runs in the VM, or on a host with IPVS.
type nodeAgent struct {
	state, keeplb, kubeconfig string
	lab                       *lab.Lab
	client                    string

	mu       sync.Mutex
	speakers map[string]*speakerProc
}

// speakerProc is a speaker process; done closes when it has exited.
type speakerProc struct {
	cmd  *exec.Cmd
	done chan struct{}
}

func runNode(state, keeplb, kubeconfig, where string) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	_ = lab.Cleanup(labPrefix)
	l, err := lab.New(labPrefix, 3)
	if err != nil {
		return err
	}
	a := &nodeAgent{state: state, keeplb: keeplb, kubeconfig: kubeconfig, lab: l, speakers: map[string]*speakerProc{}}
	defer a.close()
	client, clientIP, err := l.AddClient("client")
	if err != nil {
		return err
	}
	a.client = client
	lay := layout{Client: client, ClientIP: clientIP.String(), Where: where}
	for i, n := range l.Nodes {
		// What the speaker DaemonSet's init container runs on a real node;
		// with --netns the speaker leaves the namespace's sysctls alone.
		if out, err := exec.Command(keeplb, "prepare-node", "--netns="+n.Name).CombinedOutput(); err != nil {
			return fmt.Errorf("keeplb prepare-node --netns=%s: %w\n%s", n.Name, err, out)
		}
		p, err := l.AddPod(n, fmt.Sprintf("web-%d", i+1))
		if err != nil {
			return err
		}
		s, err := lab.Serve(p.Name, netip.AddrPortFrom(p.IP, 8080), p.Name)
		if err != nil {
			return err
		}
		l.OnClose(s.Close)
		lay.Nodes = append(lay.Nodes, nodeInfo{Name: n.Name, IP: n.IP.String()})
		lay.Pods = append(lay.Pods, podInfo{Name: p.Name, Node: n.Name, IP: p.IP.String()})
		if err := a.startSpeaker(n.Name); err != nil {
			return err
		}
	}
	if err := writeJSON(filepath.Join(state, "node.json"), lay); err != nil {
		return err
	}
	fmt.Println("node side up:", len(l.Nodes), "nodes, speakers started")
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		for _, id := range pending(state) {
			dir := filepath.Join(state, "mail")
			var req request
			err := readJSON(filepath.Join(dir, id+".req"), &req)
			_ = os.Remove(filepath.Join(dir, id+".req"))
			res := response{}
			if err == nil {
				res, err = a.handle(ctx, req)
			}
			if err != nil {
				res.Err = err.Error()
			}
			if err := writeJSON(filepath.Join(dir, id+".res"), res); err != nil {
				fmt.Fprintln(os.Stderr, "answer:", err)
			}
		}
	}
}

func (a *nodeAgent) handle(ctx context.Context, req request) (response, error) {
	switch req.Op {
	case "get":
		ap, err := netip.ParseAddrPort(req.Addr)
		if err != nil {
			return response{}, err
		}
		ans, err := lab.Get(ctx, a.client, ap, "/", 3*time.Second)
		if err != nil {
			return response{}, err
		}
		return response{Answer: &ans}, nil
	case "failover":
		return a.failover(ctx, req)
	case "nodeport":
		for _, args := range [][]string{{"-A", "-t", req.Addr, "-s", "rr"}, {"-a", "-t", req.Addr, "-r", req.Target, "-m"}} {
			if out, err := exec.Command("ip", append([]string{"netns", "exec", req.Node, "ipvsadm"}, args...)...).CombinedOutput(); err != nil {
				return response{}, fmt.Errorf("ipvsadm %v in %s: %w: %s", args, req.Node, err, out)
			}
		}
		return response{}, nil
	case "restore":
		if err := lab.SetLink(req.Node, true); err != nil {
			return response{}, err
		}
		return response{}, a.startSpeaker(req.Node)
	}
	return response{}, fmt.Errorf("unknown request %q", req.Op)
}

// failover probes the VIP from the client every 20 ms on new connections
// (250 ms timeout each), cuts req.Node off after a second (its link down,
// its speaker and keepalived killed, as a crash would), and probes on until
// 10 answers came after the cut.
func (a *nodeAgent) failover(ctx context.Context, req request) (response, error) {
	ap, err := netip.ParseAddrPort(req.Addr)
	if err != nil {
		return response{}, err
	}
	var res response
	var cut, prevOK time.Time
	after := 0
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) && after < 10 {
		if cut.IsZero() && res.Sent >= 20 {
			cut = time.Now()
			if err := lab.SetLink(req.Node, false); err != nil {
				return res, err
			}
			a.killSpeaker(req.Node)
		}
		at := time.Now()
		ans, err := lab.Get(ctx, a.client, ap, "/", 250*time.Millisecond)
		res.Sent++
		if err != nil {
			res.Failed++
		} else {
			// The gap is the longest wait between two answers: what a
			// client retrying at once would have waited.
			if !prevOK.IsZero() && at.Sub(prevOK) > res.Gap {
				res.Gap = at.Sub(prevOK)
			}
			prevOK = at
			if !cut.IsZero() {
				if after == 0 {
					res.By = ans.Name
				}
				after++
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	if after == 0 {
		return res, fmt.Errorf("no answer through %s within 30 s of cutting %s off", ap, req.Node)
	}
	return res, nil
}

func (a *nodeAgent) startSpeaker(node string) error {
	run := filepath.Join("/run/keeplb", node)
	if err := os.MkdirAll(run, 0o755); err != nil {
		return err
	}
	logf, err := os.OpenFile(filepath.Join(a.state, "logs", "speaker-"+node+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(a.keeplb, "speaker", "--node-name="+node, "--netns="+node, "--kubeconfig="+a.kubeconfig,
		"--run-dir="+run, "--metrics-bind-address=0", "--min-sync-interval=100ms", "--ipvs")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // keepalived goes with it
	if err := cmd.Start(); err != nil {
		_ = logf.Close()
		return err
	}
	p := &speakerProc{cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); _ = logf.Close(); close(p.done) }()
	a.mu.Lock()
	a.speakers[node] = p
	a.mu.Unlock()
	return nil
}

// killSpeaker kills node's speaker and its keepalived at once.
func (a *nodeAgent) killSpeaker(node string) {
	a.mu.Lock()
	p := a.speakers[node]
	delete(a.speakers, node)
	a.mu.Unlock()
	if p != nil {
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
}

// close stops the speakers gracefully (they remove their VIPs and IPVS
// virtual servers) and removes the namespaces.
func (a *nodeAgent) close() {
	a.mu.Lock()
	procs := a.speakers
	a.speakers = map[string]*speakerProc{}
	a.mu.Unlock()
	for _, p := range procs {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
	}
	for _, p := range procs {
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
			<-p.done
		}
	}
	a.lab.Close()
}
