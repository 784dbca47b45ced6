"""Reads a --tensorboard-logdir with TensorBoard's own reader and prints what
it found as JSON: {run: {"scalars": {tag: [[step, value], ...]},
"histograms": {tag: [[step, num, [[left, right, count], ...]], ...]}}}.

Used by tests/test_observe.c; exits 77 when the tensorboard package is not
importable, so the test can say it skipped this part.
"""
import json
import os
import sys

try:
    from tensorboard.backend.event_processing import event_accumulator
except ImportError:
    sys.exit(77)


def read_run(path):
    acc = event_accumulator.EventAccumulator(
        path, size_guidance={event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0}
    )
    acc.Reload()
    tags = acc.Tags()
    out = {"scalars": {}, "histograms": {}}
    for tag in tags.get("scalars", []):
        out["scalars"][tag] = [[e.step, e.value] for e in acc.Scalars(tag)]
    for tag in tags.get("histograms", []):
        rows = []
        for e in acc.Histograms(tag):
            h = e.histogram_value
            lefts = [h.min] + list(h.bucket_limit[:-1])
            rights = list(h.bucket_limit[:-1]) + [h.max]
            rows.append([e.step, h.num, [[a, b, c] for a, b, c in zip(lefts, rights, h.bucket)]])
        out["histograms"][tag] = rows
    return out


def main():
    logdir = sys.argv[1]
    result = {}
    for run in sorted(os.listdir(logdir)):
        if os.path.isdir(os.path.join(logdir, run)):
            result[run] = read_run(os.path.join(logdir, run))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
