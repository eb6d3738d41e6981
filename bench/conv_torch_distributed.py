# The peer of `mpirun -np N metalearn --threads 1 bench --workload maml-conv4|fomaml-conv4`:
# the Conv-4 MAML workload of ../shared/bench/peers/conv_torch.py (5-way 1-shot, 15 queries,
# meta-batch 32, one inner step at lr 0.4, Adam 1e-3), data-parallel with torch.distributed
# (gloo): each of RANKS processes of one thread takes its share of the meta-batch, the gradients
# are mean-all-reduced in one flat buffer, and every rank steps Adam, as in learn2learn's
# distributed MAML example.
#
#   python bench/conv_torch_distributed.py        # env: RANKS (default 2), FO=1, ITERS (3)
#
# Prints "torch-gloo maml fo=F ranks=R: X ms/iter" from rank 0. A measurement tool, not part of
# the project's code.
import os, time
import torch, torch.distributed as dist, torch.multiprocessing as mp, torch.nn.functional as F


def block(p, x, i):
    x = F.conv2d(x, p[f"w{i}"], p[f"b{i}"], padding=1)
    x = F.batch_norm(x, None, None, p[f"g{i}"], p[f"be{i}"], training=True)
    return F.max_pool2d(F.relu(x), 2)


def init(ways, hid=64):
    p, c = {}, 1
    for i in range(4):
        p[f"w{i}"] = (torch.randn(hid, c, 3, 3) * (2 / (c * 9)) ** .5).requires_grad_()
        p[f"b{i}"] = torch.zeros(hid, requires_grad=True)
        p[f"g{i}"] = torch.ones(hid, requires_grad=True)
        p[f"be{i}"] = torch.zeros(hid, requires_grad=True)
        c = hid
    p["wo"] = (torch.randn(ways, hid) * 0.01).requires_grad_()
    p["bo"] = torch.zeros(ways, requires_grad=True)
    return p


def logits(p, x):
    for i in range(4):
        x = block(p, x, i)
    return x.flatten(1) @ p["wo"].t() + p["bo"]


def worker(rank, ranks, iters, fo, port):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    torch.manual_seed(0)
    W, S, Q, MB = 5, 1, 15, 32
    p = init(W)
    for v in p.values():  # rank 0's initial state everywhere
        dist.broadcast(v.data, 0)
    opt = torch.optim.Adam(p.values(), 1e-3)
    xs = torch.randn(MB, W * S, 1, 28, 28)
    xq = torch.randn(MB, W * Q, 1, 28, 28)
    ys = torch.arange(W).repeat_interleave(S)
    yq = torch.arange(W).repeat_interleave(Q)
    per = -(-MB // ranks)
    mine = range(rank * per, min(MB, (rank + 1) * per))
    comm = [0.0]

    def step():
        tot = 0
        for t in mine:
            fast = dict(p)
            l = F.cross_entropy(logits(fast, xs[t]), ys)
            g = torch.autograd.grad(l, list(fast.values()), create_graph=not fo)
            fast = {k: v - 0.4 * gi for (k, v), gi in zip(fast.items(), g)}
            tot = tot + F.cross_entropy(logits(fast, xq[t]), yq)
        opt.zero_grad()
        (tot / MB).backward()  # this rank's share of the mean
        flat = torch.cat([v.grad.flatten() for v in p.values()])
        c0 = time.time()
        dist.all_reduce(flat)
        comm[0] += time.time() - c0
        at = 0
        for v in p.values():
            n = v.numel()
            v.grad.copy_(flat[at:at + n].view_as(v))
            at += n
        opt.step()

    step()
    comm[0] = 0.0
    dist.barrier()
    t0 = time.time()
    for _ in range(iters):
        step()
    ms = (time.time() - t0) * 1000 / iters
    if rank == 0:
        print(f"torch-gloo maml fo={int(fo)} ranks={ranks}: {ms:.1f} ms/iter "
              f"(comm {comm[0] * 1000 / iters:.1f} ms/iter, {sum(v.numel() for v in p.values()) * 4} bytes all-reduced)")
    dist.destroy_process_group()


if __name__ == "__main__":
    ranks = int(os.environ.get("RANKS", 2))
    iters = int(os.environ.get("ITERS", 3))
    fo = os.environ.get("FO") == "1"
    mp.spawn(worker, args=(ranks, iters, fo, 29500 + os.getpid() % 1000), nprocs=ranks)
