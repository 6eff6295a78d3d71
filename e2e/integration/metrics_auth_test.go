package integration

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/keeplb/keeplb/pkg/controller"
	"github.com/keeplb/keeplb/pkg/testing/keeplbtest"
)

// Issue 10: the controller serves /metrics over HTTPS, only to callers the
// API server authenticates and authorizes to get the non-resource URL
// /metrics, while /healthz and /readyz stay open to the kubelet's probes,
// which carry no token. The controller runs as its ServiceAccount, so this
// also proves that manifests/controller/rbac.yaml lets it send the
// TokenReviews and SubjectAccessReviews, and the tokens are real
// ServiceAccount tokens, one bound to keeplb:metrics-reader of the same
// file as an operator binds Prometheus's.
func TestMetricsNeedAuthorization(t *testing.T) {
	e := newEnv(t)
	e.pool("p", `{addresses: ["192.0.2.0/30"]}`)
	addr := keeplbtest.FreeAddr(t)
	e.startController(func(o *controller.Options) { o.MetricsBindAddress = addr })
	reader := keeplbtest.MetricsToken(t, e.client, "prometheus", true)
	stranger := keeplbtest.MetricsToken(t, e.client, "stranger", false)
	base := "https://" + addr

	eventually(t, 30*time.Second, "/healthz and /readyz to answer without a token", func() (bool, string) {
		h, hc := scrape(t, base+"/healthz", "")
		r, rc := scrape(t, base+"/readyz", "")
		return hc == 200 && rc == 200, "healthz " + h + ", readyz " + r
	})
	if body, code := scrape(t, base+"/metrics", ""); code != http.StatusUnauthorized {
		t.Errorf("/metrics without a token = %d %q, want 401", code, body)
	}
	if body, code := scrape(t, base+"/metrics", "not-a-token"); code != http.StatusUnauthorized {
		t.Errorf("/metrics with a made-up token = %d %q, want 401", code, body)
	}
	if body, code := scrape(t, base+"/metrics", stranger); code != http.StatusForbidden {
		t.Errorf("/metrics as a ServiceAccount without keeplb:metrics-reader = %d %q, want 403", code, body)
	}
	// The binding may take a moment to reach the API server's authorizer.
	eventually(t, 30*time.Second, "/metrics to serve keeplb's metrics to the reader", func() (bool, string) {
		body, code := scrape(t, base+"/metrics", reader)
		return code == 200 && strings.Contains(body, `keeplb_pool_addresses{family="IPv4",pool="p"} 4`), body
	})

	// Tokens never go in clear text: plain HTTP gets no answer worth one.
	resp, err := http.Get("http://" + addr + "/metrics")
	if err == nil {
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("plain HTTP to the metrics port = %s, want 400 (HTTPS only)", resp.Status)
		}
	}

	// A second replica: one of the two stands by, and its reviews must
	// not be refused by the fence that stops a standby's writes.
	standby := keeplbtest.FreeAddr(t)
	e.startController(func(o *controller.Options) { o.MetricsBindAddress = standby })
	eventually(t, 30*time.Second, "both replicas, the standby too, to serve the reader", func() (bool, string) {
		body, code := scrape(t, "https://"+standby+"/metrics", reader)
		return code == 200 && strings.Contains(body, "keeplb_"), body
	})

	// --metrics-secure=false, the escape hatch for tests and demos: plain
	// HTTP, metrics open to anyone.
	open := keeplbtest.FreeAddr(t)
	e.startController(func(o *controller.Options) { o.MetricsBindAddress, o.MetricsSecure = open, false })
	eventually(t, 30*time.Second, "plain-HTTP /metrics open to anyone with --metrics-secure=false", func() (bool, string) {
		resp, err := http.Get("http://" + open + "/metrics")
		if err != nil {
			return false, err.Error()
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, resp.Status
	})
}
