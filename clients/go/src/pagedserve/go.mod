// The Go stubs and the example client as a module, for `go build ./...` in module mode (run `go mod
// tidy` once first: it fetches the two dependencies and writes go.sum). CI builds the same tree offline
// in GOPATH mode against Debian's packages (GO111MODULE=off ignores this file), which proves the code
// against grpc 1.33 and protobuf 1.28; the versions below are newer, as `go get` would pick, and still
// support Go 1.19, Debian bookworm's.
module pagedserve

go 1.19

require (
	google.golang.org/grpc v1.56.3
	google.golang.org/protobuf v1.33.0
)
