#!/usr/bin/env python3
"""Functions in src/ are at most LIMIT lines long, or say why they are not.

A function's length runs from its opening brace to its closing brace (both
at column 0, the project's style). A longer function passes only if the
comment line right above its signature says why, starting "/* Long:".
Prints one line per offender and "N functions, M over LIMIT lines" last;
exits 1 if any offender lacks the comment.
"""
import os
import re
import sys

LIMIT = 80


def functions(path):
    lines = open(path, encoding="utf-8").read().split("\n")
    start = None
    for i, line in enumerate(lines):
        if line == "{":
            start = i
        elif line == "}" and start is not None:
            sig = start - 1
            while sig > 0 and lines[sig - 1].strip() and not lines[sig - 1].startswith(("/*", " *", "}", "#")) \
                    and not lines[sig - 1].rstrip().endswith(";"):
                sig -= 1
            name = re.search(r"(\w+)\s*\(", " ".join(lines[sig:start]))
            comment = lines[sig - 1] if sig > 0 else ""
            yield (name.group(1) if name else "?", sig + 1, i - start + 1, comment)
            start = None


def main(root):
    total = over = bad = 0
    for dirpath, _, files in sorted(os.walk(os.path.join(root, "src"))):
        for f in sorted(files):
            if not f.endswith(".c"):
                continue
            path = os.path.join(dirpath, f)
            for name, line, length, comment in functions(path):
                total += 1
                if length <= LIMIT:
                    continue
                over += 1
                ok = comment.lstrip().startswith("/* Long:")
                bad += not ok
                print(f"{os.path.relpath(path, root)}:{line}: {name}: {length} lines"
                      + ("" if ok else f" (over {LIMIT}, and no '/* Long: why */' above it)"))
    print(f"{total} functions, {over} over {LIMIT} lines, {bad} without a reason")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..")))
