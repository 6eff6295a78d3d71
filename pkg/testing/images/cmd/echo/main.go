// Command echo is the test cluster's backend image: an HTTP server that
// answers every request with the pod's name and the address the request
// came from ("pod=NAME remote=IP:PORT"), so that a test sees which pod
// served it and whether the client's address was kept. It listens on
// $PORT (default 8080) and names itself by $POD_NAME, else the hostname.
//
// `echo get URL` is the client, for tests that send from inside a pod: it
// prints URL's body and exits 0, or prints the error and exits 1, within
// five seconds.
package main

import (
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"time"
)

func main() {
	if len(os.Args) == 3 && os.Args[1] == "get" {
		os.Exit(get(os.Args[2]))
	}
	name := os.Getenv("POD_NAME")
	if name == "" {
		name, _ = os.Hostname()
	}
	port := os.Getenv("PORT")
	if port == "" {
		port = "8080"
	}
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		_, _ = fmt.Fprintf(w, "pod=%s remote=%s\n", name, r.RemoteAddr)
	})
	http.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = fmt.Fprintln(w, "ok")
	})
	log.Fatal(http.ListenAndServe(":"+port, nil))
}

func get(url string) int {
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		fmt.Println(err)
		return 1
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(resp.Body)
	fmt.Print(string(body))
	if err != nil || resp.StatusCode != http.StatusOK {
		fmt.Println(resp.Status, err)
		return 1
	}
	return 0
}
