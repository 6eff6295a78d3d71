package cluster

import (
	"context"
	"fmt"
	"io"
	"io/fs"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// seedRun is the seed containerd's folder in the VM's /run.
const seedRun = "/run/keeplb-cluster/seed"

// seedImages imports the images once, into a containerd of its own, and
// gives every node a copy of its root before the node's containerd starts:
// the image data by hard links (read only: blobs, and the snapshots that
// containers only ever use as lower layers), the databases as real copies.
// As a node image with its images preloaded; under TCG an import costs a
// minute per node, and three at once starve everything else.
func seedImages(cfg *config) error {
	start := time.Now()
	root, socket := seedRun+"/root", seedRun+"/containerd.sock"
	if err := os.MkdirAll(seedRun, 0o755); err != nil {
		return err
	}
	conf := seedRun + "/config.toml"
	if err := os.WriteFile(conf, []byte(containerdConfig(cfg, root, seedRun+"/state", socket, seedRun+"/net.d")), 0o600); err != nil {
		return err
	}
	f, err := os.Create(filepath.Join(cfg.Dir, "logs", "seed-containerd.log"))
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	cmd := exec.Command(filepath.Join(cfg.ClusterTools, "containerd"), "--config", conf)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start the seed containerd: %w", err)
	}
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	if err := waitFile(ctx, socket, time.Minute); err != nil {
		return fmt.Errorf("the seed containerd did not start: %w", err)
	}
	for _, img := range cfg.Images {
		out, err := exec.CommandContext(ctx, filepath.Join(cfg.ClusterTools, "ctr"), "--address", socket, "-n", "k8s.io", "images", "import", img).CombinedOutput()
		if err != nil {
			return fmt.Errorf("ctr images import %s: %w: %s", img, err, out)
		}
		log.Printf("seed: imported %s after %s", filepath.Base(img), time.Since(start).Round(time.Millisecond))
	}
	// Stopped, so that its databases are complete on disk.
	_ = cmd.Process.Signal(syscall.SIGTERM)
	_ = cmd.Wait()
	for i := 1; i <= cfg.Nodes; i++ {
		if err := linkTree(root, containerdRoot(i)); err != nil {
			return fmt.Errorf("seed %s: %w", NodeName(i), err)
		}
	}
	log.Printf("seed: %d images for %d nodes in %s", len(cfg.Images), cfg.Nodes, time.Since(start).Round(time.Millisecond))
	return nil
}

// linkTree makes dst a copy of src in which every file but the databases
// (*.db, which containerd writes) is a hard link to src's.
func linkTree(src, dst string) error {
	return filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		to := filepath.Join(dst, rel)
		info, err := os.Lstat(path)
		if err != nil {
			return err
		}
		st := info.Sys().(*syscall.Stat_t)
		switch {
		case d.IsDir():
			if err := os.MkdirAll(to, 0o700); err != nil {
				return err
			}
			if err := os.Lchown(to, int(st.Uid), int(st.Gid)); err != nil {
				return err
			}
			return os.Chmod(to, info.Mode().Perm()|info.Mode()&(os.ModeSetuid|os.ModeSetgid|os.ModeSticky))
		case strings.HasSuffix(path, ".db") && info.Mode().IsRegular():
			return copyFile(path, to, info.Mode().Perm())
		default:
			return os.Link(path, to)
		}
	})
}

func copyFile(from, to string, perm fs.FileMode) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer func() { _ = in.Close() }()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, perm)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		_ = out.Close()
		return err
	}
	return out.Close()
}
