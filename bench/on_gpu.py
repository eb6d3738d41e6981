"""Runs a peer PyTorch script on the first CUDA GPU, unchanged.

    python bench/on_gpu.py SCRIPT

Tensors the script creates land on the GPU (torch's default device), and the script's clock
(`time.time`) waits for the GPU's queued work first, so its ms/iter covers the work it launched
rather than only the launching.
"""
import runpy
import sys
import time

import torch

torch.set_default_device("cuda")
_wall_clock = time.time


def _synchronised_clock():
    torch.cuda.synchronize()
    return _wall_clock()


time.time = _synchronised_clock
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
