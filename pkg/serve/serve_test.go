package serve

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/apiserver/pkg/authentication/authenticator"
	"k8s.io/apiserver/pkg/authentication/request/bearertoken"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/apiserver/pkg/authorization/authorizer"
	"k8s.io/client-go/util/cert"
)

// Tokens of the fake authenticator: reader may get /metrics, nobody may
// not; any other token is unknown.
const (
	readerToken = "reader-token"
	nobodyToken = "nobody-token"
)

// fakeAuth stands for the API server: the real bearer token parsing, a
// token table for TokenReview and one rule for SubjectAccessReview. It
// records what it was asked to authorize.
type fakeAuth struct {
	mu    sync.Mutex
	asked []string
}

func (f *fakeAuth) authn() authenticator.Request {
	return bearertoken.New(authenticator.TokenFunc(func(_ context.Context, token string) (*authenticator.Response, bool, error) {
		switch token {
		case readerToken:
			return &authenticator.Response{User: &user.DefaultInfo{Name: "reader"}}, true, nil
		case nobodyToken:
			return &authenticator.Response{User: &user.DefaultInfo{Name: "nobody"}}, true, nil
		}
		return nil, false, nil
	}))
}

func (f *fakeAuth) authz() authorizer.Authorizer {
	return authorizer.AuthorizerFunc(func(_ context.Context, a authorizer.Attributes) (authorizer.Decision, string, error) {
		f.mu.Lock()
		f.asked = append(f.asked, fmt.Sprintf("%s %s %s resource=%v", a.GetUser().GetName(), a.GetVerb(), a.GetPath(), a.IsResourceRequest()))
		f.mu.Unlock()
		if a.GetUser().GetName() == "reader" && a.GetVerb() == "get" && a.GetPath() == MetricsPath && !a.IsResourceRequest() {
			return authorizer.DecisionAllow, "", nil
		}
		return authorizer.DecisionNoOpinion, "no rule", nil
	})
}

func okHandler(body string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, body) })
}

// start serves s on a loopback port until the test ends, and returns the
// address and a channel that receives Run's result.
func start(t *testing.T, ctx context.Context, s *Server) (string, <-chan error) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.serve(ctx, l) }()
	return l.Addr().String(), done
}

// insecureClient is what the kubelet's probes and a Prometheus with
// insecure_skip_verify are: encrypted, unverified.
func insecureClient() *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
}

func get(t *testing.T, c *http.Client, url, token string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func secureConfig() Config {
	c := Config{BindAddress: "127.0.0.1:0"}
	c.Defaults()
	return c
}

func TestHealthOpenMetricsGuarded(t *testing.T) {
	auth := &fakeAuth{}
	s, err := newServer(secureConfig(), auth.authn(), auth.authz(), Endpoints{
		Metrics: okHandler("keeplb_up 1\n"),
		Health:  map[string]http.Handler{"/healthz": okHandler("ok"), "/readyz": okHandler("ready")},
	})
	if err != nil {
		t.Fatal(err)
	}
	addr, _ := start(t, t.Context(), s)
	c := insecureClient()
	base := "https://" + addr
	for _, tc := range []struct {
		path, token string
		code        int
		body        string
	}{
		{"/healthz", "", 200, "ok"},
		{"/readyz", "", 200, "ready"},
		// A token does not hurt a probe, even an unknown one.
		{"/healthz", "made-up", 200, "ok"},
		{"/metrics", "", 401, "Unauthorized"},
		{"/metrics", "made-up", 401, "Unauthorized"},
		{"/metrics", nobodyToken, 403, `user "nobody" may not get path "/metrics"`},
		{"/metrics", readerToken, 200, "keeplb_up 1"},
		{"/other", readerToken, 404, ""},
	} {
		code, body := get(t, c, base+tc.path, tc.token)
		if code != tc.code || !strings.Contains(body, tc.body) {
			t.Errorf("GET %s with token %q = %d %q, want %d containing %q", tc.path, tc.token, code, body, tc.code, tc.body)
		}
	}
	auth.mu.Lock()
	defer auth.mu.Unlock()
	want := []string{"nobody get /metrics resource=false", "reader get /metrics resource=false"}
	if strings.Join(auth.asked, "|") != strings.Join(want, "|") {
		t.Errorf("authorizer asked %q, want %q (never for health, never without a user)", auth.asked, want)
	}

	// Plain HTTP to the HTTPS port gets nothing: tokens never go in clear
	// text by mistake.
	plain := &http.Client{Timeout: 10 * time.Second}
	if resp, err := plain.Get("http://" + addr + "/healthz"); err == nil {
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Errorf("plain HTTP to the secure port got %s", resp.Status)
		}
	}
}

