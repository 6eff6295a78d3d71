// Package controlplane runs a real etcd and kube-apiserver on loopback so that
// integration tests (and the demo) exercise keeplb against the genuine API
// server: real validation, real RBAC, real server-side apply, real ClusterIP
// allocation. By default there is no kube-controller-manager, scheduler or
// kubelet: nothing garbage-collects, no namespace ever finishes terminating,
// and no ServiceAccount, Pod status or EndpointSlice appears unless a test
// writes it itself. With Options.ControllersDir the real
// kube-controller-manager and kube-scheduler run too, for the real-cluster
// tests (docs/real-cluster.md).
package controlplane

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// toolsDirEnv names the environment variable that points at the directory
// built by hack/tools.sh (etcd, kube-apiserver, kubectl). It is the default
// for Options.BinDir.
const toolsDirEnv = "KEEPLB_TOOLS_DIR"

// Names of the binaries expected in Options.BinDir.
const (
	etcdBin      = "etcd"
	apiserverBin = "kube-apiserver"
	kubectlBin   = "kubectl"
)

// Service CIDRs handed to the apiserver. Dual-stack so that tests can create
// RequireDualStack Services. The IPv6 range is a /108 because apiservers that
// still write the legacy bitmap allocator reject ranges of more than 20 host
// bits; 1.37 no longer checks, but there is no reason to depend on that.
const serviceCIDRs = "10.96.0.0/16,fd00:10:96::/108"

// adminUser is the identity behind AdminConfig. It is in system:masters, so
// RBAC never stands in its way.
const adminUser = "keeplb-admin"

// Time budgets for startup. Cold starts of the apiserver under -race on two
// cores take several seconds, so these are generous; a healthy start is far
// quicker.
const (
	etcdReadyTimeout      = 30 * time.Second
	apiserverReadyTimeout = 60 * time.Second
	stopGracePeriod       = 5 * time.Second
)

// Options configures Start.
type Options struct {
	// BinDir holds etcd, kube-apiserver and kubectl. Default: $KEEPLB_TOOLS_DIR.
	BinDir string
	// WorkDir receives etcd data (etcd/), the serving certificate (certs/),
	// the process logs (etcd.log, kube-apiserver.log) and the kubeconfig.
	// Default: a new temporary directory, removed by Stop unless KeepWorkDir.
	// A WorkDir supplied by the caller is created if needed and never removed,
	// because the harness cannot know what else lives there; content from an
	// earlier run (etcd data, serving certificate) is reused.
	WorkDir string
	// KeepWorkDir keeps the temporary WorkDir after Stop, for post-mortems.
	KeepWorkDir bool
	// ControllersDir, when set, holds kube-controller-manager and
	// kube-scheduler (hack/cluster-tools.sh builds them), which then run
	// against the apiserver: the real ServiceAccount, token, Deployment,
	// ReplicaSet, DaemonSet, EndpointSlice, garbage collection and node
	// IPAM (ClusterCIDR) controllers, and the scheduler. The apiserver then
	// also admits Pods only with their ServiceAccount (its ServiceAccount
	// admission is on) and authorizes kubelets as nodes (Node, RBAC).
	ControllersDir string
	// Address is the IPv4 address the apiserver listens on and advertises
	// (default 127.0.0.1). Any other address also makes it publish itself
	// as the endpoint of the kubernetes Service (pods reach it at the
	// Service's ClusterIP, which its certificate names) and reach kubelets
	// at their InternalIP: pkg/testing/cluster gives its tap address.
	Address string
	// Users are more token users, by name, with their groups, e.g.
	// "system:node:node1": {"system:nodes"} for a kubelet; UserConfig
	// returns a client config for each.
	Users map[string][]string
	// Out, if not nil, receives a copy of the etcd and kube-apiserver logs,
	// each line prefixed with the process name. The logs are always written
	// to files in WorkDir as well.
	Out io.Writer
}

// ControlPlane is a running etcd + kube-apiserver. Its methods are safe for
// concurrent use.
type ControlPlane struct {
	binDir     string
	workDir    string
	removeDir  bool // WorkDir was created by Start and is not kept
	host       string
	address    string
	token      string
	users      map[string][]string
	tokens     map[string]string // by user, Options.Users
	caData     []byte
	kubeconfig string

	etcd      *process
	apiserver *process
	// controllersDir is Options.ControllersDir; kcm and scheduler run
	// when it is set.
	controllersDir string
	kcm, scheduler *process

	stopOnce sync.Once
	stopErr  error
}

