package images

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// readArchive returns the files of an archive Write made, by name.
func readArchive(t *testing.T, b []byte) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return files
		}
		if err != nil {
			t.Fatal(err)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		files[h.Name] = data
	}
}

// blobOf returns the blob d names, checking its digest and size as
// containerd's import does.
func blobOf(t *testing.T, files map[string][]byte, d descriptor) []byte {
	t.Helper()
	hexsum, ok := strings.CutPrefix(d.Digest, "sha256:")
	if !ok {
		t.Fatalf("digest %q is not sha256", d.Digest)
	}
	data, ok := files["blobs/sha256/"+hexsum]
	if !ok {
		t.Fatalf("no blob %s", d.Digest)
	}
	sum := sha256.Sum256(data)
	if hex.EncodeToString(sum[:]) != hexsum || len(data) != d.Size {
		t.Fatalf("blob %s: content does not match its digest or size %d", d.Digest, d.Size)
	}
	return data
}

// TestWriteIsAValidLayout follows the archive from index.json to the
// binary in the layer, checking every digest and size on the way, and
// that two writes of one image are the same bytes.
func TestWriteIsAValidLayout(t *testing.T) {
	img := Image{Ref: "keeplb.local/x:1", Binary: []byte("#!/bin/true\n"), Name: "x", Env: []string{"A=b"}}
	var a, b bytes.Buffer
	if err := Write(&a, img); err != nil {
		t.Fatal(err)
	}
	if err := Write(&b, img); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Error("two writes of one image differ")
	}
	files := readArchive(t, a.Bytes())
	if string(files["oci-layout"]) != `{"imageLayoutVersion":"1.0.0"}` {
		t.Errorf("oci-layout = %q", files["oci-layout"])
	}
	var index struct {
		Manifests []descriptor `json:"manifests"`
	}
	if err := json.Unmarshal(files["index.json"], &index); err != nil || len(index.Manifests) != 1 {
		t.Fatalf("index.json: %v, %s", err, files["index.json"])
	}
	if got := index.Manifests[0].Annotations["io.containerd.image.name"]; got != img.Ref {
		t.Errorf("containerd image name %q, want %q", got, img.Ref)
	}
	var manifest struct {
		Config descriptor   `json:"config"`
		Layers []descriptor `json:"layers"`
	}
	if err := json.Unmarshal(blobOf(t, files, index.Manifests[0]), &manifest); err != nil || len(manifest.Layers) != 1 {
		t.Fatalf("manifest: %v", err)
	}
	var config struct {
		Config struct {
			Entrypoint []string
			Env        []string
		} `json:"config"`
		RootFS struct {
			DiffIDs []string `json:"diff_ids"`
		} `json:"rootfs"`
	}
	if err := json.Unmarshal(blobOf(t, files, manifest.Config), &config); err != nil {
		t.Fatal(err)
	}
	if len(config.Config.Entrypoint) != 1 || config.Config.Entrypoint[0] != "/x" || len(config.Config.Env) != 1 {
		t.Errorf("config %+v", config.Config)
	}
	layer := blobOf(t, files, manifest.Layers[0])
	if len(config.RootFS.DiffIDs) != 1 || config.RootFS.DiffIDs[0] != manifest.Layers[0].Digest {
		t.Errorf("diff_ids %v, want the uncompressed layer's digest %s", config.RootFS.DiffIDs, manifest.Layers[0].Digest)
	}
	inLayer := readArchive(t, layer)
	if !bytes.Equal(inLayer["x"], img.Binary) {
		t.Errorf("the layer holds %q, want the binary", inLayer["x"])
	}
}

// TestBuild builds both images and runs the echo backend's binary on the
// host: it answers with its name and the client's address.
func TestBuild(t *testing.T) {
	if testing.Short() {
		t.Skip("builds two binaries")
	}
	dir := t.TempDir()
	out, err := Build(t.Context(), dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{Pause, Echo} {
		b, err := os.ReadFile(out[ref])
		if err != nil {
			t.Fatalf("%s: %v", ref, err)
		}
		if len(readArchive(t, b)) != 5 {
			t.Errorf("%s: not a five-file layout", ref)
		}
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	_ = l.Close()
	cmd := exec.Command(dir + "/echo.bin")
	cmd.Env = append(os.Environ(), "POD_NAME=echo-0", "PORT="+strings.TrimPrefix(l.Addr().String(), "127.0.0.1:"))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	url := "http://127.0.0.1:" + strings.TrimPrefix(l.Addr().String(), "127.0.0.1:") + "/"
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get(url)
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			_ = resp.Body.Close()
			if !strings.HasPrefix(string(body), "pod=echo-0 remote=127.0.0.1:") {
				t.Errorf("echo answered %q", body)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("echo on port %d never answered: %v", port, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
