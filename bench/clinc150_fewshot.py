"""Few-shot CLINC150 with metalearn's transfer methods, and the frozen-encoder peers on the same
draws, side by side.

    python bench/clinc150_fewshot.py --bin target/release/metalearn \
        --encoder ../shared/models/all-MiniLM-L6-v2 --data data/clinc150 \
        [--methods linear-probe,prototype,finetune] [--shots 5,10] [--seeds 0,1,2,3,4] \
        [--peer-python VENV/bin/python --peers ../shared/bench/peers/nlp] [--out results.jsonl]

DATA is the folder `metalearn data fetch clinc150` writes (train.csv, val.csv, test.csv). For
each (K, seed, method) it runs `metalearn train --encoder ... --shots-per-class K --seed S
--unknown-label oos --validation-data val.csv` and `metalearn evaluate` on test.csv, and prints
150-way accuracy on the 4,500 in-scope test queries, in-scope accuracy and out-of-scope recall
(threshold chosen on val.csv) and the wall time. With --peer-python, the peers' fewshot_frozen.py
(logistic regression C=10 and nearest centroid, sentence-transformers embeddings) runs on the
rows metalearn drew (written to a CSV), so both sides train on the same examples; with
`--extra="--labels-as-examples"` the peers' CSV also holds each label as one more row of its class. Uses only the
standard library.
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def run_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", required=True)
    p.add_argument("--encoder", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--methods", default="linear-probe,prototype,finetune")
    p.add_argument("--shots", default="5,10")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--peer-python")
    p.add_argument("--peers")
    p.add_argument("--out", default="clinc150_fewshot.jsonl")
    p.add_argument("--extra", default="", help="extra arguments for metalearn train")
    args = p.parse_args()
    train_csv = os.path.join(args.data, "train.csv")
    val_csv = os.path.join(args.data, "val.csv")
    test_csv = os.path.join(args.data, "test.csv")
    with open(train_csv, newline="", encoding="utf-8") as f:
        train_rows = list(csv.DictReader(f))
    work = tempfile.mkdtemp(prefix="clinc150_")
    inscope_test = os.path.join(work, "test_inscope.csv")
    with open(test_csv, newline="", encoding="utf-8") as f, open(inscope_test, "w", newline="", encoding="utf-8") as g:
        w = csv.writer(g)
        w.writerow(["text", "label"])
        for row in csv.DictReader(f):
            if row["intent"] != "oos":
                w.writerow([row["text"], row["intent"]])
    label_examples = "--labels-as-examples" in args.extra.split()
    results = []
    for k in [int(s) for s in args.shots.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            drawn = None
            for method in args.methods.split(","):
                model = os.path.join(work, f"{method}_{k}_{seed}.safetensors")
                started = time.time()
                train = run_json([args.bin, "train", "--encoder", args.encoder, "--data", train_csv,
                                  "--text-column", "text", "--target", "intent",
                                  "--shots-per-class", str(k), "--seed", str(seed),
                                  "--unknown-label", "oos", "--validation-data", val_csv,
                                  "--method", method, "--out", model, "--json", "--quiet"]
                                 + args.extra.split())
                train_wall = time.time() - started
                score = run_json([args.bin, "evaluate", "--model", model, "--data", test_csv, "--json"])
                drawn = train["drawn_rows"]
                r = {"k": k, "seed": seed, "method": method, "who": "metalearn",
                     "acc150": score["closed_accuracy"], "in_scope": score["in_scope_accuracy"],
                     "oos_recall": score["oos_recall"], "oos_precision": score["oos_precision"],
                     "train_seconds": train_wall, "threshold": train["threshold"]}
                print(json.dumps(r), flush=True)
                results.append(r)
            if args.peer_python and drawn is not None:
                drawn_csv = os.path.join(work, f"drawn_{k}_{seed}.csv")
                with open(drawn_csv, "w", newline="", encoding="utf-8") as g:
                    w = csv.writer(g)
                    w.writerow(["text", "label"])
                    for i in drawn:
                        w.writerow([train_rows[i]["text"], train_rows[i]["intent"]])
                    # The peers get the same training information: with --labels-as-examples,
                    # each label read as text is one more row of its class.
                    labels = sorted({train_rows[i]["intent"] for i in drawn}) if label_examples else []
                    for label in labels:
                        w.writerow([label_as_text(label), label])
                peer_shots = k + 1 if label_examples else k
                started = time.time()
                peer = run_json([args.peer_python, os.path.join(args.peers, "fewshot_frozen.py"),
                                 args.encoder, "--csv-train", drawn_csv, "--csv-test", inscope_test,
                                 "--shots", str(peer_shots), "--seeds", "0"])
                wall = time.time() - started
                for key, name in [("logreg", "peer: frozen + logistic regression"),
                                  ("centroid", "peer: frozen + nearest centroid")]:
                    acc = find_accuracy(peer, key)
                    r = {"k": k, "seed": seed, "method": name, "who": "peer", "acc150": acc,
                         "train_seconds": wall}
                    print(json.dumps(r), flush=True)
                    results.append(r)
    with open(args.out, "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    print()
    print("| K | method | 150-way accuracy % (mean ± std over seeds) | in-scope acc % | oos recall % | train wall s (mean) |")
    print("| --- | --- | --- | --- | --- | --- |")
    keys = sorted({(r["k"], r["method"]) for r in results}, key=lambda x: (x[0], x[1]))
    for k, method in keys:
        rs = [r for r in results if r["k"] == k and r["method"] == method]
        def ms(field):
            v = [100 * r[field] for r in rs if r.get(field) is not None]
            if not v:
                return "–"
            return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"
        wall = statistics.mean(r["train_seconds"] for r in rs)
        print(f"| {k} | {method} | {ms('acc150')} | {ms('in_scope')} | {ms('oos_recall')} | {wall:.1f} |")


def label_as_text(label):
    """A label as metalearn reads it with --labels-as-examples: `_` and `-` as spaces."""
    return " ".join(label.replace("_", " ").replace("-", " ").split())


def find_accuracy(peer, key):
    """The 150-way accuracy of one classifier (`logreg` or `centroid`) in the peer's JSON line."""
    for run in peer["runs"]:
        if run["method"] == key:
            return run["acc"]
    raise KeyError(f"no {key} run in the peer's output")


if __name__ == "__main__":
    sys.exit(main())
