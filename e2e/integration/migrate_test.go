package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/keeplb/keeplb/pkg/migrate"
)

// The Services of docs/migration.md's ConfigMap, deployed the three usual
// ways before keeplb: nginx with client-side kubectl apply (its manifest
// spells out type ClusterIP and has an annotation of its own), echo with
// kubectl create, front with server-side apply by a GitOps tool.
const (
	migrateNginx = `apiVersion: v1
kind: Service
metadata:
  name: nginx
  namespace: default
  annotations:
    example.com/team: web
spec:
  type: ClusterIP
  selector: {app: nginx}
  ports: [{name: http, port: 80, targetPort: 8080}]
`
	migrateEcho = `apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: default
spec:
  selector: {app: echo}
  ports: [{name: echo, port: 7, targetPort: 7}]
`
	migrateFront = `apiVersion: v1
kind: Service
metadata:
  name: front
  namespace: web
spec:
  selector: {app: front}
  ports: [{name: https, port: 443, targetPort: 8443}]
`
)

// TestMigrateKeepalivedVIP follows docs/migration.md on a real API server:
// the docs' ConfigMap converted with the docs' flags into the script the
// docs show, run with sh against Services deployed as above, then run
// again, then run for a changed ConfigMap; keeplb's controller gives each
// Service its VIP, and a later deployment of a Service wins as the docs
// warn.
func TestMigrateKeepalivedVIP(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	dir := t.TempDir()
	kubectl := func(args ...string) {
		t.Helper()
		if _, err := e.cp.Kubectl(ctx, args...); err != nil {
			t.Fatal(err)
		}
	}
	write := func(name, content string) string {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}

	e.namespace("web", nil)
	kubectl("apply", "-f", write("nginx.yaml", migrateNginx))
	kubectl("create", "-f", write("echo.yaml", migrateEcho))
	kubectl("apply", "--server-side", "--field-manager=gitops", "-f", write("front.yaml", migrateFront))
	before := map[string]*v1.Service{}
	for _, ref := range []string{"default/nginx", "default/echo", "web/front"} {
		ns, name, _ := strings.Cut(ref, "/")
		before[ref] = e.get(ns, name)
	}
	// kubectl create and client-side apply own the type they defaulted or
	// spelled out; server-side apply owns only what it applied.
	for ref, want := range map[string]bool{"default/nginx": true, "default/echo": true, "web/front": false} {
		owns := false
		for _, fields := range ownedBy(t, before[ref].ManagedFields) {
			owns = owns || slices.Contains(fields, "spec.type")
		}
		if owns != want {
			t.Errorf("%s: spec.type owned before the migration: %t, want %t", ref, owns, want)
		}
	}

	// Steps 3 and 5: convert the docs' ConfigMap, run the script.
	doc, err := os.ReadFile(filepath.Join("..", "..", "docs", "migration.md"))
	if err != nil {
		t.Fatal(err)
	}
	configMap := codeBlock(t, string(doc), "", "```yaml\n")
	r, err := migrate.KeepalivedVIP([]byte(configMap), migrate.Options{VRID: "51-82"})
	if err != nil || len(r.Errors) > 0 {
		t.Fatalf("migrate: %v %v", err, r.Errors)
	}
	if want := codeBlock(t, string(doc), "## What the command produces", "```sh\n"); string(r.Script) != want {
		t.Errorf("docs/migration.md shows a script other than the command's output; the output is:\n%s", r.Script)
	}
	var warnings strings.Builder
	for _, w := range r.Warnings {
		warnings.WriteString("warning: " + w + "\n")
	}
	if want := codeBlock(t, string(doc), "running the command twice gives the same script. On stderr:", "```\n"); warnings.String() != want {
		t.Errorf("docs/migration.md shows warnings other than the command's:\n%s", warnings.String())
	}
	script := write("keeplb-migrate.sh", string(r.Script))
	out, err := e.runMigrateScript(script)
	if err != nil {
		t.Fatalf("sh keeplb-migrate.sh: %v\n%s", err, out)
	}
	if strings.Contains(out, "Warning") {
		t.Errorf("kubectl warned:\n%s", out)
	}

	// The IPPool the docs show, and each Service patched: type and
	// keeplb's annotations, nothing else changed, and the earlier owners
	// keep their fields.
	pool := e.getPool(migrate.DefaultPoolName)
	if got, want := strings.Join(pool.Spec.Addresses, " "), "10.4.0.50/32 10.4.0.51/32 10.4.0.52/32"; got != want {
		t.Errorf("IPPool addresses %s, want %s", got, want)
	}
	if pool.Spec.AutoAssign == nil || *pool.Spec.AutoAssign || pool.Spec.VRRP == nil || pool.Spec.VRRP.VirtualRouterIDs != "51-82" {
		t.Errorf("IPPool spec %+v, want autoAssign false and VRIDs 51-82", pool.Spec)
	}
	if got := managers(pool.ManagedFields); !slices.Equal(got, []string{"keeplb-migrate Apply"}) {
		t.Errorf("IPPool managers %v, want keeplb-migrate's server-side apply", got)
	}
	vips := map[string]string{"default/nginx": "10.4.0.50", "default/echo": "10.4.0.51", "web/front": "10.4.0.52"}
	// What a merge patch makes keeplb-migrate own: the fields it set, and
	// the two the API server defaults when a Service becomes a
	// LoadBalancer (the allocated node ports are nobody's).
	migrateOwns := []string{
		"metadata.annotations.keeplb.io/forwarding",
		"metadata.annotations.keeplb.io/ips",
		"metadata.annotations.keeplb.io/pool",
		"spec.allocateLoadBalancerNodePorts",
		"spec.externalTrafficPolicy",
		"spec.type",
	}
	earlier := map[string]string{"default/nginx": "kubectl-client-side-apply Update", "default/echo": "kubectl-create Update", "web/front": "gitops Apply"}
	for ref, vip := range vips {
		ns, name, _ := strings.Cut(ref, "/")
		s := e.get(ns, name)
		wantAnn := maps.Clone(before[ref].Annotations)
		if wantAnn == nil {
			wantAnn = map[string]string{}
		}
		wantAnn["keeplb.io/pool"] = migrate.DefaultPoolName
		wantAnn["keeplb.io/ips"] = vip
		wantAnn["keeplb.io/forwarding"] = "pod"
		ports := slices.Clone(s.Spec.Ports)
		for i := range ports {
			ports[i].NodePort = 0 // allocated for the LoadBalancer
		}
		if s.Spec.Type != v1.ServiceTypeLoadBalancer || !maps.Equal(s.Annotations, wantAnn) || !maps.Equal(s.Spec.Selector, before[ref].Spec.Selector) || !reflect.DeepEqual(ports, before[ref].Spec.Ports) {
			t.Errorf("%s after the script: type %s, annotations %v, selector %v, ports %+v\nwant type LoadBalancer, annotations %v, selector %v, ports %+v",
				ref, s.Spec.Type, s.Annotations, s.Spec.Selector, ports, wantAnn, before[ref].Spec.Selector, before[ref].Spec.Ports)
		}
		owned := ownedBy(t, s.ManagedFields)
		if got := owned["keeplb-migrate Update"]; !slices.Equal(got, migrateOwns) {
			t.Errorf("%s: keeplb-migrate owns %v, want %v", ref, got, migrateOwns)
		}
		if got, want := managers(s.ManagedFields), slices.Sorted(slices.Values([]string{"keeplb-migrate Update", earlier[ref]})); !slices.Equal(got, want) {
			t.Errorf("%s: managers %v, want %v", ref, got, want)
		}
		if fields := owned[earlier[ref]]; !slices.Contains(fields, "spec.selector") || !slices.Contains(fields, "spec.ports[*].targetPort") {
			t.Errorf("%s: %s owns %v, no longer the selector and ports", ref, earlier[ref], fields)
		}
	}
	if fields := ownedBy(t, e.get("default", "nginx").ManagedFields)["kubectl-client-side-apply Update"]; !slices.Contains(fields, "metadata.annotations.example.com/team") {
		t.Errorf("nginx: client-side apply owns %v, no longer its annotation example.com/team", fields)
	}

	// Running it again changes nothing.
	versions := func() string {
		v := []string{e.getPool(migrate.DefaultPoolName).ResourceVersion}
		for _, ref := range []string{"default/echo", "default/nginx", "web/front"} {
			ns, name, _ := strings.Cut(ref, "/")
			v = append(v, e.get(ns, name).ResourceVersion)
		}
		return strings.Join(v, " ")
	}
	v := versions()
	out, err = e.runMigrateScript(script)
	if err != nil || strings.Count(out, "patched (no change)") != 3 {
		t.Fatalf("second run: %v, want three unchanged Services:\n%s", err, out)
	}
	if got := versions(); got != v {
		t.Errorf("resource versions went from %s to %s on a second run", v, got)
	}

	// Step 7: the controller gives each Service its VIP, with ipMode Proxy.
	e.startController()
	for ref, vip := range vips {
		ns, name, _ := strings.Cut(ref, "/")
		ing := e.waitIngress(ns, name, 1).Status.LoadBalancer.Ingress[0]
		if ing.IP != vip || ing.IPMode == nil || *ing.IPMode != v1.LoadBalancerIPModeProxy {
			t.Errorf("%s: ingress %+v, want %s with ipMode Proxy", ref, ing, vip)
		}
	}

	// A changed ConfigMap, converted and run again: nginx moves to a new
	// VIP without a conflict; an entry for a Service that does not exist
	// is reported, and creates nothing.
	changed := strings.Replace(configMap, "10.4.0.50: default/nginx", "10.4.0.53: default/nginx\n  10.4.0.54: default/missing", 1)
	r, err = migrate.KeepalivedVIP([]byte(changed), migrate.Options{VRID: "51-82"})
	if err != nil || len(r.Errors) > 0 || !strings.Contains(string(r.Script), "10.4.0.53") {
		t.Fatalf("migrate the changed ConfigMap: %v %v\n%s", err, r.Errors, r.Script)
	}
	out, err = e.runMigrateScript(write("keeplb-migrate-2.sh", string(r.Script)))
	if err == nil || !strings.Contains(out, `services "missing" not found`) || !strings.HasSuffix(out, "error: not migrated: default/missing\n") {
		t.Errorf("run for a missing Service: %v, want it to fail naming the Service:\n%s", err, out)
	}
	if _, err := e.client.CoreV1().Services("default").Get(ctx, "missing", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("Service default/missing: %v, want it not created", err)
	}
	if got := strings.Join(e.getPool(migrate.DefaultPoolName).Spec.Addresses, " "); got != "10.4.0.51/32 10.4.0.52/32 10.4.0.53/32 10.4.0.54/32" {
		t.Errorf("IPPool addresses after the change: %s", got)
	}
	eventually(t, 30*time.Second, "nginx to move to 10.4.0.53", func() (bool, string) {
		s := e.get("default", "nginx")
		return s.Annotations["keeplb.io/ips"] == "10.4.0.53" && slices.Equal(ingress(s), []string{"10.4.0.53"}), fmt.Sprint(s.Annotations["keeplb.io/ips"], ingress(s))
	})

	// Later deployments, as the docs tell: a manifest without a type keeps
	// the LoadBalancer; one that says ClusterIP conflicts with
	// keeplb-migrate (server-side apply) or turns the Service back into a
	// ClusterIP one (client-side apply); one with keeplb's type and
	// annotations applies without a conflict.
	kubectl("apply", "--server-side", "--field-manager=gitops", "-f", write("front.yaml", migrateFront))
	if s := e.get("web", "front"); s.Spec.Type != v1.ServiceTypeLoadBalancer {
		t.Errorf("front after its manifest without a type was applied again: type %s", s.Spec.Type)
	}
	clusterIP := strings.Replace(migrateFront, "spec:\n", "spec:\n  type: ClusterIP\n", 1)
	if out, err := e.cp.Kubectl(ctx, "apply", "--server-side", "--field-manager=gitops", "-f", write("front.yaml", clusterIP)); err == nil || !strings.Contains(out, `conflict with "keeplb-migrate"`) || !strings.Contains(out, ".spec.type") {
		t.Errorf("server-side apply of type ClusterIP: %v, want a conflict with keeplb-migrate over .spec.type:\n%s", err, out)
	}
	withKeeplb := strings.Replace(migrateFront, "spec:\n", "  annotations:\n    keeplb.io/pool: keepalived-vip\n    keeplb.io/ips: 10.4.0.52\n    keeplb.io/forwarding: pod\nspec:\n  type: LoadBalancer\n", 1)
	kubectl("apply", "--server-side", "--field-manager=gitops", "-f", write("front.yaml", withKeeplb))
	if s := e.get("web", "front"); s.Spec.Type != v1.ServiceTypeLoadBalancer || !slices.Equal(ingress(s), []string{"10.4.0.52"}) {
		t.Errorf("front after its own deployment: type %s, ingress %v", s.Spec.Type, ingress(s))
	}
	kubectl("apply", "-f", filepath.Join(dir, "nginx.yaml"))
	if s := e.get("default", "nginx"); s.Spec.Type != v1.ServiceTypeClusterIP {
		t.Errorf("nginx after its old manifest was applied again: type %s, want ClusterIP", s.Spec.Type)
	}
}

