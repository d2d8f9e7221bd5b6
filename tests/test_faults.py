"""Fault injection: runs killed with SIGKILL at random steps and inside checkpoint writes, disks that fill up, folders
that turn read-only, NaNs in a batch. After each, the last good checkpoint loads, and a resumed run ends with the same
weights (torch.equal) as a run that was never interrupted: nothing is lost beyond the steps since that checkpoint."""
import errno, os, random, shutil, signal, subprocess, sys, textwrap
from pathlib import Path
import pandas as pd
import pytest
import torch
from vit_nb.backprop import NonFiniteError
from vit_nb.data import get_data
from vit_nb.loop import Callback, CheckpointCallback, TrainingLoop, read_checkpoint
from vit_nb.model import ViT, vit_config

ROOT = Path(__file__).resolve().parents[1]
EVERY = 4  # checkpoint every EVERY optimizer steps (and at each epoch's end)

CHILD = textwrap.dedent('''
    import io, os, signal, sys, time, torch
    torch.set_num_threads(1)  # the same reduction order in every process
    import vit_nb.loop as L
    from vit_nb.config import TrainConfig
    from vit_nb.loop import Callback, TrainingLoop
    mode, out = sys.argv[1], sys.argv[2]
    delay = float(os.environ.get('DELAY', '0'))
    kind, _, k = os.environ.get('FAULT', '').partition(':')  # SIGKILL ourselves inside the k-th checkpoint save
    k, n, save = int(k or 0), [0], torch.save

    def die(what):
        print(f"dying {what}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    if kind == 'mid-write':        # half the checkpoint's bytes are in the temporary file
        def torch_save(obj, f):
            n[0] += 1
            if n[0] < k: return save(obj, f)
            b = io.BytesIO(); save(obj, b); data = b.getvalue()
            if isinstance(f, (str, os.PathLike)): f = open(f, 'wb')
            f.write(data[:len(data) // 2]); f.flush()
            die('mid-write')
        torch.save = torch_save
    if kind == 'before-replace':   # the temporary file is complete, not yet renamed
        replace = os.replace
        def os_replace(src, dst, *a, **kw):
            if os.path.basename(str(dst)).startswith('ckpt_'):
                n[0] += 1
                if n[0] == k: die('before-replace')
            return replace(src, dst, *a, **kw)
        os.replace = os_replace
    if kind == 'before-link':      # the new ckpt_*.pt is complete, last.pt still points at the previous one
        link = L._link_or_copy
        def link_or_copy(src, dst):
            n[0] += 1
            if n[0] == k: die('before-link')
            return link(src, dst)
        L._link_or_copy = link_or_copy

    class Tick(Callback):
        "Print each batch's position (after the checkpoint callback has run), then wait `delay` seconds."
        order = 100
        def after_batch(self, loop):
            print(f"step {loop.step} epoch {loop.epoch} batch {loop.batch_idx}", flush=True)
            time.sleep(delay)

    kw = dict(cbs=[Tick()], progress=False, verbose=False)
    if mode == 'resume': loop = TrainingLoop.resume(f"{out}/checkpoints/last.pt", **kw)
    else:
        cfg = TrainConfig(data='digits', bs=64, seed=0, model=dict(dim=32, depth=2, n_heads=2, dropout=0.1), augment=True,
                          epochs=2, lr=3e-3, out_dir=out, ckpt_every_steps=EVERY, keep_last=2, device='cpu', log_every=5)
        loop = TrainingLoop.from_config(cfg, **kw)
    loop.fit()
    save(loop.model.state_dict(), f"{out}/final.pt")
    print("done", flush=True)
''').replace('EVERY', str(EVERY))

N_STEPS = 40  # 2 epochs of 20 batches

