// Package version reports which keeplb build is running, so that bug
// reports and `keeplb version` can name the exact source and toolchain.
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// These are set at link time, for example by the Makefile and the
// Dockerfile:
//
//	-ldflags "-X github.com/keeplb/keeplb/pkg/version.version=v0.1.0
//	          -X github.com/keeplb/keeplb/pkg/version.commit=<sha>
//	          -X github.com/keeplb/keeplb/pkg/version.date=<RFC 3339>"
//
// They are never written at run time; -X can only set package-level string
// variables, which is why they are not constants.
var (
	version string
	commit  string
	date    string
)

// Info describes the running binary.
type Info struct {
	// Version is the release, such as v0.1.0 or the output of git describe;
	// "dev" when the build did not say.
	Version string `json:"version"`
	// Commit is the git commit the binary was built from, with a "-dirty"
	// suffix when Go recorded uncommitted changes; "unknown" if neither the
	// linker flags nor the Go build info name one.
	Commit string `json:"commit"`
	// Date is when the binary was built (or, failing that, the commit time
	// recorded by Go); "unknown" otherwise.
	Date string `json:"date"`
	// GoVersion is the Go toolchain that built the binary.
	GoVersion string `json:"goVersion"`
	// Platform is GOOS/GOARCH of the binary.
	Platform string `json:"platform"`
}

// Get returns the version of the running binary.
func Get() Info {
	bi, _ := debug.ReadBuildInfo()
	return get(version, commit, date, bi)
}

// get is Get with its inputs passed in, so that tests can cover every
// fallback without relinking. bi may be nil.
func get(version, commit, date string, bi *debug.BuildInfo) Info {
	info := Info{
		Version:   version,
		Commit:    commit,
		Date:      date,
		GoVersion: runtime.Version(),
		Platform:  runtime.GOOS + "/" + runtime.GOARCH,
	}
	// Plain `go build` and `go install` do not pass the linker flags, but Go
	// records the module version and the VCS state on its own; use them
	// rather than report nothing.
	if bi != nil {
		if info.Version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			info.Version = bi.Main.Version
		}
		var revision, modified, vcsTime string
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				revision = s.Value
			case "vcs.modified":
				modified = s.Value
			case "vcs.time":
				vcsTime = s.Value
			}
		}
		if info.Commit == "" && revision != "" {
			info.Commit = revision
			if modified == "true" {
				info.Commit += "-dirty"
			}
		}
		if info.Date == "" {
			info.Date = vcsTime
		}
	}
	if info.Version == "" {
		info.Version = "dev"
	}
	if info.Commit == "" {
		info.Commit = "unknown"
	}
	if info.Date == "" {
		info.Date = "unknown"
	}
	return info
}

// String renders i on one line, for humans and bug reports.
func (i Info) String() string {
	return fmt.Sprintf("keeplb %s (commit %s, built %s, %s, %s)", i.Version, i.Commit, i.Date, i.GoVersion, i.Platform)
}
