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
	chart := filepath.Join(*manifests, chartDir)
	changed := false
	for _, name := range sortedKeys(files) {
		path := filepath.Join(chart, name)
		wrote, err := writeIfChanged(path, files[name])
		if err != nil {
			fmt.Fprintf(os.Stderr, "chartgen: %v\n", err)
			return 1
		}
		if wrote {
			fmt.Println("wrote", path)
			changed = true
		}
	}
	stale, err := staleFiles(chart, files)
	if err != nil {
		fmt.Fprintf(os.Stderr, "chartgen: %v\n", err)
		return 1
	}
	for _, path := range stale {
		if err := os.Remove(path); err != nil {
			fmt.Fprintf(os.Stderr, "chartgen: %v\n", err)
			return 1
		}
		fmt.Println("removed", path)
		changed = true
	}
	if !changed {
		fmt.Println(chart, "is up to date")
	}
	return 0
}

// staleFiles returns the files of chart that an earlier run generated and
// this one did not: the CRDs, and the templates with the generated header.
// Hand-written templates such as NOTES.txt stay.
func staleFiles(chart string, files map[string][]byte) ([]string, error) {
	var stale []string
	for _, pattern := range []string{"crds/*", "templates/*"} {
		paths, err := filepath.Glob(filepath.Join(chart, pattern))
		if err != nil {
			return nil, err
		}
		for _, path := range paths {
			rel, err := filepath.Rel(chart, path)
			if err != nil {
				return nil, err
			}
			if _, ok := files[filepath.ToSlash(rel)]; ok {
				continue
			}
			data, err := os.ReadFile(path)
			if err != nil {
				return nil, err
			}
			if pattern == "crds/*" || bytes.HasPrefix(data, []byte(generatedHeader)) {
				stale = append(stale, path)
			}
		}
	}
	return stale, nil
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
