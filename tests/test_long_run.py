"""A long run under load (marked slow: `pytest tests -m slow`): the digits recipe for many epochs, checkpointing as it
goes, keeps its resident memory flat from epoch to epoch and its history complete."""
import json, os, subprocess, sys, textwrap
from pathlib import Path
import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = int(os.environ.get('VIT_NB_LONG_EPOCHS', 100))

CHILD = textwrap.dedent('''
    import json, sys, torch
    from vit_nb.config import TrainConfig
    from vit_nb.loop import Callback, TrainingLoop

    def rss_mb():
        "Resident memory of this process (VmRSS in /proc/self/status), in MiB."
        for line in open('/proc/self/status'):
            if line.startswith('VmRSS:'): return int(line.split()[1]) / 1024

    class Memory(Callback):
        "Add the resident memory at the end of each epoch to the epoch's metrics."
        order = 0  # after Recorder has filled epoch_metrics, before the logger and checkpoint callbacks
        def after_epoch(self, loop): loop.epoch_metrics['rss_mb'] = rss_mb()

    out, epochs = sys.argv[1], int(sys.argv[2])
    cfg = TrainConfig(data='digits', epochs=epochs, out_dir=out, keep_last=2, device='cpu')
    loop = TrainingLoop.from_config(cfg, cbs=[Memory()], progress=False, verbose=False)
    loop.fit()
    json.dump(dict(n_batches=loop.n_batches, steps=len(loop.history.steps), epochs=len(loop.history.epochs),
                   rss=[e['rss_mb'] for e in loop.history.epochs], valid_acc=loop.history.epochs[-1]['valid_acc']),
              open(f"{out}/summary.json", 'w'))
''')

@pytest.mark.slow
def test_long_run_memory_flat_history_complete(tmp_path):
    (tmp_path/'child.py').write_text(CHILD)
    env = {**os.environ, 'PYTHONPATH': f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, str(tmp_path/'child.py'), str(tmp_path/'run'), str(EPOCHS)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path/'run'/'summary.json').read_text())
    # the history is complete: every epoch and every batch, in memory and in the CSV logs
    assert (s['epochs'], s['steps']) == (EPOCHS, EPOCHS * s['n_batches'])
    steps, hist = pd.read_csv(tmp_path/'run'/'steps.csv'), pd.read_csv(tmp_path/'run'/'history.csv')
    assert steps['iter'].tolist() == list(range(EPOCHS * s['n_batches'])) and hist['epoch'].tolist() == list(range(EPOCHS))
    assert steps['loss'].notna().all() and hist['rss_mb'].notna().all()
    # memory is flat after the first epochs (allocator and caches warm up): no trend, no drift beyond noise
    rss = np.array(s['rss'])
    warm = rss[len(rss) // 10:]
    slope = np.polyfit(np.arange(len(warm)), warm, 1)[0]  # MiB per epoch
    print(f"\nRSS over {EPOCHS} epochs: first {rss[0]:.1f} MiB, after warm-up {warm[0]:.1f} MiB, last {rss[-1]:.1f} MiB, "
          f"max {rss.max():.1f} MiB; trend {slope * 1024:.1f} KiB/epoch; final valid_acc {s['valid_acc']:.4f}")
    fifth = max(1, len(warm) // 5)
    assert warm.max() - warm.min() < 32, warm
    assert warm[-fifth:].mean() - warm[:fifth].mean() < 16, warm  # MiB; a leak of one batch per step would be ~30
    assert slope * len(warm) < 16, f"resident memory grows by {slope * 1024:.0f} KiB per epoch"
