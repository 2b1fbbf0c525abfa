"""Test helper: one compiled training step of a tiny network, as a fresh process sees the cache.

    python tests/compile_cache_worker.py CACHE_DIR

Compiles a two-layer linear network (matrix products only: no C++ kernel to build, seconds) with
``engine.compilation.compile_network`` (cache in CACHE_DIR), runs forward + backward on a fixed
batch, and prints one JSON line: the compiled and the eager loss and gradients, and Inductor's /
AOTAutograd's cache counters of this process.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # launched as a file: make the repository importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from engine.compilation import compile_network, configure_compile_cache  # noqa: E402


def loss_and_gradients(network, inputs):
    network.zero_grad()
    loss = network(inputs).square().mean()
    loss.backward()
    return [loss.item()] + torch.cat([parameter.grad.flatten() for parameter in network.parameters()]).tolist()


def main(cache_dir):
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), torch.nn.Linear(8, 2, bias=False))
    inputs = torch.randn(3, 4)
    eager = loss_and_gradients(network, inputs)
    folder = configure_compile_cache(cache_dir)
    compiled = loss_and_gradients(compile_network(network), inputs)
    print(json.dumps({"folder": folder, "eager": eager, "compiled": compiled,
                      "inductor": dict(counters["inductor"]), "aot_autograd": dict(counters["aot_autograd"])}))


if __name__ == "__main__":
    main(sys.argv[1])