// Start launches etcd and kube-apiserver on free loopback ports and returns
// once /readyz reports ok and the "default" namespace exists. ctx bounds only
// the startup: the processes keep running until Stop, whatever happens to ctx
// afterwards. On error nothing is left running, and the error carries the
// tail of the relevant log.
func Start(ctx context.Context, opts Options) (*ControlPlane, error) {
	binDir, err := resolveBinDir(opts.BinDir)
	if err != nil {
		return nil, err
	}

	workDir, created := opts.WorkDir, false
	if workDir == "" {
		workDir, err = os.MkdirTemp("", "keeplb-controlplane-")
		if err != nil {
			return nil, fmt.Errorf("create work dir: %w", err)
		}
		created = true
	} else if err := os.MkdirAll(workDir, 0o755); err != nil {
		return nil, fmt.Errorf("create work dir: %w", err)
	}
	if workDir, err = filepath.Abs(workDir); err != nil {
		return nil, fmt.Errorf("resolve work dir: %w", err)
	}

	c := &ControlPlane{
		binDir:         binDir,
		workDir:        workDir,
		removeDir:      created && !opts.KeepWorkDir,
		kubeconfig:     filepath.Join(workDir, "kubeconfig"),
		controllersDir: opts.ControllersDir,
		address:        cmp.Or(opts.Address, "127.0.0.1"),
		users:          opts.Users,
	}
	if err := c.start(ctx, opts.Out); err != nil {
		// Stop also removes a temporary WorkDir; the error already holds the
		// log tail needed to understand what went wrong.
		return nil, errors.Join(err, c.Stop())
	}
	return c, nil
}

// start does the work of Start. Ports are picked by binding and releasing
// them, so another process may grab one in between; such a start is retried
// with fresh ports a couple of times.
func (c *ControlPlane) start(ctx context.Context, out io.Writer) error {
	if err := c.writeCredentials(); err != nil {
		return err
	}
	var logs *logSink
	if out != nil {
		logs = &logSink{out: out}
	}

	const attempts = 3
	for attempt := 1; ; attempt++ {
		err := c.startProcesses(ctx, logs)
		if err == nil {
			break
		}
		c.stopProcesses()
		var exit *processExitError
		if attempt == attempts || !errors.As(err, &exit) || !exit.addrInUse {
			return err
		}
	}
	if err := c.writeKubeconfig(); err != nil {
		return err
	}
	if c.controllersDir != "" {
		return c.startControllers(ctx, logs)
	}
	return nil
}

