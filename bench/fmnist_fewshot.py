"""Few-shot Fashion-MNIST with a frozen EfficientNet-Lite0 backbone: metalearn's transfer methods on
exactly the vision peer's draws, beside the peer's published figures (and optionally the peer run
side by side).

    python bench/fmnist_fewshot.py [--bin target/release/metalearn] \
        [--backbone ../shared/models/efficientnet-lite0/model.safetensors] [--architecture efficientnet_lite0] \
        [--fmnist-dir /usr/share/datasets/fashion-mnist] [--work DIR] \
        [--methods linear-probe,prototype] [--shots 1,5,10] [--seeds 0,1,2,3,4] [--extra "..."] \
        [--peer-python VENV/bin/python [--peers ../shared/bench/peers/vision] [--peer-time-budget S]] \
        [--out fmnist_fewshot.jsonl] [--dry-run]

Default paths are relative to the repository root (the folder above bench/), so nothing needs
passing inside a checkout that has ../shared.

Protocol (shared/bench/peers/vision/README.md, "Protocols", part (a)): for each K and seed,
rng = numpy.random.default_rng(seed) made afresh; for each class 0..9 in label order,
rng.permutation(that class's indices in the 60,000-image training file, ascending)[:K]. The K = 1
and K = 5 draws are prefixes of the K = 10 draw of the same seed; with the default shots and seeds
the 15 draws use 499 distinct training images. Evaluation: all 10,000 test images, 10-way.

The script reads the four gzip idx files from --fmnist-dir and writes into --work (default: a new
temporary folder; files already there are reused):

    test/00000.png ... test/09999.png   all test images, 8-bit grey PNG, 28x28
    train/NNNNN.png                     the training images the draws use, NNNNN = index in the training file
    test.csv                            path,label (path relative to the CSV's folder, label = class name)
    train_k{K}_seed{S}.csv              one per draw, same columns, rows in class order then draw order
    models/k{K}_s{S}_{METHOD}.safetensors

Class names, in label order: T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker,
Bag, Ankle boot. For each (K, seed, method) it runs

    BIN train --backbone BACKBONE --architecture ARCH --data WORK/train_k{K}_seed{S}.csv \
        --method METHOD --out WORK/models/k{K}_s{S}_{METHOD}.safetensors --json [EXTRA...]
    BIN evaluate --model WORK/models/k{K}_s{S}_{METHOD}.safetensors --data WORK/test.csv --json

and reads the last line of each command's stdout as JSON (evaluate: `accuracy`, a fraction, and
`images`). The first evaluation embeds the 10,000 test images (a few minutes on 2 cores); metalearn
caches those features, so the later evaluations of the same test.csv with the same backbone are
fast. Pass the same --work again to reuse the images and that cache. One JSON line per
(K, seed, method) goes to --out (accuracy in %, wall times of both commands, the commands); at the
end a summary table sets mean ± sample std over seeds beside the peer's published per-seed figures
(logistic regression C=10 <-> linear-probe, nearest prototype by cosine <-> prototype), with the
difference per seed and whether our mean lies within the peer's seed spread
(|mean difference| <= the peer's sample std over the same seeds).

With --peer-python, the peer (PEERS/fewshot_vision.py --parts fmnist --threads 2, same
--fmnist-dir, shots and seeds, weights from the backbone's folder) also runs, after metalearn, and
its figures are printed beside ours. It extracts 10,499 features with PyTorch first: 10+ minutes
on 2 cores. Its features are cached (its --cache, default fewshot_vision_cache in the system's
temporary folder), so an interrupted run loses little: with --peer-time-budget S the peer stops
computing new features after S seconds and exits with status 3 (reported here as incomplete);
run again (with --methods "" to skip metalearn) until it completes, then the peer's figures come
from its cache in about a minute. The extraction can also be done beforehand with
`PEER_PYTHON PEERS/fewshot_vision.py --parts fmnist --threads 2 --time-budget 480`, repeated while
its exit status is 3.

With --dry-run the script only writes the PNGs and CSVs and prints the commands. Uses numpy and the
standard library (PNGs are written with zlib + struct).
"""
import argparse
import gzip
import json
import os
import shlex
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BIN = os.path.join(REPO, "target", "release", "metalearn")
DEFAULT_BACKBONE = os.path.normpath(os.path.join(REPO, "..", "shared", "models", "efficientnet-lite0",
                                                 "model.safetensors"))
DEFAULT_PEERS = os.path.normpath(os.path.join(REPO, "..", "shared", "bench", "peers", "vision"))
DEFAULT_FMNIST = "/usr/share/datasets/fashion-mnist"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]
IDX_FILES = {  # name -> (magic, expected dimensions)
    "train-images-idx3-ubyte.gz": (0x00000803, (60000, 28, 28)),
    "train-labels-idx1-ubyte.gz": (0x00000801, (60000,)),
    "t10k-images-idx3-ubyte.gz": (0x00000803, (10000, 28, 28)),
    "t10k-labels-idx1-ubyte.gz": (0x00000801, (10000,)),
}

