"""Print the tables of README.md beside this file from results.jsonl.

    python docs/few_step/table.py              # the README's tables
    python docs/few_step/table.py ID [ID ...]  # the rows with these ids (any number in the README)

Each line of results.jsonl is one measured row: `id`, `date` (when it was measured), `what`,
`group`, `seed`, `source`, and `report`, which for an evaluation is the JSON that
`python -m vidit.evaluate` wrote (`results`: one entry per sampling step count).
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def load(path=os.path.join(HERE, "results.jsonl")):
    with open(path) as f:
        return {r["id"]: r for r in map(json.loads, f)}


def by_steps(rows, ids):
    """{steps: result} merged over the rows `ids` (a seed whose step counts sit in two rows)."""
    out = {}
    for i in ids:
        for res in rows[i]["report"]["results"]:
            out[res["steps"]] = res
    return out


def mean(values):
    return sum(values) / len(values)


def seed_mean(rows, seeds, steps, key):
    vals = [by_steps(rows, ids).get(steps, {}).get(key) for ids in seeds]
    return None if None in vals else mean(vals)


def pct(x):
    return "" if x is None else f"{100 * x:.1f}%"


def num(x, digits=2):
    return "" if x is None else f"{x:.{digits}f}"


# (recipe, [ids of one seed, ...]): each step of the recipe as it was measured, 500 samples
LADDER = [
    ("time_scale 1, trained-in guidance 3", [["mf-ts1-w3"]]),
    ("trained-in guidance 4, guidance_mix 0.8", [["mf-w4-s0", "mf-w4-s0-2steps"]] + [[f"mf-w4-s{s}"] for s in range(1, 5)]),
    ("+ endpoint rows from 2/3 of the run, weight 1", [[f"ep1-s{s}"] for s in range(5)]),
    ("endpoint weight 10 (resumed at step 3200)", [[f"ep10-s{s}"] for s in range(5)]),
    ("endpoint weight 10 (from scratch)", [[f"ep10-scratch-s{s}"] for s in range(4)]),
    ("the same checkpoints continued without a score term", [[f"score-off-s{s}"] for s in range(5)]),
    ("+ score term, guidance 3 (resumed at step 3200)", [[f"score-g3-s{s}"] for s in range(5)]),
    ("+ score term, guidance 3 (from scratch)", [[f"score-g3-scratch-s{s}"] for s in range(5, 9)]),
    ("**endpoint weight 5: the shipped config** (from scratch)", [[f"ship-s{s}"] for s in range(5, 9)]),
]
SHIP = [[f"ship-s{s}"] for s in range(5, 9)]
FLOW = [  # flow, 50 Euler steps, by sampling guidance (500 samples; several runs where measured)
    ("3 (flow's config)", ["flow-4800-g3"]),
    ("4 (MeanFlow's trained-in guidance)", ["flow-4800-g4", "flow-4800-s0b-g4", "flow-4800-s1-g4"]),
    ("5", ["flow-4800-g5"]),
    ("6 (flow's best)", ["flow-4800-g6", "flow-4800-s0b-g6"]),
    ("8", ["flow-4800-s0b-g8"]),
]


def dates(rows, seeds):
    return max(rows[i]["date"] for ids in seeds for i in ids)


def seeds_of(rows, seeds):
    return ",".join(str(rows[ids[0]]["seed"]) for ids in seeds)


def headline(rows):
    print(f"The shipped config, 4800 steps, from scratch, 500 samples each ({dates(rows, SHIP)}):\n")
    print("| seed | 1 step: acc., FD, precision, recall | 2 steps: acc., FD | 4 steps: acc., FD |")
    print("|---|---|---|---|")
    for ids in SHIP + [None]:
        if ids is None:
            label, get = "**mean**", lambda st, k: seed_mean(rows, SHIP, st, k)
        else:
            label, res = str(rows[ids[0]]["seed"]), by_steps(rows, ids)
            get = lambda st, k, res=res: res[st][k]
        cells = [f"{pct(get(1, 'class_accuracy'))}, {num(get(1, 'frechet_distance'))}, "
                 f"{num(get(1, 'precision'), 3)}, {num(get(1, 'recall'), 3)}"]
        cells += [f"{pct(get(s, 'class_accuracy'))}, {num(get(s, 'frechet_distance'))}" for s in (2, 4)]
        print(f"| {label} | " + " | ".join(cells) + " |")


def bar(rows):
    acc = seed_mean(rows, SHIP, 1, "class_accuracy")
    fd = seed_mean(rows, SHIP, 1, "frechet_distance")
    measured = max(rows[i]["date"] for _, ids in FLOW for i in ids)
    print(f"\nOne MeanFlow step (the rows above, mean {pct(acc)}, FD {num(fd)}) against 50 Euler steps "
          f"of flow (the quickstart config, 500 samples, mean over runs; {measured}); the bar is at "
          "most 10 points behind and at most 2x the FD:\n")
    print("| flow guidance | flow runs | flow acc., FD | one step behind by | FD ratio | bar |")
    print("|---|---|---|---|---|---|")
    for label, ids in FLOW:
        facc = mean([by_steps(rows, [i])[50]["class_accuracy"] for i in ids])
        ffd = mean([by_steps(rows, [i])[50]["frechet_distance"] for i in ids])
        gap, ratio = 100 * (facc - acc), fd / ffd
        met = "met" if gap <= 10 and ratio <= 2 else "not met"
        print(f"| {label} | {len(ids)} | {pct(facc)}, "
              f"{num(ffd)} | {gap:.1f} | {ratio:.2f}x | {met} |")


def ladder(rows):
    print("\nHow the recipe got here: each step's mean over seeds, 500 samples per seed:\n")
    print("| date | recipe (MeanFlow, time_scale 1, 4800 steps) | seeds | 1 step: acc., FD | "
          "2 steps: acc., FD | 4 steps: acc., FD |")
    print("|---|---|---|---|---|---|")
    for label, seeds in LADDER:
        cells = [f"{pct(seed_mean(rows, seeds, s, 'class_accuracy'))}, "
                 f"{num(seed_mean(rows, seeds, s, 'frechet_distance'))}".strip(", ") for s in (1, 2, 4)]
        print(f"| {dates(rows, seeds)} | {label} | {seeds_of(rows, seeds)} | " + " | ".join(cells) + " |")


def show(rows, ids):
    for i in ids:
        r = rows[i]
        print(f"{i} ({r['date']}): {r['what']}")
        rep = r["report"]
        if "results" in rep:
            for res in rep["results"]:
                parts = [f"{k} {num(v, 3) if isinstance(v, float) else v}" for k, v in res.items()
                         if k != "steps"]
                print(f"  {res['steps']}-step sampling: " + ", ".join(parts))
        else:
            print("  " + json.dumps(rep))


def main():
    rows = load()
    if sys.argv[1:]:
        show(rows, sys.argv[1:])
        return
    headline(rows)
    bar(rows)
    ladder(rows)


if __name__ == "__main__":
    main()
