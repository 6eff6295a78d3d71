package keepalived

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
)

// WriteAtomic makes the file at path hold data. If it already does, it
// writes nothing and returns false. Otherwise it writes path+".tmp",
// syncs it and renames it over path, so that a reader (keepalived on
// SIGHUP) sees the old bytes or the new ones, never a mix; it returns
// true.
func WriteAtomic(path string, data []byte) (changed bool, err error) {
	old, err := os.ReadFile(path)
	switch {
	case err == nil && bytes.Equal(old, data):
		return false, nil
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return false, err
	}
	tmp := path + ".tmp"
	if err := writeSync(tmp, data); err != nil {
		_ = os.Remove(tmp)
		return false, err
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return false, fmt.Errorf("write %s: %w", path, err)
	}
	return true, nil
}

func writeSync(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