// writeCredentials creates the admin token file and the service account key.
// They are regenerated on every start, so a reused WorkDir never carries
// credentials over.
func (c *ControlPlane) writeCredentials() error {
	tok := make([]byte, 32)
	if _, err := rand.Read(tok); err != nil {
		return fmt.Errorf("generate admin token: %w", err)
	}
	c.token = hex.EncodeToString(tok)
	// Format: token,user,uid,"group1,group2".
	line := fmt.Sprintf("%s,%s,%s,\"system:masters\"\n", c.token, adminUser, adminUser)
	c.tokens = map[string]string{}
	for _, user := range slices.Sorted(maps.Keys(c.users)) {
		if _, err := rand.Read(tok); err != nil {
			return fmt.Errorf("generate a token: %w", err)
		}
		c.tokens[user] = hex.EncodeToString(tok)
		line += fmt.Sprintf("%s,%s,%s,%q\n", c.tokens[user], user, user, strings.Join(c.users[user], ","))
	}
	if err := os.WriteFile(c.path("tokens.csv"), []byte(line), 0o600); err != nil {
		return fmt.Errorf("write token file: %w", err)
	}

	// The apiserver refuses to start without a service account issuer and
	// signing key. With them the TokenRequest API works, so a test can mint
	// a token for a ServiceAccount it created (kubectl create token).
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return fmt.Errorf("generate service account key: %w", err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	if err := os.WriteFile(c.path("sa.key"), keyPEM, 0o600); err != nil {
		return fmt.Errorf("write service account key: %w", err)
	}
	return nil
}

// startProcesses starts etcd, waits until it is healthy, then starts the
// apiserver and waits until it is ready.
func (c *ControlPlane) startProcesses(ctx context.Context, logs *logSink) error {
	// Forget the processes of a failed earlier attempt (already stopped), or
	// pause would report their exit as this attempt's failure.
	c.etcd, c.apiserver = nil, nil
	ports, err := freePorts(3)
	if err != nil {
		return err
	}
	etcdURL := "http://127.0.0.1:" + strconv.Itoa(ports[0])
	peerURL := "http://127.0.0.1:" + strconv.Itoa(ports[1])
	c.host = "https://" + c.address + ":" + strconv.Itoa(ports[2])

	c.etcd, err = startProcess(etcdBin, c.bin(etcdBin), c.path("etcd.log"), logs,
		"--name=keeplb",
		"--data-dir="+c.path("etcd"),
		"--listen-client-urls="+etcdURL,
		"--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL,
		"--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=keeplb="+peerURL,
		// Durability is worthless for throw-away test data, and fsync is
		// what makes etcd slow on CI disks.
		"--unsafe-no-fsync",
		"--quota-backend-bytes="+strconv.Itoa(2<<30),
	)
	if err != nil {
		return fmt.Errorf("start etcd: %w", err)
	}
	if err := c.waitEtcd(ctx, etcdURL); err != nil {
		return fmt.Errorf("start etcd: %w\n%s", err, c.logTails(etcdBin))
	}

	certDir := c.path("certs")
	args := []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=" + c.address,
		"--advertise-address=" + c.address,
		"--secure-port=" + strconv.Itoa(ports[2]),
		// Without --tls-cert-file the apiserver writes a self-signed CA and
		// serving certificate here, valid for the advertised address and
		// the kubernetes Service's ClusterIP and names.
		"--cert-dir=" + certDir,
		"--service-cluster-ip-range=" + serviceCIDRs,
		"--token-auth-file=" + c.path("tokens.csv"),
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + c.path("sa.key"),
		"--service-account-signing-key-file=" + c.path("sa.key"),
		"--allow-privileged=true",
	}
	if c.address == "127.0.0.1" {
		// The default "lease" reconciler would publish 127.0.0.1 as the
		// endpoint of the kubernetes Service, which the apiserver rejects as
		// a loopback address and then keeps complaining about.
		args = append(args, "--endpoint-reconciler-type=none")
	} else {
		// Kubelets register with their InternalIP; the names are not
		// resolvable here.
		args = append(args, "--kubelet-preferred-address-types=InternalIP")
	}
	if c.controllersDir == "" {
		// The ServiceAccount admission plugin would insist on a "default"
		// ServiceAccount before admitting Pods, and no controller creates it.
		args = append(args, "--authorization-mode=RBAC", "--disable-admission-plugins=ServiceAccount")
	} else {
		// Kubelets authenticate as system:node:NAME and may only touch
		// their own Node and Pods.
		args = append(args, "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction")
	}
	c.apiserver, err = startProcess(apiserverBin, c.bin(apiserverBin), c.path("kube-apiserver.log"), logs, args...)
	if err != nil {
		return fmt.Errorf("start kube-apiserver: %w", err)
	}
	if err := c.waitAPIServer(ctx, certDir); err != nil {
		tails := []string{apiserverBin}
		if c.etcd.exited() {
			tails = append(tails, etcdBin)
		}
		return fmt.Errorf("start kube-apiserver: %w\n%s", err, c.logTails(tails...))
	}
	return nil
}

// waitEtcd polls etcd's /health endpoint. Starting the apiserver only once
// etcd answers avoids its storage retries and the log noise they cause.
func (c *ControlPlane) waitEtcd(ctx context.Context, url string) error {
	ctx, cancel := context.WithTimeout(ctx, etcdReadyTimeout)
	defer cancel()
	client := &http.Client{Timeout: 2 * time.Second}
	var lastErr error
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url+"/health", nil)
		if err != nil {
			return err
		}
		resp, err := client.Do(req)
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK && bytes.Contains(body, []byte(`"health":"true"`)) {
				return nil
			}
			err = fmt.Errorf("/health: %s: %s", resp.Status, bytes.TrimSpace(body))
		}
		lastErr = err
		if err := c.pause(ctx, 100*time.Millisecond); err != nil {
			return fmt.Errorf("%w (last probe: %v)", err, lastErr)
		}
	}
}

