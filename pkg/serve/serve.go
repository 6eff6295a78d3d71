// Package serve runs the one HTTP endpoint of each keeplb daemon: the
// health checks the kubelet probes and the Prometheus metrics.
//
// It serves them the way kube-controller-manager and kube-scheduler serve
// theirs: HTTPS, with a certificate generated in memory at start unless
// one is given, so that the bearer tokens of scrapers never travel in
// clear text; the health paths open to anyone, because the kubelet's
// probes carry no credentials and say nothing secret; and /metrics only to
// callers whom the API server authenticates (TokenReview) and authorizes
// to get the non-resource URL /metrics (SubjectAccessReview). The
// speaker's metrics name Services, VIPs and nodes and count their traffic,
// and the speaker answers on its node's address: they are the business of
// the cluster's monitoring, not of whoever can reach a node.
package serve

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/apiserver/pkg/authentication/authenticator"
	"k8s.io/apiserver/pkg/authentication/authenticatorfactory"
	"k8s.io/apiserver/pkg/authorization/authorizer"
	"k8s.io/apiserver/pkg/authorization/authorizerfactory"
	"k8s.io/apiserver/pkg/server/dynamiccertificates"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/util/cert"
	"k8s.io/klog/v2"
)

// MetricsPath is where the metrics are served, and the non-resource URL a
// caller needs the verb get on to read them.
const MetricsPath = "/metrics"

// DefaultShutdownTimeout is how long a stopping server lets requests in
// flight finish: a scrape takes milliseconds, and the pod's termination
// grace period must cover the daemon's own cleanup too.
const DefaultShutdownTimeout = 5 * time.Second

// The delegated checks are cached as kube-controller-manager caches them
// by default: a scraper every 15 s or so costs the API server a
// TokenReview and a SubjectAccessReview at most every 10 s, and a revoked
// token or permission stops working within 10 s.
const (
	authnCacheTTL  = 10 * time.Second
	authzCacheTTL  = 10 * time.Second
	reviewTimeout  = 10 * time.Second
	reviewQPS      = 10
	reviewBurst    = 20
	readHeaderTime = 5 * time.Second
)

// Config says where and how to serve. The flags of both daemons map onto
// it one to one, and Validate's errors name them.
type Config struct {
	// BindAddress is the host:port to listen on.
	BindAddress string
	// Insecure serves plain HTTP with /metrics open to anyone who reaches
	// the port (--metrics-secure=false). For tests and demos only.
	Insecure bool
	// CertFile and KeyFile are a PEM serving certificate (with its chain)
	// and its key, read again whenever they change, so that a rotated
	// certificate is served without a restart. Both empty: a self-signed
	// certificate generated in memory at start.
	CertFile, KeyFile string
	// ShutdownTimeout bounds the graceful shutdown; Defaults sets it.
	ShutdownTimeout time.Duration
}

// Defaults fills in what was left zero.
func (c *Config) Defaults() {
	if c.ShutdownTimeout == 0 {
		c.ShutdownTimeout = DefaultShutdownTimeout
	}
}

// Validate reports every invalid setting at once.
func (c Config) Validate() error {
	var errs []error
	if _, _, err := net.SplitHostPort(c.BindAddress); err != nil {
		errs = append(errs, fmt.Errorf("--metrics-bind-address %q: %w", c.BindAddress, err))
	}
	if (c.CertFile == "") != (c.KeyFile == "") {
		errs = append(errs, errors.New("--metrics-cert-file and --metrics-key-file go together"))
	}
	if c.Insecure && c.CertFile != "" {
		errs = append(errs, errors.New("--metrics-cert-file needs --metrics-secure: plain HTTP uses no certificate"))
	}
	if c.ShutdownTimeout < 0 {
		errs = append(errs, fmt.Errorf("shutdown timeout %s is negative", c.ShutdownTimeout))
	}
	return errors.Join(errs...)
}

// Wildcard reports whether BindAddress listens on every address of the
// host rather than one.
func (c Config) Wildcard() bool {
	host, _, err := net.SplitHostPort(c.BindAddress)
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return host == "" || ip != nil && ip.IsUnspecified()
}

// Endpoints are what a daemon serves.
type Endpoints struct {
	// Metrics serves MetricsPath, behind authentication and authorization
	// unless Config.Insecure.
	Metrics http.Handler
	// Health are handlers open to anyone, by path: /healthz, /readyz.
	Health map[string]http.Handler
}

// Server serves a daemon's Endpoints. Run it once.
type Server struct {
	cfg     Config
	handler http.Handler
	// certs is nil with Config.Insecure.
	certs *certificates
	// files watches CertFile and KeyFile; nil without them.
	files *dynamiccertificates.DynamicCertKeyPairContent
}

