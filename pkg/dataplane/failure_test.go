package dataplane

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/keeplb/keeplb/pkg/annotations"
	"github.com/keeplb/keeplb/pkg/ipvs"
	ipvstesting "github.com/keeplb/keeplb/pkg/ipvs/testing"
)

func TestKernelProblem(t *testing.T) {
	for _, tc := range []struct {
		name      string
		sched     string
		err       error
		wantField string
		wantIn    []string
	}{
		{"a scheduler module the kernel lacks", "mh", fmt.Errorf("add: %w", syscall.ENOENT),
			annotations.Scheduler, []string{`node n1's kernel has no IPVS scheduler "mh"`, "modprobe ip_vs_mh", "TCP/192.0.2.1:80"}},
		{"ENOENT with rr is not the scheduler's fault", "rr", syscall.ENOENT,
			FieldIPVS, []string{"refused virtual server TCP/192.0.2.1:80", "no such file or directory"}},
		{"any other refusal, in the kernel's words", "mh", syscall.ENOMEM,
			FieldIPVS, []string{"node n1's kernel refused", "cannot allocate memory"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := KernelProblem("n1", "default/web", vs("192.0.2.1", "TCP", 80, tc.sched), tc.err)
			if p.Service != "default/web" || p.Field != tc.wantField {
				t.Errorf("Problem = %+v, want service default/web, field %s", p, tc.wantField)
			}
			for _, s := range tc.wantIn {
				if !strings.Contains(p.Message, s) {
					t.Errorf("message %q lacks %q", p.Message, s)
				}
			}
		})
	}
}

// TestApplyKernelWithoutScheduler: a kernel that lacks one Service's
// scheduler module refuses that virtual server alone; Result.Errors names
// it with the kernel's ENOENT, the others are programmed, and once the
// module is there the next sync converges.
func TestApplyKernelWithoutScheduler(t *testing.T) {
	st, _ := Desired(syncInputs(), "n1")
	k := slices.SortedFunc(maps.Keys(st.IPVS), ipvs.Key.Compare)[0]
	e := st.IPVS[k]
	e.Virtual.Scheduler = "mh"
	st.IPVS[k] = e
	f := ipvstesting.New()
	f.SetSchedulers("rr", "wrr")
	res, err := diffApply(f, st.IPVS, st.Owns)
	if err == nil {
		t.Fatal("Sync succeeded with a scheduler the kernel lacks")
	}
	if len(res.Errors) != 1 || !errors.Is(res.Errors[k], syscall.ENOENT) {
		t.Fatalf("Result.Errors = %v, want only %s with ENOENT", res.Errors, k)
	}
	if got := f.Table(); len(got) != len(st.IPVS)-1 {
		t.Errorf("kernel has %d virtual servers, want the %d others", len(got), len(st.IPVS)-1)
	}
	f.SetSchedulers(ipvstesting.Schedulers...)
	if res, err := diffApply(f, st.IPVS, st.Owns); err != nil || len(res.Errors) != 0 {
		t.Fatalf("Sync after loading the module = %s, %v", res, err)
	}
	if got := f.Table(); !got.Equal(st.IPVS) {
		t.Errorf("did not converge:\n%s\nwant\n%s", got, st.IPVS)
	}
}
