"""The `finetune-minilm` workload in PyTorch, for side-by-side timing with
`metalearn bench --workload finetune-minilm`: one step = 32 consecutive sentences, padded to the
longest, forward through the encoder, mean pooling, L2 normalisation, a 150-class linear head,
cross-entropy against labels i mod 150, backward through everything, AdamW (lr 2e-5) on every
weight but the word-embedding table (frozen, as in metalearn's `train --method finetune`).

    python bench/finetune_minilm_torch.py MODEL_DIR data_full.json [--steps 10] [--threads 2]

Prints one line of JSON (ms_per_iter, median_ms, peak_rss_mb) as the last line of stdout.
"""
import argparse
import json
import resource
import statistics
import time

import torch
from transformers import AutoModel, AutoTokenizer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    texts = [t for t, _ in json.load(open(args.data))["test"]]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    encoder = AutoModel.from_pretrained(args.model)
    encoder.train()
    for module in encoder.modules():  # metalearn's step has no dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    encoder.embeddings.word_embeddings.weight.requires_grad_(False)
    head = torch.nn.Linear(encoder.config.hidden_size, 150)
    params = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.01)
    position = 0

    def step():
        nonlocal position
        rows = [(position + i) % len(texts) for i in range(args.batch_size)]
        position += args.batch_size
        batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                          max_length=256, return_tensors="pt")
        labels = torch.tensor([i % 150 for i in rows])
        out = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        loss = torch.nn.functional.cross_entropy(head(pooled), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1000)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"torch finetune-minilm: {statistics.mean(times):.1f} ms/step "
          f"(median {statistics.median(times):.1f}), peak RSS {peak:.0f} MiB")
    print(json.dumps({"workload": "finetune-minilm", "peer": "pytorch", "torch": torch.__version__,
                      "ms_per_iter": statistics.mean(times), "median_ms": statistics.median(times),
                      "iterations": args.steps, "peak_rss_mb": peak}))


if __name__ == "__main__":
    main()