// New returns a server of ep as cfg says. Unless cfg.Insecure, it asks the
// API server of kube, with a client of its own, who each caller of /metrics
// is and whether they may get it: that client's rate limit keeps a flood of
// made-up tokens from eating into the daemon's own budget for its work
// (the controller's Lease renewals, say), and it must not pass the
// controller's write fence, which refuses the reviews' POSTs on a standby.
func New(cfg Config, kube *rest.Config, ep Endpoints) (*Server, error) {
	cfg.Defaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Insecure {
		return newServer(cfg, nil, nil, ep)
	}
	kube = rest.CopyConfig(kube)
	kube.QPS, kube.Burst = reviewQPS, reviewBurst
	client, err := kubernetes.NewForConfig(kube)
	if err != nil {
		return nil, err
	}
	// The API server's own retry policy for its webhooks
	// (k8s.io/apiserver/pkg/server/options.DefaultAuthWebhookRetryBackoff),
	// spelled out rather than importing every option of an API server.
	backoff := wait.Backoff{Duration: 500 * time.Millisecond, Factor: 1.5, Jitter: 0.2, Steps: 5}
	authn, _, err := authenticatorfactory.DelegatingAuthenticatorConfig{
		// No anonymous user: a request without a token is refused with
		// 401 before any review, rather than reviewed as
		// system:anonymous and refused with 403.
		Anonymous:                nil,
		TokenAccessReviewClient:  client.AuthenticationV1(),
		TokenAccessReviewTimeout: reviewTimeout,
		WebhookRetryBackoff:      &backoff,
		CacheTTL:                 authnCacheTTL,
	}.New()
	if err != nil {
		return nil, fmt.Errorf("metrics authentication: %w", err)
	}
	authz, err := authorizerfactory.DelegatingAuthorizerConfig{
		SubjectAccessReviewClient: client.AuthorizationV1(),
		AllowCacheTTL:             authzCacheTTL,
		DenyCacheTTL:              authzCacheTTL,
		WebhookRetryBackoff:       &backoff,
	}.New()
	if err != nil {
		return nil, fmt.Errorf("metrics authorization: %w", err)
	}
	return newServer(cfg, authn, authz, ep)
}

// newServer is New with the checks already built, or none with
// cfg.Insecure; tests pass fakes. cfg must be valid, with defaults.
func newServer(cfg Config, authn authenticator.Request, authz authorizer.Authorizer, ep Endpoints) (*Server, error) {
	s := &Server{cfg: cfg}
	mux := http.NewServeMux()
	for path, h := range ep.Health {
		mux.Handle(path, h)
	}
	if cfg.Insecure {
		mux.Handle(MetricsPath, ep.Metrics)
		s.handler = mux
		return s, nil
	}
	mux.Handle(MetricsPath, guard(authn, authz, ep.Metrics))
	s.handler = mux
	switch {
	case cfg.CertFile != "":
		files, err := dynamiccertificates.NewDynamicServingContentFromFiles("metrics", cfg.CertFile, cfg.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("--metrics-cert-file %s, --metrics-key-file %s: %w", cfg.CertFile, cfg.KeyFile, err)
		}
		s.files, s.certs = files, &certificates{content: files.CurrentCertKeyContent}
	default:
		pair, err := selfSigned(cfg.BindAddress)
		if err != nil {
			return nil, err
		}
		s.certs = &certificates{content: func() ([]byte, []byte) { return pair.cert, pair.key }}
	}
	// Parse once now, so that a certificate Go refuses fails the start
	// rather than every handshake.
	if _, err := s.certs.get(nil); err != nil {
		return nil, err
	}
	return s, nil
}

// guard lets a request through to next only if its bearer token belongs to
// someone who may use its method on its path, as the API server would
// decide for a request of its own: 401 without a valid token, 403 without
// the permission.
func guard(authn authenticator.Request, authz authorizer.Authorizer, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		logger := klog.FromContext(r.Context())
		resp, ok, err := authn.AuthenticateRequest(r)
		if err != nil || !ok {
			if err != nil {
				logger.V(2).Info("Refused a metrics request: authentication failed", "remote", r.RemoteAddr, "err", err)
			}
			http.Error(w, "Unauthorized", http.StatusUnauthorized)
			return
		}
		// The API server's verb for a non-resource request.
		verb := strings.ToLower(r.Method)
		decision, reason, err := authz.Authorize(r.Context(), authorizer.AttributesRecord{User: resp.User, Verb: verb, Path: r.URL.Path})
		switch {
		case decision == authorizer.DecisionAllow:
			next.ServeHTTP(w, r)
		case err != nil:
			logger.Error(err, "Could not authorize a metrics request", "user", resp.User.GetName())
			http.Error(w, "Internal Server Error: authorization failed", http.StatusInternalServerError)
		default:
			logger.V(2).Info("Refused a metrics request: forbidden", "user", resp.User.GetName(), "verb", verb, "path", r.URL.Path, "reason", reason)
			http.Error(w, fmt.Sprintf("Forbidden: user %q may not %s path %q", resp.User.GetName(), verb, r.URL.Path), http.StatusForbidden)
		}
	})
}

