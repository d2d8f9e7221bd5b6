"`vit_nb_bench --quick` end to end: the tables it prints and writes, their rows and columns -- never the timings."
import json, shutil, subprocess, sys
from pathlib import Path
import pytest
from vit_nb.bench import SECTIONS, VARIANTS, make_parser
from vit_nb.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path('/usr/share/datasets/fashion-mnist')

def _command():
    "The installed console script, or the module (a checkout not reinstalled since the script was added)."
    exe = shutil.which('vit_nb_bench')
    return [exe] if exe else [sys.executable, '-m', 'vit_nb.bench']

@pytest.fixture(scope='module')
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench')/'bench.json'
    res = subprocess.run([*_command(), '--quick', '--json', str(out)], capture_output=True, text=True, timeout=3600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout, json.loads(out.read_text())

def _cols(rows): return list(rows[0])

def test_throughput_table(quick):
    _, t = quick
    assert len(t['throughput']) == 2  # quick: two rounds
    assert _cols(t['throughput']) == ['round', 'plain_imgs_s', 'vit_nb_imgs_s', 'ratio', 'cpu_ratio', 'plain_outside', 'vit_nb_outside']
    assert _cols(t['throughput_summary']) == ['plain_imgs_s', 'vit_nb_imgs_s', 'ratio', 'ratio_min', 'ratio_max', 'cpu_ratio', 'plain_outside', 'vit_nb_outside', 'rounds']
    for r in t['throughput']: assert r['plain_imgs_s'] > 0 and r['vit_nb_imgs_s'] > 0

def test_memory_table(quick):
    _, t = quick
    assert [r['variant'] for r in t['memory']] == ['plain', 'vit_nb']
    assert _cols(t['memory']) == ['variant', 'base_mb', 'peak_mb', 'train_mb', 'peak_vs_plain']
    for r in t['memory']: assert 0 < r['base_mb'] <= r['peak_mb']

def test_accuracy_table(quick):
    _, t = quick
    rows = t['accuracy']
    assert [(r['recipe'], r['seed'], r['epochs']) for r in rows] == [('defaults', 0, 3)]  # quick: 3 epochs, seed 0
    assert _cols(rows)[:7] == ['recipe', 'seed', 'epochs', 'total_s', 'final_acc', 'best_acc', 'imgs_s']
    for g in ('97%', '98%', '99%'): assert f's_to_{g}' in rows[0] and f'epoch_to_{g}' in rows[0]
    assert 0 <= rows[0]['final_acc'] <= 1

@pytest.mark.skipif(not FASHION.is_dir(), reason='Fashion-MNIST is not installed')
def test_fashion_table(quick):
    _, t = quick
    assert len(t['fashion']) == 2 and _cols(t['fashion']) == ['round', 'plain_imgs_s', 'vit_nb_imgs_s', 'ratio', 'cpu_ratio', 'plain_outside', 'vit_nb_outside']

def test_precision_table(quick):
    _, t = quick
    rows = t['precision']
    assert [(r['precision'], r['attention'], r['compile']) for r in rows] == [v for v in VARIANTS if not v[2]]  # quick: no compile
    assert _cols(rows) == ['precision', 'attention', 'compile', 'imgs_s', 'ratio', 'first_epoch_s', 'acc_run_s', 'test_acc']
    assert rows[0]['ratio'] == 1

def test_printed(quick):
    out, t = quick
    assert out.startswith('vit_nb_bench --quick:')
    for title in ('Throughput on digits', 'Peak resident memory', 'Time to test accuracy', 'Precision, attention kernel'):
        assert f'## {title}' in out

def test_parser():
    a = make_parser().parse_args([])
    assert (a.quick, a.sections, a.config) == (False, list(SECTIONS), [])
    with pytest.raises(SystemExit): make_parser().parse_args(['--sections', 'speed'])

def test_long_recipe_file():
    "The long recipe of the README is a valid config file: shift augmentation, more epochs than the defaults."
    cfg = TrainConfig.load(ROOT/'configs'/'digits_long.yaml')
    assert cfg.data == 'digits' and cfg.augment and cfg.epochs > TrainConfig().epochs

def test_gpu_check_flop_count():
    "bench/gpu_check.py's FLOPs per training image: about 6 x parameters x tokens (2 forward, 4 backward) for a ViT."
    sys.path.insert(0, str(ROOT/'bench'))
    try: from gpu_check import train_flops_per_image
    finally: sys.path.pop(0)
    import torch
    from vit_nb.model import ViT, vit_config
    torch.manual_seed(0)
    m = ViT(vit_config('digits'))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    tokens = (8 // m.cfg.patch_size) ** 2 + 1
    dense = sum(p.numel() for n, p in m.named_parameters() if n.startswith('blocks') and p.ndim == 2)
    f = train_flops_per_image(m, x, y)
    assert 0.9 < f / (6 * dense * tokens) < 1.5, f
    assert all(p.grad is None for p in m.parameters())  # it leaves no gradients behind
