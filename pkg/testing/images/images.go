// Package images makes the container images of the test cluster that
// cannot be pulled here: the pod sandbox (pause) and an HTTP echo backend.
// Each is one static Go binary of this package's cmd/ folder, packed as a
// one-layer image in an OCI image layout tar, which `ctr images import`
// (containerd) and `podman load` accept.
package images

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"time"
)

// The images' references, as the test cluster's pods and containerd's
// sandbox_image name them.
const (
	// Pause is the pod sandbox image.
	Pause = "registry.k8s.io/pause:3.10"
	// Echo is the HTTP echo backend (cmd/echo).
	Echo = "keeplb.local/echo:1"
)

// Image is one image to pack: a static binary and how to run it.
type Image struct {
	// Ref is the image's name, e.g. "keeplb.local/echo:1".
	Ref string
	// Binary is the executable's content; it becomes /Name in the image.
	Binary []byte
	// Name is the executable's file name in the image's root.
	Name string
	// Env is the image's environment, "KEY=value".
	Env []string
}

// Build compiles this package's commands (pause, echo) for linux/amd64,
// statically, and writes each as an OCI archive into dir. It returns the
// archives' paths by reference.
func Build(ctx context.Context, dir string) (map[string]string, error) {
	src, err := sourceDir()
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, c := range []struct{ ref, cmd string }{{Pause, "pause"}, {Echo, "echo"}} {
		bin := filepath.Join(dir, c.cmd+".bin")
		build := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, "./cmd/"+c.cmd)
		build.Dir = src
		build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
		if b, err := build.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("go build %s: %w\n%s", c.cmd, err, b)
		}
		data, err := os.ReadFile(bin)
		if err != nil {
			return nil, err
		}
		archive := filepath.Join(dir, c.cmd+".tar")
		f, err := os.Create(archive)
		if err != nil {
			return nil, err
		}
		err = Write(f, Image{Ref: c.ref, Binary: data, Name: c.cmd})
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, fmt.Errorf("pack %s: %w", c.ref, err)
		}
		out[c.ref] = archive
	}
	return out, nil
}

// sourceDir is this package's folder, where its cmd/ lives.
func sourceDir() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", fmt.Errorf("images: cannot find the package's source")
	}
	return filepath.Dir(file), nil
}

// descriptor is an OCI content descriptor.
type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int               `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// The OCI media types of the archive's blobs.
const (
	mediaManifest = "application/vnd.oci.image.manifest.v1+json"
	mediaConfig   = "application/vnd.oci.image.config.v1+json"
	mediaLayer    = "application/vnd.oci.image.layer.v1.tar"
)

// Write writes img to w as an OCI image layout tar: oci-layout, index.json
// naming the image by img.Ref (containerd's io.containerd.image.name and
// the OCI ref.name), and the blobs of the manifest, the config and the one
// layer, each named by its sha256. The output depends on img alone (fixed
// times and owners), so two builds of one binary give one digest.
func Write(w io.Writer, img Image) error {
	var layer bytes.Buffer
	lt := tar.NewWriter(&layer)
	if err := lt.WriteHeader(&tar.Header{Name: img.Name, Mode: 0o755, Size: int64(len(img.Binary)), ModTime: time.Unix(0, 0), Typeflag: tar.TypeReg}); err != nil {
		return err
	}
	if _, err := lt.Write(img.Binary); err != nil {
		return err
	}
	if err := lt.Close(); err != nil {
		return err
	}
	config, err := json.Marshal(map[string]any{
		"architecture": "amd64",
		"os":           "linux",
		"config":       map[string]any{"Entrypoint": []string{"/" + img.Name}, "Env": img.Env},
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{digest(layer.Bytes())}},
	})
	if err != nil {
		return err
	}
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaManifest,
		"config":        descriptor{MediaType: mediaConfig, Digest: digest(config), Size: len(config)},
		"layers":        []descriptor{{MediaType: mediaLayer, Digest: digest(layer.Bytes()), Size: layer.Len()}},
	})
	if err != nil {
		return err
	}
	index, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"manifests": []descriptor{{MediaType: mediaManifest, Digest: digest(manifest), Size: len(manifest),
			Annotations: map[string]string{"io.containerd.image.name": img.Ref, "org.opencontainers.image.ref.name": img.Ref}}},
	})
	if err != nil {
		return err
	}
	t := tar.NewWriter(w)
	files := []struct {
		name string
		data []byte
	}{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{"index.json", index},
		{blob(manifest), manifest},
		{blob(config), config},
		{blob(layer.Bytes()), layer.Bytes()},
	}
	for _, f := range files {
		if err := t.WriteHeader(&tar.Header{Name: f.name, Mode: 0o644, Size: int64(len(f.data)), ModTime: time.Unix(0, 0), Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		if _, err := t.Write(f.data); err != nil {
			return err
		}
	}
	return t.Close()
}

func digest(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}

func blob(b []byte) string {
	sum := sha256.Sum256(b)
	return "blobs/sha256/" + hex.EncodeToString(sum[:])
}
