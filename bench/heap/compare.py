"""What grew between two heap snapshots of one process (see bench/heap/sitecustomize.py).

    .venv/bin/python -m bench.heap.compare SNAP_1 SNAP_2 [--by traceback|lineno|filename] [--top 25]
"""
from __future__ import annotations

import argparse
import tracemalloc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--by", default="lineno", choices=["traceback", "lineno", "filename"])
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    ignore = [tracemalloc.Filter(False, "<frozen importlib._bootstrap>"), tracemalloc.Filter(False, "<unknown>"),
              tracemalloc.Filter(False, tracemalloc.__file__)]
    before = tracemalloc.Snapshot.load(args.before).filter_traces(ignore)
    after = tracemalloc.Snapshot.load(args.after).filter_traces(ignore)
    stats = after.compare_to(before, args.by)
    print(f"traced now {sum(s.size for s in stats) / 1e6:.2f} MB, {sum(s.size_diff for s in stats) / 1e6:+.2f} MB since the first snapshot")
    for stat in stats[: args.top]:
        print(f"{stat.size_diff / 1e3:+10.1f} kB {stat.count_diff:+8d} blocks   now {stat.size / 1e3:10.1f} kB")
        for line in stat.traceback.format()[-(12 if args.by == "traceback" else 2):]:
            print("        " + line)


if __name__ == "__main__":
    main()
