"""GPU check: `TrainingLoop` against the plain loop on a CUDA device, by precision, data placement and torch.compile.

For each precision ('32', 'bf16' where the GPU has it, '16' with a GradScaler) and each placement of the in-memory
training data -- 'pageable' (batches sliced from CPU tensors: the `non_blocking` copy still blocks the host),
'pinned' (each batch page-locked first, so the copy is asynchronous) and 'gpu' (the whole data set on the GPU, batches
gathered there) -- the plain loop and `TrainingLoop` (default callbacks, out_dir set) train the same model for the
same epochs, alternating round by round. With --compile, compiled variants of both are added (`model.compile()`;
the first, compiling round is not counted). Prints images/s (median over rounds), the median per-round ratio, and
the share of the GPU's peak that vit_nb's images/s amount to: training FLOPs per image (forward and backward, counted
by `torch.utils.flop_counter.FlopCounterMode`) times images/s, over the peak of a large matrix product in the same
precision measured on this GPU (a peak the small digits/MNIST ViTs cannot approach: the share says how far off it is).

    python bench/gpu_check.py                       # Fashion-MNIST if installed (else digits), 3 rounds x 2 epochs
    python bench/gpu_check.py --data digits --compile --rounds 5

Needs a CUDA GPU (exits with a message otherwise). Runs in about a minute on a recent GPU without --compile.
"""
import argparse, io, math, statistics, sys, tempfile, time
from contextlib import redirect_stdout
from dataclasses import replace
import torch
import torch.nn.functional as F
from vit_nb.data import TensorLoader, get_data
from vit_nb.model import ViT, vit_config
from vit_nb.bench import decay_split, warmup_cosine
from vit_nb.loop import TrainingLoop

DTYPES = {'32': None, 'bf16': torch.bfloat16, '16': torch.float16}

class Pinned:
    "A `TensorLoader` whose batches are copied into page-locked memory, so `.to('cuda', non_blocking=True)` returns at once."
    def __init__(self, dl): self.dl = dl
    def __len__(self): return len(self.dl)
    def set_epoch(self, epoch): self.dl.set_epoch(epoch)
    def __iter__(self): return ((x.pin_memory(), y.pin_memory()) for x, y in self.dl)

def loaders(x, y, bs):
    "The training loader for each placement of the data."
    return dict(pageable=TensorLoader(x, y, bs, shuffle=True), pinned=Pinned(TensorLoader(x, y, bs, shuffle=True)),
                gpu=TensorLoader(x.cuda(), y.cuda(), bs, shuffle=True))

def plain_fit(model, dl, epochs, precision, lr=4e-3, wd=0.05, warmup_pct=0.1):
    "The plain loop on the GPU: AdamW (foreach), warm-up + cosine, autocast, a GradScaler for float16, no host sync."
    decay, no_decay = decay_split(model)
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=wd), dict(params=no_decay, weight_decay=0.)], lr=lr, foreach=True)
    total = epochs * len(dl)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: warmup_cosine(t, total, round(warmup_pct * total)))
    scaler, dtype = torch.amp.GradScaler('cuda', enabled=precision == '16'), DTYPES[precision]
    model.train()
    for epoch in range(epochs):
        dl.set_epoch(epoch)
        for xb, yb in dl:
            xb, yb = xb.to('cuda', non_blocking=True), yb.to('cuda', non_blocking=True)
            with torch.autocast('cuda', dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(model(xb), yb)
            scaler.scale(loss).backward()
            scaler.step(opt); scaler.update(); sched.step()
            opt.zero_grad(set_to_none=True)

def loop_fit(model, data, epochs, precision, out_dir, lr=4e-3, wd=0.05):
    "`TrainingLoop` with its default callbacks and out_dir on the GPU (the model already compiled, if it is)."
    with redirect_stdout(io.StringIO()):
        TrainingLoop(model, data, epochs=epochs, lr=lr, wd=wd, sched='cosine', warmup_pct=0.1, precision=precision,
                     device='cuda', out_dir=out_dir).fit()

def train_flops_per_image(model, xb, yb)->float:
    "FLOPs of one training step (forward and backward) per image, as `FlopCounterMode` counts them (matrix products, attention)."
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(xb), yb).backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / len(xb)

