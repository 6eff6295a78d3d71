// Command echo is the test cluster's backend image: an HTTP server that
// answers every request with the pod's name and the address the request
// came from ("pod=NAME remote=IP:PORT"), so that a test sees which pod
// served it and whether the client's address was kept. It listens on
// $PORT (default 8080) and names itself by $POD_NAME, else the hostname.
package main

import (
	"fmt"
	"log"
	"net/http"
	"os"
)

func main() {
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
