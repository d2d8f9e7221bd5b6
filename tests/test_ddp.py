"""DistributedDataParallel through torchrun: 2 CPU processes (gloo, loopback only) running the unchanged `TrainingLoop`.

- the 2 ranks end with identical weights and report identical validation numbers;
- a 2-rank run at batch size b follows a 1-process run at batch size 2b (same samples per step, averaged gradients),
  with and without gradient accumulation, and accumulation all-reduces once per optimizer step (`no_sync`);
- a 2-rank run killed with SIGKILL in the middle of an epoch and resumed from its last checkpoint ends with the same
  weights (torch.equal) and logs as an uninterrupted 2-rank run.
Three torchrun launches in all; each rank uses one thread."""
import os, signal, subprocess, sys, textwrap
from contextlib import contextmanager
from pathlib import Path
import pandas as pd
import pytest
import torch
from vit_nb.data import get_data
from vit_nb.distributed import free_port
from vit_nb.loop import TrainingLoop, read_checkpoint
from vit_nb.model import ViT, vit_config

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent/'torchrun'

COMMON = textwrap.dedent('''
    import torch
    from vit_nb.data import get_data
    from vit_nb.model import ViT, vit_config
    def tiny():
        "A seeded 1-block ViT for 8x8 images, 4 classes, no dropout."
        torch.manual_seed(0)
        return ViT(vit_config('digits', n_classes=4, dim=16, depth=1, n_heads=2))
    def synthetic(bs):
        "224 training images: 7 batches of 32 in one process, 7 batches of 16 on each of 2 ranks; no augmentation."
        return get_data('synthetic', bs=bs, n=320, seed=0, augment=False, valid_bs=64)
    EQUIV = dict(epochs=2, optimizer='sgd', lr=0.1, progress=False, verbose=False, device='cpu')  # SGD: linear in the gradients, so float rounding is not amplified (Adam divides near-zero gradients by their own size)
    RESUME = dict(data='digits', bs=64, seed=0, model=dict(dim=16, depth=1, n_heads=2, dropout=0.1), augment=True, epochs=3,
                  lr=3e-3, ckpt_every_steps=4, keep_last=2, device='cpu', log_every=3)
''')

CHILD = COMMON + textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    torch.set_num_threads(1)
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from vit_nb.config import TrainConfig
    from vit_nb.distributed import init_distributed, unwrap
    from vit_nb.loop import Callback, TrainingLoop
    modes, out, delay = sys.argv[1].split(','), Path(sys.argv[2]), float(sys.argv[3])
    r = init_distributed('cpu').rank
    (out/f'pid{r}').write_text(str(os.getpid()))

    if 'equiv' in modes:
        for accum in (1, 2):
            loop = TrainingLoop(tiny(), synthetic(16), accum_steps=accum, **EQUIV)  # unsharded data: the loop shards it
            n_reduce = [0]
            def count(state, bucket):
                n_reduce[0] += 1
                return allreduce_hook(state, bucket)
            loop.model.register_comm_hook(None, count)
            loop.fit()
            torch.save(dict(model=unwrap(loop.model).state_dict(), epochs=loop.history.epochs, n_reduce=n_reduce[0],
                            step=loop.step, n_batches=loop.n_batches), out/f'equiv{accum}_rank{r}.pt')

    class Tick(Callback):
        "Rank 0 prints each batch's position (after the checkpoint callback has run); every rank waits `delay` s."
        order = 100
        def after_batch(self, loop):
            if r == 0: print(f"step {loop.step} epoch {loop.epoch} batch {loop.batch_idx}", flush=True)
            time.sleep(delay)

    if 'train' in modes or 'resume' in modes:
        kw = dict(cbs=[Tick()], progress=False, verbose=False)
        if 'resume' in modes: loop = TrainingLoop.resume(out/'run/checkpoints/last.pt', **kw)
        else: loop = TrainingLoop.from_config(TrainConfig(**RESUME, out_dir=str(out/'run')), **kw)
        loop.fit()
        torch.save(unwrap(loop.model).state_dict(), out/f'final_rank{r}.pt')
    print(f"rank {r} done", flush=True)
