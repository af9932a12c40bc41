package bpf

//go:generate go tool bpf2go -tags linux -target bpfel -type event -type counters -type conn -type watch_key -type port_key -type kind -type cause -type stat probe probe.c -- -I./headers -O2 -g -Wall -Werror -mcpu=v3