# The peer's published figures (shared/bench/peers/vision/README.md, "(a) Fashion-MNIST"), 10,000 test
# images, accuracy % per seed 0..4: logistic regression C=10 <-> linear-probe, nearest prototype <-> prototype.
PEER_PUBLISHED = {
    1: {"linear-probe": [64.07, 47.27, 57.34, 53.99, 53.44], "prototype": [63.80, 46.26, 56.54, 53.14, 52.79]},
    5: {"linear-probe": [74.58, 73.54, 74.03, 76.38, 73.59], "prototype": [74.46, 72.54, 74.25, 74.53, 72.96]},
    10: {"linear-probe": [75.70, 77.91, 77.84, 79.01, 78.71], "prototype": [73.81, 76.59, 76.67, 77.53, 77.03]},
}
PEER_METHOD = {"logreg": "linear-probe", "prototype": "prototype"}  # the peer's names -> ours


# ---------------------------------------------------------------------------------------------------------------
# Data.

def read_idx(path, magic, dims):
    """A gzip idx file as a uint8 array, checking its magic number and dimensions."""
    if not os.path.exists(path):
        sys.exit(f"error: {path} not found (Fashion-MNIST idx files expected in --fmnist-dir)")
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or int.from_bytes(data[0:4], "big") != magic:
        got = data[0:4].hex() if len(data) >= 4 else "(file too short)"
        sys.exit(f"error: {path}: magic number {got}, expected {magic:08x} (not an idx file of unsigned bytes "
                 f"with {magic & 0xFF} dimensions)")
    ndim = magic & 0xFF
    got = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if got != dims:
        sys.exit(f"error: {path}: dimensions {got}, expected {dims}")
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        sys.exit(f"error: {path}: {len(body)} bytes of data, expected {int(np.prod(dims))}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def load_fmnist(d):
    arrays = [read_idx(os.path.join(d, name), magic, dims) for name, (magic, dims) in IDX_FILES.items()]
    x_tr, y_tr, x_te, y_te = arrays
    for y, name in ((y_tr, "training"), (y_te, "test")):
        if y.max() >= len(CLASSES):
            sys.exit(f"error: {name} labels go up to {y.max()}, expected 0..{len(CLASSES) - 1}")
    return x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64)


def draw_kshot(train_y, n_classes, k, seed):
    """The peer's draw (fewshot_vision.py draw_kshot): training-file indices, class order then draw order."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(n_classes):
        perm = rng.permutation(np.flatnonzero(train_y == c))
        out.append(perm[:k])
    return np.concatenate(out)


def png_grey(img):
    """An 8-bit greyscale PNG (colour type 0, no interlace, filter 0 on every row) of a uint8 HxW array."""
    h, w = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def write_png(path, img):
    """Writes the PNG unless the file is already there (written whole: temporary name, then rename)."""
    if os.path.exists(path):
        return False
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(png_grey(img))
    os.replace(tmp, path)
    return True


def write_csv(path, rows):
    """rows: (relative path, class name). Class names hold no commas or quotes, so no quoting is needed."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write("path,label\n")
        for rel, label in rows:
            f.write(f"{rel},{label}\n")
    os.replace(tmp, path)


def prepare(args, shots, seeds):
    """Writes the PNGs and CSVs; returns {(K, seed): training-file indices}."""
    x_tr, y_tr, x_te, y_te = load_fmnist(args.fmnist_dir)
    draws = {(k, s): draw_kshot(y_tr, len(CLASSES), k, s) for k in shots for s in seeds}
    pool = np.unique(np.concatenate(list(draws.values())))
    for sub in ("train", "test", "models"):
        os.makedirs(os.path.join(args.work, sub), exist_ok=True)
    started = time.time()
    new = 0
    for i in range(len(x_te)):
        new += write_png(os.path.join(args.work, "test", f"{i:05d}.png"), x_te[i])
    for i in pool:
        new += write_png(os.path.join(args.work, "train", f"{int(i):05d}.png"), x_tr[i])
    write_csv(os.path.join(args.work, "test.csv"),
              [(f"test/{i:05d}.png", CLASSES[int(y_te[i])]) for i in range(len(y_te))])
    for (k, s), idx in draws.items():
        write_csv(os.path.join(args.work, f"train_k{k}_seed{s}.csv"),
                  [(f"train/{int(i):05d}.png", CLASSES[int(y_tr[i])]) for i in idx])
    print(f"{args.work}: {len(x_te)} test images and {len(pool)} distinct training images for {len(draws)} draws "
          f"({new} PNGs written, the rest reused; {time.time() - started:.1f} s)", flush=True)
    return draws