// waitAPIServer waits for the self-signed certificate, then for /readyz,
// then for the "default" namespace, which the apiserver's bootstrap
// controller creates shortly after it becomes ready.
func (c *ControlPlane) waitAPIServer(ctx context.Context, certDir string) error {
	ctx, cancel := context.WithTimeout(ctx, apiserverReadyTimeout)
	defer cancel()

	// The certificate file is written early during startup, but not
	// atomically, so poll until it parses.
	certFile := filepath.Join(certDir, "apiserver.crt")
	for {
		ca, err := readCertBundle(certFile)
		if err == nil {
			c.caData = ca
			break
		}
		if err := c.pause(ctx, 100*time.Millisecond); err != nil {
			return fmt.Errorf("waiting for %s: %w", certFile, err)
		}
	}

	client, err := kubernetes.NewForConfig(c.AdminConfig())
	if err != nil {
		return fmt.Errorf("admin client: %w", err)
	}
	var lastErr error
	for {
		body, err := client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err == nil && string(body) == "ok" {
			break
		}
		if err == nil {
			err = fmt.Errorf("/readyz: %q", body)
		}
		lastErr = err
		if err := c.pause(ctx, 100*time.Millisecond); err != nil {
			return fmt.Errorf("waiting for /readyz: %w (last probe: %v)", err, lastErr)
		}
	}
	for {
		_, err := client.CoreV1().Namespaces().Get(ctx, metav1.NamespaceDefault, metav1.GetOptions{})
		if err == nil {
			return nil
		}
		if !apierrors.IsNotFound(err) {
			lastErr = err
		}
		if err := c.pause(ctx, 100*time.Millisecond); err != nil {
			return fmt.Errorf("waiting for namespace default: %w (last error: %v)", err, lastErr)
		}
	}
}

// readCertBundle returns the PEM content of file if it holds at least one
// certificate and nothing unparsable.
func readCertBundle(file string) ([]byte, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	rest, n := data, 0
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if _, err := x509.ParseCertificate(block.Bytes); err != nil {
			return nil, fmt.Errorf("%s: %w", file, err)
		}
		n++
	}
	if n == 0 || len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("%s: incomplete certificate bundle", file)
	}
	return data, nil
}

// writeKubeconfig writes the admin kubeconfig for kubectl and humans.
func (c *ControlPlane) writeKubeconfig() error {
	const name = "keeplb"
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters[name] = &clientcmdapi.Cluster{
		Server:                   c.host,
		CertificateAuthorityData: c.caData,
	}
	cfg.AuthInfos[adminUser] = &clientcmdapi.AuthInfo{Token: c.token}
	cfg.Contexts[name] = &clientcmdapi.Context{Cluster: name, AuthInfo: adminUser, Namespace: metav1.NamespaceDefault}
	cfg.CurrentContext = name
	if err := clientcmd.WriteToFile(*cfg, c.kubeconfig); err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	return nil
}

// Stop terminates the apiserver and then etcd (SIGTERM to each process
// group, SIGKILL if one is still alive after a few seconds) and removes a
// temporary WorkDir unless KeepWorkDir was set. It is idempotent: later calls
// return the result of the first.
func (c *ControlPlane) Stop() error {
	c.stopOnce.Do(func() {
		c.stopProcesses()
		if c.removeDir {
			if err := os.RemoveAll(c.workDir); err != nil {
				c.stopErr = fmt.Errorf("remove work dir: %w", err)
			}
		}
	})
	return c.stopErr
}

// stopProcesses stops whatever processes are running: the scheduler and
// the controller manager, then the apiserver, so that it does not spend its
// shutdown retrying a vanished etcd, then etcd.
func (c *ControlPlane) stopProcesses() {
	for _, p := range []*process{c.scheduler, c.kcm} {
		if p != nil {
			p.stop(stopGracePeriod)
		}
	}
	if c.apiserver != nil {
		c.apiserver.stop(stopGracePeriod)
	}
	if c.etcd != nil {
		c.etcd.stop(stopGracePeriod)
	}
}

