"""Summarises a moelm-train --profile trace (Chrome/Perfetto JSON): where an
update's time goes, per category (forward, backward, communication,
optimizer), per op and per layer, averaged over the profiled updates.

    python3 bench/profile_summary.py trace.json [--rank R]

Times are each span's own duration; ops nest inside layers and layers inside
forward/backward, so the op table and the layer table each add up to the
work they cover, not to each other. Standard library only.
"""
import argparse
import collections
import json


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--rank", type=int, default=0, help="the rank (process row) to summarise")
    ap.add_argument("--top", type=int, default=25, help="ops to list")
    args = ap.parse_args()
    with open(args.trace) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and e.get("pid") == args.rank]
    updates = sorted({e["args"]["update"] for e in events})
    n = max(len(updates), 1)
    step = sum(e["dur"] for e in events if e["name"] == "update") / n
    phases = collections.defaultdict(float)
    ops = collections.defaultdict(lambda: [0.0, 0, ""])
    layers = collections.defaultdict(float)
    top_level = {"forward", "backward", "gradient reduction", "norms and statistics", "optimizer", "validation"}
    for e in events:
        if e["name"] in top_level:
            phases[e["name"]] += e["dur"] / n
        elif e["name"].startswith("decoder.layers."):
            layers[(e["name"], e["cat"])] += e["dur"] / n
        elif e["name"] not in ("update", "loss", "decoder"):
            o = ops[(e["name"], e["cat"])]
            o[0] += e["dur"] / n
            o[1] += 1
    print(f"rank {args.rank}, updates {updates[0] if updates else '-'}-{updates[-1] if updates else '-'}: "
          f"{step / 1e3:.3f} ms per update")
    print("\nphase                       ms/update   share")
    for name, us in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"{name:26s} {us / 1e3:10.3f} {100 * us / step if step else 0:6.1f}%")
    print("\nop (category)                          ms/update  calls/update")
    for (name, cat), (us, calls, _) in sorted(ops.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{name + ' (' + cat + ')':38s} {us / 1e3:10.3f} {calls / n:13.1f}")
    print("\nlayer (category)                       ms/update")
    for (name, cat), us in sorted(layers.items(), key=lambda kv: (int(kv[0][0].split(".")[2]), kv[0][1])):
        print(f"{name + ' (' + cat + ')':38s} {us / 1e3:10.3f}")


if __name__ == "__main__":
    main()