// Run listens on Config.BindAddress and serves until ctx is done, then
// lets the requests in flight finish for at most Config.ShutdownTimeout.
// It returns an error only if it could not serve.
func (s *Server) Run(ctx context.Context) error {
	l, err := net.Listen("tcp", s.cfg.BindAddress)
	if err != nil {
		return fmt.Errorf("serve metrics and health: %w", err)
	}
	return s.serve(ctx, l)
}

// serve is Run on a listener of the caller's; it closes l.
func (s *Server) serve(ctx context.Context, l net.Listener) error {
	logger := klog.FromContext(ctx)
	srv := &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: readHeaderTime,
		// Requests live on past ctx, so that a stopping daemon finishes
		// the scrapes in flight, with the daemon's logger.
		BaseContext: func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
	}
	scheme := "http"
	if s.certs != nil {
		scheme = "https"
		// HTTP/1.1 only (no ALPN): a scrape or a probe needs nothing more,
		// and HTTP/2's stream handling is attack surface for nothing.
		l = tls.NewListener(l, &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: s.certs.get})
		if s.files != nil {
			filesCtx, stop := context.WithCancel(ctx)
			defer stop()
			go s.files.Run(filesCtx, 1)
		}
	}
	logger.Info("Serving metrics and health", "address", l.Addr().String(), "scheme", scheme, "metricsAuthorization", s.certs != nil)

	serving, stop := context.WithCancel(ctx)
	defer stop()
	shutdownDone := make(chan struct{})
	go func() {
		defer close(shutdownDone)
		<-serving.Done()
		shutdown, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.ShutdownTimeout)
		defer cancel()
		if err := srv.Shutdown(shutdown); err != nil {
			logger.Info("Requests still in flight at the end of the shutdown timeout; closing them", "timeout", s.cfg.ShutdownTimeout)
			_ = srv.Close()
		}
	}()
	// Serve returns as soon as Shutdown begins; the requests in flight
	// are over only once Shutdown returns.
	err := srv.Serve(l)
	stop()
	<-shutdownDone
	if !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve metrics and health on %s: %w", l.Addr(), err)
	}
	return nil
}

// Alongside runs work while srv serves, and returns once both are done,
// with both their errors. A server that cannot serve (its address taken,
// say) stops the work: the kubelet would restart a daemon it cannot probe
// anyway, and this way the daemon says why. A nil srv (serving disabled)
// just runs work.
func Alongside(ctx context.Context, srv *Server, work func(context.Context) error) error {
	if srv == nil {
		return work(ctx)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	serveErr := make(chan error, 1)
	go func() {
		err := srv.Run(ctx)
		if err != nil {
			cancel()
		}
		serveErr <- err
	}()
	err := work(ctx)
	cancel()
	return errors.Join(err, <-serveErr)
}

// certificates hands the TLS handshakes the current serving certificate,
// parsed again only when its content changed.
type certificates struct {
	content func() (cert, key []byte)

	mu      sync.Mutex
	certPEM []byte
	keyPEM  []byte
	parsed  *tls.Certificate
}

func (c *certificates) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	certPEM, keyPEM := c.content()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.parsed != nil && bytes.Equal(certPEM, c.certPEM) && bytes.Equal(keyPEM, c.keyPEM) {
		return c.parsed, nil
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("metrics serving certificate: %w", err)
	}
	c.certPEM, c.keyPEM, c.parsed = certPEM, keyPEM, &pair
	return c.parsed, nil
}

type pemPair struct{ cert, key []byte }

// selfSigned generates a certificate for this host (and the address bound,
// if it names one), signed by a CA generated with it and then forgotten:
// no client can verify it, as with kube-controller-manager's default, but
// the connection is encrypted, which is what keeps tokens from being read
// on the wire. Scrapers skip verification (the kubelet's HTTPS probes
// always do) or are given a certificate with --metrics-cert-file.
func selfSigned(bindAddress string) (pemPair, error) {
	host, _, _ := net.SplitHostPort(bindAddress)
	name, err := os.Hostname()
	if err != nil || name == "" {
		name = "localhost"
	}
	var ips []net.IP
	if ip := net.ParseIP(host); ip != nil && !ip.IsUnspecified() {
		ips = append(ips, ip)
	}
	certPEM, keyPEM, err := cert.GenerateSelfSignedCertKey(name, ips, nil)
	if err != nil {
		return pemPair{}, fmt.Errorf("generate the metrics serving certificate: %w", err)
	}
	return pemPair{cert: certPEM, key: keyPEM}, nil
}
