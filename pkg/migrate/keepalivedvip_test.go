package migrate

import (
	"bytes"
	"errors"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/keeplb/keeplb/pkg/apis/keeplb/v1alpha1"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

// render is what the command prints: stdout, then stderr.
func render(r Result) string {
	var b strings.Builder
	b.WriteString("=== stdout\n")
	b.Write(r.Script)
	b.WriteString("=== stderr\n")
	for _, w := range r.Warnings {
		b.WriteString("warning: " + w + "\n")
	}
	for _, err := range r.Errors {
		b.WriteString("error: " + err.Error() + "\n")
	}
	return b.String()
}

func TestKeepalivedVIP(t *testing.T) {
	tests := []struct {
		name string
		opts Options
		// errs are substrings of the per-entry errors, in order.
		errs []string
		// warnings are substrings each of which some warning contains.
		warnings []string
		// services is the number of Service stubs.
		services int
	}{
		{name: "nat", services: 2},
		{name: "dr-proxy", services: 2, warnings: []string{`"10.0.0.20" (default/web, DR)`, `"10.0.0.21" (shop/cart, PROXY)`}},
		{name: "lowercase-modes", services: 3, warnings: []string{`default/api, DR`, `default/db, PROXY`}},
		{name: "ipv6", services: 2, warnings: []string{`"2001:db8::11" (default/v6only, DR)`}},
		{name: "invalid-vip", services: 1, errs: []string{
			`entry "10.0.0.256": the key is not an IP address`,
			`entry "224.0.0.5": 224.0.0.5 is not a unicast address`,
			`entry "not-an-ip": the key is not an IP address`,
		}},
		{name: "invalid-service", services: 1, errs: []string{
			`entry "10.0.0.50": value "web" is not a service reference`,
			`entry "10.0.0.51": "Default" is not a valid namespace`,
			`entry "10.0.0.52": "Web" is not a valid Service name`,
			`entry "10.0.0.53": forwarding mode "LVS" is unknown`,
			`entry "10.0.0.54": value "/web" is not a service reference`,
		}},
		{name: "duplicate-family", services: 1, errs: []string{
			`entry "10.0.0.61": Service default/web already gets IPv4 10.0.0.60 from entry "10.0.0.60"`,
		}},
		{name: "shared-same-namespace", services: 2, warnings: []string{
			"Services dns/dns-tcp, dns/dns-udp share an address with keeplb.io/share-key: keepalived-vip-2001-0db8-0000-0000-0000-0000-0000-0070; their ports must not overlap",
		}},
		{name: "shared-other-namespace", services: 1, errs: []string{
			`entry "2001:db8:0::80": 2001:db8::80 is used by Services team-a/web, team-b/web; keeplb shares an address only between Services of one namespace`,
			`entry "2001:db8::80": 2001:db8::80 is used by Services team-a/web, team-b/web`,
		}},
		{name: "vrid", opts: Options{PoolName: "legacy", VRID: "50"}, services: 2, warnings: []string{
			"--vrid 50 contains VRID 50, keepalived-vip's",
			"--vrid 50 is a single VRID",
			"such as 51-82",
		}},
		{name: "vrid-range", opts: Options{VRID: "51-82"}, services: 2},
		{name: "vrid-range-with-keepalived-vip", opts: Options{VRID: "50-81"}, services: 2, warnings: []string{
			"--vrid 50-81 contains VRID 50, keepalived-vip's: until keepalived-vip is removed",
			"such as 51-82",
		}},
		{name: "vrid-keepalived-vip-vrid", opts: Options{VRID: "1-32", KeepalivedVIPVRID: 32}, services: 2, warnings: []string{
			"--vrid 1-32 contains VRID 32",
			"such as 33-64",
		}},
		{name: "vrid-other-keepalived-vip-vrid", opts: Options{VRID: "50-81", KeepalivedVIPVRID: 7}, services: 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			input := tt.name
			if strings.HasPrefix(tt.name, "vrid") {
				input = "nat"
			}
			in, err := os.ReadFile(filepath.Join("testdata", input+".yaml"))
			if err != nil {
				t.Fatal(err)
			}
			r, err := KeepalivedVIP(in, tt.opts)
			if err != nil {
				t.Fatalf("KeepalivedVIP: %v", err)
			}
			if len(r.Errors) != len(tt.errs) {
				t.Errorf("got %d errors, want %d:\n%s", len(r.Errors), len(tt.errs), render(r))
			} else {
				for i, want := range tt.errs {
					if !strings.Contains(r.Errors[i].Error(), want) {
						t.Errorf("error %d = %q, want it to contain %q", i, r.Errors[i], want)
					}
				}
			}
			for _, want := range tt.warnings {
				found := false
				for _, w := range r.Warnings {
					found = found || strings.Contains(w, want)
				}
				if !found {
					t.Errorf("no warning contains %q; warnings: %q", want, r.Warnings)
				}
			}
			if len(tt.warnings) == 0 && len(r.Warnings) > 0 {
				t.Errorf("unexpected warnings: %q", r.Warnings)
			}
			_, services := parseStream(t, r.Script)
			if len(services) != tt.services {
				t.Errorf("got %d Services, want %d", len(services), tt.services)
			}

			// Deterministic: a second run renders the same.
			r2, _ := KeepalivedVIP(in, tt.opts)
			got := render(r)
			if got != render(r2) {
				t.Errorf("two runs differ:\n%s\n---\n%s", got, render(r2))
			}
			golden := filepath.Join("testdata", tt.name+".golden")
			if *update {
				if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test -update to create it)", err)
			}
			if got != string(want) {
				t.Errorf("output differs from %s (run go test -update after checking):\ngot:\n%s\nwant:\n%s", golden, got, want)
			}
		})
	}
}

