"""Training throughput of `TrainingLoop` (default callbacks) against a plain hand-written PyTorch loop.

Same model (ViT dim 64, depth 4, patch 2: `VIT_DIGITS`), same data (digits, in-memory tensors, batch size 64, no
augmentation), same optimizer (AdamW, foreach) and schedule, float32 on the CPU. The variants run interleaved, round
after round, in one process (the machine's speed drifts between processes); each prints training images/s per round,
and the ratio to the plain loop; the last lines are the medians.

    python bench/loop_vs_plain.py [--rounds 5] [--epochs 3] [--threads N]
"""
import argparse, dataclasses, statistics, tempfile, time
import torch
import torch.nn.functional as F
from vit_nb.data import get_data
from vit_nb.model import ViT, VIT_DIGITS
from vit_nb.optimizer import OptimizerManager
from vit_nb.loop import TrainingLoop

def plain(model, data, epochs, lr=2e-3, wd=0.05):
    "The tight hand-written loop: tensor slices, AdamW foreach, cosine schedule, no host sync per batch."
    x, y, bs = data.train.x, data.train.y, data.train.bs
    opt = OptimizerManager(model, 'adamw', lr=lr, wd=wd, sched='cosine', warmup_pct=0.1, total_steps=epochs * len(data.train))
    model.train()
    tot = torch.zeros(())
    for epoch in range(epochs):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(x), bs):
            b = idx[i:i + bs]
            loss = F.cross_entropy(model(x[b]), y[b])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tot += loss.detach()
    return tot.item() / (epochs * len(data.train))

def loop_fit(model, data, epochs, **kw):
    "TrainingLoop with its default callbacks (Recorder, progress bar and table; with out_dir: CSV log and checkpoints)."
    TrainingLoop(model, data, epochs=epochs, lr=2e-3, wd=0.05, device='cpu', **kw).fit()

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch decides)')
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    data = get_data('digits', bs=64, augment=False)
    data = dataclasses.replace(data, valid=None)  # time training only: no validation pass in either
    n_imgs = a.epochs * data.sizes['train']
    out = tempfile.mkdtemp()
    variants = {'plain': lambda m: plain(m, data, a.epochs),
                'loop': lambda m: loop_fit(m, data, a.epochs),
                'loop+out_dir': lambda m: loop_fit(m, data, a.epochs, out_dir=out)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.epochs} epochs x {data.sizes['train']} images, bs 64")
    ips = {k: [] for k in variants}
    for r in range(a.rounds):
        for k, f in variants.items():
            torch.manual_seed(0); model = ViT(VIT_DIGITS)
            t = time.perf_counter(); f(model); dt = time.perf_counter() - t
            ips[k].append(n_imgs / dt)
        print(f"round {r}: " + ', '.join(f"{k} {v[-1]:.0f} img/s" for k, v in ips.items()) + '; ratio ' +
              ', '.join(f"{k} {v[-1] / ips['plain'][-1]:.2f}" for k, v in ips.items() if k != 'plain'), flush=True)
    med = {k: statistics.median(v) for k, v in ips.items()}
    ratios = {k: statistics.median([x / y for x, y in zip(v, ips['plain'])]) for k, v in ips.items() if k != 'plain'}
    print("median: " + ', '.join(f"{k} {v:.0f} img/s" for k, v in med.items()) + '; ratio to plain ' +
          ', '.join(f"{k} {v:.2f}" for k, v in ratios.items()))

if __name__ == '__main__': main()
