package cluster

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"
)

// clientTimeout bounds one request of the tests' clients.
const clientTimeout = 3 * time.Second

// Get sends one HTTP GET to url from the host side (a client outside every
// node) and returns the body of a 200 answer.
func Get(ctx context.Context, url string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, clientTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	// A new connection per request: each one is scheduled anew, as a new
	// client's would be.
	req.Close = true
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s: %s: %s", url, resp.Status, body)
	}
	return string(body), nil
}

// GetFrom sends one HTTP GET to url from node's network namespace (node ""
// is the VM's root namespace, the router), with this test binary as the
// client, and returns the body of a 200 answer.
func (c *Cluster) GetFrom(ctx context.Context, node, url string) (string, error) {
	self, err := os.Executable()
	if err != nil {
		return "", err
	}
	out, err := c.Exec(ctx, node, "env", envRole+"=get", self, url)
	return strings.TrimSpace(out), err
}

// get is the client of GetFrom, in the VM.
func get(url string) int {
	body, err := Get(context.Background(), url)
	if err != nil {
		fmt.Println(err)
		return 1
	}
	fmt.Print(body)
	return 0
}
