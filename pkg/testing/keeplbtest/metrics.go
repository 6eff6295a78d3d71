package keeplbtest

import (
	"crypto/tls"
	"io"
	"net/http"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	v1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"
)

// MetricsReaderRole is the ClusterRole of manifests/controller/rbac.yaml
// that lets a scraper read the /metrics of the controller and the speakers.
const MetricsReaderRole = "keeplb:metrics-reader"

// MetricsToken creates the ServiceAccount keeplb-system/name, binds it to
// MetricsReaderRole when read is set (as an operator binds Prometheus's),
// and returns a token of it from the TokenRequest API: a real token that
// the daemons' TokenReviews must accept. admin must be allowed all of that.
func MetricsToken(tb testing.TB, admin kubernetes.Interface, name string, read bool) string {
	tb.Helper()
	ctx := tb.Context()
	const ns = "keeplb-system"
	if _, err := admin.CoreV1().ServiceAccounts(ns).Create(ctx, &v1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
		tb.Fatalf("create ServiceAccount %s/%s: %v", ns, name, err)
	}
	if read {
		crb := &rbacv1.ClusterRoleBinding{
			ObjectMeta: metav1.ObjectMeta{Name: "test:" + name + ":metrics-reader"},
			RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: MetricsReaderRole},
			Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Namespace: ns, Name: name}},
		}
		if _, err := admin.RbacV1().ClusterRoleBindings().Create(ctx, crb, metav1.CreateOptions{}); err != nil {
			tb.Fatalf("bind %s to %s: %v", name, MetricsReaderRole, err)
		}
	}
	tr, err := admin.CoreV1().ServiceAccounts(ns).CreateToken(ctx, name, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: ptr.To[int64](3600)},
	}, metav1.CreateOptions{})
	if err != nil {
		tb.Fatalf("TokenRequest for %s/%s: %v", ns, name, err)
	}
	return tr.Status.Token
}

// Scrape GETs url with token (none if empty) as a Prometheus with
// insecure_skip_verify does: over HTTPS, unverified, since the daemons
// serve a self-signed certificate by default. It returns the body and the
// status code, or an error when the server cannot be reached.
func Scrape(url, token string) (string, int, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return "", 0, err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true},
		DisableKeepAlives: true, // a transport per call: leave no idle connection behind
	}}
	resp, err := c.Do(req)
	if err != nil {
		return "", 0, err
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	return string(b), resp.StatusCode, err
}