// A verb other than get needs its own permission, as on the API server.
func TestMetricsVerbIsTheMethod(t *testing.T) {
	auth := &fakeAuth{}
	s, err := newServer(secureConfig(), auth.authn(), auth.authz(), Endpoints{Metrics: okHandler("m")})
	if err != nil {
		t.Fatal(err)
	}
	addr, _ := start(t, t.Context(), s)
	req, _ := http.NewRequest(http.MethodPost, "https://"+addr+MetricsPath, nil)
	req.Header.Set("Authorization", "Bearer "+readerToken)
	resp, err := insecureClient().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("POST /metrics as reader = %s, want 403", resp.Status)
	}
}

// --metrics-secure=false: plain HTTP, metrics open to anyone.
func TestInsecure(t *testing.T) {
	cfg := secureConfig()
	cfg.Insecure = true
	s, err := newServer(cfg, nil, nil, Endpoints{Metrics: okHandler("keeplb_up 1\n"), Health: map[string]http.Handler{"/healthz": okHandler("ok")}})
	if err != nil {
		t.Fatal(err)
	}
	addr, _ := start(t, t.Context(), s)
	c := &http.Client{Timeout: 10 * time.Second}
	for path, want := range map[string]string{"/metrics": "keeplb_up 1", "/healthz": "ok"} {
		if code, body := get(t, c, "http://"+addr+path, ""); code != 200 || !strings.Contains(body, want) {
			t.Errorf("GET %s = %d %q", path, code, body)
		}
	}
}

// A stopping server finishes the scrape in flight, and refuses new ones.
func TestShutdownFinishesInFlightScrape(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	slow := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		close(entered)
		<-release
		_, _ = io.WriteString(w, "keeplb_up 1\n")
	})
	auth := &fakeAuth{}
	s, err := newServer(secureConfig(), auth.authn(), auth.authz(), Endpoints{Metrics: slow})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	addr, done := start(t, ctx, s)
	type result struct {
		code int
		body string
		err  error
	}
	scraped := make(chan result, 1)
	go func() {
		req, _ := http.NewRequest(http.MethodGet, "https://"+addr+MetricsPath, nil)
		req.Header.Set("Authorization", "Bearer "+readerToken)
		resp, err := insecureClient().Do(req)
		if err != nil {
			scraped <- result{err: err}
			return
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		scraped <- result{resp.StatusCode, string(b), err}
	}()
	<-entered
	cancel()
	// The listener closes at once; the scrape is still held.
	deadline := time.Now().Add(10 * time.Second)
	for {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			break
		}
		conn.Close()
		if time.Now().After(deadline) {
			t.Fatal("the stopping server still accepts connections")
		}
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case err := <-done:
		t.Fatalf("Run returned (%v) with a scrape in flight", err)
	default:
	}
	close(release)
	r := <-scraped
	if r.err != nil || r.code != 200 || r.body != "keeplb_up 1\n" {
		t.Fatalf("in-flight scrape = %d %q %v, want it whole", r.code, r.body, r.err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run = %v after a graceful shutdown", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return once the scrape was over")
	}
}

// A request that never ends holds the exit no longer than the timeout.
func TestShutdownTimeout(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	defer close(release)
	stuck := http.HandlerFunc(func(_ http.ResponseWriter, _ *http.Request) {
		close(entered)
		<-release
	})
	cfg := secureConfig()
	cfg.Insecure, cfg.ShutdownTimeout = true, 200*time.Millisecond
	s, err := newServer(cfg, nil, nil, Endpoints{Metrics: stuck})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	addr, done := start(t, ctx, s)
	failed := make(chan error, 1)
	go func() {
		resp, err := (&http.Client{}).Get("http://" + addr + MetricsPath)
		if err == nil {
			resp.Body.Close()
		}
		failed <- err
	}()
	<-entered
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run = %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run still waits for a stuck request 10s after a 200ms shutdown timeout")
	}
	if err := <-failed; err == nil {
		t.Fatal("the stuck request got an answer; want its connection closed")
	}
}

