"README.md is kept in step with nbs/index.ipynb, and CI runs README's own commands."
import subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def test_readme_matches_index():
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'make_readme.py'), '--check'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

def test_readme_has_the_two_commands():
    text = (ROOT/'README.md').read_text()
    for marker in ('<!-- main-command -->', '<!-- test-command -->'):
        block = text.split(marker, 1)[1].split('```')[1]
        assert 'constraints.txt' in block, f"{marker} command does not pass constraints.txt to pip"
    assert 'nbdev_test' in text.split('<!-- test-command -->', 1)[1].split('```')[1]
    assert 'vit_nb_train' in text.split('<!-- main-command -->', 1)[1].split('```')[1]