// AdminConfig returns a new rest.Config for the admin user (a token user in
// group system:masters). Each call returns an independent copy.
func (c *ControlPlane) AdminConfig() *rest.Config {
	return &rest.Config{
		Host:        c.host,
		BearerToken: c.token,
		// The CA is the apiserver's own self-signed one, read back from
		// WorkDir, so TLS is verified for real rather than skipped.
		TLSClientConfig: rest.TLSClientConfig{CAData: bytes.Clone(c.caData)},
		// Tests create hundreds of objects in a burst; the client-go
		// defaults (5/10) would make them crawl.
		QPS:   200,
		Burst: 400,
	}
}

// UserConfig returns a new rest.Config for one of Options.Users,
// authenticated by its own token, or nil if there is no such user.
func (c *ControlPlane) UserConfig(user string) *rest.Config {
	tok, ok := c.tokens[user]
	if !ok {
		return nil
	}
	cfg := c.AdminConfig()
	cfg.BearerToken = tok
	return cfg
}

// ImpersonatedConfig returns the admin config impersonating user with the
// given groups, so that requests are authorized with the RBAC of that user,
// e.g. ("system:serviceaccount:keeplb-system:keeplb-controller",
// "system:serviceaccounts", "system:serviceaccounts:keeplb-system",
// "system:authenticated").
func (c *ControlPlane) ImpersonatedConfig(user string, groups ...string) *rest.Config {
	cfg := c.AdminConfig()
	cfg.Impersonate = rest.ImpersonationConfig{UserName: user, Groups: append([]string(nil), groups...)}
	return cfg
}

// KubeconfigPath returns the admin kubeconfig written in WorkDir, usable with
// kubectl --kubeconfig.
func (c *ControlPlane) KubeconfigPath() string { return c.kubeconfig }

// WorkDir returns the directory holding data, certificates, logs and the
// kubeconfig.
func (c *ControlPlane) WorkDir() string { return c.workDir }

// Kubectl runs BinDir/kubectl against this control plane as admin and
// returns its combined stdout and stderr.
func (c *ControlPlane) Kubectl(ctx context.Context, args ...string) (string, error) {
	// The discovery cache goes to WorkDir rather than ~/.kube/cache, which
	// would otherwise collect an entry for every port a test ever used.
	flags := []string{"--kubeconfig=" + c.kubeconfig, "--cache-dir=" + c.path("kubectl-cache")}
	cmd := exec.CommandContext(ctx, c.bin(kubectlBin), append(flags, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

// logTail returns the last lines of the named process log ("etcd" or
// "kube-apiserver") for failure messages; empty if it cannot be read.
func (c *ControlPlane) logTail(name string, lines int) string {
	return tailFile(c.path(name+".log"), lines)
}

// logTails formats the ends of the named process logs for error messages.
func (c *ControlPlane) logTails(names ...string) string {
	var b strings.Builder
	for _, name := range names {
		fmt.Fprintf(&b, "--- last lines of %s:\n%s\n", c.path(name+".log"), c.logTail(name, 40))
	}
	return b.String()
}

func (c *ControlPlane) path(name string) string { return filepath.Join(c.workDir, name) }

func (c *ControlPlane) bin(name string) string { return filepath.Join(c.binDir, name) }

// resolveBinDir applies the $KEEPLB_TOOLS_DIR default and checks that every
// binary is present, so a bad setup fails with a message about the setup
// rather than an obscure exec error later.
func resolveBinDir(dir string) (string, error) {
	if dir == "" {
		dir = os.Getenv(toolsDirEnv)
	}
	if dir == "" {
		return "", errNoToolsDir
	}
	for _, name := range []string{etcdBin, apiserverBin, kubectlBin} {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			return "", fmt.Errorf("binary dir %s: %w (hack/tools.sh builds it)", dir, err)
		}
	}
	return dir, nil
}

// errNoToolsDir reports that neither Options.BinDir nor $KEEPLB_TOOLS_DIR is
// set; StartForTest and StartForMain turn it into a skip.
var errNoToolsDir = errors.New(toolsDirEnv + " is not set: run `make test`, which builds kube-apiserver and etcd")

// freePorts returns n distinct loopback ports that were free a moment ago.
// All listeners are held until every port is chosen so that the kernel does
// not hand out the same port twice.
func freePorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	held := make([]net.Listener, 0, n)
	defer func() {
		for _, l := range held {
			_ = l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("pick free port: %w", err)
		}
		held = append(held, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}