// Alongside: a server that cannot listen stops the daemon's work, which
// then returns the reason.
func TestAlongsideStopsWorkWhenServingFails(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	cfg := Config{BindAddress: taken.Addr().String(), Insecure: true}
	cfg.Defaults()
	s, err := newServer(cfg, nil, nil, Endpoints{Metrics: okHandler("")})
	if err != nil {
		t.Fatal(err)
	}
	workErr := errors.New("work stopped")
	err = Alongside(t.Context(), s, func(ctx context.Context) error {
		select {
		case <-ctx.Done():
			return workErr
		case <-time.After(30 * time.Second):
			return errors.New("work ran on although the server could not listen")
		}
	})
	if !errors.Is(err, workErr) || !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("Alongside = %v, want the work's error and the listen error", err)
	}
}

// --metrics-cert-file: the given certificate is served, and a rotated one
// without a restart.
func TestCertFileRotation(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	write := func(host string) *x509.CertPool {
		c, k, err := cert.GenerateSelfSignedCertKey(host, []net.IP{net.ParseIP("127.0.0.1")}, nil)
		if err != nil {
			t.Fatal(err)
		}
		// Each file atomically, as a Secret volume updates them: the
		// watcher may read a new key with the old certificate in between,
		// a pair it skips until both are new.
		for _, f := range []struct {
			path string
			data []byte
		}{{keyFile, k}, {certFile, c}} {
			if err := os.WriteFile(f.path+".tmp", f.data, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(f.path+".tmp", f.path); err != nil {
				t.Fatal(err)
			}
		}
		pool := x509.NewCertPool()
		certs, err := cert.ParseCertsPEM(c)
		if err != nil {
			t.Fatal(err)
		}
		pool.AddCert(certs[len(certs)-1]) // the CA, after the serving certificate
		return pool
	}
	first := write("first")
	cfg := secureConfig()
	cfg.CertFile, cfg.KeyFile = certFile, keyFile
	auth := &fakeAuth{}
	s, err := newServer(cfg, auth.authn(), auth.authz(), Endpoints{Health: map[string]http.Handler{"/healthz": okHandler("ok")}})
	if err != nil {
		t.Fatal(err)
	}
	addr, _ := start(t, t.Context(), s)
	verifies := func(pool *x509.CertPool) error {
		c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, DisableKeepAlives: true}}
		resp, err := c.Get("https://" + addr + "/healthz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		return nil
	}
	if err := verifies(first); err != nil {
		t.Fatalf("the given certificate is not served: %v", err)
	}
	second := write("second")
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := verifies(second)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the rotated certificate is not served 30s after the files changed: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"ok", Config{BindAddress: ":10260"}, ""},
		{"ok with files", Config{BindAddress: "[10.0.0.1]:10261", CertFile: "c", KeyFile: "k"}, ""},
		{"no port", Config{BindAddress: "10.0.0.1"}, "--metrics-bind-address"},
		{"cert without key", Config{BindAddress: ":1", CertFile: "c"}, "go together"},
		{"key without cert", Config{BindAddress: ":1", KeyFile: "k"}, "go together"},
		{"cert on plain HTTP", Config{BindAddress: ":1", Insecure: true, CertFile: "c", KeyFile: "k"}, "needs --metrics-secure"},
	} {
		err := tc.cfg.Validate()
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%s: Validate() = %v, want %q", tc.name, err, tc.want)
		}
	}
}

func TestWildcard(t *testing.T) {
	for addr, want := range map[string]bool{
		":10261":            true,
		"0.0.0.0:10261":     true,
		"[::]:10261":        true,
		"127.0.0.1:10261":   false,
		"[10.0.0.1]:10261":  false,
		"[fd00::1]:10261":   false,
		"node.example:1026": false,
	} {
		if got := (Config{BindAddress: addr}).Wildcard(); got != want {
			t.Errorf("Config{BindAddress: %q}.Wildcard() = %v, want %v", addr, got, want)
		}
	}
}