// scriptPatch matches the kubectl call that patches one Service, and its
// patch.
var scriptPatch = regexp.MustCompile(`(?m)^\$kubectl --namespace (\S+) patch service (\S+) --type merge --field-manager keeplb-migrate --patch '\n((?s:.*?))' \|\| failed="\$failed (\S+)"$`)

// parseStream reads the script: the IPPool it applies and the Services it
// patches, each decoded strictly into its type.
func parseStream(t *testing.T, script []byte) ([]v1alpha1.IPPool, []corev1.Service) {
	t.Helper()
	if len(script) == 0 {
		return nil, nil
	}
	s := string(script)
	if !strings.HasPrefix(s, "#!/bin/sh\n") {
		t.Fatalf("the script does not start with #!/bin/sh:\n%s", s)
	}
	const applyPool = "$kubectl apply --server-side --field-manager=keeplb-migrate -f - <<'EOF' || exit\n"
	_, rest, ok := strings.Cut(s, applyPool)
	if !ok {
		t.Fatalf("the script does not apply an IPPool:\n%s", s)
	}
	doc, rest, ok := strings.Cut(rest, "\nEOF\n")
	if !ok {
		t.Fatalf("the IPPool's here-document does not end:\n%s", s)
	}
	var p v1alpha1.IPPool
	if err := yaml.UnmarshalStrict([]byte(doc), &p); err != nil {
		t.Fatalf("the script's IPPool does not decode: %v\n%s", err, doc)
	}
	if p.APIVersion != v1alpha1.SchemeGroupVersion.String() || p.Kind != v1alpha1.IPPoolKind || p.Spec.AutoAssign == nil || *p.Spec.AutoAssign || p.Spec.Forwarding != "" {
		t.Errorf("IPPool %+v: want apiVersion keeplb.io/v1alpha1, autoAssign false, no forwarding", p)
	}
	var services []corev1.Service
	matches := scriptPatch.FindAllStringSubmatch(rest, -1)
	if n := strings.Count(rest, "$kubectl"); n != len(matches) {
		t.Errorf("%d kubectl calls after the IPPool, %d of them Service patches:\n%s", n, len(matches), rest)
	}
	for _, m := range matches {
		svc := corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: m[1], Name: m[2]}}
		if err := yaml.UnmarshalStrict([]byte(m[3]), &svc); err != nil {
			t.Fatalf("the patch of %s/%s does not decode into a Service: %v\n%s", m[1], m[2], err, m[3])
		}
		if m[4] != m[1]+"/"+m[2] {
			t.Errorf("the patch of %s/%s reports a failure as %s", m[1], m[2], m[4])
		}
		if svc.Namespace != m[1] || svc.Name != m[2] || svc.Spec.Type != corev1.ServiceTypeLoadBalancer || svc.Annotations["keeplb.io/ips"] == "" || svc.Annotations["keeplb.io/forwarding"] != "pod" {
			t.Errorf("Service %s/%s: %+v", m[1], m[2], svc)
		}
		services = append(services, svc)
	}
	return []v1alpha1.IPPool{p}, services
}

func TestParsedPool(t *testing.T) {
	in, err := os.ReadFile(filepath.Join("testdata", "ipv6.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	r, err := KeepalivedVIP(in, Options{VRID: "50-81"})
	if err != nil {
		t.Fatal(err)
	}
	pools, services := parseStream(t, r.Script)
	want := []string{"10.0.0.10/32", "2001:db8::10/128", "2001:db8::11/128"}
	if got := pools[0].Spec.Addresses; strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("addresses = %v, want %v", got, want)
	}
	if pools[0].Name != DefaultPoolName || pools[0].Spec.VRRP == nil || pools[0].Spec.VRRP.VirtualRouterIDs != "50-81" {
		t.Errorf("pool = %+v, want name %s and VRIDs 50-81", pools[0], DefaultPoolName)
	}
	for _, s := range services {
		if s.Name == "web" && s.Annotations["keeplb.io/ips"] != "10.0.0.10,2001:db8::10" {
			t.Errorf("web: keeplb.io/ips = %q", s.Annotations["keeplb.io/ips"])
		}
		if s.Annotations["keeplb.io/pool"] != DefaultPoolName {
			t.Errorf("%s: keeplb.io/pool = %q", s.Name, s.Annotations["keeplb.io/pool"])
		}
	}
}

func TestWholeInputErrors(t *testing.T) {
	for _, tt := range []struct {
		name, in string
		opts     Options
		want     string
	}{
		{"not yaml", "data: [", Options{}, "reading the ConfigMap"},
		{"wrong kind", "kind: Secret\ndata: {a: b}\n", Options{}, "is a Secret, not a ConfigMap"},
		{"empty", "kind: ConfigMap\n", Options{}, "no data"},
		{"bad vrid", "kind: ConfigMap\ndata: {10.0.0.1: a/b}\n", Options{VRID: "0-300"}, "--vrid"},
		{"bad pool name", "kind: ConfigMap\ndata: {10.0.0.1: a/b}\n", Options{PoolName: "Not_A_Name"}, "--pool-name"},
		{"bad keepalived-vip vrid", "kind: ConfigMap\ndata: {10.0.0.1: a/b}\n", Options{KeepalivedVIPVRID: 256}, "--keepalived-vip-vrid 256"},
	} {
		_, err := KeepalivedVIP([]byte(tt.in), tt.opts)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: err = %v, want one containing %q", tt.name, err, tt.want)
		}
	}
}

