"End-to-end runs of the installed `vit_nb_train` command (and `python -m vit_nb.cli`) in real subprocesses."
import json, os, shutil, signal, subprocess, sys
from dataclasses import fields
from pathlib import Path
import pytest
import torch
from vit_nb.config import TrainConfig
from vit_nb.loop import read_checkpoint

BIN = Path(sys.executable).parent
SCRIPT = str(BIN/'vit_nb_train') if (BIN/'vit_nb_train').exists() else shutil.which('vit_nb_train')
TINY = ['--data', 'synthetic', '--bs', '32', '--lr', '5e-3', '--model', 'dim=16', 'depth=1', 'n_heads=2', '--device', 'cpu']
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg'}

def _cmd(args, module=False):
    return [sys.executable, '-m', 'vit_nb.cli', *map(str, args)] if module else [SCRIPT, *map(str, args)]

def cli(*args, cwd=None, module=False, timeout=180):
    "Run `vit_nb_train ARGS` (or `python -m vit_nb.cli ARGS`); returns the CompletedProcess."
    return subprocess.run(_cmd(args, module), capture_output=True, text=True, cwd=cwd, env=ENV, timeout=timeout)

def cli_many(*runs, cwd=None):
    "Run several `(args, module)` commands at once (most of their time is importing torch); returns (returncode, stdout, stderr) each."
    ps = [subprocess.Popen(_cmd(a, m), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=ENV) for a, m in runs]
    outs = [p.communicate(timeout=180) for p in ps]
    return [(p.returncode, *o) for p, o in zip(ps, outs)]

def weights(path): return read_checkpoint(path)['model']

def test_help_lists_every_field_and_no_arguments_is_the_digits_recipe(tmp_path):
    "`--help` (through `python -m vit_nb.cli`) documents every field; with no arguments the job is `TrainConfig()`'s recipe."
    (rc, out, err), (rc2, out2, err2) = cli_many((['--help'], True), (['--print-config'], False), cwd=tmp_path)
    assert rc == 0, err
    for f in fields(TrainConfig): assert f'--{f.name} ' in out, f'--{f.name} missing from --help'
    for flag in ('--config', '--resume', '--out', '--model.dropout', '--loss_opts.gamma', 'peak learning rate'): assert flag in out
    assert rc2 == 0, err2
    assert TrainConfig.from_yaml(out2) == TrainConfig(out_dir='runs/digits')  # checked without training 100 epochs

@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
    "A 2-epoch digits run from a config file with a flag overriding it: (folder, CompletedProcess)."
    tmp = tmp_path_factory.mktemp('digits')
    (tmp/'cfg.yaml').write_text('epochs: 5\nlr: 4e-3\nmodel: {dim: 32, n_heads: 2}\n')
    return tmp/'run', cli('--config', tmp/'cfg.yaml', '--epochs', '2', '--device', 'cpu', '--out', tmp/'run')

def test_tiny_digits_run_writes_every_artifact(digits_run):
    out, r = digits_run
    assert r.returncode == 0, r.stderr
    assert 'train_loss' in r.stdout and 'valid_acc' in r.stdout           # the per-epoch table
    assert 'test accuracy' in r.stdout and str(out) in r.stdout            # the report and where things are
    for name in ('config.yaml', 'checkpoints/last.pt', 'history.csv', 'steps.csv', 'history.png', 'test_confusion.png',
                 'test_metrics.json', 'test_report.txt', 'test_per_class.csv'):
        assert (out/name).exists(), name
        assert str(out/name) in r.stdout, f'{name} not listed'
    cfg = TrainConfig.load(out/'config.yaml')
    assert (cfg.data, cfg.epochs, cfg.lr, cfg.model) == ('digits', 2, 4e-3, dict(dim=32, n_heads=2))  # the file's dict replaces the default
    assert 0 <= json.loads((out/'test_metrics.json').read_text())['accuracy'] <= 1
    ck = read_checkpoint(out/'checkpoints'/'last.pt')
    assert (ck['epoch'], ck['batch_idx'], ck['n_epochs']) == (2, 0, 2)  # saved at the end of the second of 2 epochs

def test_resume_continues_to_the_same_weights(digits_run, tmp_path):
    "The run resumed from its epoch-1 checkpoint (into another folder) ends where the uninterrupted run ended."
    out, r = digits_run
    assert r.returncode == 0, r.stderr
    first = sorted((out/'checkpoints').glob('ckpt_e001_*.pt'))[0]
    r = cli('--resume', first, '--out', tmp_path/'resumed')
    assert r.returncode == 0, r.stderr
    a, b = weights(out/'checkpoints'/'last.pt'), weights(tmp_path/'resumed'/'checkpoints'/'last.pt')
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert TrainConfig.load(tmp_path/'resumed'/'config.yaml').out_dir == str(tmp_path/'resumed')
    assert len((tmp_path/'resumed'/'history.csv').read_text().splitlines()) == 1 + 2  # header and every epoch
    assert r.stdout.split('test accuracy')[1][:8] == digits_run[1].stdout.split('test accuracy')[1][:8]

BAD = [(['--lr', 'fast'], "argument --lr: invalid float value: 'fast'"),
       (['--bs', '0'], 'TrainConfig.bs must be a positive integer, got 0'),
       (['--opt', 'lamb'], "TrainConfig.opt: unknown optimizer 'lamb'; known: sgd, adam, adamw, rmsprop")]

def test_bad_values_exit_with_one_line(tmp_path):
    "Each bad value: exit status 2 and one line on stderr naming it, no traceback (the last through `python -m`)."
    for (args, want), (rc, out, err) in zip(BAD, cli_many(*[(a, i == len(BAD) - 1) for i, (a, _) in enumerate(BAD)], cwd=tmp_path)):
        assert rc == 2, (args, err)
        assert err.count('\n') == 1 and err.startswith('vit_nb_train: error: '), err
        assert want in err and 'Traceback' not in err + out, err

def test_ctrl_c_stops_with_a_checkpoint_to_resume(tmp_path):
    "SIGINT stops at the end of the batch, saves a checkpoint, prints the resume command and exits 130."
    out = tmp_path/'run'
    p = subprocess.Popen([SCRIPT, *TINY, '--epochs', '500', '--out', str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        for line in p.stdout:  # wait for the first epoch's row of the table
            if line.split()[:1] == ['0']: break
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None: p.kill()
    assert p.returncode == 130, stderr
    assert 'Traceback' not in stderr and '--resume' in stderr
    path = Path(stderr.split('--resume ')[1].split()[0])
    ck = read_checkpoint(path)
    assert 12 <= ck['step'] < 500 * 12 and path.parent == out/'checkpoints'
