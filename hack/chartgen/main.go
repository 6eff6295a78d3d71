// Command chartgen writes the templates and the CRD of the Helm chart in
// manifests/charts/keeplb from the kustomize base in manifests/, so that
// both install the same objects. `make chart` runs it from the repository
// root; its tests fail when the committed chart is not what it writes.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"
)

func main() { os.Exit(run()) }

func run() int {
	manifests := flag.String("manifests", "manifests", "the kustomize base; the chart is written to its "+chartDir)
	flag.Parse()
	files, err := generate(os.DirFS(*manifests))
	if err != nil {
		fmt.Fprintf(os.Stderr, "chartgen: %v\n", err)
		return 1
	}
	for _, name := range sortedKeys(files) {
		path := filepath.Join(*manifests, chartDir, name)
		changed, err := writeIfChanged(path, files[name])
		if err != nil {
			fmt.Fprintf(os.Stderr, "chartgen: %v\n", err)
			return 1
		}
		if changed {
			fmt.Println("wrote", path)
		}
	}
	return 0
}

// writeIfChanged writes data to path through a temporary file and a rename,
// unless the file already holds exactly data.
func writeIfChanged(path string, data []byte) (bool, error) {
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, data) {
		return false, nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return false, err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return false, err
	}
	return true, os.Rename(tmp, path)
}