// TestMigrateServerSideApply shows why the script patches the Services
// rather than server-side applying Service stubs, as docs/migration.md
// tells: on a Service deployed with client-side kubectl apply, the stub
// conflicts over spec.type, and forced, kubectl hands it every field of the
// earlier apply, so that applying the stub again fails.
func TestMigrateServerSideApply(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	dir := t.TempDir()
	nginx := filepath.Join(dir, "nginx.yaml")
	stub := filepath.Join(dir, "stub.yaml")
	if err := os.WriteFile(nginx, []byte(migrateNginx), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(stub, []byte("apiVersion: v1\nkind: Service\nmetadata:\n  name: nginx\n  namespace: default\n  annotations: {keeplb.io/ips: 10.4.0.50}\nspec: {type: LoadBalancer}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := e.cp.Kubectl(ctx, "apply", "-f", nginx); err != nil {
		t.Fatal(err)
	}
	ssa := []string{"apply", "--server-side", "--field-manager=keeplb-migrate", "-f", stub}
	if out, err := e.cp.Kubectl(ctx, ssa...); err == nil || !strings.Contains(out, `conflict with "kubectl-client-side-apply"`) || !strings.Contains(out, ".spec.type") {
		t.Errorf("server-side apply of the stub: %v, want a conflict over .spec.type:\n%s", err, out)
	}
	out, err := e.cp.Kubectl(ctx, append(ssa, "--force-conflicts")...)
	if err != nil || !strings.Contains(out, "failed to re-apply configuration after performing Server-Side Apply migration") {
		t.Errorf("forced server-side apply of the stub: %v, want kubectl's migration warning:\n%s", err, out)
	}
	s := e.get("default", "nginx")
	if got := managers(s.ManagedFields); !slices.Equal(got, []string{"keeplb-migrate Apply"}) || !slices.Contains(ownedBy(t, s.ManagedFields)["keeplb-migrate Apply"], "spec.selector") {
		t.Errorf("after the forced apply: managers %v, owned %v; want keeplb-migrate owning the selector too", got, ownedBy(t, s.ManagedFields))
	}
	if out, err := e.cp.Kubectl(ctx, append(ssa, "--force-conflicts")...); err == nil || !strings.Contains(out, "spec.ports: Required value") {
		t.Errorf("the stub applied again: %v, want spec.ports: Required value:\n%s", err, out)
	}
}

// runMigrateScript runs the script the way docs/migration.md does (sh),
// with the test's kubectl and kubeconfig in $KUBECTL, and returns its
// combined output.
func (e *env) runMigrateScript(script string) (string, error) {
	e.t.Helper()
	kubectl := filepath.Join(os.Getenv("KEEPLB_TOOLS_DIR"), "kubectl")
	cmd := exec.CommandContext(e.t.Context(), "sh", script)
	cmd.Env = append(os.Environ(),
		"KUBECTL="+kubectl+" --kubeconfig="+e.cp.KubeconfigPath()+" --cache-dir="+filepath.Join(e.cp.WorkDir(), "kubectl-cache"))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// codeBlock returns the first code block of doc that opens with fence
// after the line heading (from the start if heading is empty).
func codeBlock(t *testing.T, doc, heading, fence string) string {
	t.Helper()
	if heading != "" {
		_, after, ok := strings.Cut(doc, "\n"+heading+"\n")
		if !ok {
			t.Fatalf("docs/migration.md has no %q", heading)
		}
		doc = after
	}
	_, block, ok := strings.Cut(doc, fence)
	if !ok {
		t.Fatalf("docs/migration.md has no %q block after %q", fence, heading)
	}
	block, _, ok = strings.Cut(block, "```\n")
	if !ok {
		t.Fatalf("docs/migration.md: a %q block after %q does not end", fence, heading)
	}
	return block
}

// managers lists the managedFields entries as "manager operation", sorted.
func managers(mf []metav1.ManagedFieldsEntry) []string {
	var out []string
	for _, m := range mf {
		out = append(out, m.Manager+" "+string(m.Operation))
	}
	slices.Sort(out)
	return out
}

// ownedBy lists, per "manager operation", the leaf fields it owns, as
// sorted dotted paths: "spec.type", "metadata.annotations.keeplb.io/ips";
// list items keyed by value or key become [*].
func ownedBy(t *testing.T, mf []metav1.ManagedFieldsEntry) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	for _, m := range mf {
		var fields map[string]any
		if m.FieldsV1 == nil {
			continue
		}
		if err := json.Unmarshal(m.FieldsV1.GetRawBytes(), &fields); err != nil {
			t.Fatal(err)
		}
		var leaves []string
		var walk func(prefix string, f map[string]any)
		walk = func(prefix string, f map[string]any) {
			for k, sub := range f {
				var p string
				switch {
				case k == ".":
					continue
				case strings.HasPrefix(k, "f:"):
					p = strings.TrimPrefix(prefix+"."+k[2:], ".")
				default: // k:{...} or v:...
					p = prefix + "[*]"
				}
				if s, ok := sub.(map[string]any); ok && len(s) > 0 && !(len(s) == 1 && s["."] != nil) {
					walk(p, s)
				} else {
					leaves = append(leaves, p)
				}
			}
		}
		walk("", fields)
		slices.Sort(leaves)
		out[m.Manager+" "+string(m.Operation)] = slices.Compact(leaves)
	}
	return out
}
