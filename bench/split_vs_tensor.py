"""On GPUs: one GPU against a layer split and tensor parallelism over two, eager and compiled, at two batch sizes,
with where one decode step's time goes on each GPU. A random-weight Llama shape (default 8B).

    python bench/split_vs_tensor.py [--shape 8B] [--batches 1,16] [--new-tokens 64] [--repeats 3]
Prints figures only.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from plan_vs_measured import save_model  # noqa: E402


def run(label, model, batches, args, compile):
    import nbgpu

    out = []
    for batch in batches:
        try:
            r = nbgpu.bench(model, batch=batch, prompt_len=128, new_tokens=args.new_tokens, repeats=args.repeats,
                            compile=compile, label=f"{label} {'compiled' if compile else 'eager'} b{batch}")
        except Exception as err:  # a failure in one configuration is reported, the others still run
            print(f"{label} batch {batch} {'compiled' if compile else 'eager'}: FAILED {type(err).__name__}: "
                  f"{str(err)[:400]}", flush=True)
            continue
        print(repr(r), flush=True)
        out.append(r)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="8B")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma list of: one,split,tensor")
    args = parser.parse_args(argv)
    import torch

    import nbgpu

    nbgpu.simulate(None)
    batches = [int(b) for b in args.batches.split(",")]
    skip = set(args.skip.split(","))
    results = []
    with tempfile.TemporaryDirectory() as folder:
        path = save_model(args.shape, folder)
        seq = 128 + args.new_tokens
        for n, name in ((1, "one"), (2, "split")):
            if name in skip or n > torch.cuda.device_count():
                continue
            model = nbgpu.load(nbgpu.plan(path, gpus=n, batch=max(batches), prompt_len=128,
                                          new_tokens=args.new_tokens), show=False)
            label = "1 GPU" if n == 1 else f"layer split {n}"
            for compile in (False, True):
                results += run(label, model, batches, args, compile)
            del model
            gc.collect()
            torch.cuda.empty_cache()
        if "tensor" not in skip and torch.cuda.device_count() >= 2:
            model = nbgpu.load(nbgpu.plan(path, gpus=2, batch=max(batches), seq_len=seq, prompt_len=128,
                                          parallel="tensor"), show=False)
            try:
                for compile in (False, True):
                    results += run("tensor parallel 2", model, batches, args, compile)
            finally:
                model.close()
    print()
    print(nbgpu.compare(results))
    print()
    for r in results:
        if r.timeline is not None:
            print(f"{r.label}: {r.timeline!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