func TestAddFlags(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want Options
	}{
		{nil, Options{PoolName: DefaultPoolName, KeepalivedVIPVRID: DefaultKeepalivedVIPVRID}},
		{[]string{"--pool-name=legacy", "--vrid=1-32", "--keepalived-vip-vrid=7"}, Options{PoolName: "legacy", VRID: "1-32", KeepalivedVIPVRID: 7}},
	} {
		o := Options{PoolName: DefaultPoolName}
		fs := pflag.NewFlagSet("migrate", pflag.ContinueOnError)
		o.AddFlags(fs)
		if err := fs.Parse(tt.args); err != nil {
			t.Fatalf("%q: %v", tt.args, err)
		}
		if o != tt.want {
			t.Errorf("%q: options = %+v, want %+v", tt.args, o, tt.want)
		}
	}
}

// TestScriptRuns runs a generated script with sh and a kubectl that records
// its calls and fails for one Service, as kubectl does for a Service that
// does not exist.
func TestScriptRuns(t *testing.T) {
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh:", err)
	}
	in := "kind: ConfigMap\ndata:\n  10.0.0.10: default/web\n  10.0.0.11: default/missing:DR\n  10.0.0.12: shop/cart\n"
	r, err := KeepalivedVIP([]byte(in), Options{VRID: "51-82"})
	if err != nil || len(r.Errors) > 0 {
		t.Fatalf("KeepalivedVIP: %v %v", err, r.Errors)
	}
	// The fake logs its calls (a patch up to its --type), and keeps what
	// apply reads and the 13th argument of a patch, the patch, in files.
	dir := t.TempDir()
	fake := filepath.Join(dir, "kubectl")
	if err := os.WriteFile(fake, []byte(`#!/bin/sh
cd `+dir+`
case "$5" in
patch)
  echo "$1 $2 $3 $4 $5 $6 $7 $8 $9" >>calls
  printf '%s' "${13}" >"patch-$4-$7"
  if [ "$7" = missing ]; then echo 'Error from server (NotFound): services "missing" not found' >&2; exit 1; fi ;;
*)
  echo "$*" >>calls
  cat >applied ;;
esac
`), 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(sh, "-s")
	cmd.Stdin = bytes.NewReader(r.Script)
	cmd.Env = append(os.Environ(), "KUBECTL="+fake+" --context test")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err = cmd.Run()
	if exit := (*exec.ExitError)(nil); !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Errorf("sh: %v, want exit status 1 for the missing Service", err)
	}
	if want := "error: not migrated: default/missing\n"; !strings.HasSuffix(stderr.String(), want) {
		t.Errorf("stderr = %q, want it to end with %q", stderr.String(), want)
	}

	read := func(name string) string {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	want := `--context test apply --server-side --field-manager=keeplb-migrate -f -
--context test --namespace default patch service missing --type merge
--context test --namespace default patch service web --type merge
--context test --namespace shop patch service cart --type merge
`
	if got := read("calls"); got != want {
		t.Errorf("kubectl calls:\n%swant:\n%s", got, want)
	}
	var pool v1alpha1.IPPool
	if err := yaml.UnmarshalStrict([]byte(read("applied")), &pool); err != nil || strings.Join(pool.Spec.Addresses, " ") != "10.0.0.10/32 10.0.0.11/32 10.0.0.12/32" {
		t.Errorf("kubectl apply read an IPPool with addresses %v (%v), want the three VIPs", pool.Spec.Addresses, err)
	}
	var web corev1.Service
	if err := yaml.UnmarshalStrict([]byte(read("patch-default-web")), &web); err != nil || web.Annotations["keeplb.io/ips"] != "10.0.0.10" || web.Spec.Type != corev1.ServiceTypeLoadBalancer {
		t.Errorf("the patch of default/web is %+v (%v), want type LoadBalancer and keeplb.io/ips 10.0.0.10", web, err)
	}
}
