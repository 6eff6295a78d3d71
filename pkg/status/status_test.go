package status

import (
	"bytes"
	"encoding/json"
	"flag"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/keeplb/keeplb/pkg/testing/golden"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

func sampleReport() Report {
	return Report{
		Pools: []Pool{
			{
				Name: "public", Addresses: []string{"192.0.2.0/28", "2001:db8::/124"},
				Total: "32", Used: 2, Free: "30",
				Ready:       Condition{Status: "True", Reason: "Valid"},
				Conflicting: Condition{Status: "False", Reason: "NoOverlap"},
			},
			{
				Name: "shrunk", Addresses: []string{"198.51.100.10-198.51.100.20"},
				Total: "0", Used: 1, Free: "0", OutOfRange: 1,
				Ready:       Condition{Status: "False", Reason: "Overlaps"},
				Conflicting: Condition{Status: "True", Reason: "Overlaps"},
			},
			{Name: "new", Addresses: []string{"203.0.113.0/30"}},
		},
		Services: []Service{
			{
				Namespace: "default", Name: "web",
				VIPs:  []VIP{{IP: "192.0.2.1", IPMode: "VIP", Holder: "node-a"}, {IP: "2001:db8::1", IPMode: "VIP", Holder: "node-a"}},
				Pools: []string{"public"}, Holder: "node-a", Forwarding: "nodeport",
			},
			{
				Namespace: "default", Name: "dual",
				VIPs:  []VIP{{IP: "192.0.2.2", IPMode: "Proxy", Holder: "node-a"}, {IP: "2001:db8::2", IPMode: "Proxy", Holder: "node-b"}},
				Pools: []string{"public"}, Holder: "node-a,node-b", Forwarding: "pod",
			},
			{
				Namespace: "shop", Name: "api",
				VIPs:  []VIP{{IP: "198.51.100.15", IPMode: "Proxy"}},
				Pools: []string{"shrunk"}, Forwarding: "pod",
			},
			{
				Namespace: "shop", Name: "pending", VIPs: []VIP{}, Forwarding: "nodeport",
				Problem: "no IPPool admits the Service:\n\tIPPool public admits only namespaces default; IPPool shrunk has no free address left for IPv4",
			},
		},
	}
}

func TestWriteText(t *testing.T) {
	for _, tc := range []struct {
		name   string
		report Report
	}{
		{"full", sampleReport()},
		{"empty", Report{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			if err := WriteText(&buf, tc.report); err != nil {
				t.Fatal(err)
			}
			golden.Check(t, filepath.Join("testdata", tc.name+".txt"), buf.Bytes(), *update)
		})
	}
}

func TestWriteJSON(t *testing.T) {
	var buf bytes.Buffer
	if err := WriteJSON(&buf, sampleReport()); err != nil {
		t.Fatal(err)
	}
	golden.Check(t, filepath.Join("testdata", "full.json"), buf.Bytes(), *update)
	var got Report
	dec := json.NewDecoder(&buf)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&got); err != nil {
		t.Fatal(err)
	}
	if want := sampleReport(); !reflect.DeepEqual(got, want) {
		t.Errorf("JSON round trip:\n got %+v\nwant %+v", got, want)
	}

	buf.Reset()
	if err := WriteJSON(&buf, Report{}); err != nil {
		t.Fatal(err)
	}
	if want := "{\n  \"pools\": [],\n  \"services\": []\n}\n"; buf.String() != want {
		t.Errorf("empty report: %q, want %q", buf.String(), want)
	}
}

func TestTruncate(t *testing.T) {
	for _, tc := range []struct {
		in   string
		n    int
		want string
	}{
		{"short", 10, "short"},
		{"  two\nlines\there ", 20, "two lines here"},
		{"exactly ten", 11, "exactly ten"},
		{"one two three four", 10, "one two..."},
		{"one two three four", 9, "one tw..."},
		{"abcdefghij", 8, "abcde..."},
		{"ééééé", 4, "é..."},
		{"abcdef", 2, "ab"},
	} {
		if got := Truncate(tc.in, tc.n); got != tc.want {
			t.Errorf("Truncate(%q, %d) = %q, want %q", tc.in, tc.n, got, tc.want)
		}
	}
}