def peak_matmul_flops(dtype=None, n:int=8192, reps:int=20)->float:
    "FLOP/s of an n x n matrix product on the GPU in `dtype` (None: float32, TF32 as torch is set): the practical peak."
    a = torch.randn(n, n, device='cuda', dtype=dtype or torch.float32); b = torch.randn_like(a)
    for _ in range(3): a @ b
    s = timed(lambda: [a @ b for _ in range(reps)])
    return 2 * n ** 3 * reps / s

def timed(f):
    torch.cuda.synchronize(); t = time.perf_counter()
    f()
    torch.cuda.synchronize(); return time.perf_counter() - t

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', default=None, help="'fashion_mnist' (default if installed) or 'digits'")
    p.add_argument('--bs', type=int, default=256)
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--compile', action='store_true', help='add torch.compile variants')
    a = p.parse_args(argv)
    if not torch.cuda.is_available(): sys.exit('gpu_check: no CUDA device on this machine')
    name = a.data
    if name is None:
        try: bundle, name = get_data('fashion_mnist', bs=a.bs, augment=False), 'fashion_mnist'
        except FileNotFoundError: bundle, name = get_data('digits', bs=a.bs, augment=False), 'digits'
    else: bundle = get_data(name, bs=a.bs, augment=False)
    preset = 'digits' if name == 'digits' else 'mnist'
    x, y = bundle.train.x, bundle.train.y
    precisions = ['32'] + (['bf16'] if torch.cuda.is_bf16_supported() else []) + ['16']
    variants = [(pl, pr, c) for c in ([False, True] if a.compile else [False]) for pr in precisions
                for pl in ('pageable', 'pinned', 'gpu')]
    dls, out = loaders(x, y, a.bs), tempfile.mkdtemp(prefix='vit_nb_gpu_')
    models = {}
    def model_for(v, kind):  # one model per variant and loop kind, built (and compiled) once
        if (v, kind) not in models:
            torch.manual_seed(0)
            m = ViT(vit_config(preset)).cuda()
            if v[2]: m.compile()
            models[v, kind] = m
        return models[v, kind]
    ips = {(v, k): [] for v in variants for k in ('plain', 'vit_nb')}
    n_imgs = a.epochs * len(x)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {name} ({len(x)} training images), {preset} preset, "
          f"bs {a.bs}, {a.epochs} epochs x {a.rounds} rounds (+1 warm-up round)", flush=True)
    for r in range(a.rounds + 1):  # round 0: warm-up (cuDNN/cuBLAS autotuning, compilation), not counted
        for v in (variants if r % 2 == 0 else variants[::-1]):
            pl, pr, c = v
            runs = dict(plain=lambda: plain_fit(model_for(v, 'plain'), dls[pl], a.epochs, pr),
                        vit_nb=lambda: loop_fit(model_for(v, 'vit_nb'), replace(bundle, train=dls[pl], valid=None),
                                                a.epochs, pr, out))
            for k in (('plain', 'vit_nb') if r % 2 == 0 else ('vit_nb', 'plain')):
                s = timed(runs[k])
                if r: ips[v, k].append(n_imgs / s)
    torch.manual_seed(0)
    fpi = train_flops_per_image(ViT(vit_config(preset)).cuda(), x[:a.bs].cuda(), y[:a.bs].cuda())
    peaks = {pr: peak_matmul_flops(DTYPES[pr]) for pr in precisions}
    print(f"training FLOPs per image {fpi / 1e6:.1f} M; matmul peak " + ", ".join(f"{pr}: {f / 1e12:.0f} TFLOP/s" for pr, f in peaks.items()))
    print(f"{'data':>9} {'precision':>9} {'compile':>7} {'plain img/s':>12} {'vit_nb img/s':>13} {'ratio':>6} {'of peak':>8}")
    for v in variants:
        pl, pr, c = v
        a_, b_ = ips[v, 'plain'], ips[v, 'vit_nb']
        ratio = statistics.median(y_ / x_ for x_, y_ in zip(a_, b_))
        share = statistics.median(b_) * fpi / peaks[pr]
        print(f"{pl:>9} {pr:>9} {str(c):>7} {statistics.median(a_):12.0f} {statistics.median(b_):13.0f} {ratio:6.2f} {share:8.2%}", flush=True)

if __name__ == '__main__': main()
