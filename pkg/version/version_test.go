package version

import (
	"runtime"
	"runtime/debug"
	"testing"
)

func TestGet(t *testing.T) {
	vcs := func(kv ...string) *debug.BuildInfo {
		bi := &debug.BuildInfo{}
		for i := 0; i < len(kv); i += 2 {
			bi.Settings = append(bi.Settings, debug.BuildSetting{Key: kv[i], Value: kv[i+1]})
		}
		return bi
	}
	tests := []struct {
		name                  string
		version, commit, date string
		bi                    *debug.BuildInfo
		want                  Info
	}{
		{
			name: "nothing known",
			want: Info{Version: "dev", Commit: "unknown", Date: "unknown"},
		},
		{
			name: "no build info settings",
			bi:   &debug.BuildInfo{Main: debug.Module{Version: "(devel)"}},
			want: Info{Version: "dev", Commit: "unknown", Date: "unknown"},
		},
		{
			name:    "linker flags win over build info",
			version: "v0.1.0", commit: "abc123", date: "2026-01-02T03:04:05Z",
			bi:   vcs("vcs.revision", "def456", "vcs.modified", "true", "vcs.time", "2025-01-01T00:00:00Z"),
			want: Info{Version: "v0.1.0", Commit: "abc123", Date: "2026-01-02T03:04:05Z"},
		},
		{
			name: "build info fills the gaps",
			bi:   vcs("vcs.revision", "def456", "vcs.modified", "false", "vcs.time", "2025-01-01T00:00:00Z"),
			want: Info{Version: "dev", Commit: "def456", Date: "2025-01-01T00:00:00Z"},
		},
		{
			name: "modified tree is marked dirty",
			bi:   vcs("vcs.revision", "def456", "vcs.modified", "true"),
			want: Info{Version: "dev", Commit: "def456-dirty", Date: "unknown"},
		},
		{
			name: "go install at a version",
			bi:   &debug.BuildInfo{Main: debug.Module{Version: "v0.2.0"}},
			want: Info{Version: "v0.2.0", Commit: "unknown", Date: "unknown"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.want.GoVersion = runtime.Version()
			tt.want.Platform = runtime.GOOS + "/" + runtime.GOARCH
			if got := get(tt.version, tt.commit, tt.date, tt.bi); got != tt.want {
				t.Errorf("get() = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestGetNeverEmpty(t *testing.T) {
	i := Get()
	for name, v := range map[string]string{"Version": i.Version, "Commit": i.Commit, "Date": i.Date, "GoVersion": i.GoVersion, "Platform": i.Platform} {
		if v == "" {
			t.Errorf("Get().%s is empty", name)
		}
	}
}

func TestString(t *testing.T) {
	i := Info{Version: "v0.1.0", Commit: "abc123", Date: "2026-01-02T03:04:05Z", GoVersion: "go1.26.0", Platform: "linux/amd64"}
	want := "keeplb v0.1.0 (commit abc123, built 2026-01-02T03:04:05Z, go1.26.0, linux/amd64)"
	if got := i.String(); got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
}