def _child(script, mode, out, delay=0., fault=''):
    env = {**os.environ, 'PYTHONPATH': f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", 'OMP_NUM_THREADS': '1',
           'DELAY': str(delay), 'FAULT': fault}
    return subprocess.Popen([sys.executable, str(script), mode, str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

def _finish(p, timeout=300):
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"child failed ({p.returncode}):\n{err[-3000:]}"
    return out

def _steps(lines): return [int(l.split()[1]) for l in lines if l.startswith('step ')]

def _same_weights(a, b):
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert list(a) == list(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"tensors differ after resume: {differ}"

def _same_logs(a, b):
    for f, drop in (('history.csv', ['imgs_per_s', 'time']), ('steps.csv', [])):
        pd.testing.assert_frame_equal(pd.read_csv(a/f).drop(columns=drop), pd.read_csv(b/f).drop(columns=drop), check_exact=True)

@pytest.fixture(scope='module')
def script(tmp_path_factory):
    p = tmp_path_factory.mktemp('faults')/'child.py'
    p.write_text(CHILD)
    return p

@pytest.fixture(scope='module')
def full(script, tmp_path_factory):
    "The uninterrupted run."
    out = tmp_path_factory.mktemp('full')
    _finish(_child(script, 'train', out))
    return out

def test_three_sigkills_at_random_steps(script, full, tmp_path):
    "Killed (SIGKILL, from outside) at 3 random steps and resumed each time from last.pt: the end is bitwise the same."
    seed = int(os.environ.get('FAULT_SEED', random.randrange(10**6)))
    # from step 2 * EVERY + 1 on, the first checkpoint is on disk (a save waits for the one before, written in the background)
    kills = sorted(random.Random(seed).sample(range(2 * EVERY + 1, N_STEPS - 2), 3))
    out, mode, lost = tmp_path/'killed', 'train', []
    for target in kills:
        p = _child(script, mode, out, delay=0.03)
        seen = []
        for line in p.stdout:
            seen.append(line.strip())
            if line.startswith('step ') and int(line.split()[1]) >= target: break  # >=: an earlier kill may have overshot
        else: pytest.fail(f"seed {seed}: the child ended before step {target}:\n{seen[-5:]}\n{p.stderr.read()[-3000:]}")
        p.send_signal(signal.SIGKILL)
        seen += p.stdout.read().splitlines()  # what it printed before it died
        p.wait(timeout=60)
        assert p.returncode == -signal.SIGKILL
        ck = read_checkpoint(out/'checkpoints'/'last.pt')
        done = _steps(seen)[-1]
        lost.append(done - ck['step'])
        # lost: the steps since the last checkpoint on disk (one still being written in the background when the kill
        # lands is lost too, so at most two checkpoint intervals)
        assert 0 <= done - ck['step'] < 2 * EVERY, f"seed {seed}: last step {done}, checkpoint at step {ck['step']}"
        if mode == 'resume': assert seen[0].startswith(f"step {resumed_from + 1} "), (seed, seen[0], resumed_from)
        mode, resumed_from = 'resume', ck['step']
    log = _finish(_child(script, 'resume', out)).splitlines()
    assert log[0].startswith(f"step {resumed_from + 1} ") and log[-1] == 'done'
    print(f"\nkills at steps {kills} (seed {seed}); steps lost to each kill (redone from the checkpoint): {lost}")
    _same_weights(full/'final.pt', out/'final.pt')
    _same_logs(full, out)

def test_sigkill_inside_checkpoint_writes(script, full, tmp_path):
    "Killed half-way through writing a checkpoint, after writing it but before the rename, and before last.pt moves."
    out = tmp_path/'killed'
    # fresh run: saves at steps 4, 8, 12 -> dies writing the third; resumed from 8: saves 12, 16 -> dies before renaming
    # the second; resumed from 12: saves 16, 20 (end of epoch 1) -> dies before pointing last.pt at the second.
    for mode, fault, last_good, new_step in (('train', 'mid-write:3', 8, 12), ('resume', 'before-replace:2', 12, 16),
                                             ('resume', 'before-link:2', 16, 20)):
        p = _child(script, mode, out, fault=fault)
        log, err = p.communicate(timeout=300)
        assert p.returncode == -signal.SIGKILL and f"dying {fault.split(':')[0]}" in log, (fault, p.returncode, err[-2000:])
        ck = read_checkpoint(out/'checkpoints'/'last.pt')
        assert ck['step'] == last_good, (fault, ck['step'])
        tmp = list((out/'checkpoints').glob('.*.tmp'))
        new = list((out/'checkpoints').glob(f'ckpt_*_s{new_step:07d}.pt'))
        if fault.startswith('before-link'): assert not tmp and len(new) == 1 and read_checkpoint(new[0])['step'] == new_step
        else: assert len(tmp) == 1 and not new, (fault, tmp, new)  # the interrupted write is a temporary file only
    log = _finish(_child(script, 'resume', out)).splitlines()
    assert log[0].startswith('step 17 ') and log[-1] == 'done'
    assert not list((out/'checkpoints').glob('.*.tmp'))  # cleaned up by the resumed run
    _same_weights(full/'final.pt', out/'final.pt')
    _same_logs(full, out)

# --- in-process faults: a tiny model on synthetic data ---------------------------------------------------------------
DATA = get_data('synthetic', bs=32, n=320, seed=0)  # 7 batches per epoch
QUIET = dict(progress=False, verbose=False, device='cpu')

def tiny_vit():
    torch.manual_seed(0)
    return ViT(vit_config('digits', n_classes=4, dim=16, depth=1, n_heads=2))

def run(out=None, cbs=(), resume=None, **kw):
    loop = TrainingLoop(tiny_vit(), DATA, epochs=1, out_dir=out, ckpt_every_steps=2, cbs=list(cbs), **{**QUIET, **kw})
    loop.fit(resume=resume)
    return loop

@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    "The weights of the uninterrupted in-process run."
    return {k: v.clone() for k, v in run(tmp_path_factory.mktemp('ref')).model.state_dict().items()}

def _equal(sd, ref): assert all(torch.equal(sd[k], ref[k]) for k in ref)

class At(Callback):
    "Call `f(loop)` once, after optimizer step `step`'s checkpoint is on disk."
    order = 100
    def __init__(self, step, f): self.step, self.f, self.done = step, f, False
    def after_batch(self, loop):
        if loop.step == self.step and not self.done:
            loop.get_cb(CheckpointCallback).wait()  # it may be written in the background
            self.done = True; self.f(loop)

def _resume_and_compare(out, reference, last_good):
    ck = read_checkpoint(out/'checkpoints'/'last.pt')
    assert ck['step'] == last_good
    assert not list((out/'checkpoints').glob('.*.tmp'))
    _equal(run(out, resume=out/'checkpoints'/'last.pt').model.state_dict(), reference)

def test_disk_full_during_a_save_monkeypatched(tmp_path, monkeypatch, reference):
    "A save that fails with ENOSPC half-way: a clear OSError, last.pt intact, and the resumed run loses nothing."
    save, calls = torch.save, [0]
    def fills_up(obj, f):
        calls[0] += 1
        if calls[0] == 3: f.write(b'PK\x03\x04 part of a checkpoint'); raise OSError(errno.ENOSPC, 'No space left on device')
        save(obj, f)
    monkeypatch.setattr(torch, 'save', fills_up)
    with pytest.raises(OSError) as e: run(tmp_path)
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC and 'checkpoint of step 6 not saved' in str(e.value)
    assert f"the last good checkpoint is {tmp_path/'checkpoints'/'last.pt'} (step 4)" in str(e.value)
    _resume_and_compare(tmp_path, reference, 4)

@pytest.fixture
def small_fs(tmp_path):
    "A 1 MiB tmpfs (needs root and mount; skipped elsewhere)."
    mnt = tmp_path/'mnt'; mnt.mkdir()
    if shutil.which('mount') is None or os.geteuid() != 0: pytest.skip('needs root and mount')
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(mnt)], capture_output=True, text=True)
    if r.returncode: pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(['umount', '-l', str(mnt)], capture_output=True)

def test_disk_really_full(small_fs, reference):
    "A real full disk (a tmpfs filled up after step 4's checkpoint): the opaque writer errors become ENOSPC naming the file."
    out, filler = small_fs/'run', small_fs/'filler'
    def fill(loop):
        with open(filler, 'wb', buffering=0) as f:  # unbuffered: nothing left to write at close
            try:
                while True: f.write(b'\0' * 4096)
            except OSError: pass
        while shutil.disk_usage(small_fs).free < 8192:  # leave two pages: the logs can still be appended to
            filler.write_bytes(filler.read_bytes()[:-4096])
    with pytest.raises(OSError) as e: run(out, cbs=[At(4, fill)])
    assert e.value.errno == errno.ENOSPC, e.value
    # the first write to fail names its file: the checkpoint, or a CSV log appended while a checkpoint takes the last pages
    assert f"cannot write {out}{os.sep}" in str(e.value) and 'No space left on device' in str(e.value), e.value
    assert f"the last good checkpoint is {out/'checkpoints'/'last.pt'} (step 4)" in str(e.value)
    filler.unlink()
    _resume_and_compare(out, reference, 4)

def test_folder_turns_read_only(small_fs, reference):
    "The output file system remounted read-only after step 4 (chmod does not stop root): EROFS naming the file."
    out = small_fs/'run'
    def read_only(loop): subprocess.run(['mount', '-o', 'remount,ro', str(small_fs)], check=True)
    with pytest.raises(OSError) as e: run(out, cbs=[At(4, read_only)])
    assert e.value.errno == errno.EROFS and 'Read-only file system' in str(e.value), e.value
    assert f"the last good checkpoint is {out/'checkpoints'/'last.pt'} (step 4)" in str(e.value)
    subprocess.run(['mount', '-o', 'remount,rw', str(small_fs)], check=True)
    _resume_and_compare(out, reference, 4)

def test_out_dir_is_a_file(tmp_path):
    "An output folder that cannot be made fails when the loop is built, before any training."
    (tmp_path/'taken').write_text('')
    with pytest.raises(OSError, match=f"out_dir='{tmp_path/'taken'/'run'}' cannot be written: .*taken is a file, not a folder"):
        TrainingLoop(tiny_vit(), DATA, epochs=1, out_dir=tmp_path/'taken'/'run', **QUIET)

class Poison(Callback):
    "Put a NaN into the input of the batch that makes optimizer step `at` + 1."
    def __init__(self, at): self.at, self.done = at, False
    def before_batch(self, loop):
        if loop.training and loop.step == self.at and not self.done:
            loop.xb = loop.xb.clone(); loop.xb[0, 0, 0, 0] = float('nan'); self.done = True

def test_nan_skip_policy_continues_and_counts(tmp_path):
    loop = run(tmp_path, cbs=[Poison(5)], nonfinite='skip')
    assert (loop.backprop.n_skipped, loop.step) == (1, 7 - 1)
    assert [e['n_skipped'] for e in loop.history.epochs] == [1]
    assert all(torch.isfinite(p).all() for p in loop.model.parameters())
    assert all(pd.notna(e['train_loss']) for e in loop.history.epochs)

@pytest.mark.parametrize('policy', ['raise', None])
def test_nan_raise_names_step_and_last_checkpoint(tmp_path, policy):
    "'raise' stops at the bad step; the default (checked every log_every batches) is checked before each checkpoint."
    with pytest.raises(NonFiniteError) as e: run(tmp_path, cbs=[Poison(5)], nonfinite=policy)
    msg = str(e.value)
    assert f"the last good checkpoint is {tmp_path/'checkpoints'/'last.pt'} (step 4)" in msg, msg
    assert ('after 5 optimizer steps' if policy == 'raise' else 'non-finite training loss nan at epoch 0, batch 5 (step 6)') in msg, msg
    ck = read_checkpoint(tmp_path/'checkpoints'/'last.pt')
    assert ck['step'] == 4 and all(torch.isfinite(v).all() for v in ck['model'].values())
