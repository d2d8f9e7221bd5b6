"""Exact resume across processes: a training run killed with SIGKILL in the middle of an epoch, resumed from its last
checkpoint in a new process, ends with the same weights (torch.equal) as a run that was never interrupted."""
import os, signal, subprocess, sys, textwrap
from pathlib import Path
import pandas as pd
import pytest
import torch
from vit_nb.loop import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent('''
    import sys, time, torch
    torch.set_num_threads(1)  # the same reduction order in every process
    from vit_nb.loop import Callback, TrainConfig, TrainingLoop
    mode, out, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])

    class Tick(Callback):
        "Print each batch's position (after the checkpoint callback has run), then wait `delay` seconds."
        order = 100
        def after_batch(self, loop):
            print(f"step {loop.step} epoch {loop.epoch} batch {loop.batch_idx}", flush=True)
            time.sleep(delay)

    kw = dict(cbs=[Tick()], progress=False, verbose=False)
    if mode == 'resume': loop = TrainingLoop.resume(f"{out}/checkpoints/last.pt", **kw)
    else:
        cfg = TrainConfig(data='digits', bs=64, seed=0, model=dict(dim=32, depth=2, n_heads=2, dropout=0.1), augment=True, epochs=3,
                          lr=3e-3, out_dir=out, ckpt_every_steps=4, keep_last=2, device='cpu', log_every=5)
        loop = TrainingLoop.from_config(cfg, **kw)
    loop.fit()
    torch.save(loop.model.state_dict(), f"{out}/final.pt")
    print("done", flush=True)
''')

def _child(script, mode, out, delay=0.):
    env = {**os.environ, 'PYTHONPATH': f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", 'OMP_NUM_THREADS': '1'}
    return subprocess.Popen([sys.executable, str(script), mode, str(out), str(delay)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

def _finish(p, timeout=300):
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"child failed ({p.returncode}):\n{err[-3000:]}"
    return out

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('resume')
    script = tmp/'child.py'
    script.write_text(CHILD)
    full, killed = tmp/'full', tmp/'killed'
    p_full = _child(script, 'train', full)
    _finish(p_full)
    # The run to kill: wait until it reports step 27 (epoch 1, batch 6 of 20; the last checkpoint is at step 24)
    p = _child(script, 'train', killed, delay=0.05)
    seen = []
    for line in p.stdout:
        seen.append(line.strip())
        if line.startswith('step 27 '): break
    else: pytest.fail(f"the child ended before step 27:\n{seen[-5:]}\n{p.stderr.read()[-3000:]}")
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert not (killed/'final.pt').exists()
    ck = read_checkpoint(killed/'checkpoints/last.pt')
    out = _finish(_child(script, 'resume', killed))
    return dict(full=full, killed=killed, ck=ck, resumed_log=out)

def test_killed_mid_epoch(runs):
    "The checkpoint the resumed process starts from lies inside an epoch, and the resumed run picks up after it."
    ck = runs['ck']
    assert ck['epoch'] == 1 and 0 < ck['batch_idx'] < ck['n_batches'], (ck['epoch'], ck['batch_idx'])
    first = runs['resumed_log'].splitlines()[0]
    assert first == f"step {ck['step'] + 1} epoch {ck['epoch']} batch {ck['batch_idx']}", first

def test_resumed_weights_equal(runs):
    "Final weights of the killed-and-resumed run are bitwise equal to the uninterrupted run's."
    a = torch.load(runs['full']/'final.pt', weights_only=True)
    b = torch.load(runs['killed']/'final.pt', weights_only=True)
    assert list(a) == list(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"tensors differ after resume: {differ}"

def test_resumed_logs_equal(runs):
    "The resumed run's CSV logs hold the same numbers as the uninterrupted run's."
    for f, drop in (('history.csv', ['imgs_per_s', 'time']), ('steps.csv', [])):
        a, b = (pd.read_csv(runs[k]/f).drop(columns=drop) for k in ('full', 'killed'))
        pd.testing.assert_frame_equal(a, b, check_exact=True)

def test_keep_last(runs):
    "Two checkpoints are kept besides last.pt, and last.pt is the newest."
    files = sorted(p.name for p in (runs['killed']/'checkpoints').iterdir())
    assert len(files) == 3 and 'last.pt' in files, files
    assert read_checkpoint(runs['killed']/'checkpoints/last.pt')['step'] == 60
