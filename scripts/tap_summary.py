#!/usr/bin/env python3
"""Count test cases from meson's testlog.json, whose tests speak TAP.

Prints "N passed, N failed[, N skipped]" as the last line and exits 1 if any
case failed. A test program that died without reporting a failing case
(crash, timeout, bad exit status) counts as one failed case, so a broken
program can never read as a pass.
"""
import json
import re
import sys

OK = re.compile(r"^ok\b")
NOT_OK = re.compile(r"^not ok\b")
SKIP = re.compile(r"#\s*skip", re.IGNORECASE)


def main(path):
    passed = failed = skipped = 0
    with open(path) as log:
        for line in log:
            test = json.loads(line)
            stdout = test.get("stdout") or ""
            t_pass = t_fail = t_skip = 0
            for out in stdout.splitlines():
                if NOT_OK.match(out):
                    t_fail += 1
                elif OK.match(out):
                    if SKIP.search(out):
                        t_skip += 1
                    else:
                        t_pass += 1
            if test.get("result") not in ("OK", "SKIP", "EXPECTEDFAIL") and t_fail == 0:
                print(f"{test['name']}: {test.get('result')} without a failing case reported", file=sys.stderr)
                t_fail = 1
            if t_pass + t_fail + t_skip == 0 and test.get("result") == "OK":
                t_pass = 1  # a program that is not TAP-speaking and passed
            passed += t_pass
            failed += t_fail
            skipped += t_skip
    line = f"{passed} passed, {failed} failed"
    if skipped:
        line += f", {skipped} skipped"
    print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
