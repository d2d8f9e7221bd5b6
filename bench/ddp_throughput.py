"""Training throughput of 1 process against 2 DDP processes (torchrun, gloo on the CPU) on this machine.

Same data (digits, in-memory, no augmentation, no validation), same model (the default `VIT_DIGITS`), same global
batch (default 128: one process at bs 128, or two at bs 64 each, so both take the same optimizer steps), same
`TrainingLoop` code. The CPU threads are split fairly: `--threads` (default: all cores) for the single process,
`threads // 2` for each of the two. Each run trains `--epochs` epochs; the first is a warm-up, the median images/s
of the others counts. A third variant, one process with half the threads, gives the scaling efficiency of
the two processes (their speed over twice its speed). The variants alternate, round after round; the last lines are the medians and the ratio.

    python bench/ddp_throughput.py [--rounds 3] [--epochs 6] [--bs 128] [--threads N]
"""
import argparse, json, os, statistics, subprocess, sys
from pathlib import Path

def worker(a):
    "One process of a run: train and, on rank 0, print a JSON line with the per-epoch images/s."
    import torch
    torch.set_num_threads(a.threads)
    import dataclasses
    from vit_nb.data import get_data
    from vit_nb.distributed import init_distributed
    from vit_nb.loop import TrainingLoop
    from vit_nb.model import ViT, VIT_DIGITS
    info = init_distributed('cpu')
    data = dataclasses.replace(get_data('digits', bs=a.bs // info.world_size, augment=False), valid=None)
    torch.manual_seed(0)
    loop = TrainingLoop(ViT(VIT_DIGITS), data, epochs=a.epochs, lr=2e-3, progress=False, verbose=False, device='cpu')
    loop.fit()
    if info.rank == 0:
        print(json.dumps(dict(world_size=info.world_size, threads=a.threads, bs=data.train.bs, steps=loop.step,
                              imgs_per_s=[e['imgs_per_s'] for e in loop.history.epochs])), flush=True)

def run(nproc, threads, a):
    "Launch one run (python for 1 process, torchrun on loopback for more) and return rank 0's report."
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads), 'GLOO_SOCKET_IFNAME': 'lo',
           'PYTHONPATH': f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [__file__, '--worker', '--threads', str(threads), '--epochs', str(a.epochs), '--bs', str(a.bs)]
    if nproc == 1: cmd = [sys.executable, *args]
    else:
        from vit_nb.distributed import free_port
        cmd = [str(Path(sys.executable).parent/'torchrun'), '--nnodes=1', f'--nproc_per_node={nproc}',
               '--master_addr=127.0.0.1', f'--master_port={free_port()}', *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if res.returncode: sys.exit(f"run failed ({' '.join(map(str, cmd))}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--epochs', type=int, default=6)
    p.add_argument('--bs', type=int, default=128, help='global batch size (split over the processes)')
    p.add_argument('--threads', type=int, default=os.cpu_count(), help='threads of the single process (each of 2 gets half)')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker: return worker(a)
    half = max(1, a.threads // 2)
    variants = {'1 process': (1, a.threads), '2 processes (DDP)': (2, half), '1 process, half': (1, half)}
    import torch
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores; digits, VIT_DIGITS, global batch {a.bs}, "
          f"{a.epochs} epochs per run (first one a warm-up)")
    ips = {k: [] for k in variants}
    for r in range(a.rounds):
        for k, (n, t) in variants.items():
            rep = run(n, t, a)
            ips[k].append(statistics.median(rep['imgs_per_s'][1:]))
            print(f"round {r}: {k:<18} {t} thread(s) each, bs {rep['bs']} each, {rep['steps']} steps: {ips[k][-1]:.0f} img/s", flush=True)
    med = {k: statistics.median(v) for k, v in ips.items()}
    for k, v in med.items(): print(f"median {k:<18} {v:.0f} img/s")
    one, two, alone = med.values()
    print(f"ratio 2 processes / 1 process: {two / one:.2f}")
    print(f"scaling efficiency, 2 processes / (2 x 1 process with {half} thread(s)): {two / (2 * alone):.2f}")

if __name__ == '__main__': main()
