# failed-tests.awk: reads the -test.v output of the test binaries a test VM
# ran (tests.txt, packages between HANGUP-BEGIN/HANGUP-END markers) and
# prints, for each failed test, the last lines of its own output: go test -v
# names the test every output line belongs to (=== RUN/CONT/NAME), so the
# lines of tests that passed, or of the agent's log, do not crowd out the
# ones that say why a test failed. Also prints panics and HANGUP-ERROR lines.
# Usage: awk -v keep=25 -f failed-tests.awk tests.txt
BEGIN { if (keep == "") keep = 25 }
/^HANGUP-BEGIN / { pkg = $2; cur = ""; next }
/^HANGUP-END / {
	if ($0 !~ / rc=0 /) pkgfail[pkg] = $0
	cur = ""; next
}
/^HANGUP-ERROR/ { print; next }
/^=== (RUN|CONT|NAME|PAUSE) / { cur = pkg " " $3; next }
/^ *--- (FAIL|PASS|SKIP): / {
	name = pkg " " $3
	if ($2 == "FAIL:") { failed[name] = 1; order[++nfailed] = name; endline[name] = $0 }
	# the lines after a --- line up to the next marker belong to that test
	cur = name; next
}
/^panic: / { inpanic = 1; panicked = panicked pkg ": " $0 "\n"; npanic = 1; next }
inpanic && npanic < 30 { panicked = panicked $0 "\n"; npanic++; next }
{
	if (cur == "") next
	n = ++count[cur]; lines[cur, n] = $0
	if (n > keep) delete lines[cur, n - keep]
}
END {
	for (i = 1; i <= nfailed; i++) {
		name = order[i]; n = count[name]
		# a test that failed only because a subtest did says nothing itself
		print endline[name] " [" substr(name, 1, index(name, " ") - 1) "]"
		from = n - keep + 1; if (from < 1) from = 1
		for (j = from; j <= n; j++) print "  " lines[name, j]
	}
	if (panicked != "") printf "%s", panicked
	for (p in pkgfail) if (nfailed == 0 && panicked == "") print p ": " pkgfail[p] " (no test reported a failure: see the log)"
}
