"""Every bad input of the catalog (`vit_nb.reliability.BAD_INPUTS`, nbs/95_reliability.ipynb) gets one clear error
naming the bad value, in Python and from `vit_nb_train`; real `vit_nb_train` processes exit non-zero with one line and
no traceback; a pickle crafted to run code is refused unrun; and the README's table shows what the code says today."""
import re
import os, pickle, shutil, subprocess, sys
from pathlib import Path
import pytest
import torch
from vit_nb.loop import CheckpointError, read_checkpoint
from vit_nb.reliability import BEGIN, END, _Evil, bad_input_table, summary, try_all

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope='module')
def rows(tmp_path_factory): return try_all(tmp=tmp_path_factory.mktemp('bad_inputs'))

def test_every_bad_input_gets_a_clear_error(rows):
    "A ValueError/TypeError/OSError with a one-line message naming the bad value, for every case."
    unclear = [f"{r['what']}: {r['error']}: {r['message'][:300]}" for r in rows if not r['ok']]
    assert not unclear, '\n'.join(unclear)

def test_every_bad_command_line_gets_one_line(rows):
    "`vit_nb_train` exits non-zero with one line `vit_nb_train: error: ...` naming the bad value, and no traceback."
    unclear = [f"{r['what']}: vit_nb_train {r['cli']} -> {r['status']}: {r['stderr'][:300]}" for r in rows
               if 'cli_ok' in r and not r['cli_ok']]
    assert not unclear, '\n'.join(unclear)
    s = summary(rows)
    print(f"\n{s['cases']} bad inputs, {s['clear']} clear; {s['cli_cases']} on the command line, {s['cli_clear']} clear")

def _table_rows(text:str)->dict:
    "{bad input: table line} of the data rows of a bad-input table."
    return {l.split('|')[1].strip(): l for l in text.splitlines() if l.startswith('| ') and not l.startswith('| **')
            and not l.startswith('| bad input')}

def test_readme_table_is_current(rows):
    "Each row of the README's table is what the code gives today (regenerate: python -m vit_nb.reliability --write ...)."
    readme = (ROOT/'README.md').read_text()
    assert BEGIN in readme and END in readme, 'README.md has no bad-input table'
    shown, now = _table_rows(readme.split(BEGIN, 1)[1].split(END, 1)[0]), _table_rows(bad_input_table(rows))
    missing = sorted(set(now) - set(shown))
    assert not missing, f"cases missing from README.md: {missing}"
    size = lambda l: re.sub(r'\d+ bytes', 'N bytes', l)  # a truncated file's size follows the checkpoint's, which varies
    stale = [f"README: {shown[k]}\nnow:    {now[k]}" for k in now if size(shown[k]) != size(now[k])]
    assert not stale, 'README.md table is out of date (python -m vit_nb.reliability --write nbs/index.ipynb):\n' + '\n'.join(stale)

def test_command_line_processes(tmp_path):
    "Real `vit_nb_train` processes (several at once): non-zero exit, one line on stderr, no traceback."
    (tmp_path/'a_file').write_text('')
    (tmp_path/'bad.yaml').write_text('lr: [1, 2\n')
    runs = [['--lr', '-1'], ['--resume', str(tmp_path/'nowhere.pt')], ['--config', str(tmp_path/'bad.yaml')],
            ['--out', str(tmp_path/'a_file'), '--epochs', '1', '--device', 'cpu']]  # config, checkpoint, file, folder
    exe = shutil.which('vit_nb_train', path=str(Path(sys.executable).parent)) or shutil.which('vit_nb_train')
    cmd = [exe] if exe else [sys.executable, '-m', 'vit_nb.cli']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    env.pop('VIT_NB_TRACEBACK', None)
    ps = [subprocess.Popen(cmd + a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env) for a in runs]
    for a, p in zip(runs, ps):
        out, err = p.communicate(timeout=300)
        lines = [l for l in err.splitlines() if l.strip() and 'Warning' not in l and not l.startswith('  ')]
        assert p.returncode in (1, 2), (a, p.returncode, err[-2000:])
        assert 'Traceback' not in err and len(lines) == 1 and lines[0].startswith('vit_nb_train: error: '), (a, err[-2000:])

def test_crafted_pickle_runs_nothing(tmp_path):
    "A checkpoint whose unpickling would run `touch marker`: refused by torch.load(weights_only=True) and read_checkpoint."
    marker, path = tmp_path/'PWNED', tmp_path/'evil.pt'
    torch.save({'format': 'vit_nb.checkpoint', 'schema_version': 1, 'model': _Evil(marker)}, path)
    with pytest.raises(pickle.UnpicklingError, match='GLOBAL posix.system'): torch.load(path, weights_only=True)
    with pytest.raises(CheckpointError, match='so none of it ran'): read_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: an unsafe load does run it
    assert marker.exists()

def test_every_config_field_has_a_case():
    "The catalog tries a bad value for every `TrainConfig` field (a new field needs a new case)."
    import re
    from dataclasses import fields
    from vit_nb.config import TrainConfig
    from vit_nb.reliability import BAD_INPUTS
    tried = {k for c in BAD_INPUTS if c.call.startswith('TrainConfig(') for k in re.findall(r'(\w+)=', c.call)}
    assert not [f.name for f in fields(TrainConfig) if f.name not in tried]

@pytest.mark.parametrize('name', [f for f in __import__('vit_nb.config', fromlist=['TrainConfig']).TrainConfig.__dataclass_fields__])
def test_any_field_of_the_wrong_type(name):
    "Any field given an object of no accepted type: a TypeError naming the field."
    from vit_nb.config import TrainConfig
    with pytest.raises(TypeError, match=f"TrainConfig.{name} must be"): TrainConfig(**{name: object()})
