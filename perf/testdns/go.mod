module ringdns/perf/testdns

go 1.19
