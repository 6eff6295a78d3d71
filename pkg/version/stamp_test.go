package version

import (
	"os"
	"regexp"
	"slices"
	"testing"
)

// TestBuildsStampWhatExists: the Makefile and the Dockerfile set, with -X,
// exactly the variables this package has. -X on a name that does not exist
// is silently ignored by the linker, so a rename here would otherwise
// leave every release saying "dev" without any build failing.
func TestBuildsStampWhatExists(t *testing.T) {
	_ = []*string{&version, &commit, &date} // fails to compile if one goes
	want := []string{"commit", "date", "version"}
	re := regexp.MustCompile(`-X github\.com/keeplb/keeplb/pkg/version\.(\w+)=`)
	for _, file := range []string{"../../Makefile", "../../Dockerfile"} {
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, m := range re.FindAllStringSubmatch(string(b), -1) {
			got = append(got, m[1])
		}
		slices.Sort(got)
		if !slices.Equal(got, want) {
			t.Errorf("%s stamps %v with -X; want %v", file, got, want)
		}
	}
}