# ---------------------------------------------------------------------------------------------------------------
# Runs.

def run_json(cmd):
    """Runs cmd; returns (last stdout line parsed as JSON, wall seconds). Exits with its stderr on failure."""
    started = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - started
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        sys.exit(f"error: exit status {out.returncode}: {shlex.join(cmd)}")
    lines = out.stdout.strip().splitlines()
    if not lines:
        sys.exit(f"error: no output from {shlex.join(cmd)}")
    return json.loads(lines[-1]), wall


def train_cmd(args, k, seed, method):
    model = os.path.join(args.work, "models", f"k{k}_s{seed}_{method}.safetensors")
    cmd = [args.bin, "train", "--backbone", args.backbone, "--architecture", args.architecture,
           "--data", os.path.join(args.work, f"train_k{k}_seed{seed}.csv"), "--method", method,
           "--out", model, "--json"] + shlex.split(args.extra)
    return cmd, model


def evaluate_cmd(args, model):
    return [args.bin, "evaluate", "--model", model, "--data", os.path.join(args.work, "test.csv"), "--json"]


def peer_cmd(args):
    cmd = [args.peer_python, os.path.join(args.peers, "fewshot_vision.py"), "--parts", "fmnist", "--threads", "2",
           "--fmnist-dir", args.fmnist_dir, "--shots", args.shots, "--seeds", args.seeds]
    if os.path.basename(args.backbone) == "model.safetensors":  # the peer reads DIR/model.safetensors
        cmd += ["--model-dir", os.path.dirname(args.backbone)]
    if args.peer_time_budget:
        cmd += ["--time-budget", str(args.peer_time_budget)]
    return cmd


def run_peer(args):
    """Runs the peer; returns (record for the JSONL, {(K, our method): per-seed list} or None)."""
    cmd = peer_cmd(args)
    print(f"peer: {shlex.join(cmd)}", flush=True)
    started = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - started
    lines = out.stdout.strip().splitlines()
    last = lines[-1] if lines else ""
    record = {"who": "peer", "command": shlex.join(cmd), "exit_status": out.returncode,
              "wall_seconds": round(wall, 1)}
    try:
        parsed = json.loads(last)
    except ValueError:
        parsed = None
    if out.returncode == 3:
        print(f"peer: time budget reached after {wall:.0f} s, features so far are cached; run again to go on",
              flush=True)
    elif out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        print(f"peer: exit status {out.returncode} after {wall:.0f} s", flush=True)
    if parsed is None or "fmnist" not in parsed:
        record["incomplete"] = True
        record["last_line"] = parsed if parsed is not None else last
        return record, None
    record["result"] = parsed
    figures = {}
    for row in parsed["fmnist"]["rows"]:
        if row["method"] in PEER_METHOD:
            figures[(int(row["K"]), PEER_METHOD[row["method"]])] = [float(v) for v in row["per_seed"]]
    print(f"peer: done in {wall:.0f} s", flush=True)
    return record, figures


# ---------------------------------------------------------------------------------------------------------------
# Summary.

def mean_std(v):
    if not v:
        return None, None
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def fmt_ms(m, sd):
    return "–" if m is None else f"{m:.2f} ± {sd:.2f}"


