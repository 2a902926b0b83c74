module herd-go-hello

go 1.19
