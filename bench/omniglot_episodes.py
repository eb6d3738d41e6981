"""Omniglot 5-way episodes on a frozen backbone, on exactly the vision peers' draws.

    python bench/omniglot_episodes.py --bin target/release/metalearn \
        --backbone ../shared/models/efficientnet-lite0/model.safetensors \
        [--omniglot-dir ../shared/data/omniglot] [--work /tmp/omniglot_episodes] [--episodes 600]

The peers' protocol (shared/bench/peers/vision/README.md, part (c)): the 242 characters of
`images_background_small1.zip` and `images_background_small2.zip` (Greek and Latin, in both,
counted once), classes sorted by `Alphabet/characterNN`, drawers by file name; for K in {1, 5},
`numpy.random.default_rng(0)` made afresh, then per episode `rng.choice(242, 5, replace=False)`
picks the classes and per class `perm = rng.permutation(20)` gives support `perm[:K]` and queries
`perm[K:K+15]`; nearest prototype by cosine (the prototype is the normalised mean of the
normalised features); mean accuracy over 600 episodes with its 95% interval.

The images are written to a folder tree and embedded once with `metalearn embed --backbone`
(the 105x105 images enlarged to the input with bilinear interpolation, as the peer does); the
episodes are then scored here on those features. Needs numpy.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PEER = {1: (79.10, 0.79), 5: (91.35, 0.46)}  # peer README, images as stored


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", default=os.path.join(REPO, "target", "release", "metalearn"))
    p.add_argument("--backbone", default=os.path.join(REPO, "..", "shared", "models", "efficientnet-lite0",
                                                      "model.safetensors"))
    p.add_argument("--architecture", default="efficientnet_lite0")
    p.add_argument("--omniglot-dir", default=os.path.join(REPO, "..", "shared", "data", "omniglot"))
    p.add_argument("--work", default=None)
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--queries", type=int, default=15)
    args = p.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="omniglot_episodes_")
    images = os.path.join(work, "images")
    files = {}
    for name in ("images_background_small1.zip", "images_background_small2.zip"):
        with zipfile.ZipFile(os.path.join(args.omniglot_dir, name)) as z:
            for n in z.namelist():
                if n.endswith(".png"):
                    rel = "/".join(n.split("/")[1:])  # Alphabet/characterNN/NNNN_MM.png
                    if rel not in files:
                        files[rel] = z.read(n)
    for rel, data in files.items():
        path = os.path.join(images, rel)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".part", "wb") as f:
                f.write(data)
            os.replace(path + ".part", path)
    chars = sorted({"/".join(k.split("/")[:2]) for k in files})
    drawers = [sorted(k for k in files if k.startswith(c + "/")) for c in chars]
    if any(len(d) != 20 for d in drawers):
        sys.exit("every character needs 20 drawers")
    features_csv = os.path.join(work, "features.csv")
    started = time.time()
    cmd = [args.bin, "embed", "--backbone", args.backbone, "--architecture", args.architecture,
           "--data", images, "--out", features_csv, "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    embed_seconds = time.time() - started
    report = json.loads(out.stdout.strip().splitlines()[-1])
    rows = {}
    with open(features_csv, newline="") as f:
        for row in csv.reader(f):
            if row[0] == "path":
                continue
            rows[row[0]] = np.array([float(v) for v in row[1:]])
    feats = np.stack([np.stack([rows[k] for k in d]) for d in drawers])  # [classes, 20, dim]
    feats /= np.linalg.norm(feats, axis=2, keepdims=True)
    n_cls = feats.shape[0]
    print(f"{n_cls} characters x 20 drawers embedded by metalearn in {embed_seconds:.1f} s "
          f"({report['images_per_sec']:.1f} images/s)")
    print(f"| K | metalearn features (acc % ± 95% CI) | peer | difference |")
    print(f"| --- | --- | --- | --- |")
    results = []
    for k in (1, 5):
        rng = np.random.default_rng(0)
        accs = []
        for _ in range(args.episodes):
            cls = rng.choice(n_cls, args.way, replace=False)
            sup, qry, qry_y = [], [], []
            for j, c in enumerate(cls):
                perm = rng.permutation(20)
                sup.append(feats[c, perm[:k]].mean(0))
                qry.append(feats[c, perm[k:k + args.queries]])
                qry_y += [j] * len(perm[k:k + args.queries])
            protos = np.stack(sup)
            protos /= np.linalg.norm(protos, axis=1, keepdims=True)
            pred = np.argmax(np.concatenate(qry) @ protos.T, axis=1)
            accs.append(100.0 * float(np.mean(pred == np.array(qry_y))))
        mean = float(np.mean(accs))
        ci = 1.96 * float(np.std(accs, ddof=1)) / np.sqrt(len(accs))
        peer = PEER.get(k)
        print(f"| {k} | {mean:.2f} ± {ci:.2f} | {peer[0]:.2f} ± {peer[1]:.2f} | {mean - peer[0]:+.2f} |")
        results.append({"k": k, "accuracy": mean, "ci95": ci, "peer": peer[0]})
    print(json.dumps({"episodes": args.episodes, "way": args.way, "embed_seconds": embed_seconds,
                      "results": results, "work": work}))


if __name__ == "__main__":
    main()
