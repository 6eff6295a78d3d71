package migrate

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// The script's own lines, outside comments, the IPPool's here-document and
// each Service's quoted patch. Anything taken from the ConfigMap that
// reaches a line of code must be a validated name.
var (
	codeLine = regexp.MustCompile(`^(#!/bin/sh|kubectl=\$\{KUBECTL:-kubectl\}|failed=|if \[ -n "\$failed" \]; then|  echo "error: not migrated:\$failed" >&2|  exit 1|fi)$`)
	poolLine = regexp.MustCompile(`^\$kubectl apply --server-side --field-manager=keeplb-migrate -f - <<'EOF' \|\| exit$`)
	openLine = regexp.MustCompile(`^\$kubectl --namespace [a-z0-9]([a-z0-9-]*[a-z0-9])? patch service [a-z0-9]([a-z0-9.-]*[a-z0-9])? --type merge --field-manager keeplb-migrate --patch '$`)
	endLine  = regexp.MustCompile(`^' \|\| failed="\$failed [a-z0-9-]+/[a-z0-9.-]+"$`)
)

// checkScript walks the script as sh would read it and fails at the first
// line that would run something the template does not say.
func checkScript(t *testing.T, script string) {
	t.Helper()
	const (
		code = iota
		heredoc
		quoted
	)
	state := code
	for i, line := range strings.Split(script, "\n") {
		switch state {
		case heredoc:
			if line == "EOF" {
				state = code
			}
		case quoted:
			if endLine.MatchString(line) {
				state = code
			} else if strings.Contains(line, "'") {
				t.Fatalf("line %d ends the quoted patch early: %q\n%s", i+1, line, script)
			}
		default:
			switch {
			case line == "", strings.HasPrefix(line, "#"), codeLine.MatchString(line):
			case poolLine.MatchString(line):
				state = heredoc
			case openLine.MatchString(line):
				state = quoted
			default:
				t.Fatalf("line %d is code the template does not write: %q\n%s", i+1, line, script)
			}
		}
	}
	if state != code {
		t.Fatalf("script ends inside a here-document or a quoted patch:\n%s", script)
	}
}

// FuzzKeepalivedVIP converts arbitrary manifests: never a panic, and never
// a script whose code is anything but the template's.
func FuzzKeepalivedVIP(f *testing.F) {
	seeds, _ := filepath.Glob(filepath.Join("testdata", "*.yaml"))
	for _, p := range seeds {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b, "", "")
		}
	}
	f.Add([]byte("kind: ConfigMap\nmetadata:\n  name: \"x\\nrm -rf ~\"\ndata:\n  10.0.0.1: default/web\n"), "", "")
	f.Add([]byte("kind: ConfigMap\ndata:\n  10.0.0.1: \"default/web'; reboot; '\"\n"), "p", "51-82")
	f.Fuzz(func(t *testing.T, manifest []byte, pool, vrid string) {
		r, err := KeepalivedVIP(manifest, Options{PoolName: pool, VRID: vrid})
		if err != nil {
			return
		}
		checkScript(t, string(r.Script))
	})
}

func TestCheckScriptCatchesInjection(t *testing.T) {
	r, err := KeepalivedVIP([]byte("kind: ConfigMap\nmetadata:\n  name: \"x\\nrm -rf ~\"\n  namespace: kube-system\ndata:\n  10.0.0.1: default/web\n"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	// On main the name's line break put `rm -rf ~` on a line of its own.
	checkScript(t, string(r.Script))
	if !strings.Contains(string(r.Script), `a ConfigMap named "kube-system/x\nrm -rf ~"`) {
		t.Errorf("the odd name is not quoted in the header:\n%s", r.Script)
	}
}
