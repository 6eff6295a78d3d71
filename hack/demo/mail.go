package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/keeplb/keeplb/pkg/testing/lab"
)

// The host talks to the node agent through files in the state folder,
// which the VM shares: the host writes mail/N.req, the agent answers in
// mail/N.res. Each file is written to a temporary name and renamed, so the
// reader never sees half of one.

// request is one thing for the agent to do.
type request struct {
	// Op is "get" (one HTTP GET of Addr from the client), "failover"
	// (probe Addr from the client while cutting Node off) or "restore"
	// (bring Node back), or "nodeport" (in Node, an IPVS virtual server
	// Addr forwarding to Target, as kube-proxy's IPVS mode would).
	Op     string `json:"op"`
	Addr   string `json:"addr,omitempty"`
	Node   string `json:"node,omitempty"`
	Target string `json:"target,omitempty"`
}

// response is the agent's answer.
type response struct {
	Err    string      `json:"err,omitempty"`
	Answer *lab.Answer `json:"answer,omitempty"`
	// For failover: requests sent, failed, and the gap between the last
	// answer before the cut and the first after.
	Sent   int           `json:"sent,omitempty"`
	Failed int           `json:"failed,omitempty"`
	Gap    time.Duration `json:"gap,omitempty"`
	// By is who answered after the cut.
	By string `json:"by,omitempty"`
}

// layout is the node side, as the agent reports it once up.
type layout struct {
	Client   string     `json:"client"`
	ClientIP string     `json:"clientIP"`
	Nodes    []nodeInfo `json:"nodes"`
	Pods     []podInfo  `json:"pods"`
	// Where is "VM" or "host".
	Where string `json:"where"`
}

type nodeInfo struct {
	Name string `json:"name"`
	IP   string `json:"ip"`
}

type podInfo struct {
	Name string `json:"name"`
	Node string `json:"node"`
	IP   string `json:"ip"`
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

// send mails req to the agent and waits up to timeout for its answer.
func send(state string, req request, timeout time.Duration) (response, error) {
	dir := filepath.Join(state, "mail")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return response{}, err
	}
	id := strconv.FormatInt(time.Now().UnixNano(), 10)
	if err := writeJSON(filepath.Join(dir, id+".req"), req); err != nil {
		return response{}, err
	}
	res := filepath.Join(dir, id+".res")
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		var r response
		if err := readJSON(res, &r); err == nil {
			_ = os.Remove(res)
			if r.Err != "" {
				return r, fmt.Errorf("%s", r.Err)
			}
			return r, nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return response{}, fmt.Errorf("the node agent did not answer %q within %s (is the demo up? see %s)", req.Op, timeout, filepath.Join(state, "logs", "node.log"))
}

// pending returns the requests waiting in the mailbox, oldest first.
func pending(state string) []string {
	entries, err := os.ReadDir(filepath.Join(state, "mail"))
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range entries {
		if id, ok := strings.CutSuffix(e.Name(), ".req"); ok {
			out = append(out, id)
		}
	}
	return out
}