def summary(results, shots, seeds, methods, peer_here):
    print()
    print("Fashion-MNIST, frozen EfficientNet-Lite0, 10-way, accuracy % (mean ± sample std over seeds "
          f"{','.join(map(str, seeds))}); peer = published figures on the same draws")
    print("| K | method | metalearn | peer | mean diff | within peer spread | per seed: metalearn / peer (diff)"
          + (" | peer run here" if peer_here else "") + " | train s (mean) | evaluate s (mean) |")
    print("| --- | --- | --- | --- | --- | --- | ---" + (" | ---" if peer_here else "") + " | --- | --- |")
    for k in shots:
        for method in methods:
            rs = {r["seed"]: r for r in results if r["k"] == k and r["method"] == method}
            if not rs:
                continue
            ours = [rs[s]["accuracy"] for s in seeds if s in rs]
            published = PEER_PUBLISHED.get(k, {}).get(method)
            peer = [published[s] for s in seeds if s in rs and published and 0 <= s < len(published)]
            m, sd = mean_std(ours)
            pm, psd = mean_std(peer) if len(peer) == len(ours) else (None, None)
            if pm is None:
                diff, within = "–", "–"
            else:
                diff = f"{m - pm:+.2f}"
                within = "yes" if abs(m - pm) <= psd else "no"
            cells = []
            for s in seeds:
                if s not in rs:
                    continue
                a = rs[s]["accuracy"]
                if published and 0 <= s < len(published):
                    cells.append(f"{a:.2f} / {published[s]:.2f} ({a - published[s]:+.2f})")
                else:
                    cells.append(f"{a:.2f} / –")
            here = ""
            if peer_here:
                v = peer_here.get((k, method))
                here = " | " + (fmt_ms(*mean_std(v)) if v else "–")
            tr = statistics.mean(r["train_seconds"] for r in rs.values())
            ev = statistics.mean(r["evaluate_seconds"] for r in rs.values())
            print(f"| {k} | {method} | {fmt_ms(m, sd)} | {fmt_ms(pm, psd)} | {diff} | {within} | "
                  f"{'; '.join(cells)}{here} | {tr:.1f} | {ev:.1f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default=DEFAULT_BIN)
    p.add_argument("--backbone", default=DEFAULT_BACKBONE)
    p.add_argument("--architecture", default="efficientnet_lite0")
    p.add_argument("--fmnist-dir", default=DEFAULT_FMNIST)
    p.add_argument("--work", help="folder for the PNGs, CSVs and models (default: a new temporary folder)")
    p.add_argument("--methods", default="linear-probe,prototype", help='"" runs no metalearn method')
    p.add_argument("--shots", default="1,5,10")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--extra", default="", help="extra arguments for metalearn train")
    p.add_argument("--peer-python", help="python of a venv with the vision peer's packages: also run the peer")
    p.add_argument("--peers", default=DEFAULT_PEERS, help="folder of fewshot_vision.py")
    p.add_argument("--peer-time-budget", type=float, default=0.0,
                   help="seconds of feature extraction for the peer (its --time-budget); rerun to go on")
    p.add_argument("--out", default="fmnist_fewshot.jsonl")
    p.add_argument("--dry-run", action="store_true", help="only write the PNGs and CSVs and print the commands")
    args = p.parse_args()
    t_start = time.time()
    shots = [int(s) for s in args.shots.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    args.work = os.path.abspath(args.work) if args.work else tempfile.mkdtemp(prefix="fmnist_fewshot_")
    if not args.dry_run:
        if methods and not os.path.exists(args.bin):
            sys.exit(f"error: {args.bin} not found (build it with cargo build --release, or pass --bin)")
        if methods and not os.path.exists(args.backbone):
            sys.exit(f"error: backbone {args.backbone} not found (pass --backbone)")
        if args.peer_python and not os.path.exists(os.path.join(args.peers, "fewshot_vision.py")):
            sys.exit(f"error: {os.path.join(args.peers, 'fewshot_vision.py')} not found (pass --peers)")

    prepare(args, shots, seeds)

    if args.dry_run:
        for k in shots:
            for seed in seeds:
                for method in methods:
                    cmd, model = train_cmd(args, k, seed, method)
                    print(shlex.join(cmd))
                    print(shlex.join(evaluate_cmd(args, model)))
        if args.peer_python:
            print(shlex.join(peer_cmd(args)))
        return 0

    results = []
    with open(args.out, "w") as out:
        for k in shots:
            for seed in seeds:
                for method in methods:
                    cmd, model = train_cmd(args, k, seed, method)
                    train, train_wall = run_json(cmd)
                    ecmd = evaluate_cmd(args, model)
                    score, eval_wall = run_json(ecmd)
                    if score.get("images") is not None and score["images"] != 10000:
                        print(f"warning: evaluate reports {score['images']} images, expected 10000", file=sys.stderr)
                    published = PEER_PUBLISHED.get(k, {}).get(method)
                    r = {"k": k, "seed": seed, "method": method, "who": "metalearn",
                         "accuracy": 100.0 * score["accuracy"], "images": score.get("images"),
                         "peer_published": published[seed] if published and 0 <= seed < len(published) else None,
                         "train_seconds": round(train_wall, 2), "evaluate_seconds": round(eval_wall, 2),
                         "train_command": shlex.join(cmd), "evaluate_command": shlex.join(ecmd),
                         "train_json": train, "evaluate_json": score}
                    print(json.dumps({key: r[key] for key in ("k", "seed", "method", "accuracy", "images",
                                                               "peer_published", "train_seconds",
                                                               "evaluate_seconds")}), flush=True)
                    out.write(json.dumps(r) + "\n")
                    out.flush()
                    results.append(r)
        peer_here = None
        if args.peer_python:
            record, peer_here = run_peer(args)
            out.write(json.dumps(record) + "\n")
    if results:
        summary(results, shots, seeds, methods, peer_here)
    if args.peer_python and peer_here:
        print()
        print("peer run here (fewshot_vision.py), accuracy % per seed:")
        for (k, method), v in sorted(peer_here.items()):
            print(f"  K={k} {method:12s} {fmt_ms(*mean_std(v))}   {' '.join(f'{a:.2f}' for a in v)}")
    print(f"\nwork folder: {args.work}; results: {args.out}; total wall {time.time() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