''')

def _torchrun(script, modes, out, delay=0.):
    "Start `script` on 2 local CPU processes; a new session, so the test can kill the agent's whole group."
    env = {**os.environ, 'PYTHONPATH': f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", 'OMP_NUM_THREADS': '1',
           'GLOO_SOCKET_IFNAME': 'lo'}
    cmd = [str(TORCHRUN), '--nnodes=1', '--nproc_per_node=2', '--master_addr=127.0.0.1', f'--master_port={free_port()}',
           str(script), modes, str(out), str(delay)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)

def _finish(p, timeout=150):
    try: out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL); p.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s")
    assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{err[-4000:]}"
    return out

def _kill_job(p, out):
    "SIGKILL both ranks (torchrun starts each in its own session) and the torchrun agent's process group."
    for r in (0, 1):
        try: os.kill(int((out/f'pid{r}').read_text()), signal.SIGKILL)
        except ProcessLookupError: pass
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)

@contextmanager
def _threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try: yield
    finally: torch.set_num_threads(old)

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('ddp')
    script = tmp/'child.py'
    script.write_text(CHILD)
    full, killed = tmp/'full', tmp/'killed'
    full.mkdir(); killed.mkdir()
    _finish(_torchrun(script, 'equiv,train', full))
    # The run to kill: rank 0 reports step 18 (epoch 1, batch 7 of 10); the last checkpoint is at step 16, mid-epoch
    p = _torchrun(script, 'train', killed, delay=0.05)
    seen = []
    for line in p.stdout:
        seen.append(line.strip())
        if line.startswith('step 18 '): break
    else: pytest.fail(f"the run ended before step 18:\n{seen[-5:]}\n{p.stderr.read()[-3000:]}")
    _kill_job(p, killed)
    assert not list(killed.glob('final_rank*.pt'))
    ck = read_checkpoint(killed/'run/checkpoints/last.pt')
    resumed_log = _finish(_torchrun(script, 'resume', killed))
    ns = {}
    exec(COMMON, ns)
    return dict(full=full, killed=killed, ck=ck, resumed_log=resumed_log, ns=ns)

def _load(path): return torch.load(path, weights_only=False)

def _differ(a, b): return [k for k in a if not torch.equal(a[k], b[k])]

@pytest.mark.parametrize('accum', [1, 2])
def test_ranks_identical(runs, accum):
    "Both ranks end with the same weights and report the same epoch numbers (validation broadcast from rank 0)."
    r0, r1 = (_load(runs['full']/f'equiv{accum}_rank{r}.pt') for r in (0, 1))
    assert not _differ(r0['model'], r1['model'])
    assert [{k: v for k, v in e.items() if k not in ('time', 'imgs_per_s')} for e in r0['epochs']] == \
           [{k: v for k, v in e.items() if k not in ('time', 'imgs_per_s')} for e in r1['epochs']]

@pytest.mark.parametrize('accum', [1, 2])
def test_matches_one_process(runs, accum):
    "2 ranks at batch size 16 follow 1 process at batch size 32: weights, train loss, and validation of the same weights."
    ns = runs['ns']
    r0 = _load(runs['full']/f'equiv{accum}_rank0.pt')
    with _threads(1):
        one = TrainingLoop(ns['tiny'](), ns['synthetic'](32), accum_steps=accum, **ns['EQUIV'])
        one.fit()
    assert r0['n_batches'] == one.n_batches == 7 and r0['step'] == one.step == 14 // accum
    sd = one.model.state_dict()
    worst = max((r0['model'][k] - sd[k]).abs().max().item() for k in sd)
    assert worst < 1e-6, f"weights differ by up to {worst}"  # measured: ~5e-8, float32 rounding
    for e2, e1 in zip(r0['epochs'], one.history.epochs):
        assert abs(e2['train_loss'] - e1['train_loss']) < 1e-6, (e2, e1)
    # validation numbers of the 2-rank run = a single process's validation of the same weights
    one.model.load_state_dict(r0['model'])
    with _threads(1): res = one.validate()
    assert res['valid_loss'] == pytest.approx(r0['epochs'][-1]['valid_loss'], abs=1e-6)
    assert res['valid_acc'] == r0['epochs'][-1]['valid_acc']

@pytest.mark.parametrize('accum', [1, 2])
def test_no_sync_while_accumulating(runs, accum):
    "DDP all-reduces the gradients once per optimizer step: micro-batches that do not step run under no_sync."
    r0 = _load(runs['full']/f'equiv{accum}_rank0.pt')
    assert r0['n_reduce'] == r0['step'] == 14 // accum

def test_killed_mid_epoch(runs):
    "The checkpoint the resumed job starts from lies inside an epoch, holds both ranks' RNG states, and the job picks up after it."
    ck = runs['ck']
    assert ck['world_size'] == 2 and len(ck['ranks']) == 2
    assert ck['epoch'] == 1 and 0 < ck['batch_idx'] < ck['n_batches'], (ck['epoch'], ck['batch_idx'])
    assert not torch.equal(ck['ranks'][0]['rng']['torch'], ck['ranks'][1]['rng']['torch'])  # each rank its own stream
    assert not any(k.startswith('module.') for k in ck['model'])
    first = runs['resumed_log'].splitlines()[0]
    assert first == f"step {ck['step'] + 1} epoch {ck['epoch']} batch {ck['batch_idx']}", first

def test_resumed_weights_equal(runs):
    "Both ranks of the killed-and-resumed job end bitwise equal to the uninterrupted job's."
    for r in (0, 1):
        a, b = _load(runs['full']/f'final_rank{r}.pt'), _load(runs['killed']/f'final_rank{r}.pt')
        assert list(a) == list(b)
        assert not _differ(a, b), f"rank {r}: tensors differ after resume: {_differ(a, b)}"
    assert not _differ(_load(runs['full']/'final_rank0.pt'), _load(runs['full']/'final_rank1.pt'))

def test_resumed_logs_equal(runs):
    "Rank 0 alone wrote the CSV logs; the resumed job's hold the same numbers as the uninterrupted job's."
    for f, drop in (('history.csv', ['imgs_per_s', 'time']), ('steps.csv', [])):
        a, b = (pd.read_csv(runs[k]/'run'/f).drop(columns=drop) for k in ('full', 'killed'))
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    files = sorted(p.name for p in (runs['killed']/'run/checkpoints').iterdir())
    assert len(files) == 3 and 'last.pt' in files, files

def test_cli_under_torchrun(tmp_path):
    "`torchrun --no-python vit_nb_train` (the README's command): one report and one set of run files, from rank 0."
    exe = Path(sys.executable).parent/'vit_nb_train'
    cmd = [str(exe)] if exe.exists() else [sys.executable, '-m', 'vit_nb.cli']
    env = {**os.environ, 'PYTHONPATH': f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", 'OMP_NUM_THREADS': '1',
           'GLOO_SOCKET_IFNAME': 'lo'}
    out = tmp_path/'run'
    p = subprocess.Popen([str(TORCHRUN), '--nnodes=1', '--nproc_per_node=2', '--master_addr=127.0.0.1',
                          f'--master_port={free_port()}', '--no-python', *cmd, '--epochs', '1', '--bs', '64',
                          '--model', 'dim=16', 'depth=1', 'n_heads=2', '--device', 'cpu', '--out', str(out)],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = _finish(p)
    assert log.count('test accuracy ') == 1, log[-3000:]
    assert log.count('run folder: ') == 1
    for name in ('config.yaml', 'checkpoints/last.pt', 'history.csv', 'test_metrics.json', 'test_confusion.png'):
        assert (out/name).is_file(), name
    assert read_checkpoint(out/'checkpoints/last.pt')['world_size'] == 2
